"""Shared fixtures: the read-only data sets beside the repository, extracted once per session."""
from __future__ import annotations

import importlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Where the read-only data sets live (`PICSTREAM_SHARED_DATA` overrides `../shared/data`)."""
    return Path(os.environ.get("PICSTREAM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require(module: str):
    """Import an optional dependency; skip when it is missing, except in CI (`CI` set), where it must run."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed (see the extras in pyproject.toml)")


@pytest.fixture(autouse=True)
def _own_temp_dir(tmp_path_factory, monkeypatch):
    """Each test's temporary files (the row stores, caches and plan scratch that picstream keeps in the
    temp dir, its own and its subprocesses') go to a directory removed after the test: a process a test
    kills cannot clean up after itself, and a whole suite of such leftovers fills a CI machine's /tmp."""
    path = tempfile.mkdtemp(prefix="t", dir=tmp_path_factory.getbasetemp())
    monkeypatch.setenv("TMPDIR", path)
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield
    shutil.rmtree(path, ignore_errors=True)


def _extract(archive: Path, dest: Path) -> Path:
    if not archive.exists():
        pytest.skip(f"data set not found: {archive}")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """CIFAR-10 as JPEGs: `<dir>/train/<class>/NNNN.jpg` and `<dir>/test/<class>/NNNN.jpg`."""
    root = _extract(shared_data_dir() / "cifar10-jpeg.tar.gz", tmp_path_factory.mktemp("cifar"))
    return root / "cifar10"


@pytest.fixture(scope="session")
def imagenet_sample_dir(tmp_path_factory) -> Path:
    """1000 real ImageNet JPEGs in one folder."""
    root = _extract(shared_data_dir() / "imagenet-sample-1000.tar", tmp_path_factory.mktemp("inet"))
    return root / "imagenet-sample-1000"


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> tuple[Path, Path]:
    """A small generated labeled corpus (8 shape classes, 32 px), sharded: (train, val) manifests."""
    from picstream.shards import make_shards
    from picstream.synthetic import write_corpus

    root = tmp_path_factory.mktemp("shapes")
    manifests = []
    for split, per_class, seed in (("train", 40, 0), ("val", 10, 1)):
        images = write_corpus(root / "images" / split, per_class, seed=seed)
        make_shards(str(images), str(root / split), shard_size=64, seed=seed, progress=False)
        manifests.append(root / split / "manifest.json")
    return manifests[0], manifests[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (tests/s3_server.py), one per test session."""
    require("s3fs")
    require("moto")
    from s3_server import MotoServer

    server = MotoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def s3(s3_server) -> str:
    """A fresh bucket on the local S3 server for a test module; returns ``s3://<bucket>``. The endpoint
    and the fake credentials are in this module's environment only (subprocesses inherit them)."""
    import s3fs
    from s3_server import new_bucket

    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.env.items():
            env.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield f"s3://{new_bucket()}"
        s3fs.S3FileSystem.clear_instance_cache()
