"""`make_shards`, the one-command form: plan (no units) then finalize, which packs every input in
permutation order. IDs are the ranks of the valid inputs in the permutation, so they have no holes and do
not depend on the worker count. Resumable: each shard's sidecar (written atomically after the shard)
records the inputs it consumed, and a re-run verifies the finished shards and continues after the last.
Large corpora use the phases on their own (plan.py, pack.py, finalize.py, cluster.py).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import fsspec

from . import format as F
from .buckets import check_bucket
from .finalize import finalize
from .format import ShardsError
from .hygiene import Hygiene, clean_plan
from .plan import make_plan, output_op, plan_path
from .sources import SourceOptions, list_inputs


@dataclass(frozen=True)
class ShardSummary:
    inputs: int
    packed: int
    skipped: int
    reasons: dict  # skipped inputs per reason (removed copies included)
    converted: int
    num_shards: int
    resumed_shards: int  # finished shards found (and verified) from an earlier run
    processed: int  # inputs validated by this run (the others were in resumed shards)
    bytes: int
    seconds: float
    manifest: str

    def line(self) -> str:
        rate = (self.processed / self.seconds) if self.seconds > 0 else 0.0
        return (f"packed {self.packed} of {self.inputs} inputs into {self.num_shards} shards "
                f"({self.skipped} skipped{by_reason(self.reasons)}, {self.converted} converted, "
                f"{self.resumed_shards} shards resumed) "
                f"in {self.seconds:.1f} s ({rate:.0f} img/s): {self.manifest}")


def by_reason(counts: dict | None) -> str:
    """` [3 duplicate, 1 corrupt]` (empty for no count): the summary lines' counts per skip reason."""
    return f" [{', '.join(f'{n} {r}' for r, n in counts.items())}]" if counts else ""


def check_options(shard_size: int, workers: int, max_side: int | None, resize_short: int | None,
                  quality: int) -> None:
    if min(shard_size, workers, max_side or 1, resize_short or 1) < 1 or not 1 <= quality <= 100:
        raise ShardsError("shard size, workers, max side and resize short must be >= 1, quality in [1, 100]")


def plan_shards(src, out, *, shard_size: int = 1024, seed: int = 0, labels: bool = True,
                max_side: int | None = None, resize_short: int | None = None, quality: int = 90,
                storage_options: dict | None = None, source: SourceOptions | None = None,
                spare: float | None = 0.0625, tmp: str | None = None, hygiene: Hygiene | None = None,
                workers: int = 1, client=None):
    """Phase 1: list SRC and write the plan under OUT (see plan.py), with the copies `hygiene` names
    removed (hygiene.py; default: exact duplicates; its hash pass runs in `workers` processes or as
    tasks on the Dask `client`); returns (plan, listing, fs, root)."""
    check_options(shard_size, workers, max_side, resize_short, quality)
    hygiene = Hygiene() if hygiene is None else hygiene
    if spare is not None and not 0 <= spare <= 1:
        raise ShardsError(f"spare must be in [0, 1], got {spare}")
    so = storage_options or {}
    fs, root = output_op(str(out), lambda: fsspec.core.url_to_fs(str(out), **so))
    output_op(str(out), lambda: check_bucket(str(out), fs, root))
    listing = list_inputs(src, labels=labels, storage_options=so, exclude=str(out), source=source)
    options = dict(labels=labels, max_side=max_side, resize_short=resize_short, quality=quality,
                   **listing.options, **hygiene.options())

    def clean(plan):
        return clean_plan(plan, hygiene, str(out), fs, root, storage_options=so, workers=workers,
                          client=client, tmp=tmp)

    plan = make_plan(listing, str(out), fs, root, seed=seed, shard_size=shard_size, options=options,
                     spare=spare, tmp=tmp, clean=clean if hygiene.active else None)
    return plan, listing, fs, root


def make_shards(src, out, *, shard_size: int = 1024, seed: int = 0, workers: int = 1, labels: bool = True,
                max_side: int | None = None, resize_short: int | None = None, quality: int = 90,
                progress: bool = True, storage_options: dict | None = None,
                source: SourceOptions | None = None, records: str = "auto",
                hygiene: Hygiene | None = None) -> ShardSummary:
    """Pack the images of `src` (folder, list file, tars, parquet, `datasets` folder, .beton or a URL; see
    `SourceOptions`) into shards under `out` (folder or URL), without the copies `hygiene` names
    (default: exact duplicates removed)."""
    t0 = time.perf_counter()
    check_options(shard_size, workers, max_side, resize_short, quality)
    plan, listing, fs, root = plan_shards(
        src, out, shard_size=shard_size, seed=seed, labels=labels, max_side=max_side,
        resize_short=resize_short, quality=quality, storage_options=storage_options, source=source, spare=None,
        hygiene=hygiene, workers=workers)
    fin = finalize(str(out), workers=workers, storage_options=storage_options, progress=progress,
                   records=records)
    output_op(str(out), lambda: fs.rm(plan_path(root), recursive=True))
    if listing.cleanup is not None:
        listing.cleanup()
    summary = ShardSummary(
        inputs=plan.num_inputs, packed=fin.manifest["num_samples"], skipped=fin.skipped, reasons=fin.reasons,
        converted=fin.manifest["converted"], num_shards=fin.num_shards, resumed_shards=fin.resumed,
        processed=fin.processed, bytes=fin.bytes, seconds=time.perf_counter() - t0,
        manifest=F.join(str(out), F.MANIFEST))
    if progress:
        print(summary.line(), file=sys.stderr)
    return summary
