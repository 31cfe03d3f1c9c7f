"""GPU check: the CUDA training path measured end to end, in one command, within a time budget.

  1. environment: device, memory, torch / CUDA / cuDNN versions, CPU cores; then, before anything
     is timed, the overlap check: the same steps (50; ResNet-50, batch 256, K = 4 batches so every
     step evicts) with ``classifier.overlap`` off and on (deferred write-back, and the rows of each
     next step read ahead in a background thread: ``Trainer.prefetch_rows`` names them) from the
     same start, in deterministic mode, must give bit-identical losses, resident rows, transition log and stored rows (when
     they differ, off runs again: is the device itself not repeating?). Its verdict is in the
     table; unless it is ``identical``, the overlap rows of section 2 are marked invalid and
     sections 3-5 train with ``classifier.overlap = off``;
  2. model ceiling: ResNet-50, 224 px, bf16 autocast + channels_last, batch 256, synthetic uint8
     images already on the device: img/s of (a) backbone + head only, (b) + the recent-K classifier
     (N = 1.28M, K = 65536, rows paged from a row store on local disk) with overlap on and (b') off,
     (c) + the full-N classifier; then ViT-S/16 (timm, ``configs/in1k-vit-s16.yaml``: AdamW)
     (d) backbone + head only, (e) + recent-K;
  3. device memory vs N with the recent-K classifier (N = 1e5 … 1e9, real row stores on local disk):
     ``max_memory_allocated`` per N; the full-N classifier at 1.28M and 7.47M rows (or the OOM);
  4. real data: the ImageNet sample, repeated, through the WindowLoader with every CPU core and the
     colour augmentation on the device: img/s and the step time split (waiting for data vs training);
     then the same with ``data.decode: gpu`` (nvImageCodec on the device; on the CPU its CPU back end,
     which only runs the code path): img/s, starved share, samples decoded on the host;
  5. quality: CIFAR-10 (50k train images), ResNet-18 with the CIFAR stem, as many epochs as fit in
     what is left of the budget, then k-NN top-1 on the 10k test images beside the random init.

Every step is ``picstream.train.Trainer.train_step`` on a Trainer built from ``configs/in1k.yaml``
or ``configs/cifar10.yaml``. Each section is guarded: a failure or an overrun is reported in the
table and the next section runs (section 1 always runs: its overlap check comes before any
timing). The clock is checked before each section and each measurement; section 5 is sized from
what is left. ``--smoke`` runs every section at toy sizes on CPU.

    python benchmarks/gpu_check.py --out DIR [--budget-s 480] [--smoke] [--sections 2,3]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

# deterministic cuBLAS for the overlap check (read when the first cuBLAS handle is made)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loader import prepare  # noqa: E402  (benchmarks/loader.py: ImageNet sample → shards)
from picstream.classifier import MultiViewLoss  # noqa: E402
from picstream.config import load_config  # noqa: E402
from picstream.evaluate import extract_splits, knn_classify  # noqa: E402
from picstream.loader.decode import nvimgcodec_installed  # noqa: E402
from picstream.loader.nvimgcodec_regions import NvImageCodecRegions  # noqa: E402
from picstream.model import PICNet  # noqa: E402
from picstream.shards import make_shards  # noqa: E402
from picstream.train import Trainer  # noqa: E402
from picstream.train_data import train_loader_from_config  # noqa: E402

GOAL_IMG_S = 2500        # ResNet-50 img/s on one H100, recent-K and loader-fed
GOAL_RECENT_RATIO = 0.97  # recent-K within 3% of backbone + head only
GOAL_MEMORY_RATIO = 1.05  # device memory max/min over N = 1e5 … 1e9


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and ``--smoke``."""
    arch: str
    vit_arch: str                     # section 2's ViT rows
    image: int
    batch: int
    head_hidden: int
    feature_dim: int
    recent_k: int
    window: int
    stride: int
    chunk_rows: int
    ceiling_rows: int                 # N of section 2
    warm_steps: int                   # untimed steps before each timed run (cuDNN, allocator)
    timed_steps: int
    memory_rows: tuple[int, ...]      # section 3, recent-K
    full_rows: tuple[int, ...]        # section 3, full-N
    memory_steps: int
    inet_copies: int                  # section 4: the ImageNet sample repeated
    inet_limit: Optional[int]         # ... its first photos only
    shard_size: int
    loader_steps: int
    cifar_per_class: Optional[tuple[int, int]]  # section 5: (train, test) images per class
    cifar_overrides: tuple[str, ...]  # section 5: on top of configs/cifar10.yaml
    calib_steps: int                  # section 5: steps timed to size the schedule
    train_cap_s: Optional[float]      # section 5: training time cap (None: what is left)
    verify_steps: int                 # section 1's overlap check: steps, each run
    verify_batches: int               # ... its N in batches (K = 4 batches, window = 8 batches)


FULL = Sizes(arch="resnet50", vit_arch="timm/vit_small_patch16_224", image=224, batch=256, head_hidden=2048, feature_dim=128,
             recent_k=65536, window=131072, stride=16384, chunk_rows=4096, ceiling_rows=1_281_167,
             warm_steps=5, timed_steps=30,
             memory_rows=(100_000, 1_281_167, 7_469_000, 100_000_000, 1_000_000_000),
             full_rows=(1_281_167, 7_469_000), memory_steps=5,
             inet_copies=8, inet_limit=None, shard_size=1024, loader_steps=150,
             cifar_per_class=None, cifar_overrides=(), calib_steps=40, train_cap_s=None,
             verify_steps=50, verify_batches=16)
