"""Classifier rows (weight, SGD momentum, last step) in zarr, behind a host block cache and an undo log.

Layout of a store (a zarr v3 group at any local path or fsspec URL)::

    weight     (N, D)  float32|float64, fill 0      chunks of ``chunk_rows`` rows, uncompressed
    momentum   (N, D)  same
    last_step  (N,)    int64, fill −1               −1 = never written: reads as init(seed, id), u = 0, step 0
    undo/<g>/  weight, momentum, last_step, saved   pre-images of the chunks first written in generation g

Untouched chunks are never stored (``write_empty_chunks`` off), so an N = 1e9 store costs nothing until
rows are written. All zarr I/O moves whole chunks as contiguous slices.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zarr

from .init import init_rows

FORMAT = "picstream-rowstore-1"
_FLAG_CHUNK = 65536
_ARRAY_CONFIG = {"write_empty_chunks": False}


@dataclass
class _Block:
    """One chunk of rows in host memory, in the on-disk representation (last_step −1 = untouched)."""
    w: np.ndarray
    u: np.ndarray
    last: np.ndarray
    dirty: bool = False


def _open_group(url: str, mode: str, storage_options: dict | None) -> zarr.Group:
    kwargs = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(url, mode=mode, zarr_format=3, **kwargs)


def _create_rows(group: zarr.Group, num_rows: int, dim: int, chunk_rows: int, dtype) -> None:
    for name, shape, chunks, dt, fill in (
            ("weight", (num_rows, dim), (chunk_rows, dim), dtype, 0),
            ("momentum", (num_rows, dim), (chunk_rows, dim), dtype, 0),
            ("last_step", (num_rows,), (chunk_rows,), np.int64, -1)):
        group.create_array(name, shape=shape, chunks=chunks, dtype=dt, fill_value=fill,
                           compressors=None, config=_ARRAY_CONFIG)


class RowStore:
    """Rows of an N×D classifier with their SGD momentum, on disk, with a bounded host LRU cache."""

    def __init__(self, root: zarr.Group, cache_rows: int | None = None):
        attrs = root.attrs
        if attrs.get("format") != FORMAT:
            raise ValueError("not a picstream row store")
        self._root = root
        self.num_rows = int(attrs["num_rows"])
        self.dim = int(attrs["dim"])
        self.seed = int(attrs["seed"])
        self.chunk_rows = int(attrs["chunk_rows"])
        self.generation = int(attrs["generation"])
        self._w, self._u, self._last = root["weight"], root["momentum"], root["last_step"]
        self.dtype = np.dtype(self._w.dtype)
        self.num_chunks = -(-self.num_rows // self.chunk_rows)
        cache_rows = cache_rows or 2**17 + 2**14
        self.cache_blocks = max(1, -(-cache_rows // self.chunk_rows))
        self._blocks: OrderedDict[int, _Block] = OrderedDict()
        self._inflight: set[int] = set()
        self._cond = threading.Condition(threading.RLock())
        self._executor: ThreadPoolExecutor | None = None
        self._saved = self._saved_chunks(self.generation)

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, url: str, num_rows: int, dim: int, *, seed: int = 0, chunk_rows: int = 4096,
               dtype=np.float32, cache_rows: int | None = None, storage_options: dict | None = None,
               overwrite: bool = False) -> "RowStore":
        """Create an empty store (no chunk is written: every row reads as its initial value)."""
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError("dtype must be float32 or float64")
        root = _open_group(url, "w" if overwrite else "w-", storage_options)
        _create_rows(root, num_rows, dim, chunk_rows, np.dtype(dtype))
        root.attrs.update({"format": FORMAT, "num_rows": int(num_rows), "dim": int(dim),
                           "seed": int(seed), "chunk_rows": int(chunk_rows), "generation": 0})
        return cls(root, cache_rows)

    @classmethod
    def open(cls, url: str, *, cache_rows: int | None = None,
             storage_options: dict | None = None) -> "RowStore":
        return cls(_open_group(url, "r+", storage_options), cache_rows)

    # ---------------------------------------------------------------- chunk I/O
    def _slice(self, c: int) -> slice:
        return slice(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.num_rows))

    def _load(self, c: int) -> _Block:
        sl = self._slice(c)
        return _Block(self._w[sl], self._u[sl], self._last[sl])

    def _undo_group(self, g: int) -> zarr.Group:
        undo = self._root.require_group("undo")
        if str(g) in undo:
            return undo[str(g)]
        group = undo.create_group(str(g))
        _create_rows(group, self.num_rows, self.dim, self.chunk_rows, self.dtype)
        group.create_array("saved", shape=(self.num_chunks,), chunks=(_FLAG_CHUNK,), dtype=np.uint8,
                           fill_value=0, compressors=None, config=_ARRAY_CONFIG)
        return group

    def _generations(self) -> list[int]:
        if "undo" not in self._root:
            return []
        return sorted(int(k) for k in self._root["undo"].group_keys())

    def _saved_chunks(self, g: int) -> set[int]:
        if g not in self._generations():
            return set()
        return set(np.flatnonzero(self._root["undo"][str(g)]["saved"][:]).tolist())

    def _store_block(self, c: int, blk: _Block) -> None:
        """Write a block as whole chunks, saving the chunk's pre-image first in this generation."""
        sl = self._slice(c)
        if c not in self._saved:
            undo = self._undo_group(self.generation)
            undo["weight"][sl] = self._w[sl]
            undo["momentum"][sl] = self._u[sl]
            undo["last_step"][sl] = self._last[sl]
            undo["saved"][c] = 1  # the flag makes the pre-image valid; written after it
            self._saved.add(c)
        self._w[sl] = blk.w
        self._u[sl] = blk.u
        self._last[sl] = blk.last
        blk.dirty = False

    # ---------------------------------------------------------------- cache
    def _insert(self, c: int, blk: _Block) -> None:
        self._blocks[c] = blk
        while len(self._blocks) > self.cache_blocks:
            old, victim = self._blocks.popitem(last=False)
            if victim.dirty:
                self._store_block(old, victim)

    def _block(self, c: int) -> _Block:
        """The cached block of chunk ``c`` (loading it, or waiting for its prefetch). Lock held."""
        while c in self._inflight:
            self._cond.wait()
        blk = self._blocks.get(c)
        if blk is None:
            blk = self._load(c)
            self._insert(c, blk)
        else:
            self._blocks.move_to_end(c)
        return blk

    def _by_chunk(self, ids: np.ndarray):
        """Yield ``(chunk, positions in ids, row offsets in the chunk)``."""
        chunks = ids // self.chunk_rows
        order = np.argsort(chunks, kind="stable")
        bounds = np.flatnonzero(np.diff(chunks[order])) + 1
        for pos in np.split(order, bounds):
            if pos.size:
                c = int(chunks[pos[0]])
                yield c, pos, ids[pos] - c * self.chunk_rows

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise IndexError(f"row ids must lie in [0, {self.num_rows})")
        return ids

    def read(self, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(w, u, last_step)`` of rows ``ids``; untouched rows read as ``(init, 0, 0)``."""
        ids = self._check_ids(ids)
        w = np.empty((ids.size, self.dim), self.dtype)
        u = np.empty_like(w)
        last = np.empty(ids.size, np.int64)
        with self._cond:
            for c, pos, off in self._by_chunk(ids):
                blk = self._block(c)
                w[pos], u[pos], last[pos] = blk.w[off], blk.u[off], blk.last[off]
        fresh = last < 0
        if fresh.any():
            w[fresh] = init_rows(self.seed, ids[fresh], self.dim, self.dtype)
            u[fresh] = 0
            last[fresh] = 0
        return w, u, last

    def write(self, ids, w: np.ndarray, u: np.ndarray, last_step) -> None:
        """Store rows ``ids`` (distinct) as ``(w, u)`` valid at step ``last_step``."""
        ids = self._check_ids(ids)
        last_step = np.broadcast_to(np.asarray(last_step, dtype=np.int64), ids.shape)
        with self._cond:
            for c, pos, off in self._by_chunk(ids):
                blk = self._block(c)
                blk.w[off], blk.u[off], blk.last[off] = w[pos], u[pos], last_step[pos]
                blk.dirty = True

    def prefetch(self, start: int, stop: int) -> None:
        """Load the chunks of rows ``[start, stop)`` (taken mod N) in a background thread."""
        rows = np.arange(start, stop, dtype=np.int64) % self.num_rows
        chunks = np.unique(rows // self.chunk_rows)
        if self._executor is None:  # created lazily: the process may fork loader workers first
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rowstore")
        for c in chunks[: self.cache_blocks].tolist():
            self._executor.submit(self._prefetch_chunk, c)

    def _prefetch_chunk(self, c: int) -> None:
        with self._cond:
            if c in self._blocks or c in self._inflight:
                return
            self._inflight.add(c)
        try:
            blk = self._load(c)  # not cached and not in flight: nobody writes this chunk meanwhile
        finally:
            with self._cond:
                self._inflight.discard(c)
                if c not in self._blocks:
                    self._insert(c, blk)
                self._cond.notify_all()

    def _drain(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---------------------------------------------------------------- durability
    def flush(self) -> None:
        """Write every dirty block to zarr."""
        with self._cond:
            for c, blk in self._blocks.items():
                if blk.dirty:
                    self._store_block(c, blk)

    def commit(self) -> int:
        """Flush and start a new generation; returns it (a checkpoint records this number)."""
        with self._cond:
            self.flush()
            self.generation += 1
            self._root.attrs["generation"] = self.generation
            self._saved = set()
            return self.generation

    def restore(self, generation: int) -> None:
        """Return to the exact state at the ``commit()`` that returned ``generation``.

        Applies the undo logs of generations ≥ ``generation`` newest first, then deletes them newest
        first; rerunning after a kill mid-restore gives the same result. Unflushed writes are dropped.
        """
        self._drain()
        with self._cond:
            if generation > self.generation:
                raise ValueError(f"generation {generation} is newer than the store's {self.generation}")
            self._blocks.clear()
            gens = [g for g in self._generations() if g >= generation][::-1]
            for g in gens:
                undo = self._root["undo"][str(g)]
                for c in np.flatnonzero(undo["saved"][:]).tolist():
                    sl = self._slice(c)
                    self._w[sl] = undo["weight"][sl]
                    self._u[sl] = undo["momentum"][sl]
                    self._last[sl] = undo["last_step"][sl]
            for g in gens:
                del self._root["undo"][str(g)]
            self.generation = generation
            self._root.attrs["generation"] = generation
            self._saved = set()

    def prune(self, keep_from: int) -> None:
        """Delete the undo logs of generations older than ``keep_from`` (no restore before it)."""
        with self._cond:
            for g in self._generations():
                if g < keep_from:
                    del self._root["undo"][str(g)]

    def close(self) -> None:
        self._drain()
        self.flush()

    # ---------------------------------------------------------------- distribution
    def owned_chunks(self, rank: int, world_size: int) -> np.ndarray:
        """The chunks a rank owns in a model-parallel layout (chunk ``c`` belongs to ``c % world``)."""
        return np.arange(rank, self.num_chunks, world_size)

    def owner(self, ids, world_size: int) -> np.ndarray:
        """The rank that owns each row id."""
        return (self._check_ids(ids) // self.chunk_rows) % world_size
