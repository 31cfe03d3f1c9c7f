"""Classifier rows (weight, SGD momentum, last step) in zarr, behind a host block cache and an undo log.

Layout of a store (a zarr v3 group at any local path or fsspec URL)::

    weight     (N, D)  float32|float64, fill 0      chunks of ``chunk_rows`` rows, uncompressed
    momentum   (N, D)  same
    last_step  (N,)    int64, fill −1               −1 = never written: reads as init(seed, id), u = 0, step 0
    undo/<g>/  weight, momentum, last_step, saved   pre-images of the chunks first written in generation g

Untouched chunks are never stored, so an N = 1e9 store costs nothing until rows are written. Chunks move
whole, as the zarr store's raw chunk objects (uncompressed little-endian bytes, edge chunks padded with
the fill value): plain file I/O on a local store, the store's key API elsewhere; zarr itself creates the
arrays and reads the flags. A pre-image is the chunk object as it is: an absent chunk needs no read and
no write; on a local store a present one is a hard link, and a chunk file shared with a link is never
written in place (it is replaced), so the pre-image keeps its bytes.

Invariants: a cached block is the newest copy of its rows (read-your-writes); a chunk is written by one
thread at a time (the cache lock); before a chunk is first written in a generation its pre-image is in the
undo log and then its flag is set, so ``restore`` is exact after a kill at any point; host memory is
``cache_rows`` rows, independent of N.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .init import init_rows

FORMAT = "picstream-rowstore-1"
_FLAG_CHUNK = 65536
_ARRAY_CONFIG = {"write_empty_chunks": False}
_ARRAYS = ("weight", "momentum", "last_step")


class _StoreChunks:
    """Chunk objects of any zarr store, by key, through the store's own API."""

    def __init__(self, store):
        self.store = store

    def read_into(self, key: str, out: np.ndarray) -> bool:
        """Fill ``out`` from the chunk at ``key``; False (``out`` untouched) when it is absent."""
        buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
        if buf is None:
            return False
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(buf.to_bytes(), np.uint8)
        return True

    def write(self, key: str, data: np.ndarray) -> None:
        sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data.tobytes())))

    def copy(self, src: str, dst: str) -> None:
        """Make ``dst`` what ``src`` is now (absent included)."""
        buf = sync(self.store.get(src, prototype=default_buffer_prototype()))
        sync(self.store.delete(dst) if buf is None else self.store.set(dst, buf))