SMOKE = Sizes(arch="resnet18", vit_arch="timm/test_vit", image=32, batch=16, head_hidden=64, feature_dim=16,
              recent_k=64, window=128, stride=32, chunk_rows=32, ceiling_rows=1000,
              warm_steps=1, timed_steps=2,
              memory_rows=FULL.memory_rows, full_rows=(1000, 4000), memory_steps=2,
              inet_copies=1, inet_limit=48, shard_size=16, loader_steps=3,
              cifar_per_class=(8, 4), calib_steps=1,
              cifar_overrides=("optim.batch_size=16", "data.image_size=16", "model.head_hidden=64",
                               "classifier.recent_k=64", "classifier.chunk_rows=32",
                               "schedule.window=128", "schedule.stride=32"), train_cap_s=3.0,
              verify_steps=6, verify_batches=16)
SHARE = {1: 0.1, 2: 0.25, 3: 0.25, 4: 0.15}   # fraction of the budget a section may use; 5 gets the rest
MIN_SECONDS = {1: 0, 2: 30, 3: 30, 4: 30, 5: 60}   # below this much left, a section is skipped


class SectionTimeout(Exception):
    """Raised by the alarm when a section runs past its hard limit."""


@dataclass
class Section:
    number: int
    title: str
    columns: list[str]
    rows: list[list]
    summary: dict
    status: str = "ok"
    seconds: float = 0.0


def shared_data_dir() -> Path:
    """The read-only data sets: `PICSTREAM_SHARED_DATA`, else `../shared/data` beside the repo."""
    return Path(os.environ.get("PICSTREAM_SHARED_DATA", REPO.parent / "shared" / "data"))


# ---------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the previous measurement left and restart the peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(trainer: Trainer) -> int:
    """CUDA: ``max_memory_allocated`` since :func:`release`; CPU: the classifier's tensor bytes."""
    if trainer.device.type == "cuda":
        return torch.cuda.max_memory_allocated(trainer.device)
    return trainer.classifier.device_bytes()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError))


# ---------------------------------------------------------------------------- the check
class Check:
    """Runs the sections against a shared clock; owns the work folder and the trainer configs."""

    def __init__(self, args, sizes: Sizes, work: Path):
        self.args, self.sizes, self.work = args, sizes, work
        self.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
        self.cores = len(os.sched_getaffinity(0))
        self.start = time.perf_counter()
        self.end = self.start + args.budget_s
        self.deadline = self.end
        self.sections: list[Section] = []
        self.overlap_verdict = "not run"   # section 1's overlap check: "identical" lets overlap be timed

    @property
    def overlap_verified(self) -> bool:
        return self.overlap_verdict == "identical"

    def left(self) -> float:
        """Seconds until the current section's deadline."""
        return self.deadline - time.perf_counter()

    def config(self, base: str, out: Path, *overrides: str):
        """A trainer config from ``configs/<base>`` with the run's device and overrides."""
        return load_config(REPO / "configs" / base, [
            f"run.output_dir={out}", f"run.device={self.device.type}",
            f"classifier.store={out / 'rows.zarr'}", "train.checkpoint_every=1000000000",
            *([] if self.overlap_verified else ["classifier.overlap=off"]), *overrides])

    def model_overrides(self, batch: int, arch: Optional[str] = None) -> list[str]:
        s = self.sizes
        return [f"model.arch={arch or s.arch}", f"model.head_hidden={s.head_hidden}",
                f"model.feature_dim={s.feature_dim}", f"data.image_size={s.image}",
                f"optim.batch_size={batch}", f"classifier.recent_k={s.recent_k}",
                f"classifier.chunk_rows={s.chunk_rows}", f"schedule.window={s.window}",
                f"schedule.stride={s.stride}"]

    @contextlib.contextmanager
    def synthetic_trainer(self, num_rows: int, sampling: str, base: str = "in1k.yaml",
                          arch: Optional[str] = None, extra: tuple[str, ...] = ()):
        """A trainer (ResNet, or ``arch`` from config ``base``) over ``num_rows`` instances without
        shards, with ``extra`` overrides last; its row store is local."""
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            config = self.config(base, Path(tmp), "data.train=(synthetic)", "data.workers=0",
                                 f"classifier.sampling={sampling}",
                                 *self.model_overrides(self.sizes.batch, arch), *extra)
            trainer = Trainer(config, resume="none", show_progress=False, num_instances=num_rows)
            try:
                yield trainer
            finally:
                trainer.classifier.close()

    # ------------------------------------------------------------------ running sections
    def run(self, number: int, title: str, fn: Callable[[Section], None], min_s: float) -> None:
        section = Section(number, title, [], [], {})
        self.sections.append(section)
        now = time.perf_counter()
        share = SHARE.get(number)
        self.deadline = self.end if share is None else min(self.end, now + share * self.args.budget_s)
        if number not in self.args.sections:
            section.status = "not selected"
            return
        if self.end - now < min_s:
            section.status = f"skipped: {self.end - now:.0f} s of the budget left, needs {min_s:.0f} s"
            print(render_section(section), flush=True)
            return
        hard = min(self.end, self.deadline + 0.1 * (self.end - self.deadline) + 10) - now
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, hard))
        try:
            fn(section)
        except SectionTimeout:
            section.status = f"failed: stopped at its hard time limit ({hard:.0f} s)"
        except Exception as err:  # noqa: BLE001 - a section's failure is a result; go on
            first = (str(err).splitlines() or [""])[0][:300]
            section.status = f"failed: {'OOM: ' if is_oom(err) else ''}{type(err).__name__}: {first}"
            traceback.print_exc(file=sys.stderr)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            release(self.device)
            section.seconds = time.perf_counter() - now
        print(render_section(section), flush=True)


