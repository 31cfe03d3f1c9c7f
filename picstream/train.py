"""`picstream-train`: PIC pre-training, shards → scheduler → loader → model → classifier ← row store.

Under ``torchrun`` every rank runs this same program on its block of each global batch; what is
distributed lives in :mod:`picstream.distributed` (the model wrapper, the feature gather and the
sharded softmax) and in the row store's parts; decisions about the run directory (lock, run id,
which checkpoint) are taken on rank 0 and broadcast.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from .checkpoint import (classifier_states, latest_valid_checkpoint, list_checkpoints, load_checkpoint,
                         prune_checkpoints, remove_stale_temporaries, retire_newer, save_checkpoint,
                         saved_world)
from .classifier import build_classifier, store_url_of_rank
from .config import Config, ConfigError, config_changes, config_from_dict, load_config
from .device import resolve_device
from .distributed import World, close_world, init_world, parallelize
from .evaluate import extract_splits, knn_classify
from .iopoints import replace_file
from .loader import PhotometricAugment
from .lr_schedule import warmup_cosine_lr
from .metrics import MetricsLogger
from .model import PICNet
from .multicrop import loader_crops, multi_view_loss
from .optimizers import apply_schedule, build_optimizer
from .rowstore import StoreError, window_cache_rows
from .runlock import RunLock
from .scheduler import EpochScheduler, SlidingWindowScheduler
from .shards import ShardsError
from .train_data import open_train_set, train_loader


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


class Trainer:
    """Owns one run: model, optimizers, classifier rows, data stream, checkpoints and metrics."""

    def __init__(self, config: Config, *, resume: str = "auto", show_progress: bool = True,
                 num_instances: Optional[int] = None, world: Optional[World] = None):
        """`num_instances` trains on that many instances without opening `data.train` (images and
        IDs then come from the caller through `train_step`; `run` needs shards). `world`: this
        process's rank (default: from torchrun's environment, or a 1-process run)."""
        self.config = config
        self.run_dir = Path(config.run.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = resolve_device(config.run.device)
        self.world = world or init_world(self.device, config.train.dist_timeout_s)
        self.show_progress = show_progress and self.world.is_main
        if config.optim.batch_size % self.world.size:
            raise ConfigError(f"optim.batch_size = {config.optim.batch_size} (the global batch) must be "
                              f"divisible by the number of processes, {self.world.size}")
        if config.classifier.sampling == "full" and self.world.size > 1:
            raise ConfigError("classifier.sampling = full is the 1-process reference; a distributed run "
                              "needs classifier.sampling = recent")
        if config.model.sync_bn and self.world.size > 1 and self.device.type != "cuda":
            raise ConfigError("model.sync_bn needs CUDA devices (SyncBatchNorm); on CPU use per-process "
                              "BatchNorm (model.sync_bn=false) or model.norm=group")
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
        aug = config.augment
        self.augment = PhotometricAugment(
            brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation, hue=aug.hue,
            jitter_p=aug.jitter_p, gray_p=aug.gray_p, blur_p=aug.blur_p, solarize_p=aug.solarize_p,
            block=(self.world.rank, self.world.size))
        self.amp = (self.device.type == "cuda" and config.train.amp in ("auto", "bf16")
                    and self.dtype == torch.float32)
        # Without an accelerator the colour augmentation runs in the loader's CPU workers.
        self._augment_in_workers = self.device.type == "cpu" and config.data.workers > 0

        self.store_url = config.classifier.store or str(self.run_dir / "rowstore.zarr")
        self._locks = self._lock()
        self.run_id = self.world.on_main(self._run_id)
        resumed = self._pick_checkpoint(resume)
        cls = config.classifier
        self.classifier = build_classifier(
            self.num_instances, config.model.feature_dim, sampling=cls.sampling,
            capacity=min(cls.recent_k, self.num_instances), loss=cls.loss, temperature=cls.temperature,
            momentum=optim.momentum, weight_decay=optim.weight_decay, correction=cls.correction,
            store_url=self.store_url, seed=config.run.seed, chunk_rows=cls.chunk_rows,
            cache_rows=window_cache_rows(self.scheduler.window, self.scheduler.stride, cls.chunk_rows,
                                         self.world.size),
            dtype=self.dtype, device=self.device, fresh=resumed is None, run_id=self.run_id,
            durable=config.train.durability == "power", world=self.world)
        self.start_step = 0 if resumed is None else self._load(*resumed)
        history = cls.recent_k / self.global_batch
        if cls.sampling == "recent" and history < RECENT_STEPS:
            self._say(f"note: classifier.recent_k = {cls.recent_k} holds {history:.3g} steps of negatives at "
                      f"global batch {self.global_batch}; the paper keeps K/B = {RECENT_STEPS} "
                      f"(K = 65536 at 512): consider recent_k = {RECENT_STEPS * self.global_batch}")

    # ------------------------------------------------------------------ run identity and resume
    def _lock(self) -> list[RunLock]:
        """One trainer per run directory, and per row store when the store lives elsewhere (rank 0
        holds them; each rank its own per-rank store)."""
        locks = []
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            locks.append(RunLock(self.run_dir / ".lock", f"run directory {self.run_dir}"))
        own_store = "{rank}" in self.store_url
        store = Path(store_url_of_rank(self.store_url, self.world.rank))
        if ((own_store or self.world.is_main) and "://" not in self.store_url
                and store.parent.resolve() != self.run_dir.resolve()):
            store.parent.mkdir(parents=True, exist_ok=True)
            locks.append(RunLock(store.with_name(store.name + ".lock"), f"row store {store}"))
        return locks

    def _run_id(self) -> str:
        """This run's identity (``run.json``), recorded in its row store and its checkpoints."""
        path = self.run_dir / "run.json"
        try:
            return json.loads(path.read_text())["run_id"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            run_id = uuid.uuid4().hex
            replace_file(path, (json.dumps({"run_id": run_id}) + "\n").encode())
            return run_id

    def _pick_checkpoint(self, resume: str) -> Optional[tuple[Path, dict]]:
        """``(path, state)`` of the checkpoint to continue from, or None: chosen on rank 0, which keeps
        the state it loaded; the other ranks receive the path and load it."""
        chosen: list[tuple[Path, dict]] = []

        def choose() -> Optional[Path]:
            found = self._checkpoint_to_resume(resume)
            if found is not None:
                chosen.append(found)
            return None if found is None else found[0]

        path = self.world.on_main(choose)
        return None if path is None else (chosen[0] if chosen else (path, load_checkpoint(path)))

    def _checkpoint_to_resume(self, resume: str) -> Optional[tuple[Path, dict]]:
        """The checkpoint this start continues from (None: a fresh start at step 0). Rank 0 only."""
        remove_stale_temporaries(self.ckpt_dir)
        store_exists = Path(store_url_of_rank(self.store_url, 0)).exists()
        if resume == "none":
            if list_checkpoints(self.ckpt_dir) or store_exists:
                raise ConfigError(f"{self.run_dir} already holds a run (checkpoints or a row store); "
                                  "continue it with --resume auto, or start a new run in another "
                                  "run.output_dir")
            return None
        if resume == "auto":
            found = latest_valid_checkpoint(self.ckpt_dir, log=self._say)
            if found is None:
                if store_exists:
                    self._say(f"no valid checkpoint in {self.ckpt_dir}: starting at step 0 with fresh rows")
                return None
            path, state = found
        else:
            path, state = Path(resume), load_resume_checkpoint(resume)
        self._check_config(path, state)
        if saved_world(state) != self.world.size and "{rank}" in self.store_url:
            raise ConfigError(f"cannot resume {path} (saved by {saved_world(state)} processes) with "
                              f"{self.world.size}: per-rank row stores ({self.store_url}) cannot be "
                              "re-partitioned; resume with the same number of processes")
        if resume != "auto" and path.parent.resolve() == self.ckpt_dir.resolve():
            moved = retire_newer(self.ckpt_dir, int(state["step"]))
            if moved:
                self._say(f"moved {len(moved)} newer checkpoint(s) aside to {moved[0].parent} "
                          "(kept, and never picked by --resume auto)")
        return path, state

    def _check_config(self, path: Path, state: dict) -> None:
        """Refuse a resume whose config changes the training trajectory; report harmless changes."""
        try:
            saved = config_from_dict(yaml.safe_load(state["config"]))
        except ConfigError as err:
            raise ConfigError(f"cannot resume {path}: its saved config is not valid here ({err})") from None
        refused, accepted = config_changes(saved, self.config)
        if refused:
            raise ConfigError(f"cannot resume {path} with a changed config ({'; '.join(refused)}): these "
                              "change the training trajectory; restore them, or start a new run in "
                              "another run.output_dir")
        if accepted:
            self._say(f"resuming with changed settings: {'; '.join(accepted)}")

    def _load(self, path: Path, state: dict) -> int:
        """Continue from checkpoint ``path`` (its loaded ``state``); one saved by another number of
        processes is first re-partitioned onto this world and saved again at the same step."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, saved = int(state["step"]), saved_world(state)
        if saved == self.world.size:
            self.classifier.load_checkpoint_state(classifier_states(path, state, [self.world.rank])[0])
        else:
            self.classifier.load_resized(classifier_states(path, state))
            self.save_checkpoint(step)
            self._say(f"re-partitioned the classifier rows of {saved} processes onto {self.world.size}")
        self.classifier.retire_other_parts()
        self._say(f"resumed from {path} at step {step}")
        return step

    def save_checkpoint(self, step: int) -> Path:
        """Checkpoint after `step` completed steps (the row store is committed first). In a
        distributed run every rank writes its classifier part, then rank 0 the main file."""
        world = self.world
        classifier = self.classifier.checkpoint_state()
        if world.size > 1:
            save_checkpoint(self.ckpt_dir, step, classifier, part=(world.rank, world.size))
            world.barrier()
            classifier = {"parts": world.size}
        state = {
            "config": self.config.to_yaml(),
            "run_id": self.run_id,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "classifier": classifier,
            "torch_rng": torch.get_rng_state(),
            "total_steps": self.total_steps,
            "num_instances": self.num_instances,
        }

        def write_main() -> tuple[Path, list[Path]]:
            path = save_checkpoint(self.ckpt_dir, step, state)
            return path, prune_checkpoints(self.ckpt_dir, self.config.train.keep_checkpoints)

        path, kept = world.on_main(write_main)
        try:  # the oldest kept checkpoint of this world size (others cannot be resumed onto this store)
            for oldest_kept in kept:
                oldest = load_checkpoint(oldest_kept, mmap=True)
                if saved_world(oldest) == world.size:
                    self.classifier.forget_before(classifier_states(oldest_kept, oldest, [world.rank])[0])
                    break
        except ValueError as err:  # unreadable: keep every undo log rather than lose a resume point
            self._say(f"not pruning row-store history: {err}")
        return path

    def close(self) -> None:
        """Release the row store (nothing to write: the last checkpoint committed it), the locks and
        the process group."""
        self.classifier.close(flush=False)
        for lock in self._locks:
            lock.release()
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
        loss = multi_view_loss(self.classifier, [z.to(self.dtype) for z in zs], ids,
                               self.config.classifier.multi_crop_rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        apply_schedule(self.optimizer, self.config.optim, step, self.total_steps, self.warmup_steps)
        self.optimizer.step()
        self.classifier.step(lr)
        return {"loss": loss.detach(), "lr": lr}

    def _view_input(self, step: int, view: int, images: torch.Tensor) -> torch.Tensor:
        """One view on the device; uint8 is colour-augmented here (else the loader did it), seeded
        by ``(seed, step, view)``."""
        x = images.to(self.device, non_blocking=True)
        if not x.is_floating_point():
            seed = step_seed(self.config.run.seed, step, view)
            x = self.augment(x, torch.Generator(device=self.device).manual_seed(seed))
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
                    result["loss"] = finite_loss(result["loss"], step)
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
                    self.save_checkpoint(done)
        finally:
            loader.close()
            metrics.close()
        return last

    def make_loader(self):
        """The training stream from `start_step` to `total_steps`: WindowLoader on shards, BetonLoader on a
        .beton (`train_data`); colour augmentation in the loader's workers when there is no accelerator."""
        config = self.config
        return train_loader(
            self.shards, self.scheduler, self.global_batch // self.world.size,
            rank=self.world.rank, world_size=self.world.size, image_size=config.data.image_size,
            crop_scale=tuple(config.data.crop_scale), multi_crop=loader_crops(config.data.multi_crop),
            workers=config.data.workers,
            start_step=self.start_step, num_steps=self.total_steps - self.start_step,
            seed=config.run.seed, cache_dir=config.data.cache_dir,
            cache_bytes=int(config.data.cache_gb * 2**30),
            augment=self.augment if self._augment_in_workers else None)

    def prefetch_rows(self, step: int) -> None:
        """When a batch starts a new window, ask the row store to load the next window's new rows."""
        window, stride = self.scheduler.window, self.scheduler.stride
        first = step * self.global_batch
        if first % window >= self.global_batch:
            return
        k = first // window + 1
        start = k * stride + window - stride  # the rows window k adds; the store wraps mod N
        self.classifier.prefetch(start, start + stride)

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


def finite_loss(loss: torch.Tensor, step: int) -> float:
    """The loss as a number (waits for the device); a non-finite one stops the run before it is
    logged or checkpointed."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}")
    return value


def load_resume_checkpoint(resume: str, mmap: bool = False) -> dict:
    """The checkpoint file that `--resume` names, or one `ConfigError` line."""
    if not Path(resume).is_file():
        raise ConfigError(f"--resume: no checkpoint file at {resume} (use 'auto', 'none' or a "
                          "ckpt-*.pt path)")
    try:
        return load_checkpoint(Path(resume), mmap=mmap)
    except ValueError as err:
        raise ConfigError(f"--resume: {err}") from None


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
        if os.environ.get("RANK", "0") == "0" or not isinstance(err, ConfigError):  # one line per job
            print(f"picstream-train: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        print(f"picstream-train: error: {os.strerror(err.errno)} at {err.filename}: free space there (or "
              "fix the device), then rerun the same command: it resumes from the last checkpoint",
              file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"picstream-train: done: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
