"""make_shards at scale: plan memory/time vs N, opening a huge manifest, and pack throughput on Dask.

1. plan over a synthetic streamed listing of N input names (no image bytes; shard size 1024, spare 1/16)
   for several N: wall time and peak RSS, each N in its own process (peak RSS = VmHWM, reset after imports);
   baseline: today's in-memory order (all inputs in a list + argsort of their keys) at the same N.
2. opening a synthetic shard set of S shards and reading one shard's record: manifest v2 (records inline
   in JSON) vs v3 (records sidecar), each in its own process: time and RSS above the interpreter's.
3. pack throughput: the one-command builder (1 process) vs plan + pack on Dask local clusters of 1 and
   2 worker processes + finalize, on real JPEGs (the ImageNet sample, symlinked `--copies` times).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from picstream.shards import format as F  # noqa: E402
from picstream.shards import records as R  # noqa: E402
from picstream.shards.sources import Input, Labels, Listing  # noqa: E402


def reset_peak() -> float:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux); returns the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_mb() -> float:
    return _status("VmHWM")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def synthetic_inputs(n: int):
    for i in range(n):
        name = f"part-{i // 100000:05d}/{i:012d}.jpg"
        yield Input(name, "s3://bucket/" + name, str(i % 1000))


# children: each prints one JSON line ------------------------------------------------------------------

def child_plan(n: int, out: str, mode: str) -> dict:
    import fsspec

    from picstream.shards.plan import make_plan, sort_key
    base = reset_peak()
    t = time.perf_counter()
    if mode == "external":
        fs, root = fsspec.core.url_to_fs(out)
        listing = Listing("synthetic", "list", synthetic_inputs(n), Labels())
        make_plan(listing, out, fs, root, seed=0, shard_size=1024, options={}, spare=1 / 16)
    else:  # today's in-memory order: every input in a list, argsort of their keys
        inputs = list(synthetic_inputs(n))
        keys = np.frombuffer(b"".join(sort_key(i.name, b"0", p)[:8] for p, i in enumerate(inputs)), ">u8")
        order = np.argsort(keys, kind="stable")
        assert len(order) == n
    return dict(seconds=time.perf_counter() - t, rss=peak_mb(), base=base)


def child_open(path: str) -> dict:
    from picstream.shards import ShardSet
    base = reset_peak()
    t = time.perf_counter()
    ss = ShardSet.open(path)
    rec = ss.shard_record(ss.num_shards // 2)
    seconds = time.perf_counter() - t
    assert rec["first_id"] == ss.num_shards // 2 * ss.shard_size
    return dict(seconds=seconds, rss=peak_mb(), base=base)


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# 1. plan -------------------------------------------------------------------------------------------------

def bench_plan(sizes: list[int], baseline_max: int, tmp: Path) -> float:
    print(f"\n{'plan N':>12} {'s':>8} {'µs/input':>9} {'peak RSS MB':>12} {'in-memory s':>12} {'in-memory RSS MB':>17}")
    rss = []
    for n in sizes:
        out = tmp / f"plan-{n}"
        r = run_child("plan", n, out, "external")
        shutil.rmtree(out, ignore_errors=True)
        m = run_child("plan", n, out, "memory") if n <= baseline_max else None
        rss.append(r["rss"])
        mem = f"{m['seconds']:12.1f} {m['rss']:17.0f}" if m else f"{'-':>12} {'-':>17}"
        print(f"{n:12.0e} {r['seconds']:8.1f} {1e6 * r['seconds'] / n:9.2f} {r['rss']:12.0f} {mem}")
    ratio = max(rss) / min(rss)
    print(f"peak RSS max/min over N = {sizes[0]:.0e} … {sizes[-1]:.0e}: {ratio:.3f}")
    return ratio


# 2. manifest open -------------------------------------------------------------------------------------

def synthetic_manifests(num_shards: int, tmp: Path) -> tuple[Path, Path]:
    size = 1024
    recs = [dict(name=f"shard-{k:06d}.tar", index=f"shard-{k:06d}.idx", first_id=k * size, count=size,
                 bytes=110 << 20, sha256=hashlib.sha256(b"%d" % k).hexdigest(),
                 index_sha256=hashlib.sha256(b"i%d" % k).hexdigest()) for k in range(num_shards)]
    head = dict(format="picstream-shards", num_samples=num_shards * size, shard_size=size,
                num_shards=num_shards, label_names=None, seed=0, source=dict(url="s3://corpus", kind="list"),
                options={}, fingerprint="0" * 64, converted=0)
    v2, v3 = tmp / "v2", tmp / "v3"
    v2.mkdir()
    v3.mkdir()
    (v2 / "manifest.json").write_bytes(F.manifest_bytes(dict(head, version=2, skipped=[], shards=recs)))
    data = R.assemble(b"".join(map(R.record_bytes, recs)))
    (v3 / R.RECORDS_FILE).write_bytes(data)
    (v3 / "manifest.json").write_bytes(F.manifest_bytes(dict(head, version=3, skipped=0, records=R.describe(data))))
    return v2, v3


def bench_open(num_shards: int, tmp: Path) -> float:
    v2, v3 = synthetic_manifests(num_shards, tmp)
    print(f"\n{num_shards} shards: manifest.json v2 {os.path.getsize(v2 / 'manifest.json') / 1e6:.1f} MB; "
          f"v3 {os.path.getsize(v3 / 'manifest.json') / 1e3:.1f} KB + {R.RECORDS_FILE} "
          f"{os.path.getsize(v3 / R.RECORDS_FILE) / 1e6:.1f} MB")
    print(f"{'open + one record':<26} {'ms':>10} {'RSS above start MB':>19}")
    res = {}
    for name, path in (("v2 (records in JSON)", v2), ("v3 (records sidecar)", v3)):
        r = min((run_child("open", path) for _ in range(3)), key=lambda r: r["seconds"])
        res[name] = r
        print(f"{name:<26} {1e3 * r['seconds']:10.2f} {r['rss'] - r['base']:19.1f}")
    ratio = res["v2 (records in JSON)"]["seconds"] / res["v3 (records sidecar)"]["seconds"]
    print(f"v3 opens {ratio:.0f}x faster")
    return ratio


# 3. pack throughput ------------------------------------------------------------------------------------

def bench_pack(data: Path, count: int, copies: int, tmp: Path) -> float:
    from picstream.shards import make_shards
    from picstream.shards.build import plan_shards
    from picstream.shards.cluster import dask_client, pack_on_dask
    from picstream.shards.finalize import finalize

    with tarfile.open(data / "imagenet-sample-1000.tar") as tar:
        tar.extractall(tmp / "orig", filter="data")
    src = tmp / "src"
    src.mkdir()
    for f in sorted((tmp / "orig" / "imagenet-sample-1000").iterdir())[:count]:
        for c in range(copies):
            (src / f"c{c}_{f.name}").symlink_to(f)
    n, size = count * copies, 64

    def one_command():
        make_shards(src, tmp / "one", shard_size=size, progress=False)

    def phased(workers):
        def run():
            out = tmp / f"dask{workers}"
            plan = plan_shards(src, out, shard_size=size, spare=1 / 16)[0]
            with dask_client(f"local:{workers}") as client:
                pack_on_dask(str(out), range(plan.units), client, per_task=2)
            finalize(str(out))
        return run

    print(f"\npack {n} JPEGs, shard size {size}")
    print(f"{'builder':<36} {'s':>7} {'img/s':>8} {'vs one-command':>15}")
    rows = [("one-command make_shards, 1 process", one_command), ("plan + Dask pack (1 worker) + finalize",
            phased(1)), ("plan + Dask pack (2 workers) + finalize", phased(2))]
    times = {}
    for name, fn in rows:
        t = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t
        print(f"{name:<36} {times[name]:7.2f} {n / times[name]:8.0f} {times[rows[0][0]] / times[name]:14.2f}x")
    return times[rows[0][0]] / times[rows[2][0]]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        print(json.dumps(child_plan(int(rest[0]), rest[1], rest[2]) if kind == "plan" else child_open(rest[0])))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI size: N = 1e4, 1e5; 20k shards; 200 images")
    p.add_argument("--sizes", default="1e6,1e7", help="plan sizes N (full mode)")
    p.add_argument("--shards", type=int, default=1_000_000, help="shards of the synthetic manifests")
    p.add_argument("--copies", type=int, default=2, help="copies of the ImageNet sample to pack")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("PICSTREAM_SHARED_DATA",
                                                                   REPO.parent / "shared" / "data")))
    args = p.parse_args()
    sizes = [10_000, 100_000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    num_shards = 20_000 if args.quick else args.shards
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rss_ratio = bench_plan(sizes, 10_000_000, tmp)
        open_ratio = bench_open(num_shards, tmp)
        if (args.data / "imagenet-sample-1000.tar").exists():
            pack_ratio = bench_pack(args.data, 200 if args.quick else 1000, 1 if args.quick else args.copies, tmp)
        else:
            pack_ratio = float("nan")
            print(f"\npack: skipped ({args.data / 'imagenet-sample-1000.tar'} not found)")
    print(f"RESULT: plan peak RSS max/min {rss_ratio:.2f} over N = {sizes[0]:.0e}..{sizes[-1]:.0e}; "
          f"v3 manifest opens {open_ratio:.0f}x faster at {num_shards} shards; "
          f"Dask pack 2 workers {pack_ratio:.2f}x the one-command builder")


if __name__ == "__main__":
    main()
