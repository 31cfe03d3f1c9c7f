"""Atomic, verifiable training checkpoints (`torch.load(weights_only=True)` safe)."""
from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .iopoints import about, fsync_path

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
_PART = re.compile(r"^ckpt-(\d{9})\.part-(\d+)-of-(\d+)\.pt$")
FORMAT = "picstream-checkpoint-1"


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:09d}.pt"


def part_path(directory: Path, step: int, rank: int, world: int) -> Path:
    """Rank ``rank``'s part of the checkpoint of a ``world``-rank run (its classifier state)."""
    return Path(directory) / f"ckpt-{step:09d}.part-{rank}-of-{world}.pt"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], part: tuple[int, int] | None = None
                    ) -> Path:
    """Write `state` to `ckpt-<step>.pt` (or rank ``part[0]``'s part file of a ``part[1]``-rank run)
    via a temp file, fsync and rename (never a torn file; a failed write, e.g. a full disk, removes
    its temp file). A distributed checkpoint is complete when its main file exists: it is written
    after every rank's part is, and writing it removes the parts of another world size at that step."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step) if part is None else part_path(directory, step, *part)
    tmp = final.with_name(final.name[:-len(".pt")] + f".tmp{os.getpid()}")
    try:
        with about(str(tmp), "create"), open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, "step": step, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        with about(str(final), "rename"):
            os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(str(directory))
    if part is None:
        for path in parts_of(directory, step):
            if int(_PART.match(path.name).group(3)) != saved_world(state):
                path.unlink(missing_ok=True)
    return final


def saved_world(state: dict[str, Any]) -> int:
    """How many processes saved a checkpoint (from its main file's state)."""
    classifier = state.get("classifier")
    return int(classifier.get("parts", 1)) if isinstance(classifier, dict) else 1


def parts_of(directory: Path, step: int) -> list[Path]:
    """The part files at ``step`` (of any world size)."""
    return sorted(Path(directory).glob(f"ckpt-{step:09d}.part-*-of-*.pt"))


def classifier_states(path: Path, state: dict[str, Any], ranks=None) -> list[dict]:
    """The classifier states of checkpoint ``path`` (its main file's ``state``), one per rank of the
    run that saved it (only ``ranks`` of them, if given; a 1-process checkpoint holds its own)."""
    saved = state["classifier"]
    if "parts" not in saved:
        return [saved]
    world = int(saved["parts"])
    return [load_checkpoint(part_path(Path(path).parent, int(state["step"]), r, world))
            for r in (range(world) if ranks is None else ranks)]


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that a killed process left behind, and the parts of
    distributed checkpoints that were never completed (no main file)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = list(directory.glob("ckpt-*.tmp*"))
    stale += [p for p in directory.glob("ckpt-*.part-*.pt")
              if not checkpoint_path(directory, int(_PART.match(p.name).group(1))).exists()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; raises `ValueError` if it is not a valid one.

    `mmap=True` maps the tensors instead of reading them (cheap when only metadata is needed).
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zip, bad pickle, ...: all mean "not usable"
        raise ValueError(f"checkpoint {path} is unreadable: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a picstream checkpoint")
    return state


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_valid_checkpoint(directory: Path, log=print) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint that loads; corrupt ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path)
        except ValueError as err:
            log(f"skipping {err}")
            continue
        world = saved_world(state)
        missing = [p.name for p in (part_path(directory, int(state["step"]), r, world) for r in range(world))
                   if world > 1 and not p.exists()]
        if missing:
            log(f"skipping {path}: its parts {', '.join(missing)} are missing")
            continue
        return path, state
    return None


def prune_checkpoints(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns the ones kept."""
    found = list_checkpoints(directory)
    for path in found[:-keep]:
        with about(str(path), "unlink"):
            path.unlink(missing_ok=True)
        for part in parts_of(directory, int(_NAME.match(path.name).group(1))):
            part.unlink(missing_ok=True)
    return found[-keep:]


def retire_newer(directory: Path, step: int) -> list[Path]:
    """Move the checkpoints newer than `step` into `retired-<time>/` beside them (kept, never
    deleted, and out of `--resume auto`'s reach); returns their new paths."""
    newer = [p for p in list_checkpoints(directory) if int(_NAME.match(p.name).group(1)) > step]
    if not newer:
        return []
    aside = Path(directory) / time.strftime("retired-%Y%m%d-%H%M%S")
    aside.mkdir(exist_ok=True)
    moved = []
    for path in newer:
        for part in parts_of(directory, int(_NAME.match(path.name).group(1))):
            os.replace(part, aside / part.name)
        with about(str(aside / path.name), "rename"):
            os.replace(path, aside / path.name)
        moved.append(aside / path.name)
    fsync_path(str(directory))
    return moved
