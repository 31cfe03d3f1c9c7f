"""Named I/O points: every change picstream makes to durable state announces itself here first.

The row store, the checkpoint writer and the trainer's small files call ``point(kind, path)`` (through
``about``) right before each file write, create, rename, link, unlink, mkdir and rmdir. Nothing
happens unless a hook is installed: crash tests install one that kills the process (or raises
ENOSPC) at the n-th point, which is how every crash point of a scenario is enumerated. Also here:
the file primitives built on it (``about``, ``fsync_path``, ``replace_file``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

Hook = Callable[[str, str], None]
_hook: Optional[Hook] = None


def set_hook(hook: Optional[Hook]) -> None:
    """Install ``hook(kind, path)`` (None removes it)."""
    global _hook
    _hook = hook


def point(kind: str, path: str) -> None:
    """Announce an I/O operation of ``kind`` on ``path`` that is about to happen."""
    if _hook is not None:
        _hook(kind, path)


@contextlib.contextmanager
def about(path: str, kind: str | None = None):
    """Make an OSError raised inside name ``path`` when it names nothing; with ``kind``, first
    announce the I/O point (a test's hook may fail it as the operation itself would)."""
    try:
        if kind is not None:
            point(kind, path)
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = path
        raise


def write_all(f, view: memoryview) -> None:
    """Write every byte of ``view`` to the unbuffered file ``f`` (a short write is continued)."""
    done = 0
    while done < len(view):
        done += f.write(view[done:])


def fsync_path(path: str) -> None:
    """fsync a file or a folder (a folder's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes, durable: bool = False) -> None:
    """Replace ``path`` whole by ``data`` through ``path.tmp`` and a rename: a kill leaves the old or
    the new file, a failure removes the temporary one; ``durable`` fsyncs the file and its folder."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with about(tmp, "create"), open(tmp, "wb", buffering=0) as f:
            write_all(f, memoryview(data))
            if durable:
                os.fsync(f.fileno())
        with about(path, "rename"):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        with about(path):
            fsync_path(os.path.dirname(path))
