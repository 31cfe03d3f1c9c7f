"""Run `picstream-train` (or `make_shards`) with an I/O hook that acts at one chosen I/O point.

    python tests/crash_runner.py ACTION SPEC LOG -- [picstream-train arguments]
    python tests/crash_runner.py ACTION SPEC LOG -- make_shards [make_shards arguments]

ACTION: `kill` (SIGKILL there), `enospc` (raise ENOSPC there), `pause` (create LOG.reached, then wait
until LOG.go exists) or `count` (act nowhere); `ACTION@R` acts only in rank R of a torchrun job.
Every point passed is appended to LOG as `kind path`.
SPEC: `N` (the N-th point of this process) or `KIND:GLOB:K[:+OFFSET]` (the K-th point of that kind
whose path matches GLOB, or OFFSET points after it).
"""
from __future__ import annotations

import errno
import fnmatch
import os
import signal
import sys
import time
from pathlib import Path

from picstream import iopoints


class Hook:
    def __init__(self, action: str, spec: str, log: Path):
        self.action, self.log, self.count, self.matches, self.at = action, log, 0, 0, None
        parts = spec.split(":")
        if len(parts) == 1:
            self.at = int(spec)
        else:
            self.kind, self.glob, self.k = parts[0], parts[1], int(parts[2])
            self.offset = int(parts[3]) if len(parts) > 3 else 0
        self._file = open(log, "a", buffering=1)

    def __call__(self, kind: str, path: str) -> None:
        self.count += 1
        self._file.write(f"{kind} {path}\n")
        if self.at is None and kind == self.kind and fnmatch.fnmatch(path, self.glob):
            self.matches += 1
            if self.matches == self.k:
                self.at = self.count + self.offset
        if self.count == self.at:
            self.act()

    def act(self) -> None:
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.action == "pause":
            Path(f"{self.log}.reached").touch()
            deadline = time.monotonic() + 600
            while not Path(f"{self.log}.go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


if __name__ == "__main__":
    action, spec, log, sep, *args = sys.argv[1:]
    action, _, rank = action.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        action = "count"
    assert sep == "--" and action in ("kill", "enospc", "pause", "count")
    if args[:1] == ["make_shards"]:
        from picstream.shards.cli import main
        args = args[1:]
    else:
        from picstream.train import main
    iopoints.set_hook(Hook(action, spec, Path(log)))
    sys.exit(main(args))
