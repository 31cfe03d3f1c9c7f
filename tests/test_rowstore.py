"""Row store, counter-based init, transition log and the recent-K table."""
from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
import torch

from picstream.rowstore import RecentRows, RowStore, TransitionLog, init_rows


def disk_bytes(path) -> int:
    return int(subprocess.check_output(["du", "-sb", str(path)]).split()[0])


# ---------------------------------------------------------------- init
def test_init_rows_deterministic_uniform_and_seeded():
    ids = np.array([0, 1, 7, 10**9 - 1, 10**12])
    a = init_rows(3, ids, 128)
    assert a.shape == (5, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, init_rows(3, ids, 128))
    np.testing.assert_array_equal(a[2], init_rows(3, np.array([7]), 128)[0])  # row-wise pure
    assert not np.array_equal(a, init_rows(4, ids, 128))
    big = init_rows(0, np.arange(4000), 64, np.float64)
    bound = 1 / np.sqrt(64)
    assert np.abs(big).max() <= bound
    assert abs(big.mean()) < 2e-3 and abs(big.std() - bound / np.sqrt(3)) < 2e-3
    assert len(np.unique(big)) == big.size


# ---------------------------------------------------------------- transition log
def naive_product(log: TransitionLog, lrs, s: int, t: int) -> np.ndarray:
    out = np.eye(2)
    for k in range(s, t):  # steps s+1..t use lrs[s..t-1]
        out = log.matrix(lrs[k]) @ out
    return out


def test_transition_log_matches_naive_products():
    rng = np.random.default_rng(0)
    log = TransitionLog(momentum=0.9, weight_decay=5e-4)
    lrs = rng.uniform(0.0, 0.5, 300)
    for t, lr in enumerate(lrs, 1):
        log.append(lr)
        if t in (1, 2, 3, 17, 64, 65, 129, 300):  # across tree growth
            starts = np.concatenate([[0, t], rng.integers(0, t + 1, 20)])
            prods = log.products(starts)
            for s, p in zip(starts, prods):
                ref = naive_product(log, lrs, s, t)
                np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        log.products(np.array([301]))


def test_transition_log_advance_modes_and_state_dict():
    rng = np.random.default_rng(1)
    const = TransitionLog(0.9, 1e-4)
    for _ in range(500):
        const.append(0.3)
    w, u = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    last = np.array([0, 0, 10, 250, 499, 500])
    ew, eu = const.advance(w, u, last, "exact")
    pw, pu = const.advance(w, u, last, "paper")
    np.testing.assert_allclose(pw, ew, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pu, eu, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ew[-1], w[-1])  # already current

    sched = TransitionLog(0.9, 1e-4)
    for t in range(500):
        sched.append(0.5 * (1 + np.cos(np.pi * t / 500)))
    ew, _ = sched.advance(w, u, last, "exact")
    pw, _ = sched.advance(w, u, last, "paper")
    nw, _ = sched.advance(w, u, last, "none")
    assert np.abs(pw - ew).max() > 1e-3 and np.array_equal(nw, w)

    clone = TransitionLog(0.0, 0.0)
    clone.load_state_dict(sched.state_dict())
    np.testing.assert_array_equal(clone.advance(w, u, last)[0], ew)
    f32 = sched.advance(w.astype(np.float32), u.astype(np.float32), last)[0]
    assert f32.dtype == np.float32
    with pytest.raises(ValueError):
        sched.advance(w, u, last, "bogus")


def test_compacted_log_answers_like_the_full_log_and_refuses_folded_starts():
    rng = np.random.default_rng(5)
    full, compact = TransitionLog(0.9, 1e-3), TransitionLog(0.9, 1e-3)
    for t, lr in enumerate(rng.uniform(0.01, 0.5, 200), 1):
        full.append(lr)
        compact.append(lr)
        if t in (50, 120, 121):
            compact.compact(t - 7)
    assert compact.offset == 114 and compact.num_steps == 200
    starts = np.array([0, 114, 150, 199, 200])
    np.testing.assert_allclose(compact.products(starts), full.products(starts), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError):
        compact.products(np.array([113]))
    clone = TransitionLog(0.0, 0.0)
    clone.load_state_dict(compact.state_dict())
    np.testing.assert_array_equal(clone.products(starts), compact.products(starts))  # resume: bit for bit
    assert len(compact.state_dict()["lrs"]) == 86


# ---------------------------------------------------------------- store
def test_store_untouched_rows_read_as_init(tmp_path):
    store = RowStore.create(str(tmp_path / "s"), 1000, 8, seed=5, chunk_rows=64)
    ids = np.array([3, 999, 3, 500])
    w, u, last = store.read(ids)
    np.testing.assert_array_equal(w, init_rows(5, ids, 8))
    assert not u.any() and not last.any()
    with pytest.raises(IndexError):
        store.read(np.array([1000]))


