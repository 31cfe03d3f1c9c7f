"""benchmarks/loaders.py --quick end to end: picstream and every peer loader installed here (the `loaders`
extra; all of them when `CI` is set) pack the ImageNet sample and deliver full uint8 batches of 224 px
crops, from local disk and (picstream, webdataset) from an HTTP server on 127.0.0.1, and of the multi-crop
recipe (1×160 + 3×96). Not a speed test: the numbers live in benchmarks/README.md."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, shared_data_dir

SCRIPT = REPO_ROOT / "benchmarks" / "loaders.py"
HTTP = {"picstream-http", "webdataset-http"}
MULTI = {"picstream-multicrop", "litdata-multicrop", "mosaic-multicrop", "webdataset-multicrop", "ffcv-multicrop",
         "dali-multicrop"}
CHW, HWC = "(64, 3, {0}, {0}) uint8", "(64, {0}, {0}, 3) uint8"   # torch's layout; FFCV's and DALI's


def expected_shapes(name: str) -> set[str]:
    """One 224 px batch, or the multi-crop recipe's 1×160 + 3×96, in either layout."""
    sizes = (160, 96, 96, 96) if name in MULTI else (224,)
    return {" + ".join(layout.format(s) for s in sizes) for layout in (CHW, HWC)}


@pytest.mark.slow
@pytest.mark.loaders
def test_quick_run_delivers_every_loaders_batches(tmp_path):
    data = shared_data_dir()
    if not (data / "imagenet-sample-1000.tar").exists():
        pytest.skip(f"data set not found in {data}")
    report = tmp_path / "loaders.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--data", str(data), "--json", str(report)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("RESULT: picstream WindowLoader img/s ")
    out = json.loads(report.read_text())
    if os.environ.get("CI"):
        assert out["missing"] == {}
    assert set(out["results"]) | set(out["missing"]) == {"picstream", "picstream-roi", "litdata", "mosaic",
                                                          "webdataset", "ffcv", "dali"} | HTTP | MULTI
    for name, r in out["results"].items():
        assert r["batches"] == r["expected_batches"] == 5, name   # the first batch + 256 timed images
        assert len(r["shapes"]) == 1 and r["shapes"][0] in expected_shapes(name), (name, r["shapes"])
        assert r["img_s"] > 0 and r["img_s_core"] > 0 and r["peak_pss_mb"] > 0, name
