"""benchmarks/gpu_check.py --smoke: every section of the GPU check runs (toy sizes, CPU), so the
script is ready when a device is lent; its first check (overlap off vs on, bit for bit) passes; a
failing section is reported and the others still run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, shared_data_dir

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def run_check(*args: str, data: Path) -> subprocess.CompletedProcess:
    # one torch thread: the CI machine is small and shared (spinning OpenMP threads crawl)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--data", str(data), *args],
                          capture_output=True, text=True, env=env, timeout=900)


def sections(out: Path) -> dict[int, dict]:
    report = json.loads((out / "gpu_check.json").read_text())
    return {s["number"]: s for s in report["sections"]}


@pytest.mark.slow
def test_smoke_runs_every_section(tmp_path):
    data = shared_data_dir()
    if not (data / "cifar10-jpeg.tar.gz").exists() or not (data / "imagenet-sample-1000.tar").exists():
        pytest.skip(f"data sets not found in {data}")
    out = tmp_path / "out"
    result = run_check("--out", str(out), data=data)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("RESULT: ")
    secs = sections(out)
    assert {n: s["status"] for n, s in secs.items()} == dict.fromkeys(range(1, 6), "ok")

    assert secs[1]["summary"]["device used"] == "cpu"
    assert secs[1]["summary"]["overlap"]["verdict"] == "identical"
    ceiling = secs[2]["summary"]
    assert all(ceiling[k]["img_s"] > 0 and ceiling[k]["steps"] == 2
               for k in ("none", "recent", "recent_off", "full", "vit_none", "vit_recent"))
    memory = secs[3]["summary"]
    assert [r["rows"] for r in memory["recent"]] == [10**5, 1_281_167, 7_469_000, 10**8, 10**9]
    # on CPU the figure is the classifier's tensors: K rows whatever N, N rows for the full one
    assert memory["max_over_min"] == 1.0
    assert memory["full"][1]["peak_bytes"] == 4 * memory["full"][0]["peak_bytes"]
    loader = secs[4]["summary"]
    assert loader["images"] == 3 * 8 and 0 <= loader["starved"] <= 1
    quality = secs[5]["summary"]
    assert quality["epochs_trained"] > 0
    assert 0 <= quality["knn_top1_random"] <= 100 and 0 <= quality["knn_top1"] <= 100

    table = (out / "gpu_check.md").read_text()
    assert "| check | measured | goal |" in table and "### 5. Quality" in table


def test_overlap_is_checked_first_and_identical(tmp_path):
    """Section 1 runs the same steps with classifier.overlap off and on; on this CPU they must agree
    bit for bit, with rows really written back to the store in between."""
    out = tmp_path / "out"
    result = run_check("--out", str(out), "--sections", "1", data=tmp_path / "no-data")
    assert result.returncode == 0, result.stderr[-3000:]
    overlap = sections(out)[1]["summary"]["overlap"]
    assert overlap["verdict"] == "identical" and overlap["steps"] == 6 and overlap["rows_written"] > 0
    assert result.stdout.strip().splitlines()[-1].startswith("RESULT: none (CPU only): overlap identical;")
    assert "| overlap off vs on: losses and rows (1) | identical | identical |" in (out / "gpu_check.md").read_text()


def test_failing_section_is_reported_and_the_rest_runs(tmp_path):
    out = tmp_path / "out"
    result = run_check("--out", str(out), "--sections", "4", data=tmp_path / "no-data")
    assert result.returncode == 1
    secs = sections(out)
    assert secs[1]["status"] == "ok"
    assert secs[4]["status"].startswith("failed: FileNotFoundError")
    assert secs[2]["status"] == "not selected"
    assert "failed: FileNotFoundError" in (out / "gpu_check.md").read_text()
    assert result.stdout.strip().splitlines()[-1].startswith("RESULT: ")


@pytest.mark.parametrize("args, message", [
    (["--budget-s", "0"], "--budget-s must be > 0"),
    (["--sections", "2,7"], "--sections takes numbers from 1 to 5"),
])
def test_bad_arguments_are_one_clear_error(tmp_path, args, message):
    result = run_check("--out", str(tmp_path), *args, data=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: ") and message in lines[0]
