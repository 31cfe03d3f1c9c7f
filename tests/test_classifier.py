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


def start_first_visits(weight, opt, visited, ids, z) -> None:
    """``row_init = feature`` by hand: rows seen for the first time take their first feature, u = 0."""
    with torch.no_grad():
        for pos, i in enumerate(ids.tolist()):
            if not visited[i]:
                visited[i] = True
                weight[i] = F.normalize(z[pos], dim=0)
                if opt.state:
                    opt.state[weight]["momentum_buffer"][i] = 0


def oracle_run(dtype, checkpoints, row_init="random"):
    """Dense oracle: yields (step, w, u) of all N rows after each step in ``checkpoints``."""
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    weight = torch.nn.Parameter(torch.from_numpy(init_rows(7, np.arange(N), D, np_dtype)))
    opt = torch.optim.SGD([weight], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    recent: OrderedDict[int, None] = OrderedDict()
    visited = np.zeros(N, bool)
    sched = SlidingWindowScheduler(N, W, S, seed=1)
    for step in range(STEPS):
        ids, z = batch(step, sched, dtype)
        if row_init == "feature":
            start_first_visits(weight, opt, visited, ids, z)
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


def assert_matches_oracle(clf, dtype, checks, tol, row_init="random"):
    """Train ``clf`` beside the dense oracle; every row equal to ``tol`` at each step of ``checks``."""
    done = 0
    for step, w_ref, u_ref in oracle_run(dtype, checks, row_init):
        train_steps(clf, range(done, step), dtype)
        done = step
        w, u = clf.rows.peek(np.arange(N))
        assert relative_error(w, w_ref) <= tol, step
        assert relative_error(u, u_ref) <= tol, step
        if step == checks[-1]:
            return w, u


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_recent_rows_match_dense_oracle(tmp_path, dtype, tol):
    checks = (1, 40, 150, STEPS)
    clf = make(tmp_path, dtype)
    w, u = assert_matches_oracle(clf, dtype, checks, tol)
    # the run really exercised lazy correction: most rows went through the store
    w_init = init_rows(7, np.arange(N), D, np.float64)
    assert np.abs(w - w_init).max(axis=1).min() > 0
    assert clf.log.num_steps == STEPS and len(clf.rows) == K


def test_feature_init_matches_dense_oracle(tmp_path):
    """row_init = feature: the recent rows equal the oracle that starts each row from its feature at
    its first visit, over windows that bring new rows while evicting and re-admitting others."""
    checks = (1, 40, 120)
    clf = make(tmp_path, row_init="feature")
    w, u = assert_matches_oracle(clf, torch.float64, checks, 1e-10, row_init="feature")
    stored = np.flatnonzero(~clf.store.never_written(np.arange(N)))  # visited, then evicted
    assert stored.size > K and np.isin(clf.rows.slot_ids, stored).any()  # some came back
    assert clf.store.never_written(np.arange(N - S, N)).all()  # and some rows are still to come


def rows_now(clf, ids):
    """``(w, u)`` of rows ``ids`` now, from either classifier."""
    if hasattr(clf, "rows"):
        return clf.rows.peek(ids)
    buf = clf.optimizer.state.get(clf.weight, {}).get("momentum_buffer")
    w = clf.weight.detach()[ids].numpy()
    return w, np.zeros_like(w) if buf is None else buf[ids].numpy()


@pytest.mark.parametrize("sampling", ["recent", "full"])
def test_first_visit_takes_the_feature_and_later_visits_do_not(tmp_path, sampling):
    """A row's first visit (a duplicate in the batch: its first occurrence) sets it to its unit
    feature with momentum 0, before the logits; a later visit, after an eviction in the recent
    set, finds the row as training left it."""
    clf = build_classifier(64, 8, sampling=sampling, capacity=16, momentum=0.9, weight_decay=1e-3,
                           store_url=str(tmp_path / "rows"), chunk_rows=8, dtype=torch.float64, seed=3,
                           row_init="feature")
    gen = torch.Generator().manual_seed(0)

    def visit(ids):
        z = torch.randn(len(ids), 8, dtype=torch.float64, generator=gen)
        logits, targets = clf.logits(z, np.array(ids))
        return z, logits, targets

    first_ids = [5, 9, 5, 20]
    before = rows_now(clf, [5, 9, 20])[0]
    z, logits, targets = visit(first_ids)
    w, u = rows_now(clf, [5, 9, 20])
    np.testing.assert_allclose(w, F.normalize(z[[0, 1, 3]], dim=1).numpy(), rtol=1e-14, atol=0)
    assert not np.any(u) and np.abs(before - w).min() > 0
    expected = F.normalize(z, dim=1) @ F.normalize(z[[0, 1, 0, 3]], dim=1).t() / 0.2
    np.testing.assert_allclose(logits.gather(1, targets[:, None])[:, 0].detach(), expected.diagonal())
    F.cross_entropy(logits, targets).backward()
    clf.step(0.1)
    z, logits, targets = visit(list(range(32, 48)))  # 16 new rows: 5, 9 and 20 leave the recent set
    F.cross_entropy(logits, targets).backward()
    clf.step(0.1)
    trained = rows_now(clf, [5, 60])
    assert np.abs(trained[1][0]).min() > 0  # row 5 has momentum now
    z, _, _ = visit([5, 60])
    again = rows_now(clf, [5, 60])
    np.testing.assert_array_equal(again[0][0], trained[0][0])
    np.testing.assert_array_equal(again[1][0], trained[1][0])
    np.testing.assert_allclose(again[0][1], F.normalize(z[1], dim=0).numpy(), rtol=1e-14, atol=0)
    assert not np.any(again[1][1])


@pytest.mark.parametrize("sampling", ["recent", "full"])
def test_feature_init_resumes_exactly(tmp_path, sampling):
    """A checkpoint, more steps that the resume abandons (first visits among them, stored), then a
    restore and the same steps again: bit-identical to the run without the detour; no row is started
    from a feature twice or missed."""
    def fresh(name):
        if sampling == "full":
            return build_classifier(N, D, sampling="full", momentum=MOMENTUM, weight_decay=WD,
                                    temperature=TAU, seed=7, dtype=torch.float64, row_init="feature")
        return make(tmp_path, name=name, row_init="feature", compact_min_steps=1)

    commit_at, abandon_at, end = 40, 70, 100
    killed = fresh("killed")
    train_steps(killed, range(commit_at))
    torch.save(killed.commit_state(), tmp_path / "ckpt.pt")
    train_steps(killed, range(commit_at, abandon_at))
    if sampling == "recent":
        killed.store.flush()
        killed = make(tmp_path, name="killed", row_init="feature", compact_min_steps=1)
    killed.load_state(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    train_steps(killed, range(commit_at, end))
    straight = fresh("straight")
    train_steps(straight, range(end))
    for a, b in zip(rows_now(killed, np.arange(N)), rows_now(straight, np.arange(N))):
        np.testing.assert_array_equal(a, b)


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