def _alarm(signum, frame):
    raise SectionTimeout()


# ---------------------------------------------------------------------------- 1. environment
def environment(check: Check, sec: Section) -> None:
    sec.columns = ["item", "value"]
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "CUDA (torch build)": torch.version.cuda or "none",
            "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available()
            else "none",
            "CPU cores": f"{check.cores} usable of {os.cpu_count()}",
            "host memory GiB": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f}",
            "device used": str(check.device)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"GPU": props.name, "GPU memory GiB": f"{props.total_memory / 2**30:.1f}",
                     "compute capability": f"{props.major}.{props.minor}",
                     "GPUs visible": str(torch.cuda.device_count()),
                     "bf16 supported": str(torch.cuda.is_bf16_supported())})
    else:
        info["GPU"] = "none (CPU only)"
    sec.rows = [[k, v] for k, v in info.items()]
    sec.summary = info


@contextlib.contextmanager
def deterministic_kernels():
    """cuDNN's and torch's deterministic kernels while the block runs (a kernel without one
    warns): the overlap check compares two runs bit for bit, which atomics or autotuning would break."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.benchmark, cudnn.deterministic = False, True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def overlap_run(check: Check, overlap: str) -> dict:
    """Section 1's steps with ``classifier.overlap = overlap``: the losses, the resident rows, the
    transition log and every stored row after a commit."""
    s, batch = check.sizes, check.sizes.batch
    extra = (f"classifier.overlap={overlap}", f"classifier.recent_k={4 * batch}",
             f"schedule.window={8 * batch}", f"schedule.stride={batch}")
    with check.synthetic_trainer(s.verify_batches * batch, "recent", extra=extra) as tr:
        images = synthetic_images(tr)
        with deterministic_kernels():
            losses = []
            for step in range(s.verify_steps):
                ids = torch.from_numpy(tr.scheduler.ids_at(step * batch, (step + 1) * batch))
                tr.prefetch_rows(step)
                losses.append(tr.train_step(step, images, ids)["loss"])
            state = tr.classifier.commit_state()
        return {"losses": torch.stack(losses).float().cpu(), "rows": state["rows"], "log": state["log"],
                "stored": tr.classifier.store.read(np.arange(tr.num_instances))}


def same(a, b) -> bool:
    """Bit-identical: tensors, arrays, and dicts / tuples of them (NaN equals NaN)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(*(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (a, b))))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def overlap_check(check: Check, sec: Section) -> None:
    """The environment, then overlap off and on from the same start: the verdict gates the overlap
    measurements of the sections after it."""
    environment(check, sec)
    s = check.sizes
    check.overlap_verdict = "failed to run"
    t0 = time.perf_counter()
    off, on = overlap_run(check, "off"), overlap_run(check, "on")
    differs = [part for part in off if not same(off[part], on[part])]
    written = int((off["stored"][2] > 0).sum())   # rows whose stored step says they went through the store
    check.overlap_verdict = ("identical" if not differs and written else
                             f"differs: {', '.join(differs)}" if differs else "vacuous: no row was written back")
    if differs:   # tell a broken overlap from a device that does not repeat itself
        again = overlap_run(check, "off")
        noisy = [part for part in off if not same(off[part], again[part])]
        if noisy:
            check.overlap_verdict += f" (off vs off also differs: {', '.join(noisy)})"
    title = (f"overlap off vs on, {s.verify_steps} steps of {s.arch} at batch {s.batch}, "
             f"K = {4 * s.batch:,} of N = {s.verify_batches * s.batch:,}")
    sec.rows += [[title, check.overlap_verdict],
                 ["rows written back to the store (off run)", f"{written:,}"],
                 ["overlap check s", f"{time.perf_counter() - t0:.1f}"]]
    sec.summary["overlap"] = {"verdict": check.overlap_verdict, "steps": s.verify_steps,
                              "rows_written": written, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- 2. model ceiling
def synthetic_images(trainer: Trainer) -> torch.Tensor:
    """One uint8 batch already on the device, channels-last like the loader's."""
    size, batch = trainer.config.data.image_size, trainer.global_batch
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    return images.to(trainer.device).contiguous(memory_format=torch.channels_last)


def run_steps(trainer: Trainer, images: torch.Tensor, start: int, count: int,
              deadline: float = math.inf) -> tuple[int, float]:
    """``count`` trainer steps on ``images`` with the scheduler's IDs from step ``start`` (fewer
    if the deadline comes first); returns (steps done, seconds between device syncs)."""
    batch = trainer.global_batch
    sync(trainer.device)
    t0 = time.perf_counter()
    done = 0
    for step in range(start, start + count):
        ids = torch.from_numpy(trainer.scheduler.ids_at(step * batch, (step + 1) * batch))
        trainer.prefetch_rows(step)
        trainer.train_step(step, images, ids)
        done += 1
        if time.perf_counter() > deadline:
            break
    sync(trainer.device)
    return done, time.perf_counter() - t0


class NoRows(MultiViewLoss):
    """Section 2(a)'s classifier: the logits are ``z`` itself (B×D, fixed targets) — no rows."""

    def logits(self, z: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]:
        return z, torch.zeros(z.shape[0], dtype=torch.long, device=z.device)

    def view_logits(self, z: torch.Tensor, detach_rows: bool = False) -> torch.Tensor:
        return z

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def step(self, lr: float) -> None:
        """Nothing to update."""

    def prefetch(self, start: int, stop: int) -> None:
        """Nothing to prefetch."""

    def read_ahead(self, next_ids, lr=None) -> None:
        """Nothing to read ahead."""

    def device_bytes(self) -> int:
        return 0

    def close(self) -> None:
        """Nothing to release."""


def fill_recent_rows(trainer: Trainer, steps: int) -> None:
    """Admit the first ``steps`` batches of the stream through the classifier alone (random
    features), so the timed steps evict rows and fetch rows that were written back."""
    batch, dim = trainer.global_batch, trainer.config.model.feature_dim
    for step in range(steps):
        trainer.prefetch_rows(step)
        trainer.classifier.logits(torch.randn(batch, dim, device=trainer.device),
                                  trainer.scheduler.ids_at(step * batch, (step + 1) * batch))
        trainer.classifier.step(trainer.lr_at(step))


def ceiling_variant(check: Check, label: str, sampling: str, vit: bool = False,
                    overlap: str = "on") -> Optional[dict]:
    """img/s of one variant of section 2, of the ResNet or the ViT, with ``classifier.overlap``
    (None when the section's time is up)."""
    if check.left() <= 0:
        return None
    s = check.sizes
    release(check.device)
    model = ("in1k-vit-s16.yaml", s.vit_arch) if vit else ("in1k.yaml", s.arch)
    with check.synthetic_trainer(s.ceiling_rows, "full" if sampling == "full" else "recent", *model,
                                 extra=(f"classifier.overlap={overlap}",)) as tr:
        start = 0
        if sampling == "none":
            tr.classifier.close()
            tr.classifier = NoRows()
        elif sampling == "recent":
            start = tr.scheduler.window // s.batch
            fill_recent_rows(tr, start)
        images = synthetic_images(tr)
        run_steps(tr, images, start, s.warm_steps, check.deadline)
        steps, seconds = run_steps(tr, images, start + s.warm_steps, s.timed_steps,
                                   check.deadline)
        return {"variant": label, "img_s": steps * s.batch / seconds,
                "ms_step": 1e3 * seconds / steps, "peak_mib": peak_bytes(tr) / 2**20,
                "steps": steps}


def model_ceiling(check: Check, sec: Section) -> None:
    s = check.sizes
    amp = "bf16 autocast + channels_last" if check.device.type == "cuda" else "fp32 (CPU)"
    sec.title += f" — {s.arch}, {s.image} px, batch {s.batch}, {amp}"
    sec.columns = ["variant", "img/s", "ms/step", "peak MiB", "vs (a) / (d)"]
    recent = f"+ recent-K (N={s.ceiling_rows:,}, K={s.recent_k:,})"
    # (label, sampling, summary key, ViT?, classifier.overlap); the key of (a) / (d) is the baseline's
    variants = (("(a) backbone + head only", "none", "none", False, "off"),
                (f"(b) {recent}, overlap on", "recent", "recent", False, "on"),
                (f"(b') {recent}, overlap off", "recent", "recent_off", False, "off"),
                (f"(c) + full-N (N={s.ceiling_rows:,})", "full", "full", False, "off"),
                (f"(d) {s.vit_arch}, AdamW: backbone + head only", "none", "vit_none", True, "off"),
                (f"(e) {s.vit_arch}, AdamW: + recent-K, overlap on", "recent", "vit_recent", True, "on"))
    for label, sampling, key, vit, overlap in variants:
        if overlap == "on" and not check.overlap_verified:
            sec.rows.append([label, f"invalid: overlap check {check.overlap_verdict}", "", "", ""])
            continue
        r = ceiling_variant(check, label, sampling, vit, overlap)
        if r is None:
            sec.rows.append([label, "skipped: section time is up", "", "", ""])
            continue
        sec.summary[key] = r
        base = sec.summary.get("vit_none" if vit else "none")
        ratio = r["img_s"] / base["img_s"] if base else float("nan")
        if sampling != "none":
            sec.summary[f"{key}_ratio"] = ratio
        sec.rows.append([label, f"{r['img_s']:.0f}", f"{r['ms_step']:.1f}",
                         f"{r['peak_mib']:.0f}", f"{ratio:.3f}"])


# ---------------------------------------------------------------------------- 3. memory vs N
def memory_at(check: Check, num_rows: int, sampling: str) -> dict:
    """Peak device memory of a few trainer steps over ``num_rows`` instances."""
    release(check.device)
    t0 = time.perf_counter()
    with check.synthetic_trainer(num_rows, sampling) as tr:
        run_steps(tr, synthetic_images(tr), 0, check.sizes.memory_steps)
        peak = peak_bytes(tr)
        tr.classifier.close()  # flush, so the disk figure counts every row written
        store = Path(tr.config.classifier.store)
        disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) if store.exists() else 0
    return {"rows": num_rows, "sampling": sampling, "peak_bytes": peak, "disk_bytes": disk,
            "seconds": time.perf_counter() - t0}


