"""Run under torchrun as ``sync_runner.py RUN_DIR OUT``: count each rank's host syncs per
steady-state step (tests/test_sync_free.py) into ``OUT.rank<r>.json`` (the syncs' sites per step)."""
import json
import os
import sys
from pathlib import Path

from test_sync_free import syncs_per_step

counts = syncs_per_step(Path(sys.argv[1]))
Path(f"{sys.argv[2]}.rank{os.environ['RANK']}.json").write_text(
    json.dumps([sorted(f"{kind} at {site}: {n}" for (kind, site), n in c.sites.items()) for c in counts]))
