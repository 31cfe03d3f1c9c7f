"""Classifier-path step time and memory: recent-K rows + row store vs a full-N cosine softmax.

3. One step = admit the batch's rows (fetch + exact correction + eviction write-back), cosine logits,
   cross-entropy backward, SGD on the rows. Compared with a dense N-row classifier + stock SGD.
   The recent-K step runs with ``classifier.overlap`` off and on, in the same run: the time of the
   step spent in admission (main thread) and in the store write of evicted rows; with overlap on
   each step names the next one's IDs (``read_ahead``, as the trainer does), so the deferred write,
   the store read of the next admission and, given the step's lr, the exact correction of those
   rows run in a background thread while the step computes (its time is reported too). The admission time hidden is off minus on; within
   the admission, the exact correction left there and the wait for the background thread are
   timed too, and how many admissions were corrected ahead.
4. Row store throughput: rows fetched, corrected and written back per second (admit + the trainer's
   prefetch), over one whole window after the K-slot table is full and a window of rows was evicted.

Each configuration runs in its own process so its peak memory is its own.
Usage: python benchmarks/classifier_step.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from picstream.classifier import build_classifier
from picstream.scheduler import SlidingWindowScheduler

NEED_ROWS_PER_S = 512 * 10  # a 512-image batch at 10 steps/s


def stream(args):
    sched = SlidingWindowScheduler(args.num_rows, args.window, args.stride, seed=0)
    # start mid-run (a few windows in) so the recent table is full and rows come back corrected
    first = 8 * args.window // args.batch
    return lambda step: sched.ids_at((step + first) * args.batch, (step + first + 1) * args.batch)


def prefetch_next_stride(clf, step, args):
    """What the trainer does: at each window start, prefetch the rows entering with the next one."""
    pos = (step + 8 * args.window // args.batch) * args.batch
    if pos % args.window < args.batch:
        start = (pos // args.window + 1) * args.stride + args.window - args.stride
        clf.prefetch(start, start + args.stride)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def throughput(clf, ids_of, args) -> dict:
    """Rows/s through ``admit`` (+ the trainer's prefetch) over one whole window in steady state.

    Warm-up: enough steps to fill the K-slot table, then one window, so that measured admits evict
    rows (write-back into the store) and fetch rows written back earlier (corrected over real gaps).
    """
    log, rows = clf.log, clf.rows
    per_window = args.window // args.batch
    warm = -(-args.capacity // args.batch) + per_window
    moved, busy, cpu = 0, 0.0, 0.0
    for step in range(warm + max(args.steps, per_window)):
        ids = ids_of(step)
        missing = sum(1 for i in np.unique(ids).tolist() if i not in rows._slot_of)
        t0, c0 = time.perf_counter(), time.process_time()
        prefetch_next_stride(clf, step, args)
        rows.admit(ids)
        log.append(0.05)
        sync(rows.weight.device)
        if step >= warm:
            busy += time.perf_counter() - t0
            cpu += time.process_time() - c0
            moved += missing
    return {"rows_per_s": moved / busy, "rows_per_cpu_s": moved / cpu}


class Stopwatch:
    """Wall time spent in one method of ``obj`` (the method itself runs, wrapped)."""

    def __init__(self, obj, name: str):
        self.seconds = 0.0
        method = getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        setattr(obj, name, timed)


def run_one(args) -> dict:
    """One configuration in this process: ms per step (or rows/s) and peak memory."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        clf = build_classifier(args.num_rows, args.dim, sampling="full" if args.mode == "full" else "recent",
                               capacity=args.capacity, store_url=f"{tmp}/rows", chunk_rows=args.chunk_rows,
                               cache_rows=args.window + args.stride, device=device,
                               overlap=args.overlap == "on")
        ids_of = stream(args)
        gen = torch.Generator(device="cpu").manual_seed(0)
        if args.mode == "throughput":
            return throughput(clf, ids_of, args)
        # recent-K: fill the K-slot table first, so every timed step evicts rows and writes them back
        warm = 3 + (-(-args.capacity // args.batch) if args.mode == "recent" else 0)
        for step in range(warm + args.steps):
            if step == warm:
                sync(device)
                start = time.perf_counter()
                if args.mode == "recent":  # admission, store writes and background work from here on
                    admit, write = Stopwatch(clf.rows, "admit"), Stopwatch(clf.store, "write")
                    ahead = Stopwatch(clf.rows, "_write_read_and_correct")
                    correct, wait = Stopwatch(clf.log, "advance"), Stopwatch(clf.rows._read_ahead, "drain")
            classifier_step(clf, step, ids_of, gen, args, device)
        sync(device)
        ms = (time.perf_counter() - start) / args.steps * 1e3
        out = {"ms_per_step": ms, "peak_bytes": peak_bytes(device), "state_bytes": clf.device_bytes()}
        if args.mode == "recent":
            out.update(admit_ms=admit.seconds / args.steps * 1e3, write_ms=write.seconds / args.steps * 1e3,
                       ahead_ms=ahead.seconds / args.steps * 1e3, correct_ms=correct.seconds / args.steps * 1e3,
                       wait_ms=wait.seconds / args.steps * 1e3, reads=dict(clf.rows.reads),
                       corrections=dict(clf.rows.corrections))
        return out


def spawn(args, mode: str, overlap: str = "off") -> dict:
    cmd = [sys.executable, __file__, "--one", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in (
        ("num_rows", args.num_rows), ("capacity", args.capacity), ("dim", args.dim),
        ("batch", args.batch), ("window", args.window), ("stride", args.stride),
        ("chunk_rows", args.chunk_rows), ("steps", args.steps), ("device", args.device),
        ("threads", args.threads), ("overlap", overlap))]
    return json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])


