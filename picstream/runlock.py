"""One trainer per run directory (and per row store): an OS file lock that dies with its process."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .config import ConfigError


class RunLocked(ConfigError):
    """Another live process holds the lock."""


class RunLock:
    """An exclusive POSIX record lock on ``path`` (created if needed), taken at once or refused.

    POSIX locks belong to the process: forked loader workers do not inherit them, and the kernel drops
    them when the process dies, however it dies. ``what`` names the locked thing in the refusal."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise RunLocked(f"{what} is in use by another picstream-train (pid {holder}); "
                            "wait for it to finish or stop it first") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the lock
            self._fd = -1
