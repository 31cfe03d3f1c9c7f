"""Shards, training, verification and the row store on S3: a real local endpoint (moto's server) through
s3fs, the same code paths a bucket on AWS takes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest

from picstream import iopoints
from picstream.rowstore import RowStore, StoreError, StoreNotFound

from picstream.loader.cache import cache_name, matches_record
from picstream.shards import ShardSet
from picstream.synthetic import write_corpus

from test_train import losses, train_cmd

REPO = Path(__file__).resolve().parents[1]


def test_the_local_endpoint_is_s3(s3):
    fs = fsspec.filesystem("s3")
    fs.pipe(f"{s3}/a/b", b"hello")
    assert fs.cat(f"{s3}/a/b") == b"hello" and fs.ls(f"{s3}/a") == [f"{s3[5:]}/a/b"]


def make_shards_cli(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def wds_tars(tmp_path_factory) -> Path:
    """Two webdataset tars of 48 generated labeled images (8 shape classes)."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("wds")
    images = sorted(write_corpus(root / "images", 6, seed=0).rglob("*.jpg"))
    for t in range(2):
        with wds.TarWriter(str(root / f"{t:05d}.tar")) as w:
            for path in images[t::2]:
                w.write({"__key__": f"{path.parent.name}-{path.stem}", "jpg": path.read_bytes(),
                         "cls": sorted(p.name for p in (root / "images").iterdir()).index(path.parent.name)})
    return root


def upload_tars(wds_tars: Path, bucket: str) -> str:
    fs = fsspec.filesystem("s3")
    for tar in sorted(wds_tars.glob("*.tar")):
        fs.put_file(str(tar), f"{bucket}/wds/{tar.name}")
    return f"{bucket}/wds/{{00000..00001}}.tar"


SHARDS = ("--shard-size", 16, "--seed", 3, "--quiet")


def shard_objects(prefix: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: fs.cat(p) for p in fs.find(prefix) if p.endswith((".tar", ".idx"))}


@pytest.fixture(scope="module")
def s3_shards(s3, wds_tars, tmp_path_factory) -> tuple[str, Path]:
    """make_shards, one command, from the tars on S3 to shards on S3; and from the local tars to a local
    folder with the same options: (the S3 URL, the local folder)."""
    src = upload_tars(wds_tars, s3)
    result = make_shards_cli(src, f"{s3}/shards", *SHARDS)
    assert result.returncode == 0, result.stderr
    local = tmp_path_factory.mktemp("local") / "shards"
    result = make_shards_cli(wds_tars / "{00000..00001}.tar", local, *SHARDS)
    assert result.returncode == 0, result.stderr
    return f"{s3}/shards", local


def test_make_shards_from_s3_to_s3_equals_the_local_build(s3_shards):
    url, local = s3_shards
    ss = ShardSet.open(url)
    assert len(ss) == 48 and ss.verify() == []
    objects = shard_objects(url)
    assert len(objects) == 6 and objects == {p.name: p.read_bytes() for p in sorted(local.glob("shard-*"))
                                              if p.suffix in (".tar", ".idx")}
    fs = fsspec.filesystem("s3")
    assert not [p for p in fs.find(url) if p.endswith(".tmp")] and not fs.exists(f"{url}/plan")


@pytest.mark.slow
def test_phases_on_dask_equal_the_one_command_build_on_s3(s3, s3_shards):
    src = f"{s3}/wds/{{00000..00001}}.tar"
    for args in (("plan", src, f"{s3}/phased", "--shard-size", 16, "--seed", 3, "--spare", 1.0),
                 ("pack", f"{s3}/phased", "--shards", "0:1"),
                 ("pack", f"{s3}/phased", "--dask", "local:2"),
                 ("finalize", f"{s3}/phased")):
        result = make_shards_cli(*args, "--quiet")
        assert result.returncode == 0, (args, result.stderr)
    assert shard_objects(f"{s3}/phased") == shard_objects(s3_shards[0])
    assert ShardSet.open(f"{s3}/phased").verify() == []


