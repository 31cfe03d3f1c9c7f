"""Crash-point enumeration of the row store (in the spirit of SQLite's crash tests).

A scenario drives the store the way the trainer does: run A writes rows, commits and checkpoints twice;
run B explicitly resumes A's older checkpoint (retiring the newer one, restoring the store), writes a
different branch, checkpoints three times and prunes. Every I/O point of the uninterrupted scenario is
counted; then, for every n, a forked child dies at the n-th point (a write or create is torn first:
half its bytes, then garbage), the parent reruns the interrupted command and what follows, and the
final rows and checkpoints must be bit-identical to the uninterrupted run. The same with ENOSPC
raised at each point of a commit: a clear error naming the path, nothing temporary left behind, and
a bit-identical finish once space is "freed".
"""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from picstream import iopoints
from picstream.checkpoint import (latest_valid_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints,
                                  remove_stale_temporaries, retire_newer, save_checkpoint)
from picstream.rowstore import RowStore, StoreError

N, D, CHUNK, CACHE = 80, 3, 20, 40
RUN_ID = "scenario"


def rows_of(step: int, branch: int) -> np.ndarray:
    return np.random.default_rng([step, branch]).choice(N, 10, replace=False)


def store_url(root: Path) -> str:
    """Where the scenario under ``root`` keeps its row store (tests/test_s3_crash_points.py: on S3)."""
    return str(root / "rows.zarr")


def run(root: Path, *, last_step: int, branch: int, resume: str = "auto", ckpt_every: int = 2,
        keep: int = 2, durable: bool = False) -> None:
    """One trainer-like command: resume (or start fresh), write rows step by step, checkpoint, prune."""
    url, ckpts = store_url(root), root / "ckpt"
    remove_stale_temporaries(ckpts)
    if resume == "auto":
        found = latest_valid_checkpoint(ckpts, log=lambda _: None)
        state = None if found is None else found[1]
    else:
        state = load_checkpoint(ckpts / resume)
        retire_newer(ckpts, state["step"])
    if state is None:
        try:
            RowStore.destroy(url)
        except StoreError:
            pass
        store = RowStore.create(url, N, D, chunk_rows=CHUNK, cache_rows=CACHE, dtype=np.float64,
                                run_id=RUN_ID, durable=durable)
        start = 0
    else:
        store = RowStore.open(url, cache_rows=CACHE, durable=durable)
        assert store.store_id == state["store_id"]
        store.restore(state["generation"])
        start = state["step"]
    for step in range(start, last_step):
        ids = rows_of(step, branch)
        w, u, _ = store.read(ids)  # history-dependent: a wrong restore shows in every later row
        store.write(ids, 0.5 * w + step, 0.9 * u + w, step + 1)
        if (step + 1) % ckpt_every == 0:
            state = {"store_id": store.store_id, "generation": store.commit(), "branch": branch}
            save_checkpoint(ckpts, step + 1, state)
            oldest = prune_checkpoints(ckpts, keep)[0]
            store.prune(load_checkpoint(oldest)["generation"])
    store.close()


COMMANDS = [dict(last_step=6, branch=0, keep=3), dict(last_step=8, branch=1, resume="ckpt-000000002.pt")]


def scenario(root: Path, first: int = 0, durable: bool = False) -> None:
    for command in COMMANDS[first:]:
        run(root, durable=durable, **command)


def recover(root: Path, interrupted: int) -> None:
    """What a user does after a crash: rerun the interrupted command, then the rest. Once B's explicit
    resume has taken effect (A's newer checkpoints are moved aside), B continues with --resume auto."""
    if interrupted == 1 and not any(load_checkpoint(p)["branch"] == 0 and load_checkpoint(p)["step"] > 2
                                    for p in list_checkpoints(root / "ckpt")):
        run(root, **{**COMMANDS[1], "resume": "auto"})
    else:
        scenario(root, first=interrupted)


