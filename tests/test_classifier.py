"""The classifier against a dense oracle: a full N-row parameter with stock torch.optim.SGD."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from picstream.classifier import build_classifier
from picstream.lr_schedule import warmup_cosine_lr
from picstream.rowstore import init_rows
from picstream.scheduler import SlidingWindowScheduler

N, K, D, B = 2048, 256, 16, 32
W, S = 512, 128
STEPS, WARMUP, LR = 300, 30, 0.3
MOMENTUM, WD, TAU = 0.9, 1e-3, 0.2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 matmuls on a busy 2-core machine are far faster single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(step: int, sched: SlidingWindowScheduler, dtype=torch.float64):
    """Batch ``step``: the stream's ids and fixed random features."""
    ids = sched.ids_at(step * B, (step + 1) * B)
    z = torch.from_numpy(np.random.default_rng(step).normal(size=(B, D))).to(dtype)
    return ids, z


def lr_at(step: int) -> float:
    return warmup_cosine_lr(step, STEPS, LR, WARMUP)


def make(tmp_path, dtype=torch.float64, correction="exact", name="rows", **kw):
    return build_classifier(N, D, sampling="recent", capacity=K, momentum=MOMENTUM, weight_decay=WD,
                            temperature=TAU, correction=correction, store_url=str(tmp_path / name),
                            chunk_rows=128, cache_rows=W + S, dtype=dtype, seed=7, **kw)


def train_steps(clf, steps, dtype=torch.float64):
    sched = SlidingWindowScheduler(N, W, S, seed=1)
    for step in steps:
        ids, z = batch(step, sched, dtype)
        logits, targets = clf.logits(z, ids)
        F.cross_entropy(logits, targets).backward()
        clf.step(lr_at(step))


