"""Distributed training through torchrun (gloo on CPU): 2 processes against 1, a killed rank, a killed
launcher, and resumes onto another number of processes.

The oracle is the 1-process run with the same global batch. The runs are in float64
(``train.precision``) with GroupNorm (``model.norm=group``): splitting the batch changes the order of
floating-point sums (the gradient of the backbone is summed over ranks, the softmax denominators
over the ranks' rows), which a chaotic 30-step SGD run amplifies ~1e4×: fp32 runs agree to ~3e-3 in
the loss, float64 ones to ~1e-12. Kills land at chosen I/O points (tests/crash_runner.py), never
after a sleep.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from picstream.checkpoint import classifier_states, list_checkpoints, load_checkpoint
from picstream.rowstore import RowStore

from test_integrity import children, running

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
RUNNER = Path(__file__).with_name("crash_runner.py")
STEPS = 30
SETTINGS = [
    "model.arch=resnet18", "model.head_hidden=64", "model.feature_dim=16", "model.norm=group",
    "data.image_size=32", "data.workers=0", "optim.batch_size=32", "optim.epochs=3",
    "optim.warmup_epochs=1", "optim.base_lr=0.1", "optim.base_batch_size=32",
    "classifier.recent_k=128", "classifier.chunk_rows=32", "schedule.window=128", "schedule.stride=32",
    "train.log_every=1", "train.checkpoint_every=10", "train.keep_checkpoints=10",
    f"train.max_steps={STEPS}", "train.precision=float64",
]
TIMEOUT = 600  # a hang guard only: a run takes ~30 s


def launch(procs: int, run_dir: Path, manifest: Path, crash: tuple[str, str] | None = None,
           log: Path | None = None, extra=()) -> subprocess.CompletedProcess:
    """``picstream-train`` in ``procs`` processes (torchrun for 2+), optionally under crash_runner."""
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"run.output_dir={run_dir}",
            f"data.train={manifest}", *SETTINGS, *extra]
    program = ["-m", "picstream.train"] if crash is None else [str(RUNNER), *crash, str(log), "--"]
    if procs == 1:
        cmd = [sys.executable, *program, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(procs), *program, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


def final_state(run_dir: Path, steps: int = STEPS) -> dict:
    """Losses per step, model tensors, resident rows (by ID) and every stored row of a finished run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    path = list_checkpoints(run_dir / "checkpoints")[-1]
    state = load_checkpoint(path)
    assert int(state["step"]) == steps
    resident = {}
    for part in classifier_states(path, state):
        rows = part["rows"]
        ids, at = rows["slot_ids"].numpy(), rows["row_of_slot"].numpy()
        for slot in np.flatnonzero(at >= 0):
            resident[int(ids[slot])] = torch.cat([rows["weight"][at[slot]], rows["momentum"][at[slot]]])
    store = RowStore.open(str(run_dir / "rowstore.zarr"))
    w, u, last = store.read(np.arange(store.num_rows))
    store.close(flush=False)
    return {"loss": [r["loss"] for r in records if "loss" in r], "model": state["model"],
            "resident": resident, "stored": (w, u, last)}


