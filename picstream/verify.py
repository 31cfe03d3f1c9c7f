"""`picstream-verify SHARDS [--repair-cache DIR]`: check a shard set (and a loader cache) against its
manifest.

The manifest is checked first against its own digest (reported on stderr; a manifest without one,
from an older make_shards, is reported unverified); a damaged manifest is one line on stdout and
nothing else is checked, since nothing it lists can be trusted. Each shard's tar is checked for size and sha256, its index for sha256 and, in format v2, every
sample for its checksum; one line per damaged file goes to stdout. `--repair-cache DIR` also checks
the shard set's entries in a loader cache folder (`data.cache_dir`) and deletes damaged ones and
partial downloads left by dead processes, so the loader fetches them again. Exit status: 0 when
everything matches, 1 when something is damaged, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from .loader.cache import cache_name, matches_record, remove_stale_partials
from .shards import ShardSet, ShardsError
from .shards.reader import DamagedManifest


def repair_cache(ss: ShardSet, cache_dir: Path, shards) -> list[str]:
    """Delete `cache_dir`'s damaged entries and dead processes' partial downloads of `shards`."""
    removed = []
    for k in shards:
        name = cache_name(ss.shard_record(k))
        entry = cache_dir / name
        if entry.exists() and not matches_record(str(entry), ss.shard_record(k)):
            entry.unlink()
            removed.append(f"shard {k}: removed damaged cache entry {entry}")
        removed += [f"shard {k}: removed partial download {part}"
                    for part in remove_stale_partials(str(cache_dir), f"{name}.")]
    return removed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="picstream-verify", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="a shard manifest or its folder (path or URL)")
    p.add_argument("--repair-cache", metavar="DIR", type=Path,
                   help="also check this loader cache folder; delete damaged entries")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        if args.repair_cache is not None and not args.repair_cache.is_dir():
            raise ShardsError(f"--repair-cache: {args.repair_cache} is not a folder")
        ss = ShardSet.open(args.shards)
    except DamagedManifest as err:
        print(f"manifest: {err}")
        return 1
    except ShardsError as err:
        print(f"picstream-verify: error: {err}", file=sys.stderr)
        return 2
    if ss.digest is not None:
        print(f"picstream-verify: manifest of {ss.root} matches its digest {ss.digest}", file=sys.stderr)
    damaged = 0
    for k in tqdm(range(ss.num_shards), unit="shard", disable=args.quiet, file=sys.stderr):
        problems = ss.verify([k])
        damaged += bool(problems)
        for line in problems:
            tqdm.write(line, file=sys.stdout)
    removed = repair_cache(ss, args.repair_cache, range(ss.num_shards)) if args.repair_cache else []
    for line in removed:
        print(line)
    print(f"{damaged} of {ss.num_shards} shards damaged"
          + (f"; {len(removed)} cache files removed" if args.repair_cache else ""))
    return 1 if damaged or removed else 0


if __name__ == "__main__":
    sys.exit(main())
