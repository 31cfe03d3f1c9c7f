"""Data preparation, one `picstream-train` run per (variant, seed), its k-NN result and its curves.

Every run is a normal `picstream-train` process in its own run directory: rerunning the same grid
resumes an interrupted run from its last checkpoint and skips finished ones (``result.json``).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..checkpoint import list_checkpoints
from ..config import parse_overrides
from ..shards import make_shards
from .grids import Grid, Scale, Variant

__all__ = ["DataSplits", "class_subset", "prepare_cifar10", "run_variant", "read_curves", "slug",
           "random_init_knn"]


@dataclass(frozen=True)
class DataSplits:
    pretrain: Path
    bank: Path
    test: Path


def class_subset(src: Path, dst: Path, per_class: int | None) -> Path:
    """``dst/<class>/`` holds links to the first ``per_class`` files of each class folder of ``src``."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            link = dst / cls.name / f.name
            if not link.exists():
                os.symlink(f.resolve(), link)
    return dst


def _cifar10_root(source: Path, work: Path) -> Path:
    """The folder holding ``train/`` and ``test/``: ``source`` itself, or its extracted archive."""
    if source.is_dir():
        root = source if (source / "train").is_dir() else source / "cifar10"
    else:
        done = work / "extracted"
        if not done.exists():
            with tarfile.open(source) as tar:
                tar.extractall(work / "cifar10-src", filter="data")
            done.touch()
        root = work / "cifar10-src" / "cifar10"
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(f"{source}: expected CIFAR-10 as train/<class>/ and test/<class>/ images")
    return root


def prepare_cifar10(source: Path, work: Path, scale: Scale) -> DataSplits:
    """Shards of the scale's CIFAR-10 splits under ``work`` (made once, reused afterwards)."""
    root = _cifar10_root(source, work)
    pretrain_n, bank_n, test_n = scale.per_class or (None, None, None)
    manifests = {}
    for name, split, per_class in (("pretrain", "train", pretrain_n), ("bank", "train", bank_n),
                                   ("test", "test", test_n)):
        out = work / f"{scale.name}-{name}"
        if name == "bank" and per_class == pretrain_n:   # the same images: one shard set
            manifests[name] = manifests["pretrain"]
            continue
        if not (out / "manifest.json").exists():
            images = class_subset(root / split, work / f"{scale.name}-{name}-images", per_class)
            make_shards(str(images), str(out), shard_size=1024, seed=0, progress=False)
        manifests[name] = out / "manifest.json"
    return DataSplits(**manifests)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def base_config(scale: Scale, out: Path) -> Path:
    """The scale's shared settings as a YAML file (the ``--config`` of every run)."""
    path = out / f"{scale.name}-base.yaml"
    path.write_text(yaml.safe_dump(parse_overrides(list(scale.base)), sort_keys=False))
    return path


def _steps(epochs: float, n: int, batch: int) -> int:
    return max(1, -(-int(round(epochs * n)) // batch))


def run_variant(grid: Grid, variant: Variant, seed: int, scale: Scale, data: DataSplits, out: Path,
                num_instances: int, log) -> dict:
    """Train (or resume) one run, then its final k-NN; returns ``result.json``'s content."""
    run_dir = out / scale.name / grid.name / f"{slug(variant.name)}-s{seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    overrides = dict(o.split("=", 1) for o in scale.base + variant.overrides)
    batch, epochs = int(overrides["optim.batch_size"]), float(overrides["optim.epochs"])
    every = max(1, _steps(epochs, num_instances, batch) // scale.knn_points)
    cmd = [sys.executable, "-m", "picstream.train", "--config", str(base_config(scale, out)),
           *variant.overrides, f"run.name={grid.name}-{slug(variant.name)}-s{seed}",
           f"run.output_dir={run_dir}", f"run.seed={seed}", f"data.train={data.pretrain}",
           f"monitor.knn_train={data.bank}", f"monitor.knn_val={data.test}",
           f"monitor.every_steps={every}"]
    log(f"[{grid.name}] {variant.name} seed {seed}: {' '.join(variant.overrides)}")
    started = time.perf_counter()
    _check(subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), cmd)
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    knn = _knn(["--checkpoint", str(last)], data, run_dir / "knn.json")
    result = {"grid": grid.name, "variant": variant.name, "seed": seed, "top1": knn["top1"],
              "top5": knn["top5"], "wall_s": time.perf_counter() - started,
              "overrides": list(variant.overrides), "config": str(run_dir / "config.yaml")}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"[{grid.name}] {variant.name} seed {seed}: k-NN top-1 {knn['top1']:.1f} "
        f"({result['wall_s'] / 60:.1f} min)")
    return result


def random_init_knn(scale: Scale, data: DataSplits, out: Path) -> dict:
    """k-NN of the randomly initialised backbone (the floor every run must clear)."""
    path = out / scale.name / "random-init.json"
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    cifar_stem = ["--cifar-stem"] if "model.cifar_stem=true" in scale.base else []
    return _knn(["--random-init", "resnet18", *cifar_stem, "--image-size", "32"], data, path)


def _knn(args: list[str], data: DataSplits, path: Path) -> dict:
    cmd = [sys.executable, "-m", "picstream.evaluate", "knn", *args, "--train", str(data.bank),
           "--val", str(data.test), "--workers", "0", "-o", str(path)]
    _check(subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), cmd)
    return json.loads(path.read_text())


def _check(done: subprocess.CompletedProcess, cmd: list[str]) -> None:
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {done.returncode}: {tail[0]}")


def read_curves(run_dir: Path, batch: int, num_instances: int) -> dict[str, list[tuple[float, float]]]:
    """``{"loss": [(epoch, loss)], "knn": [(epoch, top1)]}`` from a run's ``metrics.jsonl``."""
    curves: dict[str, list[tuple[float, float]]] = {"loss": [], "knn": []}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        epoch = (record["step"] + 1) * batch / num_instances
        if "loss" in record:
            curves["loss"].append((epoch, record["loss"]))
        if "knn_top1" in record:
            curves["knn"].append((epoch, record["knn_top1"]))
    return curves
