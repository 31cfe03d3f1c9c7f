"""Finished runs recorded beside the results page, so the page is regenerated, and a grid resumed,
from any checkout: the small files of each finished run (its result, loss and k-NN log, config and
final k-NN), the random-init k-NN and the peers' results, under ``<page folder>/runs`` with the
paths they have under ``--out``. Checkpoints and row stores stay under ``--out`` only.

At start, every recorded file missing under ``--out`` is copied there (:func:`restore_records`):
a recorded run is then finished there and is skipped, as a run finished on this machine is.
"""
from __future__ import annotations

import shutil
from pathlib import Path

RUN_FILES = ("result.json", "metrics.jsonl", "config.yaml", "knn.json")


def record_files(records: Path | None, out: Path, *paths: Path) -> None:
    """Copy ``paths`` (files under ``out``; missing ones skipped) to the same places under ``records``."""
    if records is None:
        return
    for path in paths:
        if path.exists():
            target = records / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def record_run(records: Path | None, out: Path, run_dir: Path) -> None:
    """Record a finished run's small files."""
    record_files(records, out, *(run_dir / name for name in RUN_FILES))


def restore_records(records: Path | None, out: Path) -> int:
    """Copy every recorded file missing under ``out`` there; returns how many were copied."""
    if records is None or not records.is_dir():
        return 0
    copied = 0
    for path in sorted(p for p in records.rglob("*") if p.is_file()):
        target = out / path.relative_to(records)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied += 1
    return copied
