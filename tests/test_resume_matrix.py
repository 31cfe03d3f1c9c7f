"""Every sampling × loss × multi-crop × world size resumes, through the real `picstream-train` CLI.

A case is interrupted one of three ways — killed just after a checkpoint then resumed with
``--resume auto``; finished, then continued from an explicit older checkpoint (the newer ones are
moved aside); killed at a chosen I/O point inside the run — and must end as the uninterrupted run:
bit-identical with the same number of processes, equal to 1e-8 (float64, GroupNorm) with another
(tests/test_distributed.py says why). Full sampling with 2 processes is refused with one line.

CI runs the sample ``CASES`` (8 points: every level of every factor, the full-sampling resume, a
change of world size); ``PICSTREAM_RESUME_MATRIX=full`` runs all 2 × 2 × 2 × 2 × 3 combinations
(16 of them the refused full × 2 processes) plus the world-size changes.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from picstream.checkpoint import classifier_states, list_checkpoints, load_checkpoint
from picstream.rowstore import RowStore
from test_distributed import SETTINGS as DISTRIBUTED_SETTINGS
from test_distributed import relative

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
RUNNER = Path(__file__).with_name("crash_runner.py")
STEPS = 12
SETTINGS = [*DISTRIBUTED_SETTINGS, "train.checkpoint_every=4", f"train.max_steps={STEPS}"]  # later keys win
# another number of processes reorders float64 sums; with multi-crop and the plain softmax these
# runs amplify that a little more than tests/test_distributed.py's (measured: 1.09e-9 after 12 steps)
OTHER_WORLD_RTOL = 1e-8
TIMEOUT = 600  # a hang guard only: a run takes well under a minute
FULL_REFUSED = ("picstream-train: error: classifier.sampling = full is the 1-process reference; a "
                "distributed run needs classifier.sampling = recent")


@dataclass(frozen=True)
class Case:
    sampling: str       # recent | full
    loss: str           # cosine | plain
    multi_crop: bool
    world: int          # processes of the interrupted run
    mode: str           # auto | explicit | kill
    resume_world: int = 0   # processes of the resumed run (0: the same)

    @property
    def extra(self) -> list[str]:
        crops = ["data.multi_crop=[[16,2]]"] if self.multi_crop else []
        return [f"classifier.sampling={self.sampling}", f"classifier.loss={self.loss}", *crops]

    def __str__(self) -> str:
        after = f"-then-{self.resume_world}" if self.resume_world else ""
        return (f"{self.sampling}-{self.loss}-{'mc' if self.multi_crop else 'one'}-"
                f"{self.world}p{after}-{self.mode}")


CASES = [
    Case("full", "cosine", False, 1, "auto"),
    Case("full", "plain", True, 1, "explicit"),
    Case("full", "cosine", True, 1, "kill"),
    Case("recent", "plain", True, 1, "explicit"),
    Case("recent", "cosine", True, 2, "kill"),
    Case("recent", "plain", False, 2, "auto"),
    Case("recent", "plain", True, 2, "auto", resume_world=1),
    Case("full", "cosine", False, 2, "auto"),   # refused
]
if os.environ.get("PICSTREAM_RESUME_MATRIX") == "full":
    CASES = [Case(*c) for c in itertools.product(("recent", "full"), ("cosine", "plain"), (False, True),
                                                 (1, 2), ("auto", "explicit", "kill"))]
    CASES += [Case("recent", loss, mc, w, "auto", resume_world=3 - w)
              for loss, mc, w in itertools.product(("cosine", "plain"), (False, True), (1, 2))]


def launch(procs: int, run_dir: Path, manifest: Path, extra=(), crash: tuple[str, str] | None = None,
           resume: str = "auto") -> subprocess.CompletedProcess:
    """``picstream-train`` in ``procs`` processes (torchrun for 2), optionally under crash_runner."""
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"run.output_dir={run_dir}",
            f"data.train={manifest}", *SETTINGS, *extra, "--resume", resume]
    program = (["-m", "picstream.train"] if crash is None
               else [str(RUNNER), *crash, str(run_dir.parent / f"{run_dir.name}.points"), "--"])
    launcher = ([] if procs == 1 else
                ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)])
    return subprocess.run([sys.executable, *launcher, *program, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-6000:]


def final_state(run_dir: Path) -> dict:
    """Losses per step, model tensors, the classifier rows by ID (resident or all) and the stored rows."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    path = list_checkpoints(run_dir / "checkpoints")[-1]
    state = load_checkpoint(path)
    assert int(state["step"]) == STEPS
    rows, stored = {}, None
    for part in classifier_states(path, state):
        if part["sampling"] == "full":
            rows = {i: torch.cat([w, u]) for i, (w, u) in enumerate(zip(part["weight"], part["momentum"]))}
            continue
        table = part["rows"]
        ids, at = table["slot_ids"].numpy(), table["row_of_slot"].numpy()
        for slot in np.flatnonzero(at >= 0):
            rows[int(ids[slot])] = torch.cat([table["weight"][at[slot]], table["momentum"][at[slot]]])
    if (run_dir / "rowstore.zarr").exists():
        store = RowStore.open(str(run_dir / "rowstore.zarr"))
        stored = store.read(np.arange(store.num_rows))
        store.close(flush=False)
    return {"loss": [r["loss"] for r in records if "loss" in r], "model": state["model"], "rows": rows,
            "stored": stored}