def memory_vs_n(check: Check, sec: Section) -> None:
    s = check.sizes
    what = "max_memory_allocated" if check.device.type == "cuda" else "classifier tensors (CPU)"
    sec.columns = ["classifier", "N", f"peak MiB ({what})", "row store on disk MiB", "s"]
    sec.title += f" — {s.arch}, batch {s.batch}, K = {s.recent_k:,}, {s.memory_steps} steps per N"
    recent, full, last = [], [], None
    sec.summary = {"recent": recent, "full": full, "memory_kind": what}
    for sampling, sizes in (("recent", s.memory_rows), ("full", s.full_rows)):
        for n in sizes:
            label = "recent-K" if sampling == "recent" else "full-N"
            # the full-N set-up is O(N) host work: skip a size its predecessor says will not fit
            need = last["seconds"] * n / last["rows"] if sampling == "full" and last else 0.0
            if check.left() <= need:
                sec.rows.append([label, f"{n:,}", "skipped: section time is up", "", ""])
                continue
            try:
                r = memory_at(check, n, sampling)
            except Exception as err:  # noqa: BLE001 - an OOM is the measurement
                if not is_oom(err):
                    raise
                sec.rows.append([label, f"{n:,}", f"OOM ({type(err).__name__})", "", ""])
                full.append({"rows": n, "oom": True})
                continue
            (recent if sampling == "recent" else full).append(r)
            if sampling == "full":
                last = r
            disk = f"{r['disk_bytes'] / 2**20:.2f}" if sampling == "recent" else "-"
            sec.rows.append([label, f"{n:,}", f"{r['peak_bytes'] / 2**20:.2f}", disk,
                             f"{r['seconds']:.1f}"])
    peaks = [r["peak_bytes"] for r in recent]
    if len(peaks) == len(s.memory_rows):
        sec.summary["max_over_min"] = max(peaks) / min(peaks)
        sec.rows.append(["recent-K max/min", f"{s.memory_rows[0]:.0e} … {s.memory_rows[-1]:.0e}",
                         f"{sec.summary['max_over_min']:.4f}", "", ""])