def final_state(root: Path) -> tuple:
    store = RowStore.open(store_url(root))
    newest = load_checkpoint(list_checkpoints(root / "ckpt")[-1])
    store.restore(newest["generation"])
    return store.read(np.arange(N)), newest["step"], [p.name for p in list_checkpoints(root / "ckpt")]


def assert_same(a: tuple, b: tuple) -> None:
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)
    assert a[1] == b[1]  # the newest checkpoint (a kill before a prune may leave one more)


class Counter:
    """An I/O hook that acts at the n-th point."""

    def __init__(self, at: int = 0, action=None):
        self.count, self.at, self.action = 0, at, action

    def __call__(self, kind: str, path: str) -> None:
        self.count += 1
        if self.count == self.at:
            self.action(kind, path)


def tear(kind: str, path: str) -> None:
    """A write or create cut short: garbage bytes land in the file."""
    if kind in ("write", "create"):
        mode = "r+b" if os.path.exists(path) and kind == "write" else "wb"
        with open(path, mode) as f:
            f.write(b"\xee" * 37)


def die(kind: str, path: str) -> None:
    tear(kind, path)
    os.kill(os.getpid(), signal.SIGKILL)


def no_space(kind: str, path: str) -> None:
    tear(kind, path)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


SPACE_TAKING = ("write", "create", "link", "mkdir", "rename")


def recorded_points(root: Path) -> list[list[str]]:
    """The kind of every I/O point of the uninterrupted scenario, in order, per command."""
    per_command = []
    for command in COMMANDS:
        kinds: list[str] = []
        iopoints.set_hook(lambda kind, _: kinds.append(kind))
        try:
            run(root, **command)
        finally:
            iopoints.set_hook(None)
        per_command.append(kinds)
    return per_command


def in_child(root: Path, hook: Counter) -> int:
    """Run the scenario in a forked child with ``hook``; returns its exit status (or -signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            iopoints.set_hook(hook)
            scenario(root)
        except OSError as err:
            code = 3 if err.errno == errno.ENOSPC and err.filename else 4
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def command_of(n: int, counts: list[int]) -> int:
    return int(np.searchsorted(np.cumsum(counts), n))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    kinds = recorded_points(root)
    return final_state(root), kinds


def test_scenario_is_history_dependent_and_restores(reference, tmp_path):
    """Sanity: the scenario really restores (skipping B's explicit resume gives other rows)."""
    ref, kinds = reference
    assert len(kinds) == 2 and min(map(len, kinds)) > 50
    run(tmp_path, **COMMANDS[0])
    run(tmp_path, last_step=8, branch=1)  # auto: continues from step 6 instead of 2
    other = final_state(tmp_path)
    assert not np.array_equal(other[0][0], ref[0][0])


@pytest.mark.slow
def test_kill_at_every_io_point_resumes_bit_identical(reference, tmp_path):
    ref, kinds = reference
    counts = [len(k) for k in kinds]
    total = sum(counts)
    for n in range(1, total + 1):
        root = tmp_path / f"n{n}"
        status = in_child(root, Counter(n, die))
        assert status == -signal.SIGKILL, f"point {n}: the child did not die there ({status})"
        recover(root, command_of(n, counts))
        assert_same(final_state(root), ref)
    print(f"crash points enumerated: {total}")


@pytest.mark.slow
def test_enospc_at_every_io_point_is_clear_and_resumes(reference, tmp_path):
    ref, kinds = reference
    counts = [len(k) for k in kinds]
    for n in [i + 1 for i, kind in enumerate(sum(kinds, [])) if kind in SPACE_TAKING]:
        root = tmp_path / f"n{n}"
        assert in_child(root, Counter(n, no_space)) == 3, f"point {n}: no clear ENOSPC error naming a path"
        leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.suffix]
        assert not leftovers, f"point {n}: temporary files left behind: {leftovers}"
        recover(root, command_of(n, counts))
        assert_same(final_state(root), ref)


def test_power_durability_gives_the_same_rows(reference, tmp_path):
    ref, _ = reference
    scenario(tmp_path, durable=True)
    assert_same(final_state(tmp_path), ref)