def oracle_run(dtype, checkpoints):
    """Dense oracle: yields (step, w, u) of all N rows after each step in ``checkpoints``."""
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    weight = torch.nn.Parameter(torch.from_numpy(init_rows(7, np.arange(N), D, np_dtype)))
    opt = torch.optim.SGD([weight], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    recent: OrderedDict[int, None] = OrderedDict()
    sched = SlidingWindowScheduler(N, W, S, seed=1)
    for step in range(STEPS):
        ids, z = batch(step, sched, dtype)
        for i in ids.tolist():
            recent[i] = None
            recent.move_to_end(i)
        while len(recent) > K:
            recent.popitem(last=False)
        rows = torch.tensor(list(recent))
        target = torch.from_numpy(np.searchsorted(rows.numpy(), ids, sorter=np.argsort(rows.numpy())))
        target = torch.argsort(rows)[target]
        logits = F.normalize(z, dim=1) @ F.normalize(weight[rows], dim=1).t() / TAU
        F.cross_entropy(logits, target).backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad()
        if step + 1 in checkpoints:
            yield step + 1, weight.detach().numpy().copy(), opt.state[weight]["momentum_buffer"].numpy().copy()


def relative_error(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_recent_rows_match_dense_oracle(tmp_path, dtype, tol):
    checks = (1, 40, 150, STEPS)
    clf = make(tmp_path, dtype)
    done = 0
    for step, w_ref, u_ref in oracle_run(dtype, checks):
        train_steps(clf, range(done, step), dtype)
        done = step
        w, u = clf.rows.peek(np.arange(N))
        assert relative_error(w, w_ref) <= tol, step
        assert relative_error(u, u_ref) <= tol, step
    # the run really exercised lazy correction: most rows went through the store
    w_init = init_rows(7, np.arange(N), D, np.float64)
    assert np.abs(w - w_init).max(axis=1).min() > 0
    assert clf.log.num_steps == STEPS and len(clf.rows) == K


def test_compacted_log_matches_dense_oracle(tmp_path):
    """Folding the log's old steps (here as often as possible) keeps the rows exact, and the log
    keeps only the steps a stored row can still start from."""
    (_, w_ref, u_ref), = oracle_run(torch.float64, (STEPS,))
    clf = make(tmp_path, compact_min_steps=1)
    train_steps(clf, range(STEPS))
    w, u = clf.rows.peek(np.arange(N))
    assert relative_error(w, w_ref) <= 1e-10 and relative_error(u, u_ref) <= 1e-10
    oldest = min(s for s, c in clf.rows._stored_at.items() if c > 0)
    assert 0 < clf.log.offset == oldest and clf.log.num_steps == STEPS
    state = clf.log.state_dict()
    assert len(state["lrs"]) == STEPS - oldest


def test_host_cache_sized_in_chunks_loads_each_chunk_about_once_per_sweep(tmp_path):
    """A chunk size that does not divide W + S: a cache of W + S rows reloads chunks in a loop."""
    n, window, stride, chunk = 6000, 1024, 256, 300
    sched = SlidingWindowScheduler(n, window, stride, seed=0)
    loads = {}
    for name, cache_rows in (("rows", window + stride), ("chunks", sched.host_cache_rows(chunk))):
        clf = build_classifier(n, 8, capacity=512, store_url=str(tmp_path / name), chunk_rows=chunk,
                               cache_rows=cache_rows, dtype=torch.float64)
        for j in range(3 * n // 64):
            clf.rows.admit(sched.ids_at(j * 64, (j + 1) * 64))
            clf.rows.sgd_step(None, 0.1)
        loads[name] = clf.store.chunk_loads / (3 * -(-n // chunk))  # per chunk per sweep
    assert loads["chunks"] <= 1.0 < 2.0 < loads["rows"], loads


def test_no_correction_differs_from_oracle(tmp_path):
    (_, w_ref, _), = oracle_run(torch.float64, (STEPS,))
    clf = make(tmp_path, correction="none")
    train_steps(clf, range(STEPS))
    assert relative_error(clf.rows.peek(np.arange(N))[0], w_ref) > 1e-3


def test_full_classifier_is_stock_sgd_over_all_rows():
    clf = build_classifier(300, 8, sampling="full", momentum=0.9, weight_decay=1e-3, seed=2,
                           dtype=torch.float64)
    ref = torch.nn.Parameter(torch.from_numpy(init_rows(2, np.arange(300), 8, np.float64)))
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(5):
        ids = np.random.default_rng(step).choice(300, 16, replace=False)
        z = torch.randn(16, 8, dtype=torch.float64)
        logits, targets = clf.logits(z, ids)
        assert logits.shape == (16, 300) and torch.equal(targets, torch.from_numpy(ids))
        F.cross_entropy(logits, targets).backward()
        clf.step(0.1)
        F.cross_entropy(F.normalize(z.float(), dim=1) @ F.normalize(ref.float(), dim=1).t() / 0.2,
                        torch.from_numpy(ids)).backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(clf.weight.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_cosine_logits_are_float32_masked_and_guarded(tmp_path):
    clf = build_classifier(100, 4, capacity=10, store_url=str(tmp_path / "r"), chunk_rows=10)
    z = torch.randn(3, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, targets = clf.logits(z, np.array([4, 5, 4]))
    assert logits.dtype == torch.float32 and logits.shape == (3, 10)
    assert torch.isinf(logits).sum() == 3 * 8 and targets[0] == targets[2]
    finite = logits[torch.isfinite(logits)]
    assert finite.abs().max() <= 1 / 0.2 + 1e-4
    clf.rows.weight[targets[0]] = 1e-30  # a row that decayed to (almost) nothing
    logits, _ = clf.logits(z, np.array([4, 5, 4]))
    assert not torch.isnan(logits).any()
    plain = build_classifier(100, 4, capacity=10, loss="plain", store_url=str(tmp_path / "p"))
    logits, t = plain.logits(z.float()[:2], np.array([1, 2]))
    torch.testing.assert_close(logits[:, t], z.float()[:2] @ plain.rows.weight[t].t())
    assert clf.min_row_norm() < 1e-20 and plain.device_bytes() == 2 * 10 * 4 * 4 + 10


def test_reopen_checks_shape(tmp_path):
    make(tmp_path).close()
    with pytest.raises(ValueError):
        build_classifier(N + 1, D, store_url=str(tmp_path / "rows"), dtype=torch.float64)


# ---------------------------------------------------------------- kill and resume
COMMIT_AT, KILL_AFTER = 120, 170


def worker(store_url: str, ckpt: str, ready: str) -> None:
    """Train, checkpoint at COMMIT_AT, keep writing to the store, announce, then wait to be killed."""
    torch.set_num_threads(1)
    clf = make(Path(store_url).parent, name=Path(store_url).name, compact_min_steps=1)
    train_steps(clf, range(COMMIT_AT))
    torch.save(clf.commit_state(), ckpt)
    train_steps(clf, range(COMMIT_AT, KILL_AFTER))
    clf.store.flush()
    Path(ready).write_text("ok")
    time.sleep(600)


@pytest.mark.slow
def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path):
    ckpt, ready = tmp_path / "ckpt.pt", tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path / "killed"), str(ckpt), str(ready)],
                            env=env)
    try:
        deadline = time.time() + 300
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, "worker failed"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    resumed = make(tmp_path, name="killed", compact_min_steps=1)
    resumed.load_state(torch.load(ckpt, weights_only=True))
    train_steps(resumed, range(COMMIT_AT, STEPS))

    straight = make(tmp_path, name="straight", compact_min_steps=1)
    train_steps(straight, range(COMMIT_AT))
    straight.commit_state()
    train_steps(straight, range(COMMIT_AT, STEPS))
    for a, b in zip(resumed.rows.peek(np.arange(N)), straight.rows.peek(np.arange(N))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(resumed.rows.slot_ids, straight.rows.slot_ids)
    assert straight.log.offset > 0 and resumed.log.offset == straight.log.offset  # folded alike


if __name__ == "__main__":
    worker(*sys.argv[1:4])
