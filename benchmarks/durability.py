"""Cost of `train.durability: power` against `process`: row-store commit time and steps/s.

One step admits a batch of the sliding-window stream into the recent-K table (fetch, exact
correction, eviction write-back into the store's cache and chunk files) and applies an SGD step to
the resident rows; every `--commit-every` steps the store commits, as the trainer does at a
checkpoint. `power` fsyncs chunk files, flags, the head and their folders before a commit counts;
`process` relies on the kernel's page cache (survives kill -9, not a power loss). Both modes run the
same workload in the same process, alternating (A B A B), each on a fresh store on local disk.

Usage: python benchmarks/durability.py [--quick] [--dir DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from picstream.classifier import build_classifier
from picstream.scheduler import SlidingWindowScheduler


def measure(durable: bool, args, root: str) -> dict:
    clf = build_classifier(args.num_rows, args.dim, capacity=args.capacity, store_url=root,
                           chunk_rows=args.chunk_rows, cache_rows=args.window + args.stride,
                           durable=durable)
    sched = SlidingWindowScheduler(args.num_rows, args.window, args.stride, seed=0)
    commit_s, started = [], time.perf_counter()
    for step in range(args.steps):
        clf.rows.admit(sched.ids_at(step * args.batch, (step + 1) * args.batch))
        clf.rows.sgd_step(None, 0.05)
        if (step + 1) % args.commit_every == 0:
            t0 = time.perf_counter()
            clf.store.commit()
            commit_s.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    clf.close(flush=False)
    return {"steps_per_s": args.steps / total, "commit_ms": 1000 * float(np.mean(commit_s))}


def workload(args):
    """The workload's sizes on ``args`` (``args.quick``: the CI size); returns ``args``."""
    scale = 4 if args.quick else 1
    args.num_rows, args.dim, args.batch = 131072 // scale, 128, 512
    args.capacity, args.window, args.stride = 16384 // scale, 32768 // scale, 4096 // scale
    args.chunk_rows = args.stride
    args.steps, args.commit_every = (60, 20) if args.quick else (256, 64)
    return args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: N = 32768, 60 steps")
    p.add_argument("--dir", help="where the stores go (default: a temporary folder)")
    args = workload(p.parse_args())

    results = {"process": [], "power": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for rep in range(2):
            for mode in ("process", "power"):
                results[mode].append(measure(mode == "power", args, f"{tmp}/{mode}-{rep}.zarr"))
    best = {mode: {k: (max if k == "steps_per_s" else min)(r[k] for r in runs) for k in runs[0]}
            for mode, runs in results.items()}
    print(f"N = {args.num_rows}, D = {args.dim}, K = {args.capacity}, W = {args.window}, S = {args.stride}, "
          f"batch {args.batch}, commit every {args.commit_every} steps, best of 2")
    print("| durability | steps/s (commits included) | commit ms |")
    print("|---|---:|---:|")
    for mode in ("process", "power"):
        print(f"| {mode} | {best[mode]['steps_per_s']:.1f} | {best[mode]['commit_ms']:.1f} |")
    speed = best["power"]["steps_per_s"] / best["process"]["steps_per_s"]
    commit = best["power"]["commit_ms"] / best["process"]["commit_ms"]
    print(f"RESULT: power/process steps/s {speed:.2f}x, commit time {commit:.1f}x")


if __name__ == "__main__":
    main()