# ---------------------------------------------------------------------------- 4. real data
def drive(trainer: Trainer, loader, warm: int, steps: int, deadline: float) -> dict:
    """Train on the loader's batches; time waiting for each batch apart from the step itself."""
    wait = compute = 0.0
    images = timed = 0
    t = time.perf_counter()
    for i, batch in enumerate(loader):
        got = time.perf_counter()
        trainer.prefetch_rows(batch.step)
        trainer.train_step(batch.step, batch.images, batch.ids)
        sync(trainer.device)
        done = time.perf_counter()
        if i >= warm:
            wait, compute = wait + got - t, compute + done - got
            images, timed = images + len(batch), timed + 1
        t = done
        if timed >= steps or done > deadline:
            break
    total = wait + compute
    return {"steps": timed, "images": images, "seconds": total, "wait_s": wait,
            "img_s": images / total if total else float("nan"),
            "img_s_compute_only": images / compute if compute else float("nan"),
            "starved": wait / total if total else float("nan")}


def train_on_shards(config, warm: int, steps: Optional[int], deadline: float,
                    make_loader: Callable = Trainer.make_loader) -> tuple[Trainer, dict]:
    """A fresh Trainer from ``config`` driven through ``make_loader(trainer)`` (its own loader by
    default; all its steps when ``steps`` is None, stopping at the deadline); returns it with the
    timings of :func:`drive` and, under ``data.decode: gpu``, the samples decoded on the host."""
    trainer = Trainer(config, resume="none", show_progress=False)
    loader = make_loader(trainer)
    try:
        r = drive(trainer, loader, warm, steps or trainer.total_steps, deadline)
        regions = getattr(loader, "decode_regions", None)
        return trainer, r if regions is None else {**r, "host_decodes": dict(regions.fallbacks)}
    finally:
        loader.close()
        trainer.classifier.close()


def gpu_mode_on_cpu(trainer: Trainer):
    """The trainer's loader under ``data.decode: gpu`` with nvImageCodec's CPU back end (no CUDA device:
    the trainer refuses gpu decode there; this runs its code path only) and the colour augmentation in
    the trainer (gpu mode takes none in the workers)."""
    config = replace(trainer.config, data=replace(trainer.config.data, decode="gpu"))
    return train_loader_from_config(config, trainer.shards, trainer.scheduler, trainer.world, trainer.device,
                                    start_step=trainer.start_step,
                                    num_steps=trainer.total_steps - trainer.start_step,
                                    decode_regions=NvImageCodecRegions(trainer.device))