def test_training_streams_s3_shards_with_the_row_store_on_s3_and_resumes(s3, s3_shards, tmp_path):
    """Shards from S3 through the verified cache and the row store on S3: the loss curve of the
    all-local run (5 steps); then a resume from the step-2 checkpoint (the store on S3 returns to its
    generation) repeats steps 2..4 exactly."""
    url, local = s3_shards
    on_s3 = (f"data.cache_dir={tmp_path / 'cache'}", f"classifier.store={s3}/rows/run.zarr")
    older = str(tmp_path / "s3" / "checkpoints" / "ckpt-000000002.pt")
    for name, manifest, extra in (("local", local / "manifest.json", ()),
                                  ("s3", f"{url}/manifest.json", on_s3),
                                  ("s3", f"{url}/manifest.json", (*on_s3, "--resume", older))):
        result = subprocess.run(train_cmd(tmp_path / name, manifest, "train.checkpoint_every=2", *extra),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    assert "moved 2 newer checkpoint(s) aside" in result.stderr and "at step 2" in result.stderr
    expected = losses(tmp_path / "local")
    assert len(expected) == 5 and losses(tmp_path / "s3") == expected  # steps 2..4 logged again
    assert fsspec.filesystem("s3").exists(f"{s3}/rows/run.zarr/rowstore.json")
    ss = ShardSet.open(url)
    entries = [tmp_path / "cache" / cache_name(ss.shard_record(k)) for k in range(ss.num_shards)]
    assert any(e.exists() for e in entries)
    assert all(matches_record(str(e), ss.shard_record(k)) for k, e in enumerate(entries) if e.exists())
    records = [json.loads(line) for line in (tmp_path / "s3" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped"] == 0 and records[-1]["retries"] == 0


def test_an_interrupted_creation_on_s3_is_no_store_and_is_replaced(s3):
    url = f"{s3}/interrupted/rows.zarr"

    def stop_at_head(kind: str, key: str) -> None:
        if key.endswith("rowstore.json"):
            raise KeyboardInterrupt

    iopoints.set_hook(stop_at_head)
    try:
        with pytest.raises(KeyboardInterrupt):
            RowStore.create(url, 50, 2, chunk_rows=10)
    finally:
        iopoints.set_hook(None)
    assert fsspec.filesystem("s3").exists(f"{url}/zarr.json")
    with pytest.raises(StoreNotFound, match="an interrupted creation"):
        RowStore.open(url)
    store = RowStore.create(url, 50, 2, chunk_rows=10)
    store.write([3], np.ones((1, 2), np.float32), np.zeros((1, 2), np.float32), 1)
    store.commit()
    with pytest.raises(StoreError, match="already exists"):
        RowStore.create(url, 50, 2, chunk_rows=10)
    assert RowStore.open(url).read([3])[0].tolist() == [[1, 1]]


def verify_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "picstream.verify", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=600)


def test_verify_checks_a_shard_set_on_s3(s3, s3_shards):
    url = s3_shards[0]
    good = verify_cli(url)
    assert good.returncode == 0, good.stderr
    fs = fsspec.filesystem("s3")
    fs.copy(url, f"{s3}/damaged", recursive=True)
    tar = bytearray(fs.cat(f"{s3}/damaged/shard-000001.tar"))
    tar[700] ^= 1
    fs.pipe(f"{s3}/damaged/shard-000001.tar", bytes(tar))
    bad = verify_cli(f"{s3}/damaged/manifest.json")
    assert bad.returncode == 1 and "shard-000001.tar" in bad.stdout and "shard-000000" not in bad.stdout


@pytest.mark.parametrize("key", ["run.output_dir", "data.cache_dir"])
def test_run_and_cache_folders_on_s3_are_one_line_refusals(s3, s3_shards, tmp_path, key):
    result = subprocess.run(train_cmd(tmp_path / "run", f"{s3_shards[0]}/manifest.json", f"{key}={s3}/run"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"picstream-train: error: config key '{key}' must be a local or shared POSIX folder, not a URL "
        f"({s3}/run): " + ("the run lock and the checkpoints' renames" if key == "run.output_dir"
                           else "the verified entries' renames") + " need one"]
    assert not fsspec.filesystem("s3").exists(f"{s3}/run") and not (tmp_path / "run").exists()


def test_missing_buckets_are_one_line_errors_and_nothing_is_created(s3, wds_tars, tmp_path):
    fs = fsspec.filesystem("s3")
    out = make_shards_cli(wds_tars / "00000.tar", "s3://no-such-bucket/shards", "--quiet")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "make_shards: error: s3://no-such-bucket/shards: bucket no-such-bucket does not exist "
        "(make_shards does not create buckets)"]
    src = make_shards_cli("s3://no-such-bucket/wds/{00000..00001}.tar", f"{s3}/never", "--quiet")
    assert src.returncode == 2 and src.stderr.strip().splitlines() == [
        "make_shards: error: no .tar files found in s3://no-such-bucket/wds/{00000..00001}.tar"]
    train = subprocess.run(train_cmd(tmp_path / "run", "s3://no-such-bucket/shards/manifest.json"),
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 2 and len(train.stderr.strip().splitlines()) == 1, train.stderr
    assert train.stderr.startswith("picstream-train: error: ") and "no-such-bucket" in train.stderr
    fs.invalidate_cache()
    assert not fs.exists("no-such-bucket") and not fs.exists(f"{s3}/never") and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_training_through_a_faulty_s3_endpoint_equals_local(s3_server, s3_shards, tmp_path):
    """503 SlowDown, 500 InternalError and connection resets on the shards' and the row store's
    requests: the first request of each method on every shard-set object (the three kinds in turn),
    and about 30% of the others (seeded, at most 3 per method and object): the same loss curve as
    the all-local run, nothing skipped. The shards' reads have s3fs's and botocore's own retries off:
    picstream's RetryPolicy retries them and the metrics count them, never more than the shards'
    faults (the row store's are botocore's, uncounted). The faults planned on the manifest, which
    the trainer reads first, make the count positive whichever process sends which request."""
    from s3_server import FaultyProxy

    url, local = s3_shards
    result = subprocess.run(train_cmd(tmp_path / "local", local / "manifest.json"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    shards = url.removeprefix("s3://")   # bucket/shards
    proxy = FaultyProxy(s3_server, tmp_path / "served.log", seed=2, rate=0.3,
                        planned_prefix=shards.split("/", 1)[1] + "/")
    try:
        result = subprocess.run(
            train_cmd(tmp_path / "faulty", f"{url}/manifest.json", f"data.cache_dir={tmp_path / 'cache'}",
                      f"classifier.store={url.rsplit('/', 1)[0]}/faulty-rows.zarr"),
            capture_output=True, text=True, timeout=600, env={**os.environ, **proxy.env})
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert losses(tmp_path / "faulty") == losses(tmp_path / "local")
    served = proxy.served()
    faults = {kind for _, kind in served if kind != "ok"}
    assert faults == {"503", "500", "reset"}
    shard_faults = sum(kind != "ok" for key, kind in served if f":/{shards}/" in key)
    records = [json.loads(line) for line in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped"] == 0
    assert records[-1]["retries"] > 0, "the faults were retried where the metrics cannot see them"
    assert records[-1]["retries"] <= shard_faults
    by_read = records[-1]["retries_by_read"]
    assert "manifest" in by_read and set(by_read) <= {"manifest", "records", "index", "shard", "range"}
