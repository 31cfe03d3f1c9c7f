"""Named I/O points: every change picstream makes to durable state announces itself here first.

The row store and the checkpoint writer call ``point(kind, path)`` right before each file write,
create, rename, link, unlink, mkdir and rmdir. Nothing happens unless a hook is installed: crash
tests install one that kills the process (or raises ENOSPC) at the n-th point, which is how every
crash point of a scenario is enumerated.
"""
from __future__ import annotations

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