def decode_run(check: Check, run_dir: Path, overrides: list[str], mode: str) -> tuple[str, str, Optional[dict]]:
    """Section 4's run (its config ``overrides``) again in ``run_dir`` decoding with nvImageCodec: ``mode``
    ``"roi"``: ``data.decoder: roi`` in the CPU workers; ``"gpu"``: ``data.decode: gpu``, on CUDA the
    trainer's own decode on the device, else :func:`gpu_mode_on_cpu`. The row's label and value, and the
    timings (None when the row did not run: skipped or failed)."""
    on_device = mode == "gpu" and check.device.type == "cuda"
    config = check.config("in1k.yaml", run_dir, *overrides, *(["data.decoder=roi"] if mode == "roi" else []),
                          *(["data.decode=gpu"] if on_device else []))
    make_loader = Trainer.make_loader
    if mode == "roi":
        label = "data.decoder: roi (crop windows only, nvImageCodec in the CPU workers)"
    elif on_device:
        label = f"data.decode: gpu (nvImageCodec on {check.device})"
    else:
        label = "data.decode: gpu (nvImageCodec CPU back end, no device: the code path only)"
        make_loader = gpu_mode_on_cpu
    if not nvimgcodec_installed():
        return label, "skipped: nvImageCodec is not installed (pip install -e '.[nvimgcodec]')", None
    if check.left() <= 0:
        return label, "skipped: section time is up", None
    try:
        _, r = train_on_shards(config, check.sizes.warm_steps, check.sizes.loader_steps, check.deadline,
                               make_loader)
    except SectionTimeout:
        raise
    except Exception as err:  # noqa: BLE001 - the CPU path's rows stand; the failure is this row's result
        first = (str(err).splitlines() or [""])[0]
        return label, f"failed: {'OOM: ' if is_oom(err) else ''}{type(err).__name__}: {first}", None
    host = f", {sum(r['host_decodes'].values())} host decodes" if "host_decodes" in r else ""
    return label, f"{r['img_s']:.0f} img/s, {100 * r['starved']:.1f} % starved{host}", r


def real_data(check: Check, sec: Section) -> None:
    s = check.sizes
    work = Path(tempfile.mkdtemp(dir=check.work))
    t0 = time.perf_counter()
    _, shards = prepare(check.args.data, work, s.inet_copies, s.shard_size,
                        workers=check.cores, limit=s.inet_limit)
    prep_s = time.perf_counter() - t0
    batch = s.batch if check.device.type == "cuda" else min(s.batch, 8)
    overrides = [f"data.train={shards / 'manifest.json'}", f"data.workers={check.cores}",
                 *check.model_overrides(batch)]
    config = check.config("in1k.yaml", work / "run", *overrides)
    trainer, r = train_on_shards(config, s.warm_steps, s.loader_steps, check.deadline)
    where = "device" if check.device.type == "cuda" else "CPU loader workers (no device)"
    sec.title += (f" — {s.arch}, {s.image} px, batch {batch}, {check.cores} loader workers, "
                  f"colour augmentation on the {where}")
    sec.columns = ["measure", "value"]
    sec.rows = [["images in the corpus (sample repeated)", f"{trainer.num_instances:,}"],
                ["shard preparation s", f"{prep_s:.1f}"],
                ["timed steps (after warm-up)", f"{r['steps']}"],
                ["img/s fed by the loader (end to end)", f"{r['img_s']:.0f}"],
                ["img/s of the training step alone", f"{r['img_s_compute_only']:.0f}"],
                ["share of the time waiting for data (starved)", f"{100 * r['starved']:.1f} %"],
                [f"img/s vs the {GOAL_IMG_S} img/s goal", f"{r['img_s'] / GOAL_IMG_S:.2f}x"],
                ["data.decode: cpu (the rows above)",
                 f"{r['img_s']:.0f} img/s, {100 * r['starved']:.1f} % starved"]]
    sec.summary = {**r, "prep_s": prep_s, "workers": check.cores, "batch": batch}
    for mode in ("gpu", "roi"):   # the device path first: the section's time may not cover both
        label, value, timings = decode_run(check, work / f"run-{mode}-decode", overrides, mode)
        sec.rows.append([label, value])
        sec.summary[f"{mode}_decode"] = timings or {"status": value}


# ---------------------------------------------------------------------------- 5. quality
def extract_cifar(archive: Path, dest: Path, per_class: Optional[tuple[int, int]]) -> Path:
    """``dest/cifar10/{train,test}/<class>/*.jpg``; with ``per_class``, only that many per class."""
    with tarfile.open(archive) as tar:
        if per_class is None:
            tar.extractall(dest, filter="data")
        else:
            counts: dict = {}
            keep = []
            for m in tar:
                parts = m.name.split("/")
                if m.isfile() and len(parts) == 4:
                    key = (parts[1], parts[2])
                    limit = per_class[0] if parts[1] == "train" else per_class[1]
                    if counts.get(key, 0) < limit:
                        counts[key] = counts.get(key, 0) + 1
                        keep.append(m)
            tar.extractall(dest, members=keep, filter="data")
    return dest / "cifar10"


