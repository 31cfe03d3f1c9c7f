"""`picstream-train` under kills, a full disk, a second trainer and changed configs.

Kills land at chosen I/O points (tests/crash_runner.py), never after a sleep: before the first
checkpoint (rows already evicted to the store), inside a checkpoint save, right after one, and at ten
seeded random points in a row. Every run must end bit-identical to an uninterrupted one: the same loss
at every step, the same model, resident rows and stored rows. The uninterrupted reference writes
evicted rows back synchronously (``classifier.overlap=off``, the oracle); the runs under test defer
that write (``auto``: on), so every kill and resume also checks overlap on == off.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from picstream.checkpoint import list_checkpoints, load_checkpoint
from picstream.rowstore import RowStore
from test_train import losses, train_cmd

RUNNER = Path(__file__).with_name("crash_runner.py")
EXTRA = ("optim.epochs=6", "train.checkpoint_every=20")  # 60 steps; checkpoints at 20, 40, 60
N = 320


def train(run_dir: Path, shards: Path, *extra: str, resume: str = "auto") -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(run_dir, shards, *EXTRA, *extra) + ["--resume", resume],
                          capture_output=True, text=True, timeout=1200)


def hooked(action: str, spec: str, run_dir: Path, shards: Path, *extra: str, resume: str = "auto",
           wait: bool = True):
    args = train_cmd(run_dir, shards, *EXTRA, *extra)[3:] + ["--resume", resume]
    cmd = [sys.executable, str(RUNNER), action, spec, str(run_dir.parent / f"{run_dir.name}.points"), "--",
           *args]
    if not wait:
        log = open(run_dir.parent / f"{run_dir.name}.stderr", "w")
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


def run_state(run_dir: Path) -> tuple:
    ckpt = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    store = RowStore.open(str(run_dir / "rowstore.zarr"))
    store.restore(ckpt["classifier"]["generation"])
    return losses(run_dir), ckpt, store.read(np.arange(N))


def assert_same_run(run_dir: Path, reference: tuple) -> None:
    got_losses, ckpt, rows = run_state(run_dir)
    ref_losses, ref_ckpt, ref_rows = reference
    assert got_losses == ref_losses and len(got_losses) == 60
    assert ckpt["step"] == ref_ckpt["step"] == 60
    for key, value in ref_ckpt["model"].items():
        assert torch.equal(value, ckpt["model"][key]), key
    for key in ("rows", "log"):
        for name, value in ref_ckpt["classifier"][key].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, ckpt["classifier"][key][name]), (key, name)
    for a, b in zip(rows, ref_rows):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def reference(shapes_shards, tmp_path_factory):
    train_manifest, _ = shapes_shards
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = hooked("count", "0", run_dir, train_manifest, "classifier.overlap=off")
    assert result.returncode == 0, result.stderr
    points = (run_dir.parent / "run.points").read_text().splitlines()
    first_ckpt = next(i for i, line in enumerate(points) if "/checkpoints/ckpt-" in line)
    assert any("/rowstore.zarr/weight/" in line for line in points[:first_ckpt]), \
        "no row reached the store before the first checkpoint: the kill before it would test nothing"
    return run_state(run_dir)


@pytest.mark.slow
def test_kills_at_chosen_and_random_points_resume_bit_identical(reference, shapes_shards, tmp_path):
    train_manifest, _ = shapes_shards
    run_dir = tmp_path / "run"
    chosen = [
        "create:*/rowstore.zarr/weight/*:1",         # before the first checkpoint, rows on disk
        "rename:*/rowstore.zarr/rowstore.json:1",    # inside a checkpoint: the store's commit
        "rename:*/checkpoints/ckpt-*.pt:1",          # inside a checkpoint: its file
        "rename:*/checkpoints/ckpt-*.pt:1:+1",       # right after a checkpoint
    ]
    rng = np.random.default_rng(0)
    random_points = [str(n) for n in rng.integers(1, 100, size=6)]
    for i, spec in enumerate(chosen + random_points):
        result = hooked("kill", spec, run_dir, train_manifest)
        assert result.returncode == -9, f"kill {i} at {spec} did not happen: {result.stderr[-2000:]}"
        if i == 3:  # every checkpoint unreadable: the restart must begin again from fresh rows
            for path in list_checkpoints(run_dir / "checkpoints"):
                path.write_bytes(path.read_bytes()[:100])
    result = train(run_dir, train_manifest)
    assert result.returncode == 0, result.stderr
    assert_same_run(run_dir, reference)

    # an older checkpoint, resumed explicitly: newer ones are moved aside, and a kill mid-restore
    # followed by --resume auto continues from the older one, never from a retired one
    older = list_checkpoints(run_dir / "checkpoints")[0]
    result = hooked("kill", "rename:*/rowstore.zarr/rowstore.json:2", run_dir, train_manifest,
                    resume=str(older))
    assert result.returncode == -9, result.stderr[-2000:]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [older.name]
    retired = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("retired-")]
    assert len(retired) == 1 and len(list(retired[0].iterdir())) == 2
    result = train(run_dir, train_manifest)
    assert result.returncode == 0 and f"resumed from {older}" in result.stderr, result.stderr
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_full_disk_is_one_clear_line_and_resumes(reference, shapes_shards, tmp_path):
    train_manifest, _ = shapes_shards
    run_dir = tmp_path / "run"
    for spec in ("create:*/rowstore.zarr/undo/*:3", "create:*/checkpoints/ckpt-*:2"):
        result = hooked("enospc", spec, run_dir, train_manifest)
        assert result.returncode == 1, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("picstream-train: error: No space left on device at ")
        assert "Traceback" not in result.stderr and str(run_dir) in lines[-1]
        assert not list(run_dir.rglob("*.tmp*")), "a temporary file was left behind"
    result = train(run_dir, train_manifest)
    assert result.returncode == 0, result.stderr
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_second_trainer_refuses_and_config_changes_are_checked(reference, shapes_shards, tmp_path):
    train_manifest, _ = shapes_shards
    run_dir = tmp_path / "run"
    first = hooked("pause", "rename:*/checkpoints/ckpt-*.pt:1", run_dir, train_manifest, wait=False)
    reached, go = Path(f"{run_dir}.points.reached"), Path(f"{run_dir}.points.go")
    while not reached.exists():  # waits for an event, not for a duration
        assert first.poll() is None, Path(f"{run_dir}.stderr").read_text()
        time.sleep(0.05)
    second = train(run_dir, train_manifest)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines() == [
        f"picstream-train: error: run directory {run_dir} is in use by another picstream-train "
        f"(pid {first.pid}); wait for it to finish or stop it first"]
    go.touch()
    assert first.wait(timeout=1200) == 0, Path(f"{run_dir}.stderr").read_text()
    assert_same_run(run_dir, reference)

    changed = train(run_dir, train_manifest, "optim.batch_size=64", "schedule.window=96")
    assert changed.returncode == 2
    (line,) = changed.stderr.strip().splitlines()
    assert "optim.batch_size: 32 -> 64" in line and "schedule.window: 128 -> 96" in line
    harmless = train(run_dir, train_manifest, "train.log_every=2")
    assert harmless.returncode == 0, harmless.stderr
    assert "resuming with changed settings: train.log_every: 1 -> 2" in harmless.stderr
    fresh = train(run_dir, train_manifest, resume="none")
    assert fresh.returncode == 2 and "continue it with --resume auto" in fresh.stderr