def test_store_roundtrip_through_small_cache_and_reopen(tmp_path):
    rng = np.random.default_rng(2)
    n, d = 2000, 8
    store = RowStore.create(str(tmp_path / "s"), n, d, chunk_rows=100, cache_rows=500,
                            dtype=np.float64)
    ref_w = init_rows(0, np.arange(n), d, np.float64)
    ref_u = np.zeros((n, d))
    ref_last = np.zeros(n, np.int64)
    for step in range(1, 12):
        ids = rng.choice(n, 50, replace=False)
        w, u = rng.normal(size=(50, d)), rng.normal(size=(50, d))
        store.write(ids, w, u, step)
        ref_w[ids], ref_u[ids], ref_last[ids] = w, u, step
        if step % 3 == 0:
            store.prefetch(int(rng.integers(n)), int(rng.integers(n)) + 300)
        q = rng.choice(n, 100)
        got = store.read(q)
        np.testing.assert_array_equal(got[0], ref_w[q])
        np.testing.assert_array_equal(got[1], ref_u[q])
        np.testing.assert_array_equal(got[2], ref_last[q])
        assert len(store._blocks) <= store.cache_blocks
    store.close()
    again = RowStore.open(str(tmp_path / "s"))
    got = again.read(np.arange(n))
    np.testing.assert_array_equal(got[0], ref_w)
    np.testing.assert_array_equal(got[1], ref_u)
    np.testing.assert_array_equal(got[2], ref_last)


def test_billion_row_store_opens_fast_and_grows_with_touched_rows(tmp_path):
    url = tmp_path / "big"
    t0 = time.perf_counter()
    store = RowStore.create(str(url), 10**9, 128, chunk_rows=4096)
    store = RowStore.open(str(url))
    assert time.perf_counter() - t0 < 2.0
    empty = disk_bytes(url)
    assert empty < 100_000
    row_bytes = 128 * 4 * 2 + 8
    sizes = []
    for m in (4096, 3 * 4096):
        store.write(np.arange(4096 * 1000, 4096 * 1000 + m), np.ones((m, 128), np.float32),
                    np.ones((m, 128), np.float32), 1)
        store.flush()
        sizes.append(disk_bytes(url) - empty)
    # bytes are O(M): the rows themselves plus one pre-image-free undo entry per chunk
    assert 4096 * row_bytes <= sizes[0] < 1.1 * 4096 * row_bytes
    assert 3 * 4096 * row_bytes <= sizes[1] < 1.1 * 3 * 4096 * row_bytes
    assert store.read(np.array([4096 * 1000]))[2][0] == 1


def test_commit_restore_undoes_later_writes(tmp_path):
    rng = np.random.default_rng(3)
    url = str(tmp_path / "s")
    store = RowStore.create(url, 1000, 4, chunk_rows=50, cache_rows=100, dtype=np.float64)

    def scribble(step):
        ids = rng.choice(1000, 120, replace=False)
        store.write(ids, rng.normal(size=(120, 4)), rng.normal(size=(120, 4)), step)

    def snapshot(s):
        return [a.copy() for a in s.read(np.arange(1000))]

    scribble(1)
    g1 = store.commit()
    at_g1 = snapshot(store)
    scribble(2)
    g2 = store.commit()
    at_g2 = snapshot(store)
    scribble(3)
    store.flush()
    scribble(4)  # partly unflushed: lost with the process
    empty_before = disk_bytes(tmp_path / "s")

    reopened = RowStore.open(url)  # as after kill -9
    reopened.restore(g2)
    for a, b in zip(snapshot(reopened), at_g2):
        np.testing.assert_array_equal(a, b)
    reopened.restore(g2)  # idempotent
    reopened.restore(g1)
    for a, b in zip(snapshot(reopened), at_g1):
        np.testing.assert_array_equal(a, b)
    assert reopened.generation == g1 and reopened.generations() == [0, g1]
    assert disk_bytes(tmp_path / "s") < empty_before
    # writing again in generation g1 and restoring to it is exact as well
    reopened.write(np.arange(100), np.zeros((100, 4)), np.zeros((100, 4)), 9)
    reopened.flush()
    reopened.restore(g1)
    for a, b in zip(snapshot(reopened), at_g1):
        np.testing.assert_array_equal(a, b)
    reopened.prune(g1)
    assert reopened.generations() == [g1]  # the current generation stays
    with pytest.raises(ValueError):
        reopened.restore(g1 + 5)


