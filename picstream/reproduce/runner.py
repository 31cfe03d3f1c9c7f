"""Data preparation, one `picstream-train` run per (variant, seed), its k-NN result and its curves.

Every run is a normal `picstream-train` process in its own run directory: rerunning the same grid
resumes an interrupted run from its last checkpoint and skips finished ones (``result.json``). A
result's paths (``config``, ``same_as``) are relative to ``--out``; a finished run is also recorded
beside the results page (:mod:`.records`).
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
from ..config import load_config, parse_overrides
from ..shards import make_shards
from ..train import DIVERGED_EXIT
from .grids import Grid, Scale, Variant
from .records import record_files, record_run

__all__ = ["DataSplits", "RunDiverged", "class_subset", "prepare_cifar10", "run_variant", "read_curves", "slug",
           "random_init_knn", "run_env", "run_measured"]


class RunDiverged(RuntimeError):
    """The run stopped because its loss became non-finite (a result of its settings, not a failure
    of the machine: recorded, and not trained again)."""


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


def prepare_cifar10(source: Path, work: Path, scale: Scale, pretrain_per_class: int | None = None) -> DataSplits:
    """Shards of the scale's CIFAR-10 splits under ``work`` (made once, reused afterwards);
    ``pretrain_per_class`` replaces the scale's pre-training subset (the bank and test stay)."""
    root = _cifar10_root(source, work)
    pretrain_n, bank_n, test_n = scale.per_class or (None, None, None)
    tag = ""
    if pretrain_per_class is not None and pretrain_per_class != pretrain_n:
        pretrain_n, tag = pretrain_per_class, f"-{pretrain_per_class}pc"
    manifests = {}
    for name, split, per_class in (("pretrain", "train", pretrain_n), ("bank", "train", bank_n),
                                   ("test", "test", test_n)):
        stem = f"{scale.name}-{name}{tag if name == 'pretrain' else ''}"
        out = work / stem
        if name == "bank" and per_class == pretrain_n:   # the same images: one shard set
            manifests[name] = manifests["pretrain"]
            continue
        if not (out / "manifest.json").exists():
            images = class_subset(root / split, work / f"{stem}-images", per_class)
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


def _settings(scale: Scale, variant: Variant) -> dict:
    """Every training setting of a variant, defaults filled in (no run names, paths or monitor)."""
    config = load_config(None, [*scale.base, *variant.overrides, "data.train=unused"]).to_dict()
    return {key: value for key, value in config.items() if key not in ("run", "monitor")}


def _same_run(out: Path, scale: Scale, settings: dict, seed: int, pretrain: Path) -> dict | None:
    """A finished run of another grid with the same settings, data and seed (reused, not trained again)."""
    for path in sorted(out.glob(f"{scale.name}/*/*-s{seed}/result.json")):
        result = json.loads(path.read_text())
        if result.get("settings") != settings or "same_as" in result:
            continue
        if yaml.safe_load((out / result["config"]).read_text())["data"]["train"] == str(pretrain):
            return {**result, "same_as": str(path.parent.relative_to(out))}
    return None


def run_env(scale: Scale) -> dict[str, str]:
    """The environment of a run: the scale's thread count when it sets one."""
    return {**os.environ, "OMP_NUM_THREADS": str(scale.threads)} if scale.threads else dict(os.environ)


