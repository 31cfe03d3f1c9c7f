"""Sliding-window data scheduler (PIC paper §2.2, Alg. 3) and the plain epoch scheduler.

Positions ``0..N-1`` are instance IDs: the shards already hold the IDs in one fixed random
permutation of the corpus. Window ``k`` covers the positions ``[k·S, k·S + W) mod N`` and is visited
in an order drawn only from ``(seed, k)``; the *stream* is window 0's order, then window 1's, ...
Memory is O(W): a window's order is regenerated on demand, never an O(N) array.

Edge cases:

- ``W >= N``: the window is clamped to all N IDs (``W = N``) and the stride to ``min(S, W)``; every
  window then is a fresh shuffle of all IDs, which is the epoch scheduler (``W = S = N``).
- ``N`` not a multiple of ``S``: the window start still advances by ``S`` modulo ``N``, so windows
  wrap around the end of the permutation. Consecutive windows still share exactly ``W − S`` IDs;
  a sweep is then ``N / S`` windows on average and each ID is visited ``W / S`` times per sweep on
  average (exactly when ``S`` divides ``N``).
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Iterator

import numpy as np

__all__ = ["SlidingWindowScheduler", "EpochScheduler", "batch_positions", "worker_steps"]


def batch_positions(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Stream positions of rank ``rank``'s block of global batch ``step``.

    Global batch ``j`` is positions ``[j·B·R, (j+1)·B·R)``; rank ``r`` takes the ``r``-th block of ``B``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    start = (step * world_size + rank) * batch_size
    return np.arange(start, start + batch_size, dtype=np.int64)


def worker_steps(start_step: int, num_steps: int | None, worker: int, num_workers: int) -> range:
    """Global batch indices that DataLoader worker ``worker`` of ``num_workers`` produces, in order.

    Worker ``p`` takes the batches ``j`` with ``(j − start_step) ≡ p (mod P)``, so the DataLoader's
    in-order round robin (which starts at worker 0) yields ``start_step, start_step + 1, ...``.
    ``num_steps=None`` means an endless stream.
    """
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} not in [0, {num_workers})")
    stop = sys.maxsize if num_steps is None else start_step + num_steps
    return range(start_step + worker, stop, num_workers)


class SlidingWindowScheduler:
    """Window ``k`` = IDs ``[k·S, k·S + W) mod N`` shuffled by ``(seed, k)``; see the module doc.

    The scheduler also keeps a cursor (the next stream position) for :meth:`next` / iteration,
    saved and restored by :meth:`state_dict` / :meth:`load_state_dict`.
    """

    _CACHED_WINDOWS = 2

    def __init__(self, num_instances: int, window: int, stride: int, seed: int = 0):
        if num_instances < 1:
            raise ValueError("num_instances must be >= 1")
        if window < 1 or stride < 1:
            raise ValueError("window and stride must be >= 1")
        if stride > window:
            raise ValueError(f"stride {stride} > window {window} would skip IDs")
        self.num_instances = int(num_instances)
        self.window = min(int(window), self.num_instances)
        self.stride = min(int(stride), self.window)
        self.seed = int(seed)
        self.position = 0
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- windows -----------------------------------------------------------------------------
    @property
    def majority_ratio(self) -> float:
        """γ = 1 − S/W: the share of a window that the next window visits again."""
        return 1.0 - self.stride / self.window

    def window_start(self, k: int) -> int:
        """First position of window ``k`` (modulo N)."""
        return (k * self.stride) % self.num_instances

    def window_range(self, k: int) -> tuple[int, int]:
        """Positions of window ``k`` as ``(start, stop)`` with ``stop - start == W``; reduce mod N."""
        start = self.window_start(k)
        return start, start + self.window

    def window_ids(self, k: int) -> np.ndarray:
        """Window ``k``'s IDs in visiting order (int64, length W)."""
        if k < 0:
            raise ValueError("window index must be >= 0")
        ids = self._cache.get(k)
        if ids is None:
            rng = np.random.Generator(np.random.Philox(key=[self.seed % 2**64, k]))
            ids = rng.permutation(self.window).astype(np.int64)
            ids += self.window_start(k)
            ids %= self.num_instances
            ids.flags.writeable = False
            self._cache[k] = ids
            while len(self._cache) > self._CACHED_WINDOWS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(k)
        return ids

    def shards_of_window(self, k: int, shard_size: int) -> np.ndarray:
        """Indices of the shards (of ``shard_size`` IDs each) that window ``k`` touches, in order."""
        start, stop = self.window_range(k)
        return _shard_span(start, stop, self.num_instances, shard_size)

    def rows_of_next_stride(self, k: int) -> tuple[int, int]:
        """The IDs that window ``k + 1`` adds to window ``k``, as ``(start, stop)``: reduce mod N
        (all N IDs when ``W = N``: every window is then a fresh shuffle of them)."""
        _, stop = self.window_range(k)
        return stop, stop + self.stride

    def shards_of_next_stride(self, k: int, shard_size: int) -> np.ndarray:
        """Shards that window ``k + 1`` adds to window ``k`` (what to prefetch during window ``k``;
        none when ``W = N``: every shard is in every window)."""
        if self.window == self.num_instances:
            return np.empty(0, dtype=np.int64)
        return _shard_span(*self.rows_of_next_stride(k), self.num_instances, shard_size)

    def rows_to_prefetch(self, step: int, batch_size: int) -> tuple[int, int] | None:
        """``(start, stop)`` of the IDs the next window adds when global batch ``step`` (of
        ``batch_size``) is the first to start in a window, else None: what the row store reads ahead."""
        first = step * batch_size
        if first % self.window >= batch_size:
            return None
        return self.rows_of_next_stride(self.window_of(first))

    def host_cache_rows(self, chunk_rows: int, world: int = 1) -> int:
        """The row store's host cache a window needs, in whole chunks of ``chunk_rows``: a window (and
        the next stride) that does not start on a chunk boundary spans one chunk more than its rows
        fill; a rank of ``world`` holds every world-th of those chunks."""
        chunks = -(-self.window // chunk_rows) + -(-self.stride // chunk_rows) + 2
        return -(-chunks // world) * chunk_rows

    # -- the stream --------------------------------------------------------------------------
    def ids_at(self, start: int, stop: int) -> np.ndarray:
        """The stream's IDs at stream positions ``[start, stop)``."""
        if start < 0 or stop < start:
            raise ValueError(f"bad stream range [{start}, {stop})")
        out = np.empty(stop - start, dtype=np.int64)
        pos = start
        while pos < stop:
            k, offset = divmod(pos, self.window)
            n = min(stop - pos, self.window - offset)
            out[pos - start:pos - start + n] = self.window_ids(k)[offset:offset + n]
            pos += n
        return out

    def window_of(self, position: int) -> int:
        """The window that stream position ``position`` belongs to."""
        return position // self.window

    def next(self, n: int) -> np.ndarray:
        """The next ``n`` IDs of the stream from the cursor; advances the cursor."""
        ids = self.ids_at(self.position, self.position + n)
        self.position += n
        return ids

    def iter(self, start: int | None = None) -> Iterator[int]:
        """IDs in visiting order from stream position ``start`` (default: the cursor), forever.

        Advances the cursor as it goes, so a state dict taken mid-iteration resumes right after
        the last ID yielded.
        """
        if start is not None:
            self.position = start
        while True:
            k, offset = divmod(self.position, self.window)
            for i in self.window_ids(k)[offset:]:
                self.position += 1
                yield int(i)

    def __iter__(self) -> Iterator[int]:
        return self.iter()

    @property
    def samples_per_epoch(self) -> int:
        """An "epoch" is N samples, whatever the scheduler."""
        return self.num_instances

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"num_instances": self.num_instances, "window": self.window,
                "stride": self.stride, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Restore the cursor; the configuration must match (it defines the stream)."""
        for key in ("num_instances", "window", "stride", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"scheduler {key} mismatch: checkpoint {state[key]}, "
                                 f"scheduler {getattr(self, key)}")
        self.position = int(state["position"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_instances={self.num_instances}, window={self.window}, "
                f"stride={self.stride}, seed={self.seed})")


class EpochScheduler(SlidingWindowScheduler):
    """The plain epoch scheduler: every epoch is a fresh shuffle of all N IDs (``W = S = N``)."""

    def __init__(self, num_instances: int, seed: int = 0):
        super().__init__(num_instances, num_instances, num_instances, seed)

    def __repr__(self) -> str:
        return f"EpochScheduler(num_instances={self.num_instances}, seed={self.seed})"


def _shard_span(start: int, stop: int, n: int, shard_size: int) -> np.ndarray:
    """Shards covering the cyclic position range ``[start, stop) mod n`` (``stop - start <= n``)."""
    num_shards = -(-n // shard_size)
    if stop - start >= n:
        return np.arange(num_shards, dtype=np.int64)
    length = stop - start
    start %= n
    stop = start + length
    if stop <= n:
        return np.arange(start // shard_size, (stop - 1) // shard_size + 1, dtype=np.int64)
    head = np.arange(start // shard_size, num_shards, dtype=np.int64)
    tail = np.arange(0, (stop - n - 1) // shard_size + 1, dtype=np.int64)
    return np.concatenate([head, tail[tail < head[0]]])