def test_restore_after_kill_mid_restore(tmp_path):
    """Re-running a restore that died after applying only the newest undo log gives the same state."""
    url = str(tmp_path / "s")
    store = RowStore.create(url, 400, 2, chunk_rows=20, dtype=np.float64)
    ids = np.arange(0, 400, 3)
    g = store.commit()
    target = [a.copy() for a in store.read(np.arange(400))]
    for step in (1, 2, 3):
        store.write(ids, np.full((ids.size, 2), step * 1.0), np.full((ids.size, 2), -step * 1.0), step)
        store.commit()
    # simulate a kill after the newest log was applied and deleted, before the rest
    newest = store.generations()[-1]
    partial = RowStore.open(url)
    partial.restore(newest)
    partial = RowStore.open(url)
    partial.restore(g)
    for a, b in zip(partial.read(np.arange(400)), target):
        np.testing.assert_array_equal(a, b)


def test_partition_covers_every_chunk_once(tmp_path):
    store = RowStore.create(str(tmp_path / "s"), 1000, 2, chunk_rows=64)
    owned = np.concatenate([store.owned_chunks(r, 3) for r in range(3)])
    assert sorted(owned.tolist()) == list(range(store.num_chunks))
    ids = np.array([0, 64, 128, 999])
    assert store.owner(ids, 3).tolist() == [0, 1, 2, (999 // 64) % 3]


# ---------------------------------------------------------------- recent rows
def test_recent_rows_admit_lru_and_write_back(tmp_path):
    store = RowStore.create(str(tmp_path / "s"), 100, 4, chunk_rows=10, dtype=np.float64)
    log = TransitionLog(0.9, 1e-4)
    rows = RecentRows(store, log, capacity=4, dtype=torch.float64)
    s = rows.admit(np.array([5, 6, 5]))
    assert s[0] == s[2] and s[0] != s[1] and len(rows) == 2
    assert rows.valid.sum() == 2
    rows.sgd_step(torch.ones(4, 4, dtype=torch.float64), 0.1)
    rows.admit(np.array([7, 8]))
    rows.admit(np.array([9, 6]))  # evicts 5, the least recently visited
    assert set(rows._slot_of) == {6, 7, 8, 9}
    w5, u5, last5 = store.read(np.array([5]))
    assert last5[0] == 1 and np.abs(u5).sum() > 0
    with pytest.raises(ValueError):
        rows.admit(np.arange(10, 15))
    state = rows.state_dict()
    rows.load_state_dict(state)
    assert set(rows._slot_of) == {6, 7, 8, 9}


def test_undo_log_links_present_chunks_and_skips_absent_ones(tmp_path):
    """A pre-image costs no copy: absent chunks leave nothing in the undo log, present ones a hard link
    that later in-place writes of the same generation never touch; restore is exact either way."""
    url = tmp_path / "s"
    store = RowStore.create(str(url), 400, 4, chunk_rows=100, cache_rows=100, dtype=np.float64)
    store.write(np.arange(0, 100, 7), np.full((15, 4), 1.5), np.full((15, 4), -1.5), 3)  # chunk 0
    g = store.commit()
    before = [a.copy() for a in store.read(np.arange(400))]
    for step in (4, 5):  # chunk 0 was on disk, chunk 2 never was; each stored twice in generation g
        store.write(np.array([5, 250]), np.full((2, 4), step), np.full((2, 4), -step), step)
        store.read(np.array([150]))  # evicts (stores) the dirty block
    store.flush()
    undo, main = url / "undo" / str(g), url / "weight" / "c"
    assert (undo / "0.weight").stat().st_nlink == 1  # the link outlived the rewrites
    assert not (undo / "2.weight").exists() and (undo / "2.saved").exists() and (main / "2" / "0").exists()
    assert store.read(np.array([5, 250]))[2].tolist() == [5, 5]
    reopened = RowStore.open(str(url))
    reopened.restore(g)
    for a, b in zip(reopened.read(np.arange(400)), before):
        np.testing.assert_array_equal(a, b)
    assert not (main / "2" / "0").exists()  # the absent pre-image restores as absent: no disk


def test_store_on_a_non_local_zarr_store_commits_and_restores(tmp_path):
    """Any zarr store (here an in-memory one) goes through the store's key API."""
    import zarr
    mem = zarr.storage.MemoryStore()
    rng = np.random.default_rng(4)
    store = RowStore.create(mem, 300, 3, chunk_rows=40, cache_rows=80, dtype=np.float64)
    store.write(np.arange(0, 300, 4), rng.normal(size=(75, 3)), rng.normal(size=(75, 3)), 1)
    g = store.commit()
    at_g = [a.copy() for a in store.read(np.arange(300))]
    store.write(np.arange(0, 300, 3), rng.normal(size=(100, 3)), rng.normal(size=(100, 3)), 2)
    store.flush()
    assert store.read(np.array([3]))[2][0] == 2
    store.restore(g)
    for a, b in zip(store.read(np.arange(300)), at_g):
        np.testing.assert_array_equal(a, b)