def run_variant(grid: Grid, variant: Variant, seed: int, scale: Scale, data: DataSplits, out: Path,
                num_instances: int, log, records: Path | None = None) -> dict:
    """Train (or resume) one run, then its final k-NN; returns ``result.json``'s content, recorded
    in ``records``. A variant whose settings equal a finished run of another grid (same seed) takes
    that run's result. A run whose loss became non-finite is finished too: its result has
    ``top1`` None and ``diverged``, where the loss became non-finite."""
    run_dir = out / scale.name / grid.name / f"{slug(variant.name)}-s{seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    overrides = dict(o.split("=", 1) for o in scale.base + variant.overrides)
    settings = _settings(scale, variant)
    same = _same_run(out, scale, settings, seed, data.pretrain)
    if same is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        same.update(grid=grid.name, variant=variant.name, overrides=list(variant.overrides))
        result_path.write_text(json.dumps(same, indent=2) + "\n")
        record_run(records, out, run_dir)
        log(f"[{grid.name}] {variant.name} seed {seed}: the run of {same['same_as']} (same settings)")
        return same
    batch, epochs = int(overrides["optim.batch_size"]), float(overrides["optim.epochs"])
    every = max(1, _steps(epochs, num_instances, batch) // scale.knn_points)
    cmd = [sys.executable, "-m", "picstream.train", "--config", str(base_config(scale, out)),
           *variant.overrides, f"run.name={grid.name}-{slug(variant.name)}-s{seed}",
           f"run.output_dir={run_dir}", f"run.seed={seed}", f"data.train={data.pretrain}",
           f"monitor.knn_train={data.bank}", f"monitor.knn_val={data.test}",
           f"monitor.every_steps={every}"]
    log(f"[{grid.name}] {variant.name} seed {seed}: {' '.join(variant.overrides)}")
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        cpu_s = run_measured(cmd, run_env(scale), run_dir / "train.stderr")
        last = list_checkpoints(run_dir / "checkpoints")[-1]
        knn, diverged = _knn(["--checkpoint", str(last)], data, run_dir / "knn.json", scale), None
    except RunDiverged as err:
        cpu_s, knn, diverged = None, {"top1": None, "top5": None}, str(err).split(";")[0]  # no local path kept
    result = {"grid": grid.name, "variant": variant.name, "seed": seed, "top1": knn["top1"],
              "top5": knn["top5"], "wall_s": time.perf_counter() - started, "train_cpu_s": cpu_s,
              "instances": num_instances,
              "overrides": list(variant.overrides), "config": str((run_dir / "config.yaml").relative_to(out)),
              "settings": settings, **({"diverged": diverged} if diverged else {})}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    record_run(records, out, run_dir)
    outcome = f"diverged: {diverged}" if diverged else f"k-NN top-1 {knn['top1']:.1f}"
    log(f"[{grid.name}] {variant.name} seed {seed}: {outcome} ({result['wall_s'] / 60:.1f} min)")
    return result


def random_init_knn(scale: Scale, data: DataSplits, out: Path, records: Path | None = None) -> dict:
    """k-NN of the randomly initialised backbone (the floor every run must clear), recorded in ``records``."""
    path = out / scale.name / "random-init.json"
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    base = dict(o.split("=", 1) for o in scale.base)
    cifar_stem = ["--cifar-stem"] if base.get("model.cifar_stem") == "true" else []
    knn = _knn(["--random-init", base["model.arch"], *cifar_stem, "--image-size", base["data.image_size"]],
               data, path, scale)
    record_files(records, out, path)
    return knn


def _knn(args: list[str], data: DataSplits, path: Path, scale: Scale) -> dict:
    cmd = [sys.executable, "-m", "picstream.evaluate", "knn", *args, "--train", str(data.bank),
           "--val", str(data.test), "--workers", "0", "-o", str(path)]
    run_measured(cmd, run_env(scale), path.with_suffix(".stderr"))
    return json.loads(path.read_text())


def run_measured(cmd: list[str], env: dict[str, str], stderr: Path) -> float:
    """Run ``cmd`` (its stderr to the file ``stderr``); the CPU seconds it used, user + system.
    Raises :class:`RunDiverged` when a training run exits because its loss became non-finite."""
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = stderr.read_text().strip().splitlines()[-1:] or ["(no output)"]
        if proc.returncode == DIVERGED_EXIT:
            raise RunDiverged(tail[0].removeprefix("picstream-train: error: "))
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}: {tail[0]}")
    return usage.ru_utime + usage.ru_stime


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
