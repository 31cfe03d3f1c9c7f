"""Command line: `python tools/make_shards.py SRC OUT [options]`."""
from __future__ import annotations

import argparse
import sys

from .build import make_shards
from .format import ShardsError
from .sources import KINDS, SourceOptions


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards", description="Pack an image corpus into tar shards with an index and a manifest.")
    p.add_argument("src", help="a folder (class sub-folders give labels), a text/CSV list (path[,label]), "
                               "webdataset tars (a tar, a folder of tars, a brace pattern), parquet files, "
                               "a `datasets` save_to_disk folder, an FFCV .beton, or any fsspec URL of these")
    p.add_argument("out", help="output folder or URL; OUT/manifest.json is the manifest (with --format "
                               "beton: OUT.beton, the shards in OUT.beton.shards/)")
    p.add_argument("--format", choices=("shards", "beton"), default="shards",
                   help="beton: also write an FFCV .beton of the shards, in the same ID order")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the ID permutation (default 0)")
    p.add_argument("--workers", type=int, default=1, help="validating/converting processes (default 1)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    shards_out = args.out
    if args.format == "beton":
        if not args.out.endswith(".beton") or "://" in args.out:
            print("make_shards: error: with --format beton, OUT is a local path ending in .beton", file=sys.stderr)
            return 2
        shards_out = args.out + ".shards"
    try:
        summary = make_shards(args.src, shards_out, shard_size=args.shard_size, seed=args.seed,
                              workers=args.workers, labels=not args.no_labels, max_side=args.max_side,
                              resize_short=args.resize_short, quality=args.quality, progress=not args.quiet,
                              source=SourceOptions(args.source, args.image_column, args.label_column,
                                                   args.label_key))
    except ShardsError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_shards: interrupted; re-run the same command to finish", file=sys.stderr)
        return 130
    if summary.packed == 0:
        print(f"make_shards: error: all {summary.inputs} inputs were skipped (reasons in {summary.manifest})",
              file=sys.stderr)
        return 2
    if args.format == "beton":
        from ..beton.writer import write_beton
        from .reader import ShardSet
        try:
            write_beton(ShardSet.open(shards_out), args.out, workers=args.workers)
        except ImportError as e:
            print(f"make_shards: error: {e}", file=sys.stderr)
            return 2
        if not args.quiet:
            print(f"wrote {args.out} ({summary.packed} samples in ID order)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
