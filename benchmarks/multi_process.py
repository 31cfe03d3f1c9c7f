"""Distributed PIC step on CPU (gloo): 1 process against 2, same global batch, same model.

Each world size runs under ``torchrun --standalone`` in its own job; every rank runs the trainer's
own objects (``Trainer`` with synthetic uint8 batches from the sliding-window stream, no loader) and
times each part of the step: backbone forward, classifier (feature gather, row admission, logits,
sharded softmax), backward (DDP gradient all-reduce and the feature-gradient reduction inside), and
the updates. The collectives of one step are then timed alone with the same sizes. Reported per
rank: classifier device memory and bytes sent through collectives per step.

``--learning`` instead pre-trains the CIFAR-10 subset of the learning test (the `cpu-small` scale
of `tools/reproduce.py`: 250 images × 100 epochs, batch 126, BatchNorm per process) with 1 and 2 processes
and compares their k-NN top-1 (~10 min on 2 cores).

Usage: python benchmarks/multi_process.py [--quick] [--learning [--data DIR_OR_ARCHIVE]]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def config_for(args, run_dir: str):
    from picstream.config import config_from_dict
    return config_from_dict({
        "run": {"output_dir": run_dir, "device": "cpu"},
        "data": {"train": "(synthetic)", "image_size": 32, "workers": 0},
        "model": {"arch": "resnet18", "cifar_stem": True, "head_hidden": 512, "feature_dim": 128},
        "classifier": {"recent_k": args.k, "chunk_rows": 1024},
        "schedule": {"window": 4 * args.k, "stride": args.k // 2},
        "optim": {"batch_size": args.batch, "base_batch_size": args.batch, "epochs": 100},
        "train": {"log_every": 10**6, "checkpoint_every": 10**6},
    })


def worker(args) -> None:
    """One rank: time the parts of ``args.steps`` steps after ``args.warmup`` warm-up steps."""
    import torch.distributed as dist

    from picstream.scheduler import batch_positions
    from picstream.train import Trainer

    trainer = Trainer(config_for(args, args.run_dir), num_instances=args.rows, show_progress=False)
    world, clf = trainer.world, trainer.classifier
    local = args.batch // world.size
    gen = torch.Generator().manual_seed(world.rank)
    parts = {"backbone forward": 0.0, "classifier forward": 0.0, "backward": 0.0, "updates": 0.0}
    for step in range(args.warmup + args.steps):
        pos = batch_positions(step, local, world.rank, world.size)
        ids = torch.from_numpy(trainer.scheduler.ids_at(int(pos[0]), int(pos[-1]) + 1))
        images = torch.randint(0, 256, (local, 3, 32, 32), dtype=torch.uint8, generator=gen)
        marks = [time.perf_counter()]
        z = trainer.forward(trainer._view_input(step, 0, images))
        marks.append(time.perf_counter())
        loss = clf.loss([z], ids)
        marks.append(time.perf_counter())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        trainer.optimizer.step()
        clf.step(trainer.lr_at(step))
        marks.append(time.perf_counter())
        if step >= args.warmup:
            for name, a, b in zip(parts, marks, marks[1:]):
                parts[name] += (b - a) / args.steps
    params = sum(p.numel() for p in trainer.model.parameters())
    comm, sent = 0.0, 0
    if world.size > 1:  # the step's collectives alone, with its sizes (float32)
        feats = torch.randn(local, 128)
        grads = torch.randn(params)
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            gathered = [torch.empty_like(feats) for _ in range(world.size)]
            dist.all_gather(gathered, feats)                       # features
            for _ in range(3):
                dist.all_reduce(torch.randn(args.batch))           # max, sum-exp, target logit
            dist.all_reduce(torch.randn(args.batch, 128))          # feature gradients
            dist.all_reduce(grads)                                 # backbone + head gradients
            world.gather_ids(torch.zeros(local, dtype=torch.int64))  # batch IDs
            if i >= args.warmup:
                comm += (time.perf_counter() - t) / args.steps
        frac = (world.size - 1) / world.size  # ring all-gather / all-reduce: bytes each rank sends
        sent = int(frac * (args.batch * 128 * 4 + args.batch * 8)
                   + 2 * frac * (3 * args.batch * 4 + args.batch * 128 * 4 + params * 4))
    report = {"world": world.size, **parts, "step": sum(parts.values()), "comm": comm, "sent": sent,
              "classifier_mb": clf.device_bytes() / 2**20, "resident_rows": int(clf.rows.weight.shape[0])}
    trainer.close()
    if world.rank == 0:
        print("REPORT " + json.dumps(report), flush=True)


def launch(world: int, args) -> dict:
    run_dir = tempfile.mkdtemp(prefix="picstream-dist-bench-")
    cmd = [*torchrun(world), __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--k", str(args.k), "--rows", str(args.rows), "--run-dir", run_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    shutil.rmtree(run_dir, ignore_errors=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    if out.returncode or not lines:
        sys.exit(f"world {world} failed:\n" + "\n".join(line for line in out.stderr.splitlines()
                                                        if "Error" in line or "rank" in line)[-4000:])
    return json.loads(lines[0][len("REPORT "):])


def torchrun(procs: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]


def learning(args) -> None:
    """k-NN top-1 after the same pre-training with 1 and 2 processes (per-process BatchNorm)."""
    from picstream.reproduce.grids import SCALES
    from picstream.reproduce.runner import base_config, prepare_cifar10

    scale = SCALES["cpu-small"]
    work = Path(tempfile.mkdtemp(prefix="picstream-dist-learning-"))
    data = prepare_cifar10(args.data, work, scale)
    top1 = {}
    for procs in (1, 2):
        run_dir = work / f"p{procs}"
        started = time.perf_counter()
        subprocess.run([*torchrun(procs), "-m", "picstream.train", "--config", str(base_config(scale, work)),
                        f"run.output_dir={run_dir}", f"data.train={data.pretrain}",
                        "optim.batch_size=126", "optim.base_batch_size=126"],  # 125 does not split in 2
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = sorted((run_dir / "checkpoints").glob("ckpt-*[0-9].pt"))[-1]
        out = run_dir / "knn.json"
        subprocess.run([sys.executable, "-m", "picstream.evaluate", "knn", "--checkpoint", str(last),
                        "--train", str(data.bank), "--val", str(data.test), "--workers", "0", "-o", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        top1[procs] = json.loads(out.read_text())["top1"]
        print(f"| {procs} | {top1[procs]:.1f} | {(time.perf_counter() - started) / 60:.1f} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT: k-NN top-1 with 2 processes {top1[2]:.1f} vs 1 process {top1[1]:.1f} "
          f"({top1[2] - top1[1]:+.1f} points)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--learning", action="store_true", help="k-NN after 1- and 2-process pre-training")
    parser.add_argument("--data", type=Path, help="CIFAR-10 folder or archive (default: the shared data)",
                        default=Path(os.environ.get("PICSTREAM_SHARED_DATA",
                                                    Path(__file__).parents[2] / "shared" / "data"))
                        / "cifar10-jpeg.tar.gz")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=1 << 20)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.learning:
        print("| processes | k-NN top-1 | minutes |\n|---|---|---|")
        return learning(args)
    if args.quick:
        args.steps, args.warmup, args.batch, args.k, args.rows = 4, 2, 32, 2048, 1 << 16
    runs = [launch(world, args) for world in (1, 2)]
    print(f"ResNet-18 (32 px), global batch {args.batch}, K = {args.k}, N = {args.rows}, D = 128, "
          f"CPU gloo, {os.cpu_count()} cores shared by the ranks")
    cols = ["backbone forward", "classifier forward", "backward", "updates", "step", "comm"]
    print("| processes | " + " | ".join(f"{c} (ms)" for c in cols)
          + " | classifier MB/rank | rows/rank | sent/rank/step (MB) |")
    print("|---" * (len(cols) + 4) + "|")
    for r in runs:
        print(f"| {r['world']} | " + " | ".join(f"{1e3 * r[c]:.1f}" for c in cols)
              + f" | {r['classifier_mb']:.2f} | {r['resident_rows']} | {r['sent'] / 2**20:.2f} |")
    one, two = runs
    share = lambda r: r["classifier forward"] / r["step"]  # noqa: E731
    print(f"RESULT: 2 processes / 1: step time {two['step'] / one['step']:.2f}x, classifier memory per "
          f"rank {two['classifier_mb'] / one['classifier_mb']:.2f}x, classifier share of the step "
          f"{share(one):.1%} → {share(two):.1%}, collectives {two['comm'] / two['step']:.1%} of the "
          "2-process step")


if __name__ == "__main__":
    main()
