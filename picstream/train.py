"""`picstream-train`: PIC pre-training, shards → scheduler → loader → model → classifier ← row store.

Under ``torchrun`` every rank runs this same program on its block of each global batch; what is
distributed lives in :mod:`picstream.distributed` (the model wrapper, the feature gather and the
sharded softmax) and in the row store's parts; the run directory (lock, run id, which checkpoint,
saving and resuming every part of the state) is :mod:`picstream.lifecycle`'s.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch

from .classifier import classifier_from_config
from .config import Config, ConfigError, load_config
from .device import resolve_device
from .distributed import World, close_world, init_world, parallelize, speaks_for_job
from .evaluate import extract_splits, knn_classify
from .lifecycle import RunLifecycle, TorchRNG, load_resume_checkpoint
from .loader import PhotometricAugment
from .lr_schedule import warmup_cosine_lr
from .metrics import MetricsLogger
from .model import PICNet
from .optimizers import apply_schedule, build_optimizer
from .rowstore import StoreError
from .scheduler import EpochScheduler, SlidingWindowScheduler
from .shards import ShardsError
from .train_data import check_decode, open_train_set, train_loader_from_config
from .transfer import to_device


RECENT_STEPS = 128  # the paper's K / B: 65536 recent rows at batch 512


def step_seed(seed: int, step: int, view: int = 0) -> int:
    """A per-step, per-view seed for the batched photometric augmentation (independent of resumes;
    distinct for every step and view below 7919 views, as 7919 and 104729 are primes)."""
    return (seed * 1_000_003 + step * 7919 + view * 104_729 + 17) % (2**63 - 1)


def build_scheduler(config: Config, num_instances: int):
    """The visiting order (a window larger than the corpus is clamped to it by the scheduler)."""
    if config.schedule.scheduler == "epoch":
        return EpochScheduler(num_instances, config.run.seed)
    return SlidingWindowScheduler(num_instances, config.schedule.window, config.schedule.stride,
                                  config.run.seed)


def check_world(config: Config, world: World, device: torch.device) -> None:
    """Refuse, in one line, what this config cannot do on this world and device."""
    if config.optim.batch_size % world.size:
        raise ConfigError(f"optim.batch_size = {config.optim.batch_size} (the global batch) must be "
                          f"divisible by the number of processes, {world.size}")
    if config.model.norm == "batch" and config.optim.batch_size // world.size < 2:
        raise ConfigError(f"optim.batch_size = {config.optim.batch_size} leaves {config.optim.batch_size // world.size} "
                          f"image per process: BatchNorm needs at least 2 (a larger batch, or model.norm=group)")
    if config.classifier.sampling == "full" and world.size > 1:
        raise ConfigError("classifier.sampling = full is the 1-process reference; a distributed run "
                          "needs classifier.sampling = recent")
    check_decode(config, device)
    if config.model.sync_bn and world.size > 1 and device.type != "cuda":
        raise ConfigError("model.sync_bn needs CUDA devices (SyncBatchNorm); on CPU use per-process "
                          "BatchNorm (model.sync_bn=false) or model.norm=group")


def recent_k_note(config: Config, num_instances: int) -> Optional[str]:
    """A note when the recent set holds fewer steps of negatives than the paper's K/B (none when K
    already covers the corpus, and never advising more rows than it has)."""
    cls, batch = config.classifier, config.optim.batch_size
    advised = min(RECENT_STEPS * batch, num_instances)
    if cls.sampling != "recent" or cls.recent_k >= advised:
        return None
    return (f"note: classifier.recent_k = {cls.recent_k} holds {cls.recent_k / batch:.3g} steps of "
            f"negatives at global batch {batch}; the paper keeps K/B = {RECENT_STEPS} (K = 65536 at "
            f"512): consider recent_k = {advised}"
            + (" (every instance of the corpus)" if advised == num_instances else ""))


class Diverged(RuntimeError):
    """The loss became non-finite: the run stops before anything of that step is saved."""


class Trainer:
    """One process's run: the loop and the step over model, optimiser, classifier rows and data
    stream; the run's lifecycle (``self.lifecycle``) saves and restores their state."""

    def __init__(self, config: Config, *, resume: str = "auto", show_progress: bool = True,
                 num_instances: Optional[int] = None, world: Optional[World] = None):
        """`num_instances` trains on that many instances without opening `data.train` (images and
        IDs then come from the caller through `train_step`; `run` needs shards). `world`: this
        process's rank (default: from torchrun's environment, or a 1-process run)."""
        self.config = config
        self.run_dir = Path(config.run.output_dir)
        self.device = resolve_device(config.run.device)
        self.world = world or init_world(self.device, config.train.dist_timeout_s)
        self.show_progress = show_progress and self.world.is_main
        check_world(config, self.world, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # the shapes are fixed: autotune each conv once
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # leave the loader workers their cores: oversubscribed OpenMP threads spin and crawl
            per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, per_rank - config.data.workers))
        torch.manual_seed(config.run.seed)

        self.shards = open_train_set(config.data.train, seed=config.run.seed) if num_instances is None else None
        self.num_instances = len(self.shards) if num_instances is None else num_instances
        optim = config.optim
        self.global_batch = optim.batch_size
        steps_per_epoch = self.num_instances / self.global_batch
        self.total_steps = max(1, math.ceil(optim.epochs * steps_per_epoch))
        if config.train.max_steps is not None:
            self.total_steps = min(self.total_steps, config.train.max_steps)
        self.warmup_steps = round(optim.warmup_epochs * steps_per_epoch)
        self.peak_lr = optim.base_lr * self.global_batch / optim.base_batch_size
        self.scheduler = build_scheduler(config, self.num_instances)

        self.dtype = torch.float64 if config.train.precision == "float64" else torch.float32
        self.model = PICNet(config.model).to(self.device, self.dtype)
        if self.device.type == "cuda" and config.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = parallelize(self.model, self.world, sync_bn=config.model.sync_bn)
        if config.train.compile:
            self.forward = torch.compile(self.forward)
        self.optimizer = build_optimizer(self.model, optim)
        self.augment = PhotometricAugment.from_config(config.augment, self.world)
        self.amp = (self.device.type == "cuda" and config.train.amp in ("auto", "bf16")
                    and self.dtype == torch.float32)
        # Without an accelerator the colour augmentation runs in the loader's CPU workers; else its
        # parameters are drawn on the host (no sync), by one generator reseeded every view.
        self._augment_in_workers = self.device.type == "cpu" and config.data.workers > 0
        self._augment_rng = torch.Generator()

        self.lifecycle = RunLifecycle(config, self.world, resume=resume, say=self._say,
                                      info={"total_steps": self.total_steps,
                                            "num_instances": self.num_instances})
        self.classifier = classifier_from_config(
            config, self.num_instances, self.world, store_url=self.lifecycle.store_url,
            fresh=self.lifecycle.fresh, run_id=self.lifecycle.run_id,
            cache_rows=self.scheduler.host_cache_rows(config.classifier.chunk_rows, self.world.size),
            dtype=self.dtype, device=self.device, say=self._say)
        for name, part in (("model", self.model), ("optimizer", self.optimizer),
                           ("torch_rng", TorchRNG()), ("classifier", self.classifier)):
            self.lifecycle.register(name, part)
        self.start_step = self.lifecycle.resume()
        note = recent_k_note(config, self.num_instances)
        if note:
            self._say(note)

    def close(self) -> None:
        """Release the row store (nothing to write: the last checkpoint committed it), the run's
        locks, the parallel wrapper and the process group (`close_world` says why in that order)."""
        self.classifier.close(flush=False)
        self.lifecycle.close()
        self.forward = None
        close_world(self.world)

    # ------------------------------------------------------------------ the step
    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(step, self.total_steps, self.peak_lr, self.warmup_steps)

    def train_step(self, step: int, images: torch.Tensor, ids, extra_crops=()) -> dict[str, Any]:
        """One PIC step on a uint8 batch: augment → network → cosine logits over recent rows → SGD.

        ``extra_crops`` (multi-crop views, aligned with ``images``) go through the same network;
        every view's loss is over the rows admitted once for ``ids`` (:mod:`picstream.multicrop`).
        In a distributed run the batch is this rank's block and the loss the global batch's. The
        loss comes back as a device tensor (reading it would wait for the device).
        """
        lr = self.lr_at(step)
        views = [self._view_input(step, view, x) for view, x in enumerate((images, *extra_crops))]
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.amp
                    else contextlib.nullcontext())
        with autocast:
            zs = [self.forward(x) for x in views]
        loss = self.classifier.loss([z.to(self.dtype) for z in zs], ids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        apply_schedule(self.optimizer, self.config.optim, step, self.total_steps, self.warmup_steps)
        self.optimizer.step()
        self.classifier.step(lr)
        return {"loss": loss.detach(), "lr": lr}

    def _view_input(self, step: int, view: int, images: torch.Tensor) -> torch.Tensor:
        """One view on the device; uint8 is colour-augmented here (else the loader did it), seeded
        by ``(seed, step, view)`` on the host."""
        x = to_device(images, self.device)
        if not x.is_floating_point():
            seed = step_seed(self.config.run.seed, step, view)
            x = self.augment(x, self._augment_rng.manual_seed(seed))
        x = x.to(self.dtype)
        if self.device.type == "cuda" and self.config.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train from `start_step` to `total_steps`; returns the final metrics."""
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config.to_yaml())
        if self.start_step >= self.total_steps:
            self._say(f"nothing to do: step {self.start_step} of {self.total_steps} already reached")
            return {"step": self.start_step}
        loader = self.make_loader()
        metrics = MetricsLogger(self.run_dir, self.start_step, self.total_steps,
                                show_progress=self.show_progress, enabled=self.world.is_main)
        last: dict[str, Any] = {}
        skip_reasons: Counter[str] = Counter()
        retries: Counter[str] = Counter()   # remote read retries, loader workers and this process
        try:
            for batch in loader:
                step = batch.step
                skip_reasons.update(batch.skip_reasons)
                retries.update(batch.retries)
                retries.update(self.shards.retry_stats.drain())
                self.prefetch_rows(step)
                result = self.train_step(step, batch.images, batch.ids, batch.extra_crops)
                done = step + 1
                checkpoint = done % config.train.checkpoint_every == 0 or done == self.total_steps
                if checkpoint or done % config.train.log_every == 0:
                    result["loss"] = self.finite_loss(result["loss"], step)
                if done % config.train.log_every == 0 or done == self.total_steps:
                    last = metrics.log(step, {
                        **result,
                        "epoch": done * self.global_batch / self.num_instances,
                        "min_row_norm": self.classifier.min_row_norm(),
                        "device_mem_mb": self._device_memory_mb(),
                        "skipped": sum(skip_reasons.values()),
                        "skip_reasons": dict(skip_reasons),
                        "retries": sum(retries.values()),
                        "retries_by_read": dict(retries),
                    }, images_per_step=self.global_batch)
                if config.monitor.every_steps and done % config.monitor.every_steps == 0:
                    metrics.event(step, {"knn_top1": self.world.on_main(self.knn_monitor)["top1"]})
                if checkpoint:
                    self.lifecycle.save(done)
        finally:
            loader.close()
            metrics.close()
        return last

    def make_loader(self):
        """The training stream from `start_step` to `total_steps`: WindowLoader on shards, BetonLoader on a
        .beton (`train_data`); colour augmentation in the loader's workers when there is no accelerator."""
        return train_loader_from_config(
            self.config, self.shards, self.scheduler, self.world, self.device, start_step=self.start_step,
            num_steps=self.total_steps - self.start_step,
            augment=self.augment if self._augment_in_workers else None)

    def prefetch_rows(self, step: int) -> None:
        """When a batch starts a new window, ask the row store to read the next window's new rows;
        and name the next batch's IDs and this step's learning rate to the classifier, which reads
        their rows ahead and brings them forward past this step."""
        batch = self.global_batch
        rows = self.scheduler.rows_to_prefetch(step, batch)
        if rows is not None:
            self.classifier.prefetch(*rows)
        if step + 1 < self.total_steps:
            self.classifier.read_ahead(self.scheduler.ids_at((step + 1) * batch, (step + 2) * batch),
                                       self.lr_at(step))

    def finite_loss(self, loss: torch.Tensor, step: int) -> float:
        """The loss as a number (waits for the device); a non-finite one stops the run before that
        step is logged or checkpointed, naming the last good checkpoint."""
        value = float(loss)
        if not math.isfinite(value):
            last = self.lifecycle.last_saved
            raise Diverged(f"the loss is {value} at step {step}; the last good checkpoint is "
                           + (f"{last}: lower optim.base_lr (or fix the data) and resume it with "
                              f"--resume {last}" if last else "none (no checkpoint was saved yet)"))
        return value

    def knn_monitor(self) -> dict[str, float]:
        mon = self.config.monitor
        if not (mon.knn_train and mon.knn_val):
            raise ConfigError("monitor.every_steps needs monitor.knn_train and monitor.knn_val")
        train, val = extract_splits(self.model.backbone, mon.knn_train, mon.knn_val,
                                    image_size=self.config.data.image_size,
                                    workers=self.config.data.workers, device=self.device)
        return knn_classify(train, val, k=mon.k, temperature=mon.temperature)

    def _device_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.classifier.device_bytes() / 2**20

    def _say(self, message: str) -> None:
        if self.show_progress:
            print(message, file=sys.stderr)


STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
DIVERGED_EXIT = 3  # the loss became non-finite (README, "What survives a crash")


def _check_output_dir(run_dir: Path) -> None:
    """`run.output_dir` (or the folder it would be created in) must be a writable directory."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'run.output_dir': cannot write to {run_dir} "
                          f"({existing} is {'read-only' if existing.is_dir() else 'not a directory'})")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="picstream-train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (newest valid checkpoint of the run, default), 'none', or a path")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.epochs=10")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.resume not in ("auto", "none"):  # checked before anything is written
            load_resume_checkpoint(args.resume, mmap=True)
        _check_output_dir(Path(config.run.output_dir))
        trainer = Trainer(config, resume=args.resume)
        try:
            result = trainer.run()
        finally:
            trainer.close()
    except (ConfigError, ShardsError, StoreError) as err:
        if speaks_for_job() or not isinstance(err, ConfigError):  # one line per job
            print(f"picstream-train: error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:  # every rank sees the same global loss
        if speaks_for_job():
            print(f"picstream-train: error: {err}", file=sys.stderr)
        return DIVERGED_EXIT
    except PermissionError as err:  # credentials or permissions of a storage (local or remote) changed mid-run
        print(f"picstream-train: error: access denied: {err}: fix the credentials or permissions, then rerun the "
              "same command: it resumes from the last checkpoint", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        print(f"picstream-train: error: {os.strerror(err.errno)} at {err.filename}: free space there (or "
              "fix the device), then rerun the same command: it resumes from the last checkpoint",
              file=sys.stderr)
        return 1
    if speaks_for_job():
        print(f"picstream-train: done: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