def classifier_step(clf, step: int, ids_of, gen: torch.Generator, args, device) -> None:
    """One classifier-path step on random features: prefetch (and name the next step's IDs),
    logits, backward, SGD."""
    prefetch_next_stride(clf, step, args)
    clf.read_ahead(ids_of(step + 1), 0.05)
    z = torch.randn(args.batch, args.dim, generator=gen).to(device).requires_grad_()
    logits, targets = clf.logits(z, ids_of(step))
    F.cross_entropy(logits, targets).backward()
    clf.step(0.05)


def add_shape_args(p: argparse.ArgumentParser, steps: int) -> None:
    """The classifier-path shape options shared with store_memory.py (paper defaults)."""
    p.add_argument("--capacity", type=int, default=65536)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--window", type=int, default=131072)
    p.add_argument("--stride", type=int, default=16384)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: N = 131072, K = 8192, few steps")
    p.add_argument("--num-rows", type=int, default=1_281_167)
    add_shape_args(p, steps=20)
    p.add_argument("--throughput-only", action="store_true", help="only the row store throughput")
    p.add_argument("--one", choices=("recent", "full", "throughput"), help=argparse.SUPPRESS)
    p.add_argument("--overlap", choices=("on", "off"), default="off", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.mode = args.one
        print(json.dumps(run_one(args)))
        return
    if args.quick:
        args.num_rows, args.capacity, args.window, args.stride, args.steps = 131072, 8192, 16384, 2048, 5
    thr = spawn(args, "throughput")
    print(f"N={args.num_rows} K={args.capacity} D={args.dim} B={args.batch} W={args.window} "
          f"S={args.stride} device={args.device} steps={args.steps} cpu_threads={args.threads} "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    need = thr["rows_per_s"] / NEED_ROWS_PER_S
    print(f"store throughput: {thr['rows_per_s']:.0f} rows/s fetched+corrected+written back "
          f"= {need:.1f}x the {NEED_ROWS_PER_S} rows/s of 512 images at 10 steps/s "
          f"({thr['rows_per_cpu_s']:.0f} rows per CPU second)")
    store = f"store {thr['rows_per_s']:.0f} rows/s = {need:.1f}x the {NEED_ROWS_PER_S} rows/s needed"
    if args.throughput_only:
        print(f"RESULT: {store}")
        return
    recent, overlapped, full = spawn(args, "recent"), spawn(args, "recent", "on"), spawn(args, "full")
    print(f"{'classifier':<30}{'ms/step':>10}{'peak MiB':>11}{'state MiB':>11}")
    for name, r in (("recent-K + row store", recent), ("recent-K, overlap on", overlapped),
                    ("full-N dense SGD", full)):
        print(f"{name:<30}{r['ms_per_step']:>10.1f}{r['peak_bytes'] / 2**20:>11.0f}"
              f"{r['state_bytes'] / 2**20:>11.1f}")
    speed = full["ms_per_step"] / recent["ms_per_step"]
    memory = full["peak_bytes"] / recent["peak_bytes"]
    print(f"full/recent: time {speed:.2f}x, peak memory {memory:.2f}x")
    print(f"{'recent-K admission':<34}{'admit ms/step':>14}{'correction':>11}{'wait':>6}"
          f"{'store write ms':>16}{'background ms':>15}{'share of step':>15}")
    for name, r in (("overlap off (synchronous)", recent), ("overlap on (write + read ahead)", overlapped)):
        print(f"{name:<34}{r['admit_ms']:>14.1f}{r['correct_ms']:>11.1f}{r['wait_ms']:>6.1f}"
              f"{r['write_ms']:>16.1f}{r['ahead_ms']:>15.1f}{100 * r['admit_ms'] / r['ms_per_step']:>14.1f}%")
    hidden = recent["admit_ms"] - overlapped["admit_ms"]
    print(f"admission time hidden by the read-ahead: {hidden:.1f} ms/step "
          f"(admit on/off {overlapped['admit_ms'] / recent['admit_ms']:.2f}x; admissions that read "
          f"ahead / in the step, overlap on: {overlapped['reads'].get('ahead', 0)} / "
          f"{overlapped['reads'].get('here', 0)}, corrected ahead / in the step: "
          f"{overlapped['corrections'].get('ahead', 0)} / {overlapped['corrections'].get('here', 0)})")
    print(f"RESULT: step time full/recent {speed:.2f}x, memory {memory:.2f}x, {store}; admission "
          f"{overlapped['admit_ms']:.1f} ms/step with overlap on (read ahead) vs {recent['admit_ms']:.1f} "
          f"off ({overlapped['admit_ms'] / recent['admit_ms']:.2f}x; background "
          f"{overlapped['ahead_ms']:.1f} ms, correction in admission {overlapped['correct_ms']:.1f} "
          f"vs {recent['correct_ms']:.1f} ms), {hidden:.1f} ms hidden")


if __name__ == "__main__":
    main()
