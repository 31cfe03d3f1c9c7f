"""Classifier rows (weight, SGD momentum, last step) in zarr, behind a host block cache and an undo log.

Layout of a store (a zarr v3 group at any local path or fsspec URL)::

    rowstore.json      the head: store id, run id, current generation, next generation, restore intent
    weight     (N, D)  float32|float64, fill 0      chunks of ``chunk_rows`` rows, uncompressed
    momentum   (N, D)  same
    last_step  (N,)    int64, fill −1               −1 = never written: reads as init(seed, id), u = 0, step 0
    undo/<g>/begun                   generation g exists (written before the head names it)
    undo/<g>/<c>.{weight,momentum,last_step}   pre-images of chunk c, first written in generation g
    undo/<g>/<c>.saved               chunk c's pre-images are complete (written after them)
    parts/<R>/<r>/{rowstore.json,undo/}   the same, of rank r's part in an R-rank run (below)

A run of R > 1 ranks opens the store as R parts: rank r owns the chunks c ≡ r (mod R), writes only
those, and keeps its own head (generation) and undo logs under ``parts/<R>/<r>/``; the top-level head
(identity, and the generations of the 1-rank part) is shared. Parts of one R change disjoint chunks,
so each restores on its own. Parts of another R are retired (their history dropped, their
generation moved past every checkpoint's) before a run of this R writes a chunk.

Untouched chunks are never stored, so an N = 1e9 store costs nothing until rows are written. Chunks move
whole, as the zarr store's raw chunk objects (uncompressed little-endian bytes, edge chunks padded with
the fill value). A pre-image is the chunk object as it is: an absent chunk leaves no file; on a local
store a present one is a hard link, and a chunk file shared with a link is never written in place.

Crash safety (the rule docs/design.md states): the head is the only thing that switches state, and it is
replaced atomically after everything it points to is written (and, with ``durable``, fsynced). A chunk is
overwritten only after its pre-image and then its ``saved`` flag exist in the current generation, so a
torn or lost chunk write is always repaired by ``restore``. Generation numbers are never reused. Opening
a store finishes a restore the head says was under way and deletes undo logs the head does not reach
(a half-done commit or prune). Host memory is ``cache_rows`` rows, independent of N.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .init import init_rows
from ..iopoints import about, fsync_path
from .storage import LocalFiles, StoreKeys

FORMAT = "picstream-rowstore-2"
HEAD = "rowstore.json"
_ARRAY_CONFIG = {"write_empty_chunks": False}
_ARRAYS = ("weight", "momentum", "last_step")


class StoreError(ValueError):
    """A row store that is missing, not a row store, or does not match what the caller expects."""


class StoreNotFound(StoreError):
    """Nothing at the URL."""


def _local_path(url) -> str | None:
    """The folder of a local store URL (a path or file://), else None."""
    if isinstance(url, os.PathLike):
        return os.fspath(url)
    if isinstance(url, str) and "://" not in url:
        return url
    if isinstance(url, str) and url.startswith("file://"):
        return url[len("file://"):]
    return None


@contextlib.contextmanager
def _access(url):
    """A refusal of the storage (bad credentials, a read-only bucket) as a one-line StoreError."""
    try:
        yield
    except PermissionError as err:
        raise StoreError(f"row store {url}: access denied ({err}): check the credentials and the "
                         "permissions there (a run writes its row store)") from None


def _open_group(url, mode: str, storage_options: dict | None) -> zarr.Group:
    """The store's zarr group; at a URL without fsspec's listings cache (every listing and existence
    check asks the store: another process's objects are never hidden by a stale cache)."""
    if isinstance(url, str) and _local_path(url) is None:
        storage_options = {"use_listings_cache": False, **(storage_options or {})}
    kwargs = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(url, mode=mode, zarr_format=3, **kwargs)


def _io_for(root: zarr.Group, durable: bool) -> StoreKeys:
    if isinstance(root.store, LocalStore):
        return LocalFiles(os.path.join(str(root.store.root), root.path), durable)
    return StoreKeys(root.store, f"{root.path}/" if root.path else "", durable)


def _create_rows(group: zarr.Group, num_rows: int, dim: int, chunk_rows: int, dtype) -> None:
    for name, shape, chunks, dt, fill in (
            ("weight", (num_rows, dim), (chunk_rows, dim), dtype, 0),
            ("momentum", (num_rows, dim), (chunk_rows, dim), dtype, 0),
            ("last_step", (num_rows,), (chunk_rows,), np.int64, -1)):
        group.create_array(name, shape=shape, chunks=chunks, dtype=dt, fill_value=fill,
                           compressors=None, config=_ARRAY_CONFIG)


def store_url_of_rank(url: str, rank: int) -> str:
    """A per-rank row store URL (``classifier.store`` with ``{rank}``, e.g. node-local disks), or the
    one store all ranks share."""
    return url.format(rank=rank) if "{rank}" in url else url


def _remove_leftovers(path: str) -> None:
    """Delete what a killed create or destroy of the local store ``path`` left beside it."""
    parent, base = os.path.split(os.path.abspath(path))
    for name in os.listdir(parent):
        if name.startswith((base + ".creating-", base + ".deleting-")):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


class RowStore:
    """Rows of an N×D classifier with their SGD momentum, on disk, with a bounded host LRU cache.

    The cache is a pool of ``cache_blocks`` slots, each one whole chunk; a read or write gathers or
    scatters all its rows in one indexing operation over the pool. ``durable=True`` makes ``commit``
    survive a power loss (fsync of chunks, flags, head and folders), not only a killed process.
    """

    def __init__(self, root: zarr.Group, cache_rows: int | None = None, durable: bool = False,
                 part: tuple[int, int] = (0, 1)):
        attrs = root.attrs
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{root.store} is not a picstream row store (format {FORMAT})")
        self._root = root
        self._io = _io_for(root, durable)
        self.rank, self.world = part
        if not 0 <= self.rank < self.world:
            raise ValueError(f"part {part}: need 0 <= rank < world")
        self._prefix = "" if self.world == 1 else f"parts/{self.world}/{self.rank}/"
        identity = self._read_head(HEAD)
        self.store_id, self.run_id = identity["store_id"], identity.get("run_id")
        if self._io.get(self._prefix + HEAD) is None and self.world > 1:  # a part's first open
            self._io.put(self._undo(0) + "begun", b"")
            self._write_head(0, 1)
        head = self._read_head(self._prefix + HEAD)
        self.generation, self._next = int(head["generation"]), int(head["next_generation"])
        self.num_rows = int(attrs["num_rows"])
        self.dim = int(attrs["dim"])
        self.seed = int(attrs["seed"])
        self.chunk_rows = int(attrs["chunk_rows"])
        arrays = [root[name] for name in _ARRAYS]
        if any(a.compressors or a.metadata.codecs != arrays[0].metadata.codecs for a in arrays):
            raise StoreError("row arrays must be uncompressed")
        self._encode_key = arrays[0].metadata.chunk_key_encoding.encode_chunk_key
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
        self.chunk_loads = 0  # chunks read into the cache so far (absent ones included)
        self._recover(head)
        self._saved = self._saved_chunks(self.generation)

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(cls, url, num_rows: int, dim: int, *, seed: int = 0, chunk_rows: int = 4096,
               dtype=np.float32, cache_rows: int | None = None, storage_options: dict | None = None,
               run_id: str | None = None, durable: bool = False) -> "RowStore":
        """Create an empty store (no chunk is written: every row reads as its initial value).

        A local store is built in a temporary folder beside ``url`` and renamed into place, so it
        either exists whole or not at all; elsewhere the head is written last (what a killed creation
        left, a row store group without a head, is deleted first)."""
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError("dtype must be float32 or float64")
        attrs = {"format": FORMAT, "num_rows": int(num_rows), "dim": int(dim), "seed": int(seed),
                 "chunk_rows": int(chunk_rows)}
        head = {"store_id": uuid.uuid4().hex, "run_id": run_id}
        local = _local_path(url)
        if local is None:
            with _access(url):
                cls._remove_interrupted_creation(url, storage_options)
                cls._build(url, attrs, head, np.dtype(dtype), storage_options, durable)
        else:
            if os.path.lexists(local):
                raise StoreError(f"{local} already exists")
            parent = os.path.dirname(os.path.abspath(local))
            os.makedirs(parent, exist_ok=True)
            _remove_leftovers(local)
            build = f"{local}.creating-{head['store_id'][:8]}"
            try:
                with about(build, "mkdir"):
                    os.mkdir(build)
                cls._build(build, attrs, head, np.dtype(dtype), None, durable)
                with about(local, "rename"):
                    os.rename(build, local)
            except BaseException:
                shutil.rmtree(build, ignore_errors=True)
                raise
            if durable:
                fsync_path(parent)
        return cls.open(url, cache_rows=cache_rows, storage_options=storage_options, durable=durable)

    @staticmethod
    def _remove_interrupted_creation(url, storage_options) -> None:
        """Delete a row store group without a head at the URL ``url``; refuse anything else there."""
        try:
            root = _open_group(url, "r+", storage_options)
        except FileNotFoundError:
            return
        if root.attrs.get("format") != FORMAT or _io_for(root, False).exists(HEAD):
            raise StoreError(f"{url} already exists")
        sync(root.store.delete_dir(root.path))

    @staticmethod
    def _build(url, attrs: dict, head: dict, dtype, storage_options, durable: bool) -> None:
        root = _open_group(url, "w-", storage_options)
        root.attrs.update(attrs)
        _create_rows(root, attrs["num_rows"], attrs["dim"], attrs["chunk_rows"], dtype)
        io = _io_for(root, durable)
        io.put("undo/0/begun", b"")
        if durable and isinstance(io, LocalFiles):  # zarr's own metadata files too
            for folder, _, files in os.walk(io.root):
                for name in files:
                    fsync_path(os.path.join(folder, name))
                fsync_path(folder)
        io.put(HEAD, json.dumps({"format": FORMAT, **head, "generation": 0, "next_generation": 1,
                                 "restoring": None}).encode())

    @classmethod
    def open(cls, url, *, cache_rows: int | None = None, storage_options: dict | None = None,
             durable: bool = False, part: tuple[int, int] = (0, 1)) -> "RowStore":
        """Open a store (rank ``part[0]``'s part of it in a ``part[1]``-rank run), first finishing any
        restore, commit or prune a killed process left half done."""
        with _access(url):
            try:
                root = _open_group(url, "r+", storage_options)
            except FileNotFoundError:
                raise StoreNotFound(f"no row store at {url}") from None
            return cls(root, cache_rows, durable, part)

    @classmethod
    def destroy(cls, url, storage_options: dict | None = None) -> None:
        """Delete the store at ``url`` (nothing if absent); refuses anything that is not a row store.
        A local store is first renamed aside, so a kill never leaves half a store under ``url``."""
        local = _local_path(url)
        if local is not None and not os.path.lexists(local):
            return
        try:
            root = _open_group(url, "r" if local is not None else "r+", storage_options)
            ours = root.attrs.get("format") == FORMAT
        except FileNotFoundError:
            ours = False
        if not ours:
            raise StoreError(f"{url} is not a picstream row store; refusing to delete it")
        if local is None:
            _io_for(root, False).delete(HEAD)
            sync(root.store.delete_dir(root.path))
            return
        trash = f"{local}.deleting-{uuid.uuid4().hex[:8]}"
        with about(local, "rename"):
            os.rename(local, trash)
        shutil.rmtree(trash)

    # ---------------------------------------------------------------- head and generations
    @property
    def durable(self) -> bool:
        return self._io.durable

    @durable.setter
    def durable(self, value: bool) -> None:
        self._io.durable = bool(value)

    def _read_head(self, key: str) -> dict:
        raw = self._io.get(key)
        if raw is None:  # the top-level head is written last: without it there is no store yet
            raise (StoreNotFound if key == HEAD else StoreError)(
                f"row store {self._root.store} has no {key} (an interrupted creation)")
        head = json.loads(raw)
        if head.get("format") != FORMAT:
            raise StoreError(f"row store {self._root.store}: {key} is not of format {FORMAT}")
        return head

    def _write_head(self, generation: int, next_generation: int, restoring: int | None = None) -> None:
        """Switch the part's state: one atomic replacement of its head."""
        self._io.put(self._prefix + HEAD, json.dumps({
            "format": FORMAT, "store_id": self.store_id, "run_id": self.run_id, "generation": generation,
            "next_generation": next_generation, "restoring": restoring}).encode())

    def generations(self) -> list[int]:
        """The generations the store can be restored to (their undo logs exist), oldest first."""
        return sorted(int(n) for n in self._io.names(self._prefix + "undo/")
                      if n.isdigit() and self._io.exists(self._undo(n) + "begun"))

    def _undo(self, g) -> str:
        return f"{self._prefix}undo/{g}/"

    def _saved_chunks(self, g: int) -> set[int]:
        """The chunks whose pre-images generation ``g`` holds (those with a ``saved`` flag)."""
        return {int(n[:-len(".saved")]) for n in self._io.names(self._undo(g)) if n.endswith(".saved")}

    def _drop(self, g: int) -> None:
        """Delete generation ``g``'s undo log; ``begun`` goes first, so a kill leaves no half a log."""
        self._io.remove_folder(self._undo(g), first=("begun",))

    def _recover(self, head: dict) -> None:
        """Finish what a killed process left half done: a restore, a commit or a prune."""
        if head.get("restoring") is not None:
            self._finish_restore(int(head["restoring"]))
        for name in self._io.names(self._prefix + "undo/"):
            if not (name.isdigit() and int(name) <= self.generation
                    and self._io.exists(self._undo(name) + "begun")):
                self._io.remove_folder(self._undo(name), first=("begun",))
        self._io.delete(self._prefix + HEAD + ".tmp")

    # ---------------------------------------------------------------- chunk I/O
    def _key(self, name: str, c: int) -> str:
        return name + "/" + self._encode_key((c,) if name == "last_step" else (c, 0))

    def _load(self, c: int, slot: int) -> None:
        """Chunk ``c`` into pool slot ``slot`` (edge chunks padded); an absent chunk reads as the fill."""
        self.chunk_loads += 1
        for name, pool, fill in zip(_ARRAYS, self._pool, (0, 0, -1)):
            if not self._io.read_into(self._key(name, c), pool[slot]):
                pool[slot].fill(fill)

    def _store_block(self, c: int, slot: int) -> None:
        """Write a cached block as whole chunks, saving the chunk's pre-image first in this generation."""
        if c not in self._saved:
            undo = self._undo(self.generation)
            for name in _ARRAYS:
                self._io.snapshot(self._key(name, c), f"{undo}{c}.{name}")
            self._io.put(f"{undo}{c}.saved", b"")  # the flag makes the pre-images valid
            self._saved.add(c)
        for name, pool in zip(_ARRAYS, self._pool):
            self._io.write(self._key(name, c), pool[slot])
        self._dirty[slot] = False

    # ---------------------------------------------------------------- cache
    def _alloc(self, clean_only: bool = False) -> int | None:
        """A free slot, evicting the least recently used unpinned block (written if dirty; with
        ``clean_only``, only a clean one), or None when there is none. Lock held."""
        if self._free:
            return self._free.pop()
        for c, slot in self._blocks.items():
            if c not in self._pinned and not (clean_only and self._dirty[slot]):
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

    def never_written(self, ids) -> np.ndarray:
        """Which of rows ``ids`` were never written (``last_step`` still the fill value −1): rows no
        run has trained yet, since no row reaches the store before its first visit."""
        ids = self._check_ids(ids)
        out = np.empty(ids.size, bool)
        with self._cond:
            for pos, rows in self._resident(ids):
                out[pos] = self._flat[2][rows] < 0
        return out

    def write(self, ids, w: np.ndarray, u: np.ndarray, last_step) -> None:
        """Store rows ``ids`` (distinct) as ``(w, u)`` valid at step ``last_step``."""
        ids = self._check_ids(ids)
        if self.world > 1 and np.any(self.owner(ids) != self.rank):
            raise ValueError(f"rank {self.rank} of {self.world} may write only its own chunks")
        last_step = np.broadcast_to(np.asarray(last_step, dtype=np.int64), ids.shape)
        with self._cond:
            for pos, rows in self._resident(ids):
                for flat, values in zip(self._flat, (w, u, last_step)):
                    flat[rows] = values[pos]
                self._dirty[rows // self.chunk_rows] = True

    def prefetch(self, start: int, stop: int) -> None:
        """Load this part's chunks of rows ``[start, stop)`` (taken mod N) in a background thread."""
        rows = np.arange(start, stop, dtype=np.int64) % self.num_rows
        chunks = np.unique(rows // self.chunk_rows)
        chunks = chunks[chunks % self.world == self.rank]
        if self._executor is None:  # created lazily: the process may fork loader workers first
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rowstore")
        for c in chunks[: len(self._dirty)].tolist():
            self._executor.submit(self._prefetch_chunk, c)

    def _prefetch_chunk(self, c: int) -> None:
        with self._cond:
            if c in self._blocks or c in self._inflight:
                return
            slot = self._alloc(clean_only=True)  # writes stay in the caller's thread
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
            self._io.sync_written()
            new = self._next
            self._io.put(f"{self._undo(new)}begun", b"")
            self._write_head(new, new + 1)
            self.generation, self._next, self._saved = new, new + 1, set()
            return new

    def restore(self, generation: int) -> None:
        """Return to the exact state at the ``commit()`` that returned ``generation`` (or at creation,
        for 0). Unflushed writes are dropped; the generations after it are deleted for good.

        The head first records the intent, so a restore cut short by a kill is finished by the next
        ``open``; applying the undo logs newest first is idempotent."""
        self._drain()
        with self._cond:
            if generation not in self.generations() or generation > self.generation:
                raise StoreError(f"row store {self._root.store} cannot return to generation {generation}: "
                                 f"it can return to {self.generations()} (current {self.generation})")
            self._write_head(self.generation, self._next, restoring=generation)
            self._finish_restore(generation)

    def _finish_restore(self, generation: int) -> None:
        self._blocks.clear()
        self._dirty[:] = False
        self._free = list(range(len(self._dirty)))[::-1]
        later = [g for g in self.generations() if g >= generation][::-1]
        for g in later:
            undo = self._undo(g)
            for c in sorted(self._saved_chunks(g)):
                for name in _ARRAYS:
                    self._io.snapshot(f"{undo}{c}.{name}", self._key(name, c))
        self._io.sync_written()
        for g in later[:-1]:
            self._drop(g)
        undo = self._undo(generation)  # now empty again: flags first, then the pre-images
        names = self._io.names(undo)
        for name in sorted(names, key=lambda n: not n.endswith(".saved")):
            if name != "begun":
                self._io.delete(undo + name)
        self._write_head(generation, self._next)
        self.generation, self._saved = generation, set()

    def retire(self) -> None:
        """Drop this part's whole history and move its generation past every one a checkpoint holds
        (the chunks stay as they are: another partition of the store takes them over): a commit,
        then a prune of every generation before it."""
        self._drain()
        self.prune(self.commit())

    def stored_step_counts(self) -> "Counter[int]":
        """How many of this part's rows the store holds at each last step > 0 (from the chunks'
        ``last_step`` objects: N / world int64 read, once, when a run changes its world size)."""
        self.flush()
        counts: Counter[int] = Counter()
        buf = np.empty(self.chunk_rows, np.int64)
        for c in self.owned_chunks(self.rank, self.world).tolist():
            if self._io.read_into(self._key("last_step", c), buf):
                steps, n = np.unique(buf[buf > 0], return_counts=True)
                counts.update(dict(zip(steps.tolist(), n.tolist())))
        return counts

    def other_parts(self) -> list[tuple[int, int]]:
        """The ``(rank, world)`` parts of the store that belong to another world size than this one."""
        found = [] if self.world == 1 else [(0, 1)]
        for world in self._io.names("parts/"):
            if world.isdigit() and int(world) != self.world:
                found += [(int(r), int(world)) for r in self._io.names(f"parts/{world}/") if r.isdigit()]
        return sorted(found)

    def prune(self, keep_from: int) -> None:
        """Delete the undo logs of generations older than ``keep_from`` (no restore before it)."""
        with self._cond:
            for g in self.generations():
                if g < min(keep_from, self.generation):
                    self._drop(g)

    def close(self, flush: bool = True) -> None:
        """Stop the prefetch thread and (unless ``flush=False``) write every dirty block."""
        self._drain()
        if flush:
            self.flush()

    # ---------------------------------------------------------------- distribution
    def owned_chunks(self, rank: int, world_size: int) -> np.ndarray:
        """The chunks a rank owns in a model-parallel layout (chunk ``c`` belongs to ``c % world``)."""
        return np.arange(rank, self.num_chunks, world_size)

    def owner(self, ids, world_size: int | None = None) -> np.ndarray:
        """The rank that owns each row id (in this part's world by default)."""
        return (self._check_ids(ids) // self.chunk_rows) % (world_size or self.world)
