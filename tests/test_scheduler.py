"""Sliding-window and epoch schedulers: window contents, stream, resume, split, visit statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from picstream.scheduler import (EpochScheduler, SlidingWindowScheduler, batch_positions,
                                 worker_steps)


def reference_window(n: int, w: int, s: int, k: int) -> set[int]:
    """The paper's definition: positions [kS, kS + W) modulo N (after clamping W to N)."""
    w = min(w, n)
    return {(k * s + i) % n for i in range(w)}


@pytest.mark.parametrize("n,w,s", [(1000, 128, 16), (1000, 300, 128), (97, 40, 7), (50, 64, 8)])
def test_window_contents_match_definition(n, w, s):
    sched = SlidingWindowScheduler(n, w, s, seed=3)
    for k in list(range(12)) + [1000, 12345]:
        ids = sched.window_ids(k)
        assert ids.dtype == np.int64 and len(ids) == min(w, n)
        assert len(np.unique(ids)) == len(ids)
        assert set(ids.tolist()) == reference_window(n, w, s, k)


def test_consecutive_windows_overlap_exactly_w_minus_s():
    n, w, s = 1000, 300, 128   # 1000 is not a multiple of 128: windows wrap around the end
    sched = SlidingWindowScheduler(n, w, s, seed=0)
    for k in range(40):
        shared = np.intersect1d(sched.window_ids(k), sched.window_ids(k + 1))
        assert len(shared) == w - s


