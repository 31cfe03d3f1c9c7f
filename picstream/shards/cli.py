"""Command line: `python tools/make_shards.py SRC OUT [options]`, or its phases for large corpora:
`make_shards plan SRC OUT`, `make_shards pack OUT [--shards A:B] [--dask ADDRESS]`, `make_shards finalize OUT`."""
from __future__ import annotations

import argparse
import sys

from .build import by_reason, make_shards, plan_shards
from .dedup import DEFAULT_THRESHOLD, MODES
from .finalize import RECORDS, finalize
from .format import ShardsError
from .hygiene import Hygiene
from .pack import pack, parse_range
from .plan import load_plan
from .sources import KINDS, SourceOptions

PHASES = ("plan", "pack", "finalize")


def _source_args(p: argparse.ArgumentParser) -> None:
    """SRC, OUT and the options that decide the shards' content (shared by the one-command form and plan)."""
    p.add_argument("src", help="a folder (class sub-folders give labels), a text/CSV list (path[,label]), "
                               "webdataset tars (a tar, a folder of tars, a brace pattern), parquet files, "
                               "a `datasets` save_to_disk folder, an FFCV .beton, or any fsspec URL of these")
    p.add_argument("out", help="output folder or URL; OUT/manifest.json is the manifest (with --format "
                               "beton: OUT.beton, the shards in OUT.beton.shards/)")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the ID permutation (default 0)")
    p.add_argument("--no-labels", action="store_true", help="ignore class folders / list labels")
    p.add_argument("--max-side", type=int, default=None, metavar="PX",
                   help="re-encode if the long side exceeds PX, scaling it to PX")
    p.add_argument("--resize-short", type=int, default=None, metavar="PX",
                   help="re-encode if the short side exceeds PX, scaling it to PX")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--source", choices=KINDS, default="auto",
                   help="how to read SRC (default: detected from its suffix or folder content)")
    p.add_argument("--image-column", default=None, metavar="NAME",
                   help="parquet/datasets image column or .beton image field (default: detected)")
    p.add_argument("--label-column", default=None, metavar="NAME",
                   help="parquet/datasets label column or .beton label field (default: `label` if present)")
    p.add_argument("--label-key", default=None, metavar="KEY",
                   help="webdataset: take the label from this key of each sample's .json (default: .cls)")
    p.add_argument("--dedup", choices=MODES, default="exact",
                   help="remove copies: exact (default: identical bytes or decoded pixels), near (also "
                        "re-encodes, resizes, colour shifts, mirror images), none; removals are skip records")
    p.add_argument("--near-threshold", type=int, default=DEFAULT_THRESHOLD, metavar="BITS",
                   help="near copies differ in at most BITS of 64 perceptual-hash bits "
                        f"(default {DEFAULT_THRESHOLD}; also used by --decontaminate)")
    p.add_argument("--decontaminate", nargs="+", default=[], metavar="EVAL",
                   help="remove training inputs that are exact or near copies of these evaluation sets "
                        "(any make_shards source, a shard set included)")


def _records_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", choices=RECORDS, default="auto",
                   help="shard records in manifest.json (inline) or in a sidecar read lazily (sidecar); "
                        "auto: inline up to 1024 shards")


def _dask_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--dask", default=None, metavar="ADDRESS", help=text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards", description="Pack an image corpus into tar shards with an index and a manifest. "
        "Large corpora: `make_shards plan|pack|finalize -h` (plan once, pack anywhere, finalize once).")
    _source_args(p)
    p.add_argument("--format", choices=("shards", "beton"), default="shards",
                   help="beton: also write an FFCV .beton of the shards, in the same ID order")
    p.add_argument("--workers", type=int, default=1, help="validating/converting processes (default 1)")
    _records_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return p


