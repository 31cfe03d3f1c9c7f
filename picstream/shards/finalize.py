"""Phase 3 of make_shards: check every unit's shard, pack the unused reserve inputs in order as the last
shards, and write the manifest (records inline up to INLINE_MAX shards, else in a sidecar, records.py).

Refuses (one line) a plan with unpacked shards or shards of another plan. Resumable: the reserve shards
are verified from their sidecars and packing continues after the last good one; the manifest is
written last.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

from tqdm import tqdm

from . import format as F
from . import records as R
from .format import ShardsError
from .pack import Packer
from .plan import Plan, load_plan, output_op, reserve_inputs

INLINE_MAX = 1024  # "auto": up to this many shards the records stay in manifest.json (version 2)
RECORDS = ("auto", "inline", "sidecar")
SKIPPED_FILE = "skipped.jsonl"


@dataclass(frozen=True)
class Finalized:
    manifest: dict  # without the v2 records and skipped list
    num_shards: int
    skipped: int
    reasons: dict  # skipped inputs per reason
    bytes: int
    resumed: int  # reserve shards found finished
    processed: int  # reserve inputs validated by this call


def finalize(out: str, *, workers: int = 1, storage_options: dict | None = None, progress: bool = False,
             records: str = "auto") -> Finalized:
    fs, root, plan = load_plan(out, storage_options)
    if records not in RECORDS:
        raise ShardsError(f"records must be one of {', '.join(RECORDS)}, got {records!r}")
    used = _units_used(fs, root, plan, out)
    segments = ([(lo + n, hi) for n, (lo, hi) in zip(used, map(plan.reserve_range, range(plan.units)))]
                if plan.units else [(0, plan.num_inputs)])
    total = sum(hi - lo for lo, hi in segments)
    bar = tqdm(total=total, unit="img", disable=not progress, desc="make_shards", dynamic_ncols=True)
    packer = Packer(out, fs, root, plan, workers, storage_options, bar)
    done = []
    while (side := packer.verified(plan.units + len(done))) is not None:
        done.append(side)
    start = done[-1]["input_stop"] if done else 0
    bar.update(start)
    stream = itertools.chain.from_iterable(reserve_inputs(fs, root, lo, hi) for lo, hi in segments)
    try:
        made, tail_skips, partial = packer.run(itertools.islice(stream, start, None),
                                               plan.units + len(done), start)
        if partial:
            writer, shard_start, pos, converted = partial
            made.append(packer.finish(writer, shard_start, pos, tail_skips, converted))
            tail_skips = []
    finally:
        bar.close()
    fin = _write_manifest(out, fs, root, plan, plan.units + len(done) + len(made), tail_skips, records)
    return Finalized(**fin, resumed=len(done), processed=total - start)


def _units_used(fs, root: str, plan: Plan, out: str) -> list[int]:
    """Inputs of its reserve each unit used; refuses missing units and units of another plan."""
    used, missing = [], []
    for u in range(plan.units):
        try:
            side = json.loads(fs.cat_file(F.join(root, F.sidecar_name(u))))
        except FileNotFoundError:
            missing.append(u)
            continue
        if side["fingerprint"] != plan.fingerprint:
            raise ShardsError(f"shard {u} in {out} was packed from another plan; delete it and pack it again")
        used.append(side["input_stop"] - plan.shard_size)
    if missing:
        raise ShardsError(f"{len(missing)} of {plan.units} shards are not packed yet (--shards "
                          f"{_ranges(missing)}); run `make_shards pack {out} --shards A:B` for them")
    return used


def _ranges(ks: list[int]) -> str:
    runs = [list(g) for _, g in itertools.groupby(ks, key=lambda k, c=itertools.count(): k - next(c))]
    text = ", ".join(f"{r[0]}:{r[-1] + 1}" for r in runs[:5])
    return text + (", ..." if len(runs) > 5 else "")


def _write_manifest(out, fs, root, plan: Plan, num_shards: int, tail_skips: list, records: str) -> dict:
    """Merge the shards' sidecars into the manifest; the counts must add up to the plan's inputs. Large
    sets: the skips are streamed to SKIPPED_FILE and the records (88 bytes per shard) to R.RECORDS_FILE."""
    inline = records == "inline" or (records == "auto" and num_shards <= INLINE_MAX)
    shards, skipped, body = [], [], bytearray()
    packed = converted = size = nskipped = 0
    reasons: Counter = Counter()
    skip_path = F.join(root, SKIPPED_FILE)
    skip_sha = hashlib.sha256()
    opened = nullcontext() if inline else output_op(out, lambda: fs.open(skip_path + ".tmp", "wb"))
    with opened as skip_file:
        def skips(items: list) -> None:
            if inline:
                skipped.extend(items)
            else:
                lines = b"".join(F.json_bytes(s) + b"\n" for s in items)
                skip_sha.update(lines)
                output_op(out, lambda: skip_file.write(lines))
        for k in range(num_shards):
            side = json.loads(fs.cat_file(F.join(root, F.sidecar_name(k))))
            rec = side["shard"]
            packed, converted, size = packed + rec["count"], converted + side["converted"], size + rec["bytes"]
            nskipped += len(side["skipped"])
            reasons.update(s["reason"] for s in side["skipped"])
            skips(side["skipped"])
            if inline:
                shards.append(rec)
            else:
                body += R.record_bytes(rec)
        skips(tail_skips)
    nskipped += len(tail_skips)
    reasons.update(s["reason"] for s in tail_skips)
    if packed + nskipped != plan.num_inputs:
        raise ShardsError(f"{out}: {packed} packed + {nskipped} skipped inputs != {plan.num_inputs} planned")
    manifest = dict(
        format=F.FORMAT_NAME, version=F.FORMAT_VERSION if inline else F.RECORDS_VERSION,
        num_samples=packed, shard_size=plan.shard_size, num_shards=num_shards,
        label_names=plan.label_names, seed=plan.seed, source=dict(**plan.source, inputs=plan.num_inputs),
        options=plan.options, fingerprint=plan.fingerprint, converted=converted)
    if inline:
        manifest.update(skipped=skipped, shards=shards)
    else:
        data = R.assemble(bytes(body))
        output_op(out, lambda: fs.mv(skip_path + ".tmp", skip_path))
        output_op(out, lambda: F.write_atomic(fs, F.join(root, R.RECORDS_FILE), data))
        manifest.update(skipped=nskipped, skipped_list=dict(name=SKIPPED_FILE, sha256=skip_sha.hexdigest()),
                        records=R.describe(data))
    output_op(out, lambda: F.write_atomic(fs, F.join(root, F.MANIFEST), F.manifest_bytes(manifest)))
    return dict(manifest=manifest, num_shards=num_shards, skipped=nskipped, reasons=dict(sorted(reasons.items())),
                bytes=size)
