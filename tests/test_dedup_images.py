"""make_shards' duplicate removal and decontamination on real images (ImageNet and CIFAR-10 samples) with
known copies: precision and recall per transformation, the eval sets, the phases on Dask, re-runs."""
from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

from picstream.copies import TRANSFORMS, score, write_copies
from picstream.shards import ShardSet, make_shards
from picstream.shards.build import plan_shards
from picstream.shards.finalize import finalize
from picstream.shards.hashing import HASH_PREFIX
from picstream.shards.hygiene import Hygiene
from picstream.shards.pack import pack

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


def skipped(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["skipped"]


@pytest.fixture(scope="module")
def copies(imagenet_sample_dir, cifar10_dir, tmp_path_factory):
    """30 ImageNet + 30 CIFAR-10 originals with one copy per transformation, among 600 distinct images."""
    inet = sorted(imagenet_sample_dir.iterdir())
    cifar = sorted((cifar10_dir / "train").rglob("*.jpg"))[::40]
    folder = tmp_path_factory.mktemp("copies") / "src"
    truth = write_copies(inet[:30] + cifar[:30], inet[30:330] + cifar[30:330], folder)
    return folder, truth


@pytest.fixture(scope="module")
def near_table(copies, tmp_path_factory):
    folder, truth = copies
    out = tmp_path_factory.mktemp("near") / "o"
    summary = make_shards(folder, out, shard_size=64, progress=False, hygiene=Hygiene("near"))
    assert summary.packed + summary.skipped == len(truth)
    return score(skipped(out), truth), summary


def test_near_recall_and_precision_per_transformation(near_table):
    table, summary = near_table
    for t in ("bytes", "png", "jpeg-q50", "jpeg-q95", "half", "up", "colour", "flip"):
        assert table[t]["recall"] >= 0.95, (t, table[t])
    removed = sum(row["removed"] for row in table.values())
    right = sum(row["removed"] * row["precision"] for row in table.values() if row["removed"])
    assert removed > 400 and right / removed >= 0.99, table
    assert table["up"]["removed"] == 0  # the largest copy is the one kept
    assert table["distinct"]["removed"] <= 3, table["distinct"]  # real near-duplicates among the samples
    assert summary.reasons["near-duplicate"] > summary.reasons["duplicate"] > 0


def test_exact_mode_removes_only_identical_pictures(copies, tmp_path):
    folder, truth = copies
    summary = make_shards(folder, tmp_path / "o", shard_size=64, progress=False)  # the default: exact
    recs = skipped(tmp_path / "o")
    table = score(recs, truth)
    assert table["bytes"]["recall"] == table["png"]["recall"] == 1.0
    assert all(table[t]["removed"] == 0 for t in ("jpeg-q50", "half", "colour", "flip", "distinct"))
    assert {r["reason"] for r in recs} == {"duplicate"} and summary.reasons == {"duplicate": len(recs)}
    assert {r["detail"] for r in recs} == {"identical bytes", "identical pixels"}
    ss = ShardSet.open(tmp_path / "o")
    assert len(ss) + len(recs) == len(truth) and ss.verify() == []


@pytest.fixture(scope="module")
def leaky(cifar10_dir, tmp_path_factory):
    """An eval split (100 CIFAR-10 test images) and a training corpus of 200 training images plus copies
    of 20 eval images (byte copies, re-encodes, PNG, mirror images)."""
    root = tmp_path_factory.mktemp("leaky")
    test = sorted((cifar10_dir / "test").rglob("*.jpg"))[::50][:100]
    (root / "eval").mkdir()
    for k, p in enumerate(test):
        shutil.copy(p, root / "eval" / f"v{k:03d}.jpg")
    train = root / "train"
    write_copies([], sorted((cifar10_dir / "train").rglob("*.jpg"))[::150][:200], train)
    leaks = {}
    for k in range(0, 100, 5):
        data = (root / "eval" / f"v{k:03d}.jpg").read_bytes()
        t = ("bytes", "jpeg-q95", "png", "flip")[k % 4]
        name = f"leak{k:03d}.{'png' if t == 'png' else 'jpg'}"
        (train / name).write_bytes(TRANSFORMS[t][1](data))
        leaks[name] = f"v{k:03d}.jpg"
    return root, leaks


def test_decontamination_removes_exactly_the_eval_copies(leaky, tmp_path):
    root, leaks = leaky
    evals = str(root / "eval")
    make_shards(root / "train", tmp_path / "o", shard_size=SIZE, progress=False,
                hygiene=Hygiene("none", evals=(evals,)))
    recs = skipped(tmp_path / "o")
    assert {r["input"]: r["match"] for r in recs} == leaks
    assert {r["reason"] for r in recs} == {f"contaminates {evals}"}
    # an eval shard set works the same (its tars are read as a webdataset)
    make_shards(root / "eval", tmp_path / "eval-shards", shard_size=SIZE, progress=False)
    make_shards(root / "train", tmp_path / "o2", shard_size=SIZE, progress=False,
                hygiene=Hygiene("exact", evals=(str(tmp_path / "eval-shards"),)))
    assert sorted(r["input"] for r in skipped(tmp_path / "o2")) == sorted(leaks)


def phased(src, out, client=None, **kw):
    plan = plan_shards(src, out, shard_size=SIZE, seed=3, spare=1.0, client=client, **kw)[0]
    pack(str(out))
    finalize(str(out))
    return plan


def test_dask_hash_pass_gives_the_same_shards(leaky, tmp_path):
    require("distributed")
    from picstream.shards.cluster import dask_client
    root, leaks = leaky
    hygiene = Hygiene("near", evals=(str(root / "eval"),))
    one = phased(root / "train", tmp_path / "one", hygiene=hygiene, workers=2)
    with dask_client("local:2") as client:
        dask = phased(root / "train", tmp_path / "dask", client=client, hygiene=hygiene)
    assert one.units > 2 and one.removed == dask.removed and one.removed[f"contaminates {root / 'eval'}"] == 20
    for name in ["manifest.json"] + [f"shard-{k:06d}.tar" for k in range(one.units)]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()


def test_plan_resumes_from_its_hash_files(leaky, tmp_path):
    root, _ = leaky
    hygiene = Hygiene("near", evals=(str(root / "eval"),))
    phased(root / "train", tmp_path / "a", hygiene=hygiene)
    out = tmp_path / "b"
    plan_shards(root / "train", out, shard_size=SIZE, seed=3, spare=1.0, hygiene=hygiene)
    hashes = sorted((out / "plan").glob("hashes-*"))
    assert len(hashes) > 3
    (out / "plan" / "plan.json").unlink()  # as if killed before the plan was finished
    hashes[1].unlink()
    kept = {p: p.stat().st_mtime_ns for p in hashes[2:]}
    phased(root / "train", out, hygiene=hygiene)
    assert {p: p.stat().st_mtime_ns for p in hashes[2:]} == kept and hashes[1].exists()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def test_hash_files_of_the_former_hash_are_not_read(leaky, tmp_path):
    root, _ = leaky
    hygiene = Hygiene("near", evals=(str(root / "eval"),))
    phased(root / "train", tmp_path / "a", hygiene=hygiene)
    out = tmp_path / "b"
    plan_shards(root / "train", out, shard_size=SIZE, seed=3, spare=1.0, hygiene=hygiene)
    (out / "plan" / "plan.json").unlink()  # as if a plan of the former 64-bit hash had been killed
    for path in (out / "plan").glob(HASH_PREFIX + "*"):
        records = [h and dataclasses.replace(h, phash=0) for h in pickle.loads(path.read_bytes())]
        (out / "plan" / ("hashes-" + path.name[len(HASH_PREFIX):])).write_bytes(pickle.dumps(records))
        path.unlink()  # if read, these records would make every input a copy of every other
    phased(root / "train", out, hygiene=hygiene)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_cli_dedup_options(leaky, tmp_path):
    root, leaks = leaky
    r = run_cli(root / "train", tmp_path / "o", "--near-threshold", 40)
    assert r.returncode == 2 and r.stderr == "make_shards: error: --near-threshold must be in [0, 32], got 40\n"
    r = run_cli("plan", root / "train", tmp_path / "p", "--shard-size", SIZE, "--spare", 1, "--dedup", "near",
                "--decontaminate", root / "eval")
    assert r.returncode == 0, r.stderr
    assert f"({len(leaks)} removed as copies [{len(leaks)} contaminates {root / 'eval'}])" in r.stderr
    assert run_cli("pack", tmp_path / "p", "--quiet").returncode == 0
    r = run_cli("finalize", tmp_path / "p")
    assert r.returncode == 0 and f"{len(leaks)} contaminates" in r.stderr, r.stderr