def phase_parser(phase: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"make_shards {phase}")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    if phase == "plan":
        p.description = "List SRC, put it in the ID permutation in bounded memory, write the plan to OUT."
        _source_args(p)
        p.add_argument("--spare", type=float, default=0.0625, metavar="F",
                       help="reserve inputs per shard as a fraction of the shard size, to replace skipped "
                            "inputs (default 0.0625; make it larger than the share of unusable inputs)")
        p.add_argument("--tmp", default=None, metavar="DIR",
                       help="local folder for the sort's spilled runs (kept for a re-run until the plan is done)")
        p.add_argument("--workers", type=int, default=1, help="hashing processes for --dedup (default 1)")
        _dask_arg(p, "hash the inputs for --dedup/--decontaminate on a Dask scheduler (tcp://HOST:PORT) "
                     "or a local cluster (local:N), one task per plan list")
        return p
    p.add_argument("out", help="the output folder or URL given to `make_shards plan`")
    p.add_argument("--workers", type=int, default=1, help="validating/converting processes (default 1)")
    if phase == "pack":
        p.description = "Pack shards of a plan; finished shards are verified and kept (idempotent)."
        p.add_argument("--shards", default=":", metavar="A:B", help="pack shards A..B-1 (default: all)")
        _dask_arg(p, "run on a Dask scheduler (tcp://HOST:PORT) or a local cluster (local:N)")
        p.add_argument("--per-task", type=int, default=1, metavar="K", help="shards per Dask task (default 1)")
    else:
        p.description = "Check every shard of the plan, pack the unused reserve inputs, write the manifest."
        _records_arg(p)
    return p


def _source(args) -> SourceOptions:
    return SourceOptions(args.source, args.image_column, args.label_column, args.label_key)


def _content(args) -> dict:
    return dict(shard_size=args.shard_size, seed=args.seed, labels=not args.no_labels, max_side=args.max_side,
                resize_short=args.resize_short, quality=args.quality, source=_source(args),
                hygiene=Hygiene(args.dedup, args.near_threshold, tuple(args.decontaminate)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    phase = argv[0] if argv and argv[0] in PHASES else None
    prog = f"make_shards {phase}" if phase else "make_shards"
    try:
        return _run_phase(phase, phase_parser(phase).parse_args(argv[1:])) if phase else _one_command(argv)
    except ShardsError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; re-run the same command to finish", file=sys.stderr)
        return 130


def _run_phase(phase: str, args) -> int:
    if phase == "plan":
        plan = _plan(args)
        if not args.quiet:
            removed = sum((plan.removed or {}).values())
            print(f"planned {plan.num_inputs} inputs ({removed} removed as copies{by_reason(plan.removed)}): "
                  f"shards 0:{plan.units} to pack "
                  f"(`make_shards pack {args.out} --shards A:B`), then `make_shards finalize {args.out}`",
                  file=sys.stderr)
        return 0
    if args.workers < 1:
        raise ShardsError("--workers must be >= 1")
    if phase == "finalize":
        fin = finalize(args.out, workers=args.workers, progress=not args.quiet, records=args.records)
        if not args.quiet:
            print(f"{fin.manifest['num_samples']} samples in {fin.num_shards} shards ({fin.skipped} skipped"
                  f"{by_reason(fin.reasons)}): "
                  f"{args.out}", file=sys.stderr)
        return 0
    shards = parse_range(args.shards, load_plan(args.out)[2].units)
    if args.dask:
        from .cluster import dask_client, pack_on_dask
        if args.per_task < 1:
            raise ShardsError("--per-task must be >= 1")
        with dask_client(args.dask) as client:
            summary = pack_on_dask(args.out, shards, client, per_task=args.per_task)
    else:
        summary = pack(args.out, shards, workers=args.workers, progress=not args.quiet)
    if not args.quiet:
        print(summary.line(), file=sys.stderr)
    return 0


def _plan(args):
    if args.workers < 1:
        raise ShardsError("--workers must be >= 1")
    if not args.dask:
        return plan_shards(args.src, args.out, spare=args.spare, tmp=args.tmp, workers=args.workers,
                           **_content(args))[0]
    from .cluster import dask_client
    with dask_client(args.dask) as client:
        return plan_shards(args.src, args.out, spare=args.spare, tmp=args.tmp, client=client,
                           **_content(args))[0]


def _one_command(argv) -> int:
    args = parser().parse_args(argv)
    shards_out = args.out
    if args.format == "beton":
        if not args.out.endswith(".beton") or "://" in args.out:
            raise ShardsError("with --format beton, OUT is a local path ending in .beton")
        shards_out = args.out + ".shards"
    summary = make_shards(args.src, shards_out, workers=args.workers, progress=not args.quiet,
                          records=args.records, **_content(args))
    if summary.packed == 0:
        raise ShardsError(f"all {summary.inputs} inputs were skipped (reasons in {summary.manifest})")
    if args.format == "beton":
        from ..beton.writer import write_beton
        from .reader import ShardSet
        try:
            write_beton(ShardSet.open(shards_out), args.out, workers=args.workers)
        except ImportError as e:
            raise ShardsError(str(e)) from None
        if not args.quiet:
            print(f"wrote {args.out} ({summary.packed} samples in ID order)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
