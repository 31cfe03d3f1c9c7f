"""make_shards throughput vs webdataset's ShardWriter on the same bytes, and ShardSet read throughput.

The ImageNet sample (1000 real ~110 KB JPEGs) is repeated `--copies` times under different names (symlinks).
make_shards validates every input (entropy-decodes each JPEG), hashes and indexes the shards; the baseline
writes the same image bytes plus the same metadata with webdataset.ShardWriter and validates nothing.
Reads: `ShardSet.read` of random IDs (one ranged read each) vs `iter_range` over all IDs (shards in the page
cache).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from picstream.shards import ShardSet, make_shards  # noqa: E402


def corpus(data: Path, tmp: Path, copies: int) -> Path:
    with tarfile.open(data / "imagenet-sample-1000.tar") as tar:
        tar.extractall(tmp / "orig", filter="data")
    src = tmp / "src"
    src.mkdir()
    for f in sorted((tmp / "orig" / "imagenet-sample-1000").iterdir()):
        for c in range(copies):
            (src / f"c{c}_{f.name}").symlink_to(f)
    return src


def webdataset_baseline(src: Path, out: Path, shard_size: int) -> None:
    import webdataset as wds  # imported by main() before any timing; not at module level, where the
    out.mkdir()               # spawned make_shards workers would import it (and torch) too
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i, f in enumerate(sorted(src.iterdir())):
            data = f.read_bytes()
            sink.write({"__key__": f"{i:012d}", "jpg": data,
                        "json": json.dumps({"src": f.name, "bytes": len(data)}).encode()})


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (the worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def best_times(configs: dict, repeat: int) -> dict:
    """Best (wall, CPU) seconds per config over `repeat` interleaved rounds. The machine is shared:
    interleaving spreads load changes over all configs, the best run is the least disturbed one, and
    CPU time does not depend on the load."""
    best = {name: (float("inf"), float("inf")) for name in configs}
    for _ in range(repeat):
        for name, (run, out) in configs.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # no writeback of the previous run's output during this one
            cpu = cpu_seconds()
            wall = timed(run)
            cpu = cpu_seconds() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--quick", action="store_true", help="1000 images instead of 8000")
    p.add_argument("--copies", type=int, default=None)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--reads", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds; each row is its best")
    args = p.parse_args()
    copies = args.copies or (1 if args.quick else 8)
    import webdataset  # noqa: F401  (import cost outside the timings)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src = corpus(args.data, tmp, copies)
        n = sum(1 for _ in src.iterdir())
        mb = sum(f.stat().st_size for f in src.iterdir()) / 1e6
        for f in src.iterdir():
            f.read_bytes()  # every writer starts with the inputs in the page cache
        print(f"corpus: {n} JPEGs, {mb:.0f} MB; shard size 1024; best of {args.repeat}")
        workers = [int(x) for x in args.workers.split(",")]
        configs = {"webdataset ShardWriter (no validation)":
                   (lambda: webdataset_baseline(src, tmp / "wds", 1024), tmp / "wds")}
        for w in workers:
            configs[f"make_shards workers={w}"] = (
                lambda w=w: make_shards(src, tmp / f"w{w}", workers=w, progress=False), tmp / f"w{w}")
        rows = list(best_times(configs, args.repeat).items())
        out = tmp / f"w{workers[-1]}"
        base = rows[0][1][0]
        print(f"\n{'writer':<40} {'s':>7} {'img/s':>8} {'MB/s':>7} {'vs wds':>7} {'CPU ms/img':>11}")
        for name, (t, cpu) in rows:
            print(f"{name:<40} {t:7.2f} {n / t:8.0f} {mb / t:7.1f} {base / t:7.2f}x {1e3 * cpu / n:11.2f}")

        ss = ShardSet.open(out)
        ids = np.random.default_rng(0).integers(0, len(ss), min(args.reads, len(ss)))
        for k in range(ss.num_shards):
            ss.index(k)  # index arrays cached, as in steady state
        t_rand = min(timed(lambda: [ss.read(int(i)) for i in ids]) for _ in range(args.repeat))
        t_seq = min(timed(lambda: sum(1 for _ in ss.iter_range(0, len(ss)))) for _ in range(args.repeat))
        rand, seq = len(ids) / t_rand, len(ss) / t_seq
        print(f"\n{'read':<40} {'img/s':>8} {'MB/s':>7}")
        print(f"{'ShardSet.read, random IDs':<40} {rand:8.0f} {rand * mb / n:7.1f}")
        print(f"{'ShardSet.iter_range, sequential':<40} {seq:8.0f} {seq * mb / n:7.1f}")
        print(f"random / sequential: {rand / seq:.2f}x")
        name, (t, _) = min(rows[1:], key=lambda r: r[1][0])
        print(f"RESULT: {name}: {n / t:.0f} img/s = {base / t:.2f}x webdataset ShardWriter "
              f"(which validates nothing); random read {rand / seq:.2f}x sequential")


if __name__ == "__main__":
    main()
