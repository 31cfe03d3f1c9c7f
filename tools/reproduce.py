#!/usr/bin/env python
"""Run the paper's ablation grids and write docs/results.md with plots; see `--help`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from picstream.reproduce.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
