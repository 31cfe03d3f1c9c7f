"""tools/reproduce.py end to end on the smallest grid: runs, resume-or-skip, the page and its plots.

Asserts nothing about accuracy (tests/test_learning.py does): only that every run trained, was
evaluated, and shows up in the page with its plots.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from picstream.reproduce.grids import Claim
from picstream.reproduce.report import verdict

TOOL = Path(__file__).resolve().parents[1] / "tools" / "reproduce.py"


def test_verdict_is_a_stated_test_on_at_least_3_seeds():
    claim, same = Claim("a", "b", "a beats b"), Claim("a", "b", "a matches b", same=True)
    assert verdict(claim, [40.0, 41.0, 42.0], [30.0, 31.0, 32.0]).startswith("**reproduced**: +10.0 points")
    assert verdict(claim, [30.0, 31.0, 32.0], [40.0, 41.0, 42.0]).startswith("**reversed**: -10.0 points")
    overlap = verdict(claim, [40.0, 35.0, 38.0], [38.0, 36.0, 37.0])
    assert overlap.startswith("**no effect detectable at this power (smallest detectable ≈ ") and "p = 0.7" in overlap
    assert verdict(same, [40.0, 35.0, 38.0], [38.0, 36.0, 37.0]).startswith("**reproduced: no difference detectable")
    assert verdict(same, [40.0, 41.0, 42.0], [30.0, 31.0, 32.0]).startswith("**not reproduced: they differ**")
    assert "fewer than 3 seeds a side, no verdict" in verdict(claim, [40.0, 41.0], [30.0, 31.0, 32.0])


@pytest.mark.slow
def test_table1_smoke_grid_writes_page_and_plots(tmp_path, shapes_shards):
    train, val = shapes_shards
    page = tmp_path / "docs" / "results.md"
    cmd = [sys.executable, str(TOOL), "--grid", "table1", "--scale", "smoke", "--seeds", "1",
           "--train", str(train), "--bank", str(train), "--val", str(val), "--out", str(tmp_path / "runs"),
           "--page", str(page)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted((tmp_path / "runs" / "smoke" / "table1").glob("*/result.json"))
    assert [p.parent.name for p in results] == ["cosine-lr-4-s1", "cosine-s1", "linear-head-s1", "plain-lr-4-s1",
                                                "plain-s1", "weak-aug-s1"]
    for p in results:
        result = json.loads(p.read_text())
        assert 0 <= result["top1"] <= 100 and (tmp_path / "runs" / result["config"]).exists()
        assert any("knn_top1" in line for line in (p.parent / "metrics.jsonl").read_text().splitlines())
    text = page.read_text()
    assert "## Table 1: cosine softmax, 2-layer head, strong augmentation" in text
    assert all(f"| {paper} |" in text for paper in ("66.2", "46.5", "60.5", "62.3"))
    assert "Not run yet at this scale: table2 (`python tools/reproduce.py --grid table2 --scale smoke" in text
    assert "cosine > plain" in text and "## Table 2" not in text and "(s1)" in text and "--seeds 1" in text
    for png in ("table1-knn.png", "table1-curves.png"):
        assert f"](results/{png})" in text
        assert (page.parent / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (page.parent / "results" / "configs" / "table1-cosine.yaml").exists()

    # a second call trains nothing again (every run has its result) and rewrites the same page
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "seed" not in again.stdout.replace("seeds", ""), again.stdout
    assert page.read_text() == text

    # on another machine (a fresh --out) the runs recorded beside the page are taken, not trained again
    records = page.parent / "results" / "runs"
    assert sorted(p.parent.name for p in records.glob("smoke/table1/*/result.json")) == [
        "cosine-lr-4-s1", "cosine-s1", "linear-head-s1", "plain-lr-4-s1", "plain-s1", "weak-aug-s1"]
    assert not list(records.rglob("*.pt")) and not list(records.rglob("*.zarr"))
    elsewhere = [*cmd[:cmd.index("--out") + 1], str(tmp_path / "elsewhere"), *cmd[cmd.index("--out") + 2:]]
    moved = subprocess.run(elsewhere, capture_output=True, text=True, timeout=300)
    assert moved.returncode == 0 and "seed" not in moved.stdout.replace("seeds", ""), moved.stdout
    assert "files of finished runs taken from" in moved.stdout
    assert page.read_text() == text


def test_missing_data_is_one_clear_error(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--scale", "smoke", "--cifar10", str(tmp_path / "none"),
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"reproduce: error: CIFAR-10 not found at {tmp_path / 'none'}: "
                                                "give --cifar10"]


@pytest.mark.slow
def test_a_diverged_run_is_recorded_not_retrained(tmp_path, shapes_shards):
    from picstream.reproduce.grids import SCALES, Grid, Variant
    from picstream.reproduce.report import _per_seed
    from picstream.reproduce.runner import DataSplits, run_variant

    train, val = shapes_shards
    explodes = Variant("explodes", ("optim.epochs=1", "classifier.loss=plain", "optim.base_lr=1e12"))
    grid = Grid("t", "t", "t", (explodes,), ())
    lines = []
    (tmp_path / "runs").mkdir()
    args = (grid, explodes, 0, SCALES["smoke"], DataSplits(train, train, val), tmp_path / "runs", 320, lines.append,
            tmp_path / "records")
    result = run_variant(*args)
    assert result["top1"] is None and result["train_cpu_s"] is None
    assert result["diverged"].startswith("the loss is ") and ";" not in result["diverged"], result["diverged"]
    assert "diverged: the loss is" in lines[-1]
    assert json.loads((tmp_path / "records" / "smoke" / "t" / "explodes-s0" / "result.json").read_text()) == result
    assert _per_seed([result]).startswith("diverged (") and _per_seed([result]).endswith("(s0)")
    lines.clear()
    assert run_variant(*args) == result and lines == []   # finished: not trained again
