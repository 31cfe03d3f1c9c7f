"""benchmarks/peers.py --quick: one lightly peer (SimCLR) and PIC trained on the same shards, k-NN for both."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


@pytest.mark.slow
def test_quick_peer_run_beside_pic(tmp_path, shapes_shards):
    require("lightly")
    train, val = shapes_shards
    cmd = [sys.executable, str(SCRIPT), "--quick", "--seeds", "0", "--train", str(train), "--val", str(val),
           "--out", str(tmp_path), "--records", str(tmp_path / "records")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT: k-NN top-1, PIC ") and "simclr (epochs)" in last and "x PIC)" in last
    peer = json.loads((tmp_path / "smoke" / "peers" / "simclr-epochs-s0.json").read_text())
    pic = json.loads((tmp_path / "smoke" / "peers" / "pic-s0" / "result.json").read_text())
    assert peer["steps"] == 1 and peer["train_cpu_s"] > 0 and 0 <= peer["top1"] <= 100
    assert pic["top1"] == peer["pic_top1"] and pic["train_cpu_s"] > 0
    recorded = tmp_path / "records" / "smoke" / "peers"
    assert json.loads((recorded / "simclr-epochs-s0.json").read_text()) == peer
    assert json.loads((recorded / "pic-s0" / "result.json").read_text()) == pic