def test_window_order_depends_only_on_seed_and_k():
    a = SlidingWindowScheduler(5000, 512, 64, seed=7)
    b = SlidingWindowScheduler(5000, 512, 64, seed=7)
    c = SlidingWindowScheduler(5000, 512, 64, seed=8)
    b.window_ids(9)  # a different access history must not matter
    np.testing.assert_array_equal(a.window_ids(3), b.window_ids(3))
    assert not np.array_equal(a.window_ids(3), c.window_ids(3))
    # the same positions of window 0 and window N/S (same set) are visited in a new order
    assert not np.array_equal(a.window_ids(0), a.window_ids(5000 * 64 // 64))


def test_every_instance_visited_w_over_s_times_per_sweep():
    n, w, s = 2048, 256, 32
    sched = SlidingWindowScheduler(n, w, s, seed=1)
    counts = np.zeros(n, dtype=np.int64)
    for k in range(n // s):
        np.add.at(counts, sched.window_ids(k), 1)
    assert (counts == w // s).all()


def test_window_clamped_when_larger_than_dataset():
    sched = SlidingWindowScheduler(100, 2**17, 2**14, seed=0)
    assert (sched.window, sched.stride) == (100, 100)
    for k in range(3):
        assert sorted(sched.window_ids(k).tolist()) == list(range(100))
    assert not np.array_equal(sched.window_ids(0), sched.window_ids(1))


def test_epoch_scheduler_is_full_window():
    ep = EpochScheduler(1234, seed=5)
    sw = SlidingWindowScheduler(1234, 1234, 1234, seed=5)
    for e in range(3):
        assert sorted(ep.window_ids(e).tolist()) == list(range(1234))
    np.testing.assert_array_equal(ep.ids_at(100, 3000), sw.ids_at(100, 3000))
    assert ep.samples_per_epoch == 1234


def test_invalid_arguments():
    with pytest.raises(ValueError):
        SlidingWindowScheduler(100, 10, 20, seed=0)   # stride > window leaves gaps
    with pytest.raises(ValueError):
        SlidingWindowScheduler(0, 10, 5, seed=0)
    with pytest.raises(ValueError):
        batch_positions(0, 4, rank=2, world_size=2)


def test_ids_at_is_concatenation_of_windows():
    n, w, s = 777, 100, 30
    sched = SlidingWindowScheduler(n, w, s, seed=2)
    stream = np.concatenate([SlidingWindowScheduler(n, w, s, seed=2).window_ids(k)
                             for k in range(20)])
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = int(rng.integers(0, len(stream)))
        b = int(rng.integers(a, len(stream) + 1))
        np.testing.assert_array_equal(sched.ids_at(a, b), stream[a:b])
    assert len(sched._cache) <= 2


def test_memory_is_o_window_for_huge_n():
    sched = SlidingWindowScheduler(10**12, 2**12, 2**9, seed=0)
    ids = sched.ids_at(10**9, 10**9 + 10_000)
    assert ids.min() >= 0 and ids.max() < 10**12
    assert sum(a.nbytes for a in sched._cache.values()) <= 2 * 8 * 2**12


def test_iteration_and_resume_mid_window():
    sched = SlidingWindowScheduler(1000, 256, 64, seed=4)
    it = iter(sched)
    head = [next(it) for _ in range(1234)]          # stops mid-window (1234 % 256 != 0)
    state = sched.state_dict()
    tail = [next(it) for _ in range(3000)]
    assert head + tail == sched.ids_at(0, 4234).tolist()

    resumed = SlidingWindowScheduler(1000, 256, 64, seed=4)
    resumed.load_state_dict(state)
    assert [next(iter(resumed)) for _ in range(1)] == tail[:1]
    assert resumed.next(2999).tolist() == tail[1:]
    with pytest.raises(ValueError):
        SlidingWindowScheduler(1000, 256, 32, seed=4).load_state_dict(state)


def test_shards_of_window_and_next_stride():
    n, w, s, size = 1000, 300, 128, 64
    sched = SlidingWindowScheduler(n, w, s, seed=0)
    for k in range(20):
        cur = set(np.unique(sched.window_ids(k) // size).tolist())
        assert set(sched.shards_of_window(k, size).tolist()) == cur
        nxt = set(np.unique(sched.window_ids(k + 1) // size).tolist())
        assert nxt - cur <= set(sched.shards_of_next_stride(k, size).tolist()) <= nxt


def _revisit_gaps(stream: np.ndarray) -> np.ndarray:
    """Distances between consecutive visits of the same ID in a stream."""
    order = np.argsort(stream, kind="stable")
    same = stream[order][1:] == stream[order][:-1]
    return (order[1:] - order[:-1])[same]


def test_visiting_distance_statistics_proposition_1():
    n = 4096
    epoch = EpochScheduler(n, seed=0).ids_at(0, 30 * n)
    gaps = _revisit_gaps(epoch)
    assert abs(gaps.mean() / n - 1) < 0.02          # Proposition 1: mean distance N

    n, w, s = 2048, 256, 32
    sliding = SlidingWindowScheduler(n, w, s, seed=0)
    gaps = _revisit_gaps(sliding.ids_at(0, 20 * (n // s) * w))   # 20 sweeps: small edge effects
    short = gaps < 2 * w                             # revisits in the next window
    assert abs(short.mean() - sliding.majority_ratio) < 0.01   # γ = 1 − S/W = 0.875
    assert abs(gaps[short].mean() / w - 1) < 0.02    # majority distance D = W
    assert gaps[~short].min() > n - 2 * w            # the rest wait for the next sweep


class _StreamIDs(IterableDataset):
    """Yields whole batches (step, ids) the way the loader splits work across workers."""

    def __init__(self, sched, batch_size, rank, world_size, start_step, num_steps):
        self.args = sched, batch_size, rank, world_size, start_step, num_steps

    def __iter__(self):
        sched, b, rank, world, start, steps = self.args
        info = get_worker_info()
        p, workers = (info.id, info.num_workers) if info else (0, 1)
        for j in worker_steps(start, steps, p, workers):
            pos = batch_positions(j, b, rank, world)
            yield j, torch.from_numpy(sched.ids_at(int(pos[0]), int(pos[-1]) + 1))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_split_across_ranks_and_forked_workers():
    n, w, s, b, world, start, steps = 600, 128, 32, 5, 2, 3, 11
    sched = SlidingWindowScheduler(n, w, s, seed=9)
    got = []
    for rank in range(world):
        ds = _StreamIDs(sched, b, rank, world, start, steps)
        loader = DataLoader(ds, batch_size=None, num_workers=3, multiprocessing_context="fork")
        batches = list(loader)
        assert [j for j, _ in batches] == list(range(start, start + steps))   # order restored
        got.append(torch.cat([ids for _, ids in batches]).numpy())
    assert len(got[0]) == len(got[1])                                          # no uneven ranks
    expected = sched.ids_at(start * b * world, (start + steps) * b * world)
    merged = np.concatenate(got)
    assert len(merged) == len(expected)
    np.testing.assert_array_equal(np.sort(merged), np.sort(expected))          # each exactly once
    np.testing.assert_array_equal(got[1][:b], expected[b:2 * b])              # rank 1's block
