#!/usr/bin/env python
"""Pack an image corpus into picstream shards; see `--help` and shards/README.md."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from picstream.shards.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
