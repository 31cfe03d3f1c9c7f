"""Classifier-path memory is independent of N; row-store disk bytes grow with touched rows only.

1. Peak device memory of the classifier path (CUDA ``max_memory_allocated``; on CPU the classifier's
   tensor bytes and the process peak RSS) for N = 1e5 … 1e9 at fixed K, D, W, B. Each N runs in its
   own process.
2. Disk bytes of an N = 1e9 store after touching M rows (training writes whole windows: contiguous).
Usage: python benchmarks/store_memory.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from classifier_step import add_shape_args, classifier_step, peak_bytes, stream, sync
from picstream.classifier import build_classifier
from picstream.rowstore import RowStore

SIZES = (100_000, 1_281_167, 7_469_000, 100_000_000, 1_000_000_000)


def run_one(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        clf = build_classifier(args.num_rows, args.dim, capacity=args.capacity, store_url=f"{tmp}/rows",
                               chunk_rows=args.chunk_rows, cache_rows=args.window + args.stride,
                               device=device)
        ids_of, gen = stream(args), torch.Generator().manual_seed(0)
        for step in range(args.steps):
            classifier_step(clf, step, ids_of, gen, args, device)
        sync(device)
        clf.close()
        return {"peak_bytes": peak_bytes(device), "state_bytes": clf.device_bytes()}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_growth(touched: list[int], dim: int, chunk_rows: int) -> list[tuple[int, int]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in touched:
            url = Path(tmp) / f"m{m}"
            store = RowStore.create(str(url), 10**9, dim, chunk_rows=chunk_rows)
            start = 123 * chunk_rows
            for lo in range(0, m, 65536):
                hi = min(m, lo + 65536)
                w = np.ones((hi - lo, dim), np.float32)
                store.write(np.arange(start + lo, start + hi), w, w, 1)
            store.close()
            rows.append((m, du(url)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: K = 4096, W = 8192, 10 steps")
    add_shape_args(p, steps=300)
    p.add_argument("--num-rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.quick:
        args.capacity, args.window, args.stride, args.batch, args.steps = 4096, 8192, 1024, 256, 10
    print(f"K={args.capacity} D={args.dim} B={args.batch} W={args.window} S={args.stride} "
          f"steps={args.steps} device={args.device}")
    print(f"{'N':>14}{'peak MiB':>11}{'state MiB':>11}")
    peaks = []
    for n in SIZES:
        cmd = [sys.executable, __file__, "--one", f"--num-rows={n}"] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
                "capacity", "dim", "batch", "window", "stride", "chunk_rows", "steps", "threads",
                "device")]
        r = json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])
        peaks.append(r["peak_bytes"])
        print(f"{n:>14,}{r['peak_bytes'] / 2**20:>11.1f}{r['state_bytes'] / 2**20:>11.1f}")
    ratio = max(peaks) / min(peaks)
    print(f"peak memory max/min over N: {ratio:.3f}")
    touched = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    print(f"{'rows touched (N = 1e9)':>24}{'disk MiB':>11}{'bytes/row':>11}")
    growth = disk_growth(touched, args.dim, args.chunk_rows)
    for m, b in growth:
        print(f"{m:>24,}{b / 2**20:>11.1f}{b / m:>11.0f}")
    per_row = [b / m for m, b in growth]
    print(f"RESULT: peak memory max/min over N=1e5..1e9 {ratio:.3f}; disk {per_row[-1]:.0f} bytes "
          f"per touched row (2·D·4 + 8 = {2 * args.dim * 4 + 8})")


if __name__ == "__main__":
    main()