def assert_same(a: dict, b: dict, rtol: float) -> None:
    """Equal to ``rtol`` relative per loss, tensor and row (0: bit-identical)."""
    assert len(a["loss"]) == len(b["loss"]) == STEPS
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=rtol, atol=0)
    for name, tensor in a["model"].items():
        if rtol == 0 or not tensor.is_floating_point():
            assert torch.equal(b["model"][name], tensor), name
        else:
            assert relative(tensor, b["model"][name]) <= rtol, name
    assert a["rows"].keys() == b["rows"].keys()
    for i, row in a["rows"].items():
        assert (torch.equal(row, b["rows"][i]) if rtol == 0 else relative(row, b["rows"][i]) <= rtol), i
    assert (a["stored"] is None) == (b["stored"] is None)
    if a["stored"] is not None:
        np.testing.assert_array_equal(a["stored"][2], b["stored"][2])
        for x, y in zip(a["stored"][:2], b["stored"][:2]):
            assert max(relative(x[i], y[i]) for i in range(len(x)) if np.any(x[i])) <= rtol


@pytest.fixture(scope="module")
def references(tmp_path_factory, shapes_shards):
    """Uninterrupted runs, made on first use: (sampling, loss, multi_crop, world) → final state."""
    made: dict = {}

    def reference(case: Case, world: int) -> dict:
        key = (case.sampling, case.loss, case.multi_crop, world)
        if key not in made:
            run_dir = tmp_path_factory.mktemp("ref") / "run"
            ok(launch(world, run_dir, shapes_shards[0], case.extra))
            made[key] = final_state(run_dir)
        return made[key]

    return reference


def kill_point(case: Case) -> tuple[str, str]:
    """Where the 'kill' mode stops the run (in its last rank), between the step-4 and step-8
    checkpoints: inside the step-8 checkpoint write for full sampling (no row store); for recent
    sampling three I/O points after the rank's file of the step-4 checkpoint (once the checkpoint is
    complete: the rank waits for rank 0's main file), inside the row store's writes that follow."""
    action = "kill" if case.world == 1 else f"kill@{case.world - 1}"
    if case.sampling == "full":
        return action, "create:*ckpt-000000008.tmp*:1"
    return action, "rename:*/ckpt-000000004*:1:+3"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_resume(case, references, shapes_shards, tmp_path):
    manifest, run_dir = shapes_shards[0], tmp_path / "run"
    if case.sampling == "full" and case.world > 1:
        result = launch(case.world, run_dir, manifest, case.extra)
        assert result.returncode != 0
        assert [line for line in result.stderr.splitlines() if "picstream-train: error" in line] == [FULL_REFUSED]
        return
    after = case.resume_world or case.world
    if case.mode == "explicit":
        ok(launch(case.world, run_dir, manifest, case.extra))
        resumed = launch(after, run_dir, manifest, case.extra,
                         resume=str(run_dir / "checkpoints" / "ckpt-000000004.pt"))
        ok(resumed)
        assert "moved 2 newer checkpoint(s) aside" in resumed.stderr
    else:
        crash = (("kill" if case.world == 1 else "kill@0", "rename:*ckpt-000000008.pt:1:+1")
                 if case.mode == "auto" else kill_point(case))
        killed = launch(case.world, run_dir, manifest, case.extra, crash=crash)
        assert killed.returncode != 0, "the chosen I/O point was never reached"
        resumed = launch(after, run_dir, manifest, case.extra)
        ok(resumed)
    expected_step = {"auto": 8, "explicit": 4, "kill": 4}[case.mode]
    assert f"at step {expected_step}" in resumed.stderr, resumed.stderr[-3000:]
    if after != case.world:
        assert f"re-partitioned the classifier rows of {case.world} processes onto {after}" in resumed.stderr
    same_world = after == case.world
    assert_same(references(case, after), final_state(run_dir), rtol=0 if same_world else OTHER_WORLD_RTOL)
