"""Row store on S3 against local disk: the trainer's classifier workload, steps/s and commit time.

The workload of `durability.py` (admissions into the recent-K table with eviction write-back, an SGD
step, a commit every `--commit-every` steps as at a checkpoint), once with the row store in a local
folder and once at an `s3://` URL on moto's S3 server on 127.0.0.1 (tests/s3_server.py). Loopback: the
ratio shows the protocol's requests (one PUT per chunk array, copied pre-images, listings at commit)
and the S3 server's cost per request, not a network. Alternating (local, S3, local, S3), best of 2.

Usage: python benchmarks/rowstore_s3.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]

from durability import measure, workload  # noqa: E402
from s3_server import MotoServer, new_bucket  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: N = 32768, 60 steps")
    args = workload(p.parse_args())

    server = MotoServer()
    os.environ.update(server.env)
    results = {"local": [], "s3": []}
    try:
        bucket = new_bucket()
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(2):
                results["local"].append(measure(False, args, f"{tmp}/local-{rep}.zarr"))
                results["s3"].append(measure(False, args, f"s3://{bucket}/s3-{rep}.zarr"))
    finally:
        server.close()
    best = {where: {k: (max if k == "steps_per_s" else min)(r[k] for r in runs) for k in runs[0]}
            for where, runs in results.items()}
    print(f"N = {args.num_rows}, D = {args.dim}, K = {args.capacity}, W = {args.window}, S = {args.stride}, "
          f"batch {args.batch}, commit every {args.commit_every} steps, best of 2")
    print("| row store | steps/s (commits included) | commit ms |")
    print("|---|---:|---:|")
    for where in ("local", "s3"):
        print(f"| {where} | {best[where]['steps_per_s']:.1f} | {best[where]['commit_ms']:.1f} |")
    speed = best["s3"]["steps_per_s"] / best["local"]["steps_per_s"]
    commit = best["s3"]["commit_ms"] / best["local"]["commit_ms"]
    print(f"RESULT: S3/local steps/s {speed:.2f}x, commit time {commit:.1f}x")


if __name__ == "__main__":
    main()
