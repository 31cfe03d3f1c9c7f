"""One retry policy for every remote read (manifest, index, shard, ranged read).

Exponential backoff with full jitter, a bounded number of tries and a bounded total wait. A missing
object (404) and other client errors (4xx except 408 and 429) are not retried; server errors, cut
connections, timeouts and reads whose bytes fail a check (short, wrong size or checksum, not JSON)
are. Every retry is counted in a :class:`RetryStats` under the kind of read.

On S3 the reads open their filesystem with :func:`filesystem_for_reads`: s3fs's and botocore's own
retries off, so a 503 SlowDown, a 500 or a reset connection reaches this policy and is counted.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, TypeVar

import fsspec

from .format import SampleError

__all__ = ["RetryPolicy", "RetryStats", "Unavailable", "filesystem_for_reads", "retryable"]

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIED_CLIENT_STATUSES = (408, 429)  # request timeout, too many requests


# botocore retries S3's errors itself (`total_max_attempts` tries), and s3fs again around it (its
# `retries` attribute): one try each, so every failure is this policy's to retry and to count
S3_ONE_TRY = {"retries": {"total_max_attempts": 1}}


def filesystem_for_reads(url: str, storage_options: dict | None = None):
    """``fsspec.core.url_to_fs(url, **storage_options)`` for reads under :class:`RetryPolicy`: on
    ``s3://``, the client's own retries off unless ``config_kwargs`` names its own (then uncounted)."""
    options = dict(storage_options or {})
    s3 = str(url).startswith(("s3://", "s3a://"))
    if s3:
        options["config_kwargs"] = {**S3_ONE_TRY, **options.get("config_kwargs", {})}
    fs, path = fsspec.core.url_to_fs(url, **options)
    if s3:
        fs.retries = 1  # this instance is our options' own (fsspec caches one per option set)
    return fs, path


class Unavailable(SampleError):
    """A remote read that still failed after the policy's retries (or could not be retried)."""

    reason = "unavailable"


def retryable(exc: BaseException) -> bool:
    """True for failures that may pass on a later try."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError and alike
    if isinstance(status, int):
        return status >= 500 or status in RETRIED_CLIENT_STATUSES
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return True
    botocore = sys.modules.get("botocore.exceptions")  # s3fs's transport, when it is in use
    if botocore is not None and isinstance(exc, (botocore.HTTPClientError, botocore.ConnectionError)):
        return True
    import aiohttp  # fsspec's HTTP transport; imported only once a read has failed

    return isinstance(exc, aiohttp.ClientError)


class RetryStats:
    """Retries counted per kind of read in this process (thread-safe; starts empty after a fork)."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def _own(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    def add(self, kind: str) -> None:
        self._own()
        with self._lock:
            self._counts[kind] += 1

    def drain(self) -> dict[str, int]:
        """The counts since the previous drain (and reset them)."""
        self._own()
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts

    def __getstate__(self):
        return {}

    def __setstate__(self, state) -> None:
        self._reset()


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; before try ``i + 1`` wait ``uniform(0, min(cap, base·2^i))``
    seconds, and never start a wait that would take the total past ``max_wait`` seconds."""

    attempts: int = 8
    base: float = 0.1
    cap: float = 10.0
    max_wait: float = 120.0

    def __post_init__(self):
        if self.attempts < 1 or min(self.base, self.cap, self.max_wait) < 0:
            raise ValueError("a retry policy needs attempts >= 1 and non-negative waits")

    def call(self, fn: Callable[[], T], *, what: str, kind: str, stats: RetryStats | None = None) -> T:
        """``fn()``, retried per the policy; the final failure raises :class:`Unavailable` (or the
        error itself when it is not retryable, e.g. ``FileNotFoundError``)."""
        waited, attempt = 0.0, 0
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified by retryable()
                if not retryable(exc):
                    raise
                attempt += 1
                delay = random.uniform(0.0, min(self.cap, self.base * 2 ** (attempt - 1)))
                if attempt == self.attempts or waited + delay > self.max_wait:
                    raise Unavailable(f"{what}: {attempt} tries failed, last: "
                                      f"{type(exc).__name__}: {exc}") from exc
                if stats is not None:
                    stats.add(kind)
                log.warning("%s failed (%s: %s); retrying", what, type(exc).__name__, exc)
                time.sleep(delay)
                waited += delay
