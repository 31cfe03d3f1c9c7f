"""tools/reproduce.py end to end on the smallest grid: runs, resume-or-skip, the page and its plots.

Asserts nothing about accuracy (tests/test_learning.py does): only that every run trained, was
evaluated, and shows up in the page with its plots.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from picstream.reproduce.report import verdict

TOOL = Path(__file__).resolve().parents[1] / "tools" / "reproduce.py"


def test_verdict_says_when_seeds_do_not_separate():
    assert verdict([40.0, 41.0], [30.0, 31.0]).startswith("holds: +10.0 points, each of 2 seeds")
    assert "inside the seed noise" in verdict([40.0, 35.0], [38.0, 36.0])
    assert verdict([30.0, 31.0], [40.0, 41.0]).startswith("reversed")
    assert "no estimate of the seed noise" in verdict([40.0], [30.0])


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
    assert [p.parent.name for p in results] == ["cosine-s1", "plain-s1"]
    for p in results:
        result = json.loads(p.read_text())
        assert 0 <= result["top1"] <= 100 and Path(result["config"]).exists()
        assert any("knn_top1" in line for line in (p.parent / "metrics.jsonl").read_text().splitlines())
    text = page.read_text()
    assert "## Table 1: cosine vs plain softmax" in text and "| 66.2 |" in text and "| 46.5 |" in text
    assert "Not run yet at this scale: table2, table4, multicrop" in text
    assert "cosine > plain" in text and "## Table 2" not in text and "(s1)" in text and "--seeds 1" in text
    for png in ("table1-knn.png", "table1-curves.png"):
        assert f"](results/{png})" in text
        assert (page.parent / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (page.parent / "results" / "configs" / "table1-cosine.yaml").exists()

    # a second call trains nothing again (every run has its result) and rewrites the same page
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "seed" not in again.stdout.replace("seeds", ""), again.stdout
    assert page.read_text() == text


def test_missing_data_is_one_clear_error(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--scale", "smoke", "--cifar10", str(tmp_path / "none"),
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"reproduce: error: CIFAR-10 not found at {tmp_path / 'none'}: "
                                                "give --cifar10"]