def quality(check: Check, sec: Section) -> None:
    s, device = check.sizes, check.device
    work = Path(tempfile.mkdtemp(dir=check.work))
    root = extract_cifar(check.args.data / "cifar10-jpeg.tar.gz", work, s.cifar_per_class)
    manifests = {}
    for split in ("train", "test"):
        make_shards(str(root / split), str(work / split), shard_size=s.shard_size, seed=0,
                    workers=check.cores, progress=False)
        manifests[split] = work / split / "manifest.json"

    def configured(run: str, *extra: str):
        return check.config("cifar10.yaml", work / run, f"data.train={manifests['train']}",
                            f"data.workers={check.cores}", *s.cifar_overrides, *extra)

    def knn_top1(backbone) -> tuple[float, int]:
        mon = config.monitor
        train, test = extract_splits(backbone.to(device), manifests["train"], manifests["test"],
                                     image_size=config.data.image_size, workers=check.cores,
                                     device=device)
        return knn_classify(train, test, k=mon.k, temperature=mon.temperature)["top1"], len(test.labels)

    config = configured("calibrate", "optim.epochs=1")
    t0 = time.perf_counter()
    torch.manual_seed(config.run.seed)   # the initialisation every Trainer starts from
    random_top1, num_test = knn_top1(PICNet(config.model).backbone)
    eval_s = time.perf_counter() - t0

    # time a few steps, then size the schedule (epochs) to what is left after the final k-NN
    trainer, calib = train_on_shards(config, s.warm_steps, s.calib_steps, check.deadline)
    train_s = check.left() - 1.3 * eval_s - 5
    if s.train_cap_s is not None:
        train_s = min(train_s, s.train_cap_s)
    if train_s <= 0 or not calib["steps"]:
        raise RuntimeError(f"no time left to train ({train_s:.0f} s after calibration)")
    n = trainer.num_instances
    epochs = max(calib["img_s"] * train_s / n, 1e-3)
    config = configured("train", f"optim.epochs={epochs:.4f}",
                        f"optim.warmup_epochs={min(config.optim.warmup_epochs, epochs / 10):.4f}")
    trainer, trained = train_on_shards(config, 0, None, time.perf_counter() + train_s)
    done = trained["images"] / n
    top1, _ = knn_top1(trainer.model.backbone)
    sec.title += (f" — {config.model.arch}, CIFAR stem, {n:,} train images, batch "
                  f"{config.optim.batch_size}, K = {config.classifier.recent_k:,}")
    sec.columns = ["measure", "value"]
    sec.rows = [["epochs planned / trained (time limit)", f"{epochs:.2f} / {done:.2f}"],
                ["training s, img/s", f"{trained['seconds']:.0f}, {trained['img_s']:.0f}"],
                ["k-NN top-1, random init", f"{random_top1:.2f}"],
                ["k-NN top-1, after PIC", f"{top1:.2f}"],
                ["k-NN bank / queries", f"{n:,} train / {num_test:,} test images"]]
    sec.summary = {"epochs_planned": epochs, "epochs_trained": done, "train": trained,
                   "calibration": calib, "knn_top1_random": random_top1, "knn_top1": top1,
                   "eval_s": eval_s}

# ---------------------------------------------------------------------------- report
def _cell(value) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_section(sec: Section) -> str:
    text = f"### {sec.number}. {sec.title}\n\nstatus: {sec.status} ({sec.seconds:.1f} s)\n"
    if sec.rows:
        text += "\n" + markdown_table(sec.columns, sec.rows) + "\n"
    return text


