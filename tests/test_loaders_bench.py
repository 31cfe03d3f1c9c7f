"""benchmarks/loaders.py --quick end to end: picstream and every peer loader installed here (the `loaders`
extra; all of them when `CI` is set, which runs the local rows) pack the ImageNet sample and deliver full uint8 batches of 224 px
crops, from local disk and (picstream, webdataset) from an HTTP server on 127.0.0.1, and of the multi-crop
recipe (1×160 + 3×96). Not a speed test: the numbers live in benchmarks/README.md."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, require, shared_data_dir

SCRIPT = REPO_ROOT / "benchmarks" / "loaders.py"
LOCAL = ("picstream-roi", "litdata", "mosaic", "webdataset", "ffcv", "dali")
HTTP = {"picstream-http", "webdataset-http"}
MULTI = {"picstream-multicrop", "litdata-multicrop", "mosaic-multicrop", "webdataset-multicrop", "ffcv-multicrop",
         "dali-multicrop"}
CHW, HWC = "(64, 3, {0}, {0}) uint8", "(64, {0}, {0}, 3) uint8"   # torch's layout; FFCV's and DALI's


def expected_shapes(name: str) -> set[str]:
    """One 224 px batch, or the multi-crop recipe's 1×160 + 3×96, in either layout."""
    sizes = (160, 96, 96, 96) if name in MULTI else (224,)
    return {" + ".join(layout.format(s) for s in sizes) for layout in (CHW, HWC)}


def quick_run(tmp_path, only: str | None = None) -> dict:
    """benchmarks/loaders.py --quick (with ``--only``: those loaders and the picstream rows they are
    compared with) in a subprocess; its JSON report."""
    data = shared_data_dir()
    if not (data / "imagenet-sample-1000.tar").exists():
        pytest.skip(f"data set not found in {data}")
    report = tmp_path / "loaders.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--data", str(data), "--json", str(report),
                           *(["--only", only] if only else [])], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("RESULT: picstream WindowLoader img/s ")
    out = json.loads(report.read_text())
    if os.environ.get("CI"):
        assert out["missing"] == {}
    for name, r in out["results"].items():
        assert r["batches"] == r["expected_batches"] == 5, name   # the first batch + 256 timed images
        assert len(r["shapes"]) == 1 and r["shapes"][0] in expected_shapes(name), (name, r["shapes"])
        assert r["img_s"] > 0 and r["img_s_core"] > 0 and r["peak_pss_mb"] > 0, name
    return out


@pytest.mark.slow
def test_quick_run_delivers_every_peers_batches_from_local_disk(tmp_path):
    """Every peer loader once, from local disk (CI runs these 7 of the 15 rows; the HTTP and multi-crop rows
    are `make test-loaders`)."""
    require("litdata")
    out = quick_run(tmp_path, ",".join(LOCAL))
    assert set(out["results"]) | set(out["missing"]) == {"picstream", *LOCAL}


@pytest.mark.slow
@pytest.mark.loaders
def test_quick_run_delivers_every_loaders_batches(tmp_path):
    out = quick_run(tmp_path)
    assert set(out["results"]) | set(out["missing"]) == {"picstream", *LOCAL} | HTTP | MULTI
