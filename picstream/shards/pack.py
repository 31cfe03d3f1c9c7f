"""Phase 2 of make_shards: pack shards from a plan, each from its own inputs, on any machine.

`pack(out, range(a, b))` makes shards a..b-1 of the plan's units (see plan.py): shard u takes unit u's
main inputs, then its reserve, in permutation order, until it holds `shard_size` valid samples. Each
shard's sidecar (written atomically after the shard) records the plan fingerprint, the shard's record,
its skips and how many of its inputs it consumed, so a re-run verifies finished shards and skips them:
idempotent and resumable, any subset on any machine. `Packer` is the shared loop (also finalize's).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Iterable

from tqdm import tqdm

from . import format as F
from .convert import Skip
from .format import ShardsError
from .plan import Plan, load_plan, main_inputs, output_op, reserve_inputs
from .sources import Input
from .workers import prepared
from .writer import ShardWriter


@dataclass
class Packer:
    """Validates/converts inputs in `workers` processes and writes them, in order, into shards."""

    out: str
    fs: object
    root: str
    plan: Plan
    workers: int = 1
    so: dict | None = None
    bar: tqdm | None = None

    def run(self, todo: Iterable[Input], first_shard: int, start: int, max_shards: int | None = None):
        """Pack `todo` (stream positions start, start+1, ...) into shards first_shard, ... (at most
        `max_shards`). Returns (sidecars, skips after the last shard, its unfinished writer or None)."""
        size, sidecars = self.plan.shard_size, []
        writer, skips, shard_start, pos, converted = None, [], start, start, 0
        mine, theirs = itertools.tee(todo)
        results = prepared(theirs, self.workers, self.plan.options, self.so or {})
        try:
            for inp, result in zip(mine, results):
                pos += 1
                if self.bar is not None:
                    self.bar.update(1)
                if isinstance(result, Skip):
                    skip = dict(input=inp.name, reason=result.reason, detail=result.detail)
                    skips.append(skip if result.match is None else dict(skip, match=result.match))
                    continue
                raw_size, prep, extra = result
                if writer is None:
                    k = first_shard + len(sidecars)
                    writer = output_op(self.out, lambda: ShardWriter(self.fs, self.root, k, k * size))
                    converted = 0
                meta = dict(src=inp.name, bytes=raw_size, width=prep.width, height=prep.height,
                            converted=prep.converted, **extra)
                output_op(self.out, lambda: writer.add(prep.data, inp.label, meta))
                converted += prep.converted is not None
                if len(writer) == size:
                    sidecars.append(self.finish(writer, shard_start, pos, skips, converted))
                    writer, skips, shard_start = None, [], pos
                    if len(sidecars) == max_shards:
                        break
        finally:
            results.close()
        return sidecars, skips, writer and (writer, shard_start, pos, converted)

    def finish(self, writer: ShardWriter, input_start: int, input_stop: int, skips: list,
               converted: int) -> dict:
        def op():
            rec = writer.close()
            side = dict(fingerprint=self.plan.fingerprint, shard=rec.to_json(), input_start=input_start,
                        input_stop=input_stop, skipped=skips, converted=converted)
            F.write_atomic(self.fs, F.join(self.root, F.sidecar_name(writer.k)),
                           json.dumps(side, indent=1).encode())
            return side
        return output_op(self.out, op)

    def verified(self, k: int) -> dict | None:
        """Shard k's sidecar if it is of this plan and its files match their checksums."""
        fs, root = self.fs, self.root
        path = F.join(root, F.sidecar_name(k))
        try:
            side = json.loads(fs.cat_file(path))
            rec = side["shard"]
            ok = (side["fingerprint"] == self.plan.fingerprint
                  and F.sha256_hex(fs.cat_file(F.join(root, rec["name"]))) == rec["sha256"]
                  and F.sha256_hex(fs.cat_file(F.join(root, rec["index"]))) == rec["index_sha256"])
        except FileNotFoundError:
            return None
        return side if ok else None


@dataclass(frozen=True)
class PackSummary:
    packed: int  # shards made by this call
    resumed: int  # shards found finished (and verified)

    def line(self) -> str:
        return f"packed {self.packed} shards ({self.resumed} already done)"


def parse_range(text: str, units: int) -> range:
    """`A:B` (either side may be empty) → range(A, B) clipped to the plan's units."""
    try:
        a, b = (int(x) if x else None for x in text.split(":"))
    except ValueError:
        raise ShardsError(f"--shards must be A:B (shard numbers), got {text!r}") from None
    return range(units)[slice(a, b)]


def pack(out: str, shards: range | None = None, *, workers: int = 1, storage_options: dict | None = None,
         progress: bool = False) -> PackSummary:
    """Make the given shards (default: all of the plan's units) of the plan in OUT; finished ones are
    verified and kept."""
    fs, root, plan = load_plan(out, storage_options)
    shards = range(plan.units) if shards is None else shards
    if shards and not (0 <= shards.start and shards.stop <= plan.units):
        raise ShardsError(f"the plan has shards 0:{plan.units} to pack, not {shards.start}:{shards.stop}")
    bar = tqdm(total=len(shards), unit="shard", disable=not progress, desc="pack", dynamic_ncols=True)
    packer = Packer(out, fs, root, plan, workers, storage_options)
    made = 0
    try:
        for u in shards:
            if packer.verified(u) is None:
                pack_unit(packer, u)
                made += 1
            bar.update(1)
    finally:
        bar.close()
    return PackSummary(made, len(shards) - made)


def pack_unit(packer: Packer, u: int) -> dict:
    """Shard u from unit u's main inputs, then its reserve; a unit without enough valid inputs is fatal."""
    fs, root, plan = packer.fs, packer.root, packer.plan
    lo, hi = plan.reserve_range(u)
    todo = itertools.chain(main_inputs(fs, root, u), reserve_inputs(fs, root, lo, hi))
    sidecars, skips, partial = packer.run(todo, u, 0, max_shards=1)
    if sidecars:
        return sidecars[0]
    if partial:
        partial[0].abort()
    valid = len(partial[0]) if partial else 0
    raise ShardsError(f"shard {u}: only {valid} of its {plan.shard_size + hi - lo} planned inputs are valid "
                      f"images ({len(skips)} skipped); plan again with a larger --spare")
