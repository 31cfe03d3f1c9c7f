"""Every user error through the real `picstream-train` CLI: exit status 2, one line on stderr naming
the key or file, no traceback, nothing written to the run directory."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from picstream.shards.format import manifest_bytes

from test_train import train_cmd

pytestmark = pytest.mark.slow   # one interpreter start (torch import) per case


def broken_manifest(tmp: Path, good: Path, kind: str) -> Path:
    """A manifest as a new user might produce it: missing, truncated, empty, foreign, inconsistent (with a
    digest that matches, as a tool that writes it would give), or damaged on disk (one changed digit)."""
    path = tmp / "shards" / "manifest.json"
    path.parent.mkdir()
    text = good.read_text()
    manifest = json.loads(text)
    if kind == "truncated":
        path.write_text(text[:len(text) // 2])
    elif kind == "empty":
        path.write_text("")
    elif kind == "version":
        path.write_bytes(manifest_bytes({**manifest, "version": 99}))
    elif kind == "format":
        path.write_text(json.dumps({"format": "webdataset", "shards": []}))
    elif kind == "list":
        path.write_text("[1, 2, 3]")
    elif kind == "more_samples":
        path.write_bytes(manifest_bytes({**manifest, "num_samples": manifest["num_samples"] + 10}))
    elif kind == "damaged":
        path.write_text(text.replace('"count": 64', '"count": 65', 1))
    return path


# (case, how to build the command's extra arguments, a phrase the error line must contain)
MANIFEST_CASES = [
    ("missing", "shard manifest not found"),
    ("truncated", "is not valid JSON"),
    ("empty", "is empty"),
    ("version", "shard format version 99 is not supported"),
    ("format", "not a picstream-shards manifest (format: 'webdataset')"),
    ("list", "not a picstream-shards manifest (format: 'list')"),
    ("more_samples", "it claims 330 samples but its shards hold 320"),
    ("damaged", "does not match its digest: it is damaged"),
]
OVERRIDE_CASES = [
    ("data.workers=-1", "config key 'data.workers' must be >= 0, got -1"),
    ("train.log_every=0", "config key 'train.log_every' must be > 0, got 0"),
    ("optim.epochs=.nan", "config key 'optim.epochs' must be a finite number, got nan"),
    ("model.head_hidden=0", "config key 'model.head_hidden' must be > 0, got 0"),
    ("train.max_steps=0", "config key 'train.max_steps' must be > 0, got 0"),
    ("classifier.temperature=.inf", "config key 'classifier.temperature' must be a finite number, got inf"),
    ("augment.gray_p=1.5", "config key 'augment.gray_p' must be in [0, 1], got 1.5"),
]


def assert_user_error(cmd: list[str], run_dir: Path, phrase: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("picstream-train: error: "), lines
    assert phrase in lines[0], lines[0]
    assert not run_dir.exists()                                  # nothing written


@pytest.mark.parametrize("kind, phrase", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifest(kind, phrase, tmp_path, shapes_shards):
    manifest = broken_manifest(tmp_path, shapes_shards[0], kind)
    if kind == "missing":
        manifest.parent.rmdir()
    run_dir = tmp_path / "run"
    assert_user_error(train_cmd(run_dir, manifest), run_dir, phrase)


@pytest.mark.parametrize("override, phrase", OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES])
def test_bad_value(override, phrase, tmp_path, shapes_shards):
    run_dir = tmp_path / "run"
    assert_user_error(train_cmd(run_dir, shapes_shards[0], override), run_dir, phrase)


# values that each pass alone but break a constructor together (found by trying them)
COMBINATION_CASES = [
    (("model.norm=group", "model.head_hidden=100"),
     "config key 'model.head_hidden' must be a multiple of 32 with model.norm = group"),
    (("optim.batch_size=1", "classifier.recent_k=16"),
     "optim.batch_size = 1 leaves 1 image per process: BatchNorm needs at least 2"),
    (("data.decode=gpu", "run.device=cpu"),
     "config key 'data.decode': gpu needs a CUDA device and nvImageCodec (pip install -e '.[nvimgcodec]'); "
     "this run has no CUDA device"),
]


@pytest.mark.parametrize("overrides, phrase", COMBINATION_CASES, ids=[c[0][0] for c in COMBINATION_CASES])
def test_bad_combination(overrides, phrase, tmp_path, shapes_shards):
    run_dir = tmp_path / "run"
    assert_user_error(train_cmd(run_dir, shapes_shards[0], *overrides), run_dir, phrase)


def test_yaml_root_that_is_a_list(tmp_path, shapes_shards):
    config = tmp_path / "list.yaml"
    config.write_text("- run\n- data\n")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "picstream.train", "--config", str(config), f"run.output_dir={run_dir}"]
    assert_user_error(cmd, run_dir, f"config file {config} must be a mapping of sections")


@pytest.mark.parametrize("what", ["missing", "not a checkpoint"])
def test_resume_with_a_bad_path(what, tmp_path, shapes_shards):
    path = tmp_path / "ckpt.pt"
    if what != "missing":
        path.write_bytes(b"not a checkpoint")
    run_dir = tmp_path / "run"
    cmd = train_cmd(run_dir, shapes_shards[0]) + ["--resume", str(path)]
    assert_user_error(cmd, run_dir, "--resume: ")


def test_output_dir_below_a_file(tmp_path, shapes_shards):
    (tmp_path / "file").write_text("x")
    run_dir = tmp_path / "file" / "run"
    assert_user_error(train_cmd(run_dir, shapes_shards[0]), run_dir,
                      f"config key 'run.output_dir': cannot write to {run_dir}")


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only: by mode bits, or for root (whom they do not stop) immutable."""
    root = os.geteuid() == 0
    if not root:
        folder.chmod(0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    try:
        yield folder
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_read_only_output_dir(tmp_path, shapes_shards):
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        assert_user_error(train_cmd(parent / "run", shapes_shards[0]), parent / "run", "is read-only")


def test_all_missing_window_is_one_line(tmp_path, shapes_shards):
    """Not a config error, but one clear line too: the first window's shards are all gone (a broken
    shard set: with the default data.on_missing=fail the line names the first missing shard)."""
    root = tmp_path / "shards"
    root.mkdir()
    for f in Path(shapes_shards[0]).parent.iterdir():
        if not f.name.endswith(".tar"):
            (root / f.name).write_bytes(f.read_bytes())
    result = subprocess.run(train_cmd(tmp_path / "run", root / "manifest.json"), capture_output=True,
                            text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lines[-1].startswith("picstream-train: error: shard ") and str(root) in lines[-1]
    assert "is missing" in lines[-1] and "data.on_missing=skip" in lines[-1]
    assert not any("loss is nan" in line for line in lines)