def relative(a, b) -> float:
    """‖a − b‖ / ‖a‖ (a tensor's elements near 0 make an element-wise bound meaningless)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / a.norm().clamp_min(1e-300))


def assert_same(a: dict, b: dict, rtol: float, steps: int = STEPS) -> None:
    """Equal to ``rtol`` relative (per loss, per tensor, per row; 0: bit-identical)."""
    assert len(a["loss"]) == len(b["loss"]) == steps
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=rtol, atol=0)
    for name, tensor in a["model"].items():
        if tensor.is_floating_point():
            assert relative(tensor, b["model"][name]) <= rtol, name
        else:
            assert torch.equal(b["model"][name], tensor), name
    assert a["resident"].keys() == b["resident"].keys()
    assert max(relative(row, b["resident"][i]) for i, row in a["resident"].items()) <= rtol
    np.testing.assert_array_equal(a["stored"][2], b["stored"][2])  # the same rows stored at the same steps
    for x, y in zip(a["stored"][:2], b["stored"][:2]):
        assert max(relative(x[i], y[i]) for i in range(len(x)) if np.any(x[i])) <= rtol


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines()
                                             if "rank" in line or "rror" in line)[-6000:]


@pytest.fixture(scope="module")
def reference_dirs(shapes_shards, tmp_path_factory):
    """Uninterrupted runs with 1 and 2 processes: their run directories. The 2-process one writes evicted
    rows back synchronously (``classifier.overlap=off``, the oracle), so every 2-process run compared
    with it bit for bit (overlap ``auto``: on) also checks that the deferred write-back changes nothing."""
    dirs = {}
    for procs in (1, 2):
        dirs[procs] = tmp_path_factory.mktemp(f"ref{procs}")
        ok(launch(procs, dirs[procs], shapes_shards[0], extra=("classifier.overlap=off",) if procs == 2 else ()))
    yield dirs
    for run_dir in dirs.values():  # ten checkpoints each: gone with the module
        shutil.rmtree(run_dir)


@pytest.fixture(scope="module")
def reference(reference_dirs) -> dict:
    return {procs: final_state(run_dir) for procs, run_dir in reference_dirs.items()}


def test_two_processes_equal_one(reference):
    """Same global batch, eviction (K = 128 < W = 128 + the stride's new rows), 30 steps: every loss,
    weight and row (resident and stored) equal to 1e-9; the 128 resident rows are split over ranks."""
    assert_same(reference[1], reference[2], rtol=1e-9)
    assert len(reference[2]["resident"]) == 128
    assert (reference[2]["stored"][2] > 0).sum() > 0  # rows were evicted and stored


def test_rank_holds_only_its_rows(reference_dirs):
    """Each rank's part file holds only rows its chunks own; its device table is ≈ K / 2 rows."""
    run_dir = reference_dirs[2]
    path = list_checkpoints(run_dir / "checkpoints")[-1]
    parts = classifier_states(path, load_checkpoint(path))
    for rank, part in enumerate(parts):
        rows = part["rows"]
        held = rows["slot_ids"].numpy()[rows["row_of_slot"].numpy() >= 0]
        assert np.all((held // 32) % 2 == rank)
        assert rows["weight"].shape[0] == 80  # ceil(1.25 · 128 / 2): no growth was needed
    undo = sorted(p.relative_to(run_dir / "rowstore.zarr").parts[:3]
                  for p in (run_dir / "rowstore.zarr" / "parts").rglob("begun"))
    assert {u[:3] for u in undo} == {("parts", "2", "0"), ("parts", "2", "1")}


def test_killed_rank_stops_the_job_and_the_same_command_resumes(reference, shapes_shards, tmp_path):
    """Rank 1 killed while writing its part of the step-20 checkpoint: torchrun stops rank 0 and exits
    non-zero; the same command resumes from step 10 (the step-20 parts without a main file are
    dropped) and ends bit-identical to the uninterrupted 2-process run."""
    run_dir, log = tmp_path / "run", tmp_path / "io.log"
    killed = launch(2, run_dir, shapes_shards[0], ("kill@1", "rename:*part-1-of-2.pt:2"), log)
    assert killed.returncode != 0
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["ckpt-000000010.pt"]
    resumed = launch(2, run_dir, shapes_shards[0])
    ok(resumed)
    assert "resumed from" in resumed.stderr and "at step 10" in resumed.stderr
    assert_same(reference[2], final_state(run_dir), rtol=0)


def test_killed_launcher_stops_every_rank_and_the_same_command_resumes(reference, shapes_shards, tmp_path):
    """SIGKILL of torchrun itself (not of a rank) while rank 0 is held just after the step-10
    checkpoint: no rank is alive 30 s later, and the same command resumes from step 10 and ends
    bit-identical to the uninterrupted 2-process run."""
    run_dir, log = tmp_path / "run", tmp_path / "io.log"
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"run.output_dir={run_dir}",
            f"data.train={shapes_shards[0]}", *SETTINGS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(RUNNER), "pause@0", "rename:*ckpt-000000010.pt:1:+1", str(log), "--", *args]
    with open(tmp_path / "torchrun.out", "w") as out:
        launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    ranks: set[int] = set()
    try:
        reached = Path(f"{log}.reached")
        deadline = time.monotonic() + TIMEOUT
        while not reached.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reached.exists(), (tmp_path / "torchrun.out").read_text()[-3000:]
        ranks = children(launcher.pid)
        assert len(ranks) == 2
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(map(running, ranks)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(running, ranks))
    finally:
        for pid in ranks:   # a rank that outlived its launcher (the failure this test catches)
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["ckpt-000000010.pt"]
    resumed = launch(2, run_dir, shapes_shards[0])
    ok(resumed)
    assert "resumed from" in resumed.stderr and "at step 10" in resumed.stderr
    assert_same(reference[2], final_state(run_dir), rtol=0)


def test_feature_init_two_processes_killed_and_resumed_equal_one(reference, shapes_shards, tmp_path):
    """classifier.row_init = feature: a rank's rows start from the features of whichever rank's
    block holds their samples (the gathered batch). A 2-process run killed while writing the step-20
    checkpoint and resumed from step 10 re-initialises no row twice: bit-identical to the
    uninterrupted 2-process run, which equals the 1-process one up to float reassociation (the rank
    split's sum order now enters the rows through the features themselves and grows in this chaotic
    run: measured 4.6e-9 in the losses, up to 1.4e-6 in a small BatchNorm bias, so the losses to 1e-7
    here; the first losses agree to 1e-15) and differs from the random-init run."""
    feature = ("classifier.row_init=feature",)
    ok(launch(1, tmp_path / "one", shapes_shards[0], extra=feature))
    ok(launch(2, tmp_path / "two", shapes_shards[0], extra=feature))
    run_dir = tmp_path / "killed"
    killed = launch(2, run_dir, shapes_shards[0], ("kill@1", "rename:*part-1-of-2.pt:2"), tmp_path / "io.log",
                    extra=feature)
    assert killed.returncode != 0
    resumed = launch(2, run_dir, shapes_shards[0], extra=feature)
    ok(resumed)
    assert "at step 10" in resumed.stderr
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert_same(two, final_state(run_dir), rtol=0)
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-7, atol=0)
    assert one["loss"][0] != reference[1]["loss"][0]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_onto_another_number_of_processes(reference, shapes_shards, tmp_path, before, after):
    """Killed just after the step-10 checkpoint with `before` processes, resumed with `after` on the
    same shared row store: the rows are re-partitioned, and the run ends as the uninterrupted one."""
    run_dir, log = tmp_path / "run", tmp_path / "io.log"
    killed = launch(before, run_dir, shapes_shards[0], ("kill@0", "rename:*ckpt-000000010.pt:1:+1"), log)
    assert killed.returncode != 0
    resumed = launch(after, run_dir, shapes_shards[0])
    ok(resumed)
    assert f"re-partitioned the classifier rows of {before} processes onto {after}" in resumed.stderr
    assert_same(reference[1], final_state(run_dir), rtol=1e-9)
    # the other world size's history is retired: its checkpoint parts are gone, its undo logs empty
    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert not any(f"-of-{before}." in n for n in names)


def test_closing_the_trainer_frees_the_process_group(shapes_shards, tmp_path):
    """A group that outlives Trainer.close is torn down by the interpreter's exit, where gloo can abort
    a rank of a run that finished (SIGABRT, "terminate called without an active exception")."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("teardown_runner.py")), "--config", str(ROOT / "configs/demo.yaml"),
           f"run.output_dir={tmp_path / 'run'}", f"data.train={shapes_shards[0]}", *SETTINGS,
           "train.max_steps=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(line for line in result.stdout.splitlines() if "group freed" in line) == [
        "rank 0 group freed: True", "rank 1 group freed: True"]


def test_global_batch_must_divide_by_the_processes(shapes_shards, tmp_path):
    result = launch(2, tmp_path / "run", shapes_shards[0], extra=["optim.batch_size=33"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("picstream-train: error")]
    assert errors == ["picstream-train: error: optim.batch_size = 33 (the global batch) must be divisible "
                      "by the number of processes, 2"]


def test_benchmark_quick_mode_runs():
    """benchmarks/multi_process.py --quick: both world sizes run and the table and RESULT line print."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_process.py"), "--quick"],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2
    assert result.stdout.splitlines()[-1].startswith("RESULT: 2 processes / 1: step time")