class _LocalChunks(_StoreChunks):
    """Chunk files of a local store. A copy is a hard link; a write goes in place into a file of its own
    and replaces a file that has other links (or is absent) by a new one."""

    def __init__(self, store: LocalStore):
        super().__init__(store)
        self.root = str(store.root)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def read_into(self, key: str, out: np.ndarray) -> bool:
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                    raise OSError(f"chunk {key} is truncated")
        except FileNotFoundError:
            return False
        return True

    def write(self, key: str, data: np.ndarray) -> None:
        path, view = self._path(key), memoryview(np.ascontiguousarray(data)).cast("B")
        try:
            with open(path, "r+b", buffering=0) as f:
                st = os.fstat(f.fileno())
                if st.st_nlink == 1 and st.st_size == view.nbytes:
                    f.write(view)
                    return
        except FileNotFoundError:
            pass
        _unlink(path)
        try:
            f = open(path, "xb", buffering=0)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(path, "xb", buffering=0)
        with f:
            f.write(view)

    def copy(self, src: str, dst: str) -> None:
        src, dst = self._path(src), self._path(dst)
        _unlink(dst)
        try:
            os.link(src, dst)
        except FileNotFoundError:
            if os.path.exists(src):  # dst's folder is new
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.link(src, dst)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
    """Rows of an N×D classifier with their SGD momentum, on disk, with a bounded host LRU cache.

    The cache is a pool of ``cache_blocks`` slots, each one whole chunk; a read or write gathers or
    scatters all its rows in one indexing operation over the pool.
    """

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
        arrays = [root[name] for name in _ARRAYS]
        if any(a.compressors or a.metadata.codecs != arrays[0].metadata.codecs for a in arrays):
            raise ValueError("row arrays must be uncompressed")
        self._encode_key = arrays[0].metadata.chunk_key_encoding.encode_chunk_key
        self._chunks = (_LocalChunks if isinstance(root.store, LocalStore) else _StoreChunks)(root.store)
        self._prefix = f"{root.path}/" if root.path else ""
        self.dtype = np.dtype(arrays[0].dtype)
        self.num_chunks = -(-self.num_rows // self.chunk_rows)
        cache_rows = cache_rows or 2**17 + 2**14
        self.cache_blocks = max(1, -(-cache_rows // self.chunk_rows))
        slots, r, d = min(self.cache_blocks, self.num_chunks), self.chunk_rows, self.dim
        # np.zeros: pages are committed when a slot is first used
        self._pool = (np.zeros((slots, r, d), self.dtype), np.zeros((slots, r, d), self.dtype),
                      np.zeros((slots, r), np.int64))
        self._flat = (self._pool[0].reshape(-1, d), self._pool[1].reshape(-1, d), self._pool[2].reshape(-1))
        self._dirty = np.zeros(slots, bool)
        self._free = list(range(slots))[::-1]
        self._blocks: OrderedDict[int, int] = OrderedDict()  # chunk -> slot, least recent first
        self._inflight: dict[int, int] = {}  # chunk -> slot being loaded by the prefetch thread
        self._pinned: set[int] = set()  # chunks the current read/write needs resident
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
    def _key(self, base: str, name: str, c: int) -> str:
        return base + name + "/" + self._encode_key((c,) if name in ("last_step", "saved") else (c, 0))

    def _undo_base(self, g: int) -> str:
        return f"{self._prefix}undo/{g}/"

    def _load(self, c: int, slot: int) -> None:
        """Chunk ``c`` into pool slot ``slot`` (edge chunks padded); an absent chunk reads as the fill."""
        for name, pool, fill in zip(_ARRAYS, self._pool, (0, 0, -1)):
            if not self._chunks.read_into(self._key(self._prefix, name, c), pool[slot]):
                pool[slot].fill(fill)

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

    def _saved_chunks(self, g: int) -> np.ndarray:
        """Generation ``g``'s flags: chunk ``c`` has its pre-image in the undo log iff ``flags[c]``."""
        if g not in self._generations():
            return np.zeros(self.num_chunks, np.uint8)
        return self._root["undo"][str(g)]["saved"][:]

    def _store_block(self, c: int, slot: int) -> None:
        """Write a cached block as whole chunks, saving the chunk's pre-image first in this generation."""
        if not self._saved[c]:
            if not self._saved.any():
                self._undo_group(self.generation)
            undo = self._undo_base(self.generation)
            for name in _ARRAYS:
                self._chunks.copy(self._key(self._prefix, name, c), self._key(undo, name, c))
            self._saved[c] = 1  # the flag makes the pre-image valid; written after it
            f = c // _FLAG_CHUNK
            flags = np.zeros(_FLAG_CHUNK, np.uint8)
            part = self._saved[f * _FLAG_CHUNK:(f + 1) * _FLAG_CHUNK]
            flags[:part.size] = part
            self._chunks.write(self._key(undo, "saved", f), flags)
        for name, pool in zip(_ARRAYS, self._pool):
            self._chunks.write(self._key(self._prefix, name, c), pool[slot])
        self._dirty[slot] = False

    # ---------------------------------------------------------------- cache
    def _alloc(self) -> int | None:
        """A free slot, evicting the least recently used unpinned block (written if dirty), or None
        when every slot is pinned or being prefetched. Lock held."""
        if self._free:
            return self._free.pop()
        for c, slot in self._blocks.items():
            if c not in self._pinned:
                break
        else:
            return None
        if self._dirty[slot]:
            self._store_block(c, slot)
        del self._blocks[c]
        return slot

    def _block(self, c: int) -> int:
        """The slot of chunk ``c`` (loading it, or waiting for its prefetch). Lock held."""
        while True:
            while c in self._inflight:
                self._cond.wait()
            slot = self._blocks.get(c)
            if slot is not None:
                self._blocks.move_to_end(c)
                return slot
            slot = self._alloc()
            if slot is not None:
                break
            if not self._inflight:
                raise RuntimeError("every cache slot is pinned")
            self._cond.wait()  # the unpinned slots are all being prefetched
        try:
            self._load(c, slot)
        except BaseException:
            self._free.append(slot)
            raise
        self._blocks[c] = slot
        return slot

    def _resident(self, ids: np.ndarray):
        """Yield ``(positions in ids, flat pool rows)``, a group of at most one pool of chunks at a
        time, each group's chunks pinned in the cache while the caller uses it. Lock held."""
        chunks = ids // self.chunk_rows
        uniq, inv = np.unique(chunks, return_inverse=True)
        offsets = ids - chunks * self.chunk_rows
        size = len(self._dirty)
        for lo in range(0, uniq.size, size):
            group = uniq[lo:lo + size].tolist()
            slots = np.empty(len(group), np.int64)
            try:
                for j, c in enumerate(group):
                    self._pinned.add(c)
                    slots[j] = self._block(c)
                if uniq.size <= size:
                    yield slice(None), slots[inv] * self.chunk_rows + offsets
                else:
                    pos = np.flatnonzero((inv >= lo) & (inv < lo + size))
                    yield pos, slots[inv[pos] - lo] * self.chunk_rows + offsets[pos]
            finally:
                self._pinned.difference_update(group)

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
            for pos, rows in self._resident(ids):
                w[pos], u[pos], last[pos] = (flat[rows] for flat in self._flat)
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
            for pos, rows in self._resident(ids):
                for flat, values in zip(self._flat, (w, u, last_step)):
                    flat[rows] = values[pos]
                self._dirty[rows // self.chunk_rows] = True

    def prefetch(self, start: int, stop: int) -> None:
        """Load the chunks of rows ``[start, stop)`` (taken mod N) in a background thread."""
        rows = np.arange(start, stop, dtype=np.int64) % self.num_rows
        chunks = np.unique(rows // self.chunk_rows)
        if self._executor is None:  # created lazily: the process may fork loader workers first
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rowstore")
        for c in chunks[: len(self._dirty)].tolist():
            self._executor.submit(self._prefetch_chunk, c)

    def _prefetch_chunk(self, c: int) -> None:
        with self._cond:
            if c in self._blocks or c in self._inflight:
                return
            slot = self._alloc()
            if slot is None:
                return
            self._inflight[c] = slot
        loaded = False
        try:
            self._load(c, slot)  # a reserved slot: nobody else touches it meanwhile
            loaded = True
        finally:
            with self._cond:
                del self._inflight[c]
                if loaded:
                    self._blocks[c] = slot
                else:
                    self._free.append(slot)
                self._cond.notify_all()

    def _drain(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---------------------------------------------------------------- durability
    def flush(self) -> None:
        """Write every dirty block to zarr."""
        with self._cond:
            for c, slot in self._blocks.items():
                if self._dirty[slot]:
                    self._store_block(c, slot)

    def commit(self) -> int:
        """Flush and start a new generation; returns it (a checkpoint records this number)."""
        with self._cond:
            self.flush()
            self.generation += 1
            self._root.attrs["generation"] = self.generation
            self._saved = np.zeros(self.num_chunks, np.uint8)
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
            self._dirty[:] = False
            self._free = list(range(len(self._dirty)))[::-1]
            gens = [g for g in self._generations() if g >= generation][::-1]
            for g in gens:
                undo = self._undo_base(g)
                for c in np.flatnonzero(self._saved_chunks(g)).tolist():
                    for name in _ARRAYS:
                        self._chunks.copy(self._key(undo, name, c), self._key(self._prefix, name, c))
            for g in gens:
                del self._root["undo"][str(g)]
            self.generation = generation
            self._root.attrs["generation"] = generation
            self._saved = np.zeros(self.num_chunks, np.uint8)

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