def headline(sections: dict[int, Section]) -> tuple[list[list], str]:
    """The summary rows (check, measured, goal) and the RESULT line."""
    def got(number: int, *keys):
        value = sections[number].summary if number in sections else {}
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    rows, parts = [], []
    verdict = got(1, "overlap", "verdict") or "not run"
    rows.append(["overlap off vs on: losses and rows (1)", verdict, "identical"])
    parts.append(f"overlap {verdict}")
    recent, ratio, full = got(2, "recent", "img_s"), got(2, "recent_ratio"), got(2, "full_ratio")
    rows.append(["model ceiling img/s, + recent-K, overlap on (2b)", f"{recent:.0f}" if recent else "n/a",
                 f">= {GOAL_IMG_S} (H100, ResNet-50)"])
    rows.append(["(b)/(a): recent-K vs backbone + head only", f"{ratio:.3f}" if ratio else "n/a",
                 f">= {GOAL_RECENT_RATIO}"])
    off = got(2, "recent_off_ratio")
    rows.append(["(b')/(a): recent-K, overlap off", f"{off:.3f}" if off else "n/a", "-"])
    rows.append(["(c)/(a): full-N vs backbone + head only", f"{full:.3f}" if full else "n/a", "-"])
    parts.append(f"ceiling {recent:.0f} img/s with recent-K = {ratio:.3f}x backbone-only"
                 + (f" ({off:.3f}x with overlap off)" if off else "") if recent and ratio else "ceiling n/a")
    vit, vit_ratio = got(2, "vit_recent", "img_s"), got(2, "vit_recent_ratio")
    rows.append(["ViT-S/16 img/s, + recent-K (2e) and (e)/(d)",
                 f"{vit:.0f} ({vit_ratio:.3f})" if vit and vit_ratio else "n/a", "-"])
    parts.append(f"ViT-S/16 {vit:.0f} img/s with recent-K = {vit_ratio:.3f}x" if vit and vit_ratio
                 else "ViT n/a")
    mem = got(3, "max_over_min")
    rows.append(["device memory max/min, recent-K, N = 1e5 ... 1e9", f"{mem:.4f}" if mem else "n/a",
                 f"<= {GOAL_MEMORY_RATIO}"])
    parts.append(f"memory max/min {mem:.4f}" if mem else "memory n/a")
    fed, starved = got(4, "img_s"), got(4, "starved")
    rows.append(["loader-fed img/s (share of time starved)",
                 f"{fed:.0f} ({100 * starved:.0f} %)" if fed else "n/a", f">= {GOAL_IMG_S}"])
    parts.append(f"loader-fed {fed:.0f} img/s ({100 * starved:.0f}% starved)" if fed
                 else "loader n/a")
    for mode, setting in (("roi", "data.decoder: roi"), ("gpu", "data.decode: gpu")):
        mode_fed, mode_starved = got(4, f"{mode}_decode", "img_s"), got(4, f"{mode}_decode", "starved")
        rows.append([f"loader-fed img/s, {setting} (share of time starved)",
                     f"{mode_fed:.0f} ({100 * mode_starved:.0f} %)" if mode_fed else "n/a", "-"])
    top1, rand, epochs = got(5, "knn_top1"), got(5, "knn_top1_random"), got(5, "epochs_trained")
    rows.append(["CIFAR-10 k-NN top-1: PIC / random init (epochs)",
                 f"{top1:.2f} / {rand:.2f} ({epochs:.2f})" if top1 is not None else "n/a",
                 "PIC above random init"])
    parts.append(f"CIFAR-10 k-NN {top1:.1f} vs {rand:.1f} random ({epochs:.1f} epochs)"
                 if top1 is not None else "CIFAR-10 n/a")
    ok = sum(s.status == "ok" for s in sections.values())
    device = got(1, "GPU") or "?"
    return rows, f"RESULT: {device}: " + "; ".join(parts) + f"; {ok}/{len(sections)} sections ok"


def write_report(check: Check, out: Path) -> str:
    sections = {s.number: s for s in check.sections if s.status != "not selected"}
    rows, result = headline(sections)
    total = time.perf_counter() - check.start
    mode = "--smoke (toy sizes, CPU)" if check.args.smoke else "full sizes"
    md = [f"## GPU check: {check.sections[0].summary.get('GPU', '?')}", "",
          f"`python benchmarks/gpu_check.py{' --smoke' if check.args.smoke else ''} "
          f"--budget-s {check.args.budget_s:g}` — {mode}; {total:.0f} s of the "
          f"{check.args.budget_s:g} s budget.", "",
          markdown_table(["check", "measured", "goal"], rows), ""]
    md += [render_section(s) for s in sections.values()]
    md += [result, ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text("\n".join(md))
    report = {"result": result, "seconds": total, "budget_s": check.args.budget_s,
              "smoke": check.args.smoke, "device": str(check.device),
              "sections": [vars(s) for s in check.sections]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return result


# ---------------------------------------------------------------------------- main
def parse_sections(text: str) -> set[int]:
    try:
        chosen = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        chosen = set()
    if not chosen or not chosen <= set(MIN_SECONDS):
        raise ValueError(f"--sections takes numbers from 1 to 5 separated by commas, got {text!r}")
    return chosen


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                    help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget (seconds)")
    ap.add_argument("--smoke", "--quick", dest="smoke", action="store_true",
                    help="every section at toy sizes on CPU (CI)")
    ap.add_argument("--data", type=Path, default=shared_data_dir(),
                    help="folder with imagenet-sample-1000.tar and cifar10-jpeg.tar.gz")
    ap.add_argument("--sections", default="1,2,3,4,5", help="which sections to run, e.g. 2,3")
    args = ap.parse_args(argv)
    try:
        if not args.budget_s > 0:
            raise ValueError(f"--budget-s must be > 0, got {args.budget_s:g}")
        args.sections = parse_sections(args.sections) | {1}
        args.out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="picstream-gpu-check-") as tmp:
        check = Check(args, sizes, Path(tmp))
        if check.device.type == "cpu" and not args.smoke:
            print("gpu_check: no CUDA device: full sizes on CPU, cut short by the budget",
                  file=sys.stderr)
        min_s = dict.fromkeys(MIN_SECONDS, 0) if args.smoke else MIN_SECONDS
        for number, title, fn in (
                (1, "Environment and overlap check", overlap_check),
                (2, "Model ceiling", model_ceiling),
                (3, "Device memory vs N", memory_vs_n),
                (4, "Real data through the WindowLoader", real_data),
                (5, "Quality: CIFAR-10 k-NN", quality)):
            check.run(number, title, lambda sec, fn=fn: fn(check, sec), min_s[number])
        result = write_report(check, args.out)
    print(f"report: {args.out / 'gpu_check.md'}, {args.out / 'gpu_check.json'}")
    print(result)
    return 0 if all(s.status in ("ok", "not selected") for s in check.sections) else 1


if __name__ == "__main__":
    sys.exit(main())
