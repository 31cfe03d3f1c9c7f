"""One background thread for the row store work of the next admission (``classifier.overlap``).

:class:`ReadAhead` runs one job at a time, named by the row IDs it reads. ``drain`` waits for the
job in flight and raises its error, once, in the caller's thread; ``take`` hands the finished job to
the admission, which uses its result only for exactly those IDs. The thread starts with the first
job (after the loader may have forked its workers) and stops at ``close``. On CUDA the thread
first makes the rows' device its current one: the job waits for CUDA events (the evicted rows'
copies), and a thread without a current device would start a context on device 0 for that.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch


class ReadAhead:
    """At most one job in flight, its result kept until :meth:`take`; the jobs wait for events of
    ``device``."""

    def __init__(self, device: torch.device):
        device = torch.device(device)
        self._device = None
        if device.type == "cuda":
            self._device = device.index if device.index is not None else torch.cuda.current_device()
        self._executor: ThreadPoolExecutor | None = None
        self._job: tuple[np.ndarray, Future] | None = None

    def start(self, ids: np.ndarray, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` in the thread as the job for rows ``ids`` (after waiting for the last one)."""
        self.drain()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead",
                                                initializer=self._enter_device)
        self._job = (ids, self._executor.submit(fn, *args))

    def _enter_device(self) -> None:
        if self._device is not None:
            torch.cuda.set_device(self._device)

    def drain(self) -> None:
        """Wait for the job in flight; an error it raised is raised here, and the job dropped."""
        if self._job is not None:
            try:
                self._job[1].result()
            except BaseException:
                self._job = None
                raise

    def take(self) -> tuple[np.ndarray, object] | None:
        """``(ids, result)`` of the last job, finished (None when there is none); the job is dropped."""
        self.drain()
        job, self._job = self._job, None
        return None if job is None else (job[0], job[1].result())

    def close(self) -> None:
        """Stop the thread (after the job in flight); the job's result is dropped."""
        executor, self._executor, self._job = self._executor, None, None
        if executor is not None:
            executor.shutdown(wait=True)
