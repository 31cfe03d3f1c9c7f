"""Reading sample bytes from shards: ranged local reads, or whole remote shards in a bounded cache.

Local shards (plain paths, ``file://``) are read with ``os.pread`` on cached file descriptors; the
next stride's shards are announced to the kernel (``posix_fadvise(WILLNEED)``) so it reads them
ahead. Remote shards (any other fsspec URL) are fetched whole, concurrently, into ``cache_dir``:
a download goes to a temporary name, is checked against the manifest's size and sha256 and only
then renamed into place, under an exclusive ``flock`` on a per-shard lock file, so processes
sharing the folder never download a shard twice at once. Cache entries are named by the shard's
sha256, so an entry is always a verified copy of the shard the manifest lists; one of the wrong
size is deleted when opened, one whose sample fails its checksum is re-hashed and, unless it still
matches the manifest, deleted and fetched again. When the folder holds more than ``cache_bytes``,
the oldest shards outside the current window and the next stride are deleted. There are no
per-sample remote requests. Downloads follow the shard set's retry policy; a shard that still
fails after the retries is remembered for the rest of the run in this process, and one that is
missing (its tar or index answered 404, or is absent locally) in a flag shared by every process
forked from the one that made the reader (one request per missing shard and run, whatever the
worker count), so its samples fail at once. Partial downloads of processes that are gone are
deleted when the reader is made.

Nothing here starts a thread or a filesystem before it is first needed, so an instance can be
created in a parent process and used in forked DataLoader workers (each builds its own).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..shards.format import DamagedData, MissingShard, is_local
from ..shards.retry import filesystem_for_reads

__all__ = ["ShardReader", "SharedFlags", "cache_name", "is_local", "matches_record",
           "remove_stale_partials"]

log = logging.getLogger(__name__)
HASH_CHUNK = 1 << 20
_TAR, _INDEX = 1, 2  # what of a shard was found missing


def cache_name(record: dict) -> str:
    """The cache file of a shard listed as `record` in a manifest: named by its sha256."""
    return f"{record['sha256'][:16]}-{record['name']}"


def matches_record(path: str, record: dict) -> bool:
    """True when the file at `path` has the size and sha256 the manifest lists for the shard."""
    if os.path.getsize(path) != record["bytes"]:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == record["sha256"]


def remove_stale_partials(cache_dir: str, prefix: str = "") -> list[str]:
    """Delete the partial downloads (``PREFIX*.PID.part``) in `cache_dir` whose process is gone (the
    cache folder is one machine's); the paths deleted."""
    removed = []
    with contextlib.suppress(FileNotFoundError), os.scandir(cache_dir) as it:
        for e in it:
            if e.name.startswith(prefix) and e.name.endswith(".part"):
                pid = e.name.rsplit(".", 2)[-2]
                if pid.isdigit() and not _alive(int(pid)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(e.path)
                        removed.append(e.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


class SharedFlags:
    """``n`` small values (0..255, 0 at first) in an anonymous shared mapping: one set in any process is
    seen by every process forked after the flags were made. A pickled copy starts cleared (shared
    with its own forks)."""

    def __init__(self, n: int):
        self.n = n
        self._map = mmap.mmap(-1, max(n, 1))

    def __getitem__(self, k: int) -> int:
        return self._map[k]

    def __setitem__(self, k: int, value: int) -> None:
        self._map[k] = value

    def __getstate__(self):
        return {"n": self.n}

    def __setstate__(self, state) -> None:
        self.__init__(state["n"])


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


class ShardReader:
    """``read_sample(id)`` → checked image bytes and label; ``plan(current, upcoming)`` drives
    prefetch.

    ``worker`` / ``num_workers`` split the prefetching of remote shards among processes sharing one
    cache folder (worker ``p`` prefetches the shards ``k ≡ p (mod P)``; demand reads fetch any).
    """

    def __init__(self, shardset, cache_dir: str | None = None, cache_bytes: int = 32 << 30,
                 prefetch: bool = True, fetch_threads: int = 4, max_open_files: int = 256):
        self.shardset = shardset
        self.local = is_local(shardset.shard_url(0))
        if not self.local and cache_dir is None:
            raise ValueError("remote shards need a cache_dir")
        self.cache_dir = cache_dir
        self.cache_bytes = int(cache_bytes)
        self.prefetch = prefetch
        self.fetch_threads = fetch_threads
        self.max_open_files = max_open_files
        self.worker, self.num_workers = 0, 1
        self._protected: set[int] = set()
        self._missing = SharedFlags(shardset.num_shards)  # shard -> what of it is missing (_TAR, _INDEX)
        self._reset()
        if not self.local:
            removed = remove_stale_partials(cache_dir)
            if removed:
                log.warning("removed %d partial downloads left in %s by processes that are gone",
                            len(removed), cache_dir)

    def _reset(self) -> None:
        """Per-process state (file descriptors, thread pool, filesystem, failures), rebuilt after a fork."""
        self._pid = os.getpid()
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future] = {}
        self._fs = None
        self._warned_full = False
        self._failed: dict[int, OSError] = {}   # shards unavailable for this run (this process)
        self._verified: dict[int, int] = {}     # shard -> inode of the cache entry hashed here

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_fds=OrderedDict(), _pool=None, _futures={}, _fs=None, _pid=None, _failed={},
                     _verified={})   # _missing pickles as cleared flags
        return state

    # -- reading -------------------------------------------------------------------------------
    def read_sample(self, sample_id: int) -> tuple[bytes, int]:
        """The image bytes of sample ``sample_id``, checked against its checksum, and its label.

        Raises a :class:`~picstream.shards.format.SampleError` (its ``reason`` says why) or another
        ``OSError`` when the sample cannot be read intact.
        """
        self._check_pid()
        ss = self.shardset
        k, i = divmod(int(sample_id), ss.shard_size)
        offset, size, label = (int(v) for v in self._index(k)[i])
        data = self.read(k, offset, size)
        try:
            return ss.check_sample(sample_id, data), label
        except DamagedData:
            if self.local or not self._recheck(k):
                raise
        return ss.check_sample(sample_id, self.read(k, offset, size)), label

    def _index(self, k: int):
        """Shard ``k``'s index; a remote one is loaded under the shard's lock (one request across
        processes when it is missing)."""
        if self._missing[k]:
            raise self._gone(k)
        if self.local or self.shardset.has_index(k):
            return self._load_index(k)
        with self._locked(k):
            if self._missing[k]:
                raise self._gone(k)
            return self._load_index(k)

    def _load_index(self, k: int):
        try:
            return self.shardset.index(k)
        except MissingShard:
            self._missing[k] = _INDEX
            raise self._gone(k) from None

    def _gone(self, k: int) -> MissingShard:
        """The error of shard ``k``, found missing by this process or another one."""
        if self._missing[k] == _INDEX:
            return MissingShard(f"index of shard {k} is missing: {self.shardset.index_url(k)}")
        return MissingShard(f"shard {k} is missing: {self.shardset.shard_url(k)}")

    def read(self, k: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of shard ``k`` (fetching the shard first when remote)."""
        self._check_pid()
        fd = self._local_fd(k) if self.local else self._remote_fd(k)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise DamagedData(errno.EIO, f"short read of shard {k}: {len(data)} of {size} bytes")
        return data

    def _local_path(self, k: int) -> str:
        return LocalFileSystem._strip_protocol(self.shardset.shard_url(k))

    def _local_fd(self, k: int) -> int:
        if self._missing[k]:
            raise self._gone(k)
        path = self._local_path(k)
        try:
            return self._fd(path)
        except FileNotFoundError:
            self._missing[k] = _TAR
            raise self._gone(k) from None

    def _remote_fd(self, k: int) -> int:
        self._ensure(k)
        try:
            return self._cached_fd(k)
        except FileNotFoundError:   # evicted or found damaged by another process in between
            self._fetch(k)
            return self._cached_fd(k)

    def _cached_fd(self, k: int) -> int:
        """The open cache entry of shard ``k``; one of the wrong size is deleted (FileNotFoundError)."""
        path = self.cache_path(k)
        if path in self._fds:
            return self._fd(path)
        fd = self._fd(path)
        st = os.fstat(fd)
        if st.st_size != self.shardset.shard_record(k)["bytes"]:
            log.warning("cached shard %d has the wrong size; fetching it again", k)
            self._close_fd(path)
            with self._locked(k):
                if _inode(path) == st.st_ino:   # not replaced by another process meanwhile
                    os.unlink(path)
            raise FileNotFoundError(path)
        return fd

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
            while len(self._fds) > self.max_open_files:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(path)
        return fd

    def _close_fd(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    # -- planning ------------------------------------------------------------------------------
    def plan(self, current: Iterable[int], upcoming: Iterable[int]) -> None:
        """The window now being read and the shards the next window adds: keep, fetch, read ahead."""
        self._check_pid()
        current, upcoming = [int(k) for k in current], [int(k) for k in upcoming]
        self._protected = set(current) | set(upcoming)
        if not self.prefetch:
            return
        if self.local:
            for k in upcoming:
                try:
                    os.posix_fadvise(self._fd(self._local_path(k)), 0, 0, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass   # a missing shard surfaces (and is counted) when it is read
            return
        self._futures = {k: f for k, f in self._futures.items() if not f.done()}
        for k in current + upcoming:
            if (k % self.num_workers == self.worker and k not in self._failed and not self._missing[k]
                    and not os.path.exists(self.cache_path(k))):
                self._submit(k)

    # -- remote cache --------------------------------------------------------------------------
    def cache_path(self, k: int) -> str:
        return os.path.join(self.cache_dir, cache_name(self.shardset.shard_record(k)))

    def _submit(self, k: int) -> Future:
        fut = self._futures.get(k)
        if fut is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="shard-fetch")
            fut = self._futures[k] = self._pool.submit(self._fetch, k)
        return fut

    def _ensure(self, k: int) -> None:
        """Make sure shard ``k`` is cached: fetch it now (or await its prefetch) when missing."""
        fut = self._futures.pop(k, None)
        if fut is not None:
            fut.result()
        elif not os.path.exists(self.cache_path(k)):
            self._fetch(k)

    def _filesystem(self):
        if self._fs is None:
            url = self.shardset.shard_url(0)
            self._fs = filesystem_for_reads(url, getattr(self.shardset, "storage_options", {}))[0]
        return self._fs

    @contextlib.contextmanager
    def _locked(self, k: int):
        """An exclusive lock on shard ``k``'s cache entry, across processes."""
        os.makedirs(self.cache_dir, exist_ok=True)
        with open(self.cache_path(k) + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _fetch(self, k: int) -> None:
        """Download shard ``k`` into the cache (once across processes) under the retry policy; a
        missing or unavailable shard is remembered for the run."""
        if k in self._failed:
            raise self._failed[k]
        path = self.cache_path(k)
        tmp = f"{path}.{os.getpid()}.part"
        try:
            with self._locked(k):
                if self._missing[k]:   # found missing by another process while this one waited
                    raise self._gone(k)
                try:
                    if not os.path.exists(path):
                        self.shardset.remote_call(lambda: self._download(k, tmp, path),
                                                  what=f"fetching shard {k}", kind="shard")
                except FileNotFoundError:   # flagged before the lock is released: a process waiting
                    self._missing[k] = self._missing[k] or _TAR   # for it must not request it again
                    raise
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        except FileNotFoundError:
            self._missing[k] = self._missing[k] or _TAR
            raise self._gone(k) from None
        except OSError as err:
            self._failed[k] = err
            raise
        self._evict()

    def _download(self, k: int, tmp: str, path: str) -> None:
        """One try: fetch to ``tmp``, check size and sha256, flush, rename to ``path``."""
        self._filesystem().get_file(self.shardset.shard_url(k), tmp)
        record = self.shardset.shard_record(k)
        if not matches_record(tmp, record):
            raise DamagedData(f"fetched shard {k} ({os.path.getsize(tmp)} bytes) does not match the "
                              f"manifest's size {record['bytes']} and sha256")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._verified[k] = _inode(path)

    def _recheck(self, k: int) -> bool:
        """A sample of cached shard ``k`` failed its checksum. Unless this process already hashed the
        very same entry, hash it: delete it when it does not match the manifest. True when the
        sample is worth reading again (a fresh entry), False when the shard itself is damaged."""
        path = self.cache_path(k)
        fd = self._fds.get(path)
        if fd is not None and self._verified.get(k) == os.fstat(fd).st_ino:
            return False
        self._close_fd(path)
        with self._locked(k), contextlib.suppress(FileNotFoundError):
            if matches_record(path, self.shardset.shard_record(k)):
                self._verified[k] = _inode(path)
            else:
                log.warning("cached shard %d does not match the manifest; fetching it again", k)
                os.unlink(path)
        return True

    def _evict(self) -> None:
        """Delete the oldest cached shards outside the protected set while over ``cache_bytes``."""
        entries = []
        with os.scandir(self.cache_dir) as it:
            for e in it:
                if not e.name.endswith((".lock", ".part")):
                    st = e.stat()
                    entries.append((st.st_mtime, st.st_size, e.path))
        total = sum(size for _, size, _ in entries)
        if total <= self.cache_bytes:
            return
        keep = {self.cache_path(k) for k in self._protected}
        for _, size, path in sorted(entries):
            if total <= self.cache_bytes:
                return
            if path not in keep:
                try:
                    os.unlink(path)
                    total -= size
                except FileNotFoundError:
                    pass
        if not self._warned_full:
            self._warned_full = True
            log.warning("shard cache holds %d bytes > cache_bytes=%d: the window and the next "
                        "stride do not fit", total, self.cache_bytes)

    def close(self) -> None:
        """Close file descriptors and stop fetch threads of this process."""
        if self._pid != os.getpid():
            return
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)
        self._reset()
