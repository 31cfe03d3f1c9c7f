"""Reading sample bytes from shards: ranged local reads, or whole remote shards in a bounded cache.

Local shards (plain paths, ``file://``) are read with ``os.pread`` on cached file descriptors; the
next stride's shards are announced to the kernel (``posix_fadvise(WILLNEED)``) so it reads them
ahead. Remote shards (any other fsspec URL) are fetched whole, concurrently, into ``cache_dir``:
a download goes to a temporary name and is renamed into place under an exclusive ``flock`` on a
per-shard lock file, so processes sharing the folder never download a shard twice at once. When
the folder holds more than ``cache_bytes``, the oldest shards outside the current window and the
next stride are deleted. There are no per-sample remote requests.

Nothing here starts a thread or a filesystem before it is first needed, so an instance can be
created in a parent process and used in forked DataLoader workers (each builds its own).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

__all__ = ["ShardReader", "is_local"]

log = logging.getLogger(__name__)


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs (a pure string test: creates no filesystem)."""
    return get_protocol(str(url)) in ("file", "local")


class ShardReader:
    """``read(k, offset, size)`` → bytes of shard ``k``; ``plan(current, upcoming)`` drives prefetch.

    ``worker`` / ``num_workers`` split the prefetching of remote shards among processes sharing one
    cache folder (worker ``p`` prefetches the shards ``k ≡ p (mod P)``; demand reads fetch any).
    """

    def __init__(self, shardset, cache_dir: str | None = None, cache_bytes: int = 32 << 30,
                 prefetch: bool = True, fetch_threads: int = 4, retries: int = 5,
                 backoff: float = 0.2, max_open_files: int = 256):
        self.shardset = shardset
        self.local = is_local(shardset.shard_url(0))
        if not self.local and cache_dir is None:
            raise ValueError("remote shards need a cache_dir")
        self.cache_dir = cache_dir
        self.cache_bytes = int(cache_bytes)
        self.prefetch = prefetch
        self.fetch_threads = fetch_threads
        self.retries, self.backoff = retries, backoff
        self.max_open_files = max_open_files
        self.worker, self.num_workers = 0, 1
        self._protected: set[int] = set()
        self._reset()

    def _reset(self) -> None:
        """Per-process state (file descriptors, thread pool, filesystem), rebuilt after a fork."""
        self._pid = os.getpid()
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future] = {}
        self._fs = None
        self._warned_full = False

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_fds=OrderedDict(), _pool=None, _futures={}, _fs=None, _pid=None)
        return state

    # -- reading -------------------------------------------------------------------------------
    def read(self, k: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of shard ``k`` (fetching the shard first when remote)."""
        self._check_pid()
        if self.local:
            fd = self._fd(self._local_path(k))
        else:
            try:
                fd = self._fd(self._ensure(k))
            except FileNotFoundError:   # evicted by another process in between: fetch again
                self._fetch(k)
                fd = self._fd(self.cache_path(k))
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read of shard {k}: {len(data)} of {size} bytes")
        return data

    def _local_path(self, k: int) -> str:
        return LocalFileSystem._strip_protocol(self.shardset.shard_url(k))

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
            if k % self.num_workers == self.worker and not os.path.exists(self.cache_path(k)):
                self._submit(k)

    # -- remote cache --------------------------------------------------------------------------
    def cache_path(self, k: int) -> str:
        url = self.shardset.shard_url(k)
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, f"{digest}-{url.rsplit('/', 1)[-1]}")

    def _submit(self, k: int) -> Future:
        fut = self._futures.get(k)
        if fut is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="shard-fetch")
            fut = self._futures[k] = self._pool.submit(self._fetch, k)
        return fut

    def _ensure(self, k: int) -> str:
        """The cached file of shard ``k``, fetched now (or awaited) when missing."""
        path = self.cache_path(k)
        fut = self._futures.pop(k, None)
        if fut is not None:
            fut.result()
        elif not os.path.exists(path):
            self._fetch(k)
        return path

    def _filesystem(self):
        if self._fs is None:
            url = self.shardset.shard_url(0)
            self._fs = fsspec.core.url_to_fs(url, **getattr(self.shardset, "storage_options", {}))[0]
        return self._fs

    def _fetch(self, k: int) -> None:
        """Download shard ``k`` into the cache (once across processes), retrying with backoff."""
        os.makedirs(self.cache_dir, exist_ok=True)
        path = self.cache_path(k)
        tmp = f"{path}.{os.getpid()}.part"
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if os.path.exists(path):
                    return
                for attempt in range(self.retries + 1):
                    try:
                        self._filesystem().get_file(self.shardset.shard_url(k), tmp)
                        os.replace(tmp, path)
                        break
                    except FileNotFoundError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - any transport error is retried
                        if attempt == self.retries:
                            raise OSError(f"cannot fetch shard {k}: {exc}") from exc
                        log.warning("fetching shard %d failed (%s); retrying", k, exc)
                        time.sleep(self.backoff * 2 ** attempt)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._evict()

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
