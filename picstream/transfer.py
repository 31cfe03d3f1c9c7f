"""Copies between host and device that never make the host wait for the device.

:func:`to_device` copies with ``non_blocking=True``, from a pinned staging copy on CUDA (a copy from
pageable memory would wait for the stream); the caching host allocator keeps that staging buffer
until the copy is done. :func:`device_constant` uploads a small constant once per device and reuses it.
:class:`HostCopy` starts a device → host copy and waits for it only when its result is read.
"""
from __future__ import annotations

import functools

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (``t`` itself when it is already there), copied without blocking."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@functools.lru_cache(maxsize=None)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only 1-D tensor of ``values`` on ``device``, uploaded on the first call only."""
    return to_device(torch.tensor(values, dtype=dtype), device)


class HostCopy:
    """A host copy of a device tensor, started without waiting (into pinned memory on CUDA, with an
    event); :meth:`result` waits for that copy only. On the CPU it is an ordinary copy."""

    def __init__(self, t: torch.Tensor):
        cuda = t.device.type == "cuda"
        self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        self._host.copy_(t, non_blocking=True)
        self._done = None
        if cuda:
            self._done = torch.cuda.Event()
            self._done.record()

    def result(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()
        return self._host
