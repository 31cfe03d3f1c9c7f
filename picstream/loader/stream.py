"""The training loader: the scheduler's stream of IDs → decoded, cropped uint8 batches.

Global batch ``j`` is stream positions ``[j·B·R, (j+1)·B·R)``; rank ``r`` takes block ``r``;
DataLoader worker ``p`` produces the batches ``(j − start_step) ≡ p (mod P)`` as whole batches
(``batch_size=None``), and the DataLoader's in-order round robin restores the order. Each sample's
crop and flip are drawn from ``(seed, stream position)``, so batches do not depend on the worker
count and a loader built with ``start_step=j`` reproduces batch ``j`` onwards exactly.

A sample that cannot be read intact or decoded is skipped (counted by reason) and its slot refilled
with the next readable refill candidate of its rank, drawn with the slot's randomness. The candidates
of global batch ``j`` are the stream's IDs from the end of the global batch on, for one window of
positions, each ID at its first position there only and none of the global batch's; the position
``end + i`` belongs to rank ``i mod R``. Every rank derives the same sequence, so no two ranks refill
one global batch with the same ID (nor with one another rank trains on in it); with one process it is
the next stream IDs not in the batch. Refills depend only on which samples are readable, never on the
worker count or the resume step. A batch with no readable sample at all ends the iteration with
:class:`UnreadableStream`.

A missing shard (or index) that the manifest lists is a broken shard set, not missing data: with
``on_missing="fail"`` (the default) the iteration ends with one :class:`BrokenShardSet` line naming
it; ``"skip"`` counts its samples as skipped (reason ``missing``) and refills their slots. Shard
records that stay damaged after the retries (a v3 sidecar) end it the same way.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..scheduler import SlidingWindowScheduler, batch_positions, worker_steps
from ..shards.format import MissingShard, ShardsError
from .cache import ShardReader, is_local
from .decode import check_decoder, crop_boxes, cut_windowed_crops, decode_crops, jpeg_frame, windowed
from .device_crops import cut_views
from .geometry import DRAWS_PER_CROP, CropSpec, sample_uniforms

__all__ = ["Batch", "BrokenShardSet", "DECODE_MODES", "EncodedCrops", "WindowLoader", "ON_MISSING",
           "SMALL_CROP_SCALE", "UnreadableStream", "crop_specs"]

log = logging.getLogger(__name__)

SMALL_CROP_SCALE = (0.08, 0.14)   # multi-crop's small views: the authors' scripts/PIC.sh (--crop 0.08 --crop2 0.14)
ON_MISSING = ("fail", "skip")
DECODE_MODES = ("cpu", "gpu")


class UnreadableStream(ShardsError):
    """No sample of a batch, nor of the stream positions after it (one window), could be read."""


class BrokenShardSet(ShardsError):
    """The shard set is not the one its manifest lists: a listed shard is missing (``on_missing="fail"``)
    or its records stay damaged."""


@dataclass
class Batch:
    """A batch of uint8 images with their instance IDs.

    ``images`` (b,3,H,W) uint8 in channels-last memory format; ``ids``, ``labels`` (−1 when
    unlabelled) and ``positions`` (the stream positions of the slots, whose randomness the crops
    use) int64 (b,); ``step`` is the global batch index ``j``; ``skipped`` counts samples that could
    not be read intact or decoded (``skip_reasons``: count per reason), each replaced by a refill
    when one was readable; ``retries`` counts remote read retries per kind of read in the process
    that made the batch, since its previous batch; ``extra_crops`` holds one uint8 tensor per
    multi-crop view, aligned with ``images``. ``error`` (an empty batch) says why the shard set is
    broken; the loader raises it as :class:`BrokenShardSet` in the process that iterates.
    """

    images: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    step: int
    positions: torch.Tensor
    skipped: int = 0
    extra_crops: list[torch.Tensor] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    encoded: "EncodedCrops | None" = None

    def __len__(self) -> int:
        return len(self.ids)

    def _map(self, fn) -> "Batch":
        return replace(self, images=fn(self.images), ids=fn(self.ids), labels=fn(self.labels),
                       positions=fn(self.positions), extra_crops=[fn(c) for c in self.extra_crops])

    def pin_memory(self) -> "Batch":
        """Used by the DataLoader when ``pin_memory=True``."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


@dataclass
class EncodedCrops:
    """What a worker passes under ``decode="gpu"`` instead of pixels: each kept sample's bytes, the
    union of its crop boxes (``regions`` (b,4): top, left, h, w) and its boxes (``boxes`` (b,V,5):
    top, left, h, w, flip per view), aligned with the batch's ``ids``."""

    data: list[bytes]
    regions: np.ndarray
    boxes: np.ndarray


def crop_specs(image_size: int, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip: bool = True,
               multi_crop: Sequence[tuple] | None = None) -> list[CropSpec]:
    """The main crop, then each extra crop: ``multi_crop`` items are ``(size, count[, scale])``.

    Without an explicit scale, extra crops smaller than half the main size use
    :data:`SMALL_CROP_SCALE`, the others ``crop_scale``.
    """
    specs = [CropSpec(image_size, tuple(crop_scale), tuple(crop_ratio), flip)]
    for item in multi_crop or ():
        size, count = int(item[0]), int(item[1])
        scale = item[2] if len(item) > 2 else (
            SMALL_CROP_SCALE if 2 * size < image_size else crop_scale)
        specs += [CropSpec(size, tuple(scale), tuple(crop_ratio), flip)] * count
    return specs


class _BatchMaker:
    """Reads, decodes and crops the samples of one batch (runs inside the DataLoader workers)."""

    def __init__(self, shardset, reader: ShardReader, specs: list[CropSpec], seed: int, decoder: str,
                 augment=None, on_missing: str = "fail", decode: str = "cpu"):
        self.shardset, self.reader, self.specs = shardset, reader, specs
        self.decode = decode
        self.seed, self.decoder, self.augment = seed, decoder, augment
        self.on_missing = on_missing
        self._warned: set[tuple[int, str]] = set()

    def make(self, step: int, positions: np.ndarray, ids: np.ndarray, spares=()) -> Batch:
        """The batch of ``ids`` at stream ``positions``; a slot whose sample fails takes the next
        readable ID of ``spares`` not yet in the batch (decoded with the slot's randomness)."""
        n = len(ids)
        u = sample_uniforms(self.seed, positions, DRAWS_PER_CROP * len(self.specs))
        u = u.reshape(n, len(self.specs), DRAWS_PER_CROP)
        views = ([torch.empty((n, s.size, s.size, 3), dtype=torch.uint8) for s in self.specs]
                 if self.decode == "cpu" else [[None] * n])   # gpu: slot i holds (bytes, boxes)
        labels = np.full(n, -1, dtype=np.int64)
        got = ids.copy()
        ok = np.zeros(n, dtype=bool)
        reasons: Counter[str] = Counter()
        tried = set(ids.tolist())
        spares = (c for c in spares if c not in tried)
        # "roi": the slots' windows are decoded together after the reads, one nvImageCodec call per batch
        windows = {} if self.decoder == "roi" and self.decode == "cpu" else None
        failed = []
        try:
            for i, sample_id in enumerate(ids.tolist()):
                reason = self._fill(i, sample_id, int(positions[i]), u[i], views, labels, windows)
                if reason is None:
                    got[i], ok[i] = sample_id, True
                else:
                    reasons[reason] += 1
                    failed.append(i)
            for i in self._cut_windows(windows or {}, views):   # read, but its pixels did not decode
                ok[i] = False
                reasons["decode"] += 1
                failed.append(i)
            for i in sorted(failed):   # refilled in slot order, each spare decoded on its own
                for sample_id in spares:
                    tried.add(sample_id)
                    reason = self._fill(i, sample_id, int(positions[i]), u[i], views, labels)
                    if reason is None:
                        got[i], ok[i] = sample_id, True
                        break
                    reasons[reason] += 1
        except ShardsError as err:
            return _error_batch(step, err)
        keep = None if ok.all() else torch.from_numpy(np.flatnonzero(ok))
        pick = (lambda t: t) if keep is None else (lambda t: t.index_select(0, keep))
        meta = dict(ids=pick(torch.from_numpy(got)), labels=pick(torch.from_numpy(labels)), step=step,
                    positions=pick(torch.from_numpy(positions)), skipped=sum(reasons.values()),
                    skip_reasons=dict(reasons), retries=self.shardset.retry_stats.drain())
        if self.decode == "gpu":
            return Batch(images=torch.empty(0, dtype=torch.uint8), encoded=_encoded(
                [views[0][i] for i in np.flatnonzero(ok)], len(self.specs)), **meta)
        images = [pick(v).permute(0, 3, 1, 2) for v in views]      # (b,3,H,W), channels-last
        if self.augment is not None:
            images = [self.augment(im, _generator(self.seed, step, view))
                      for view, im in enumerate(images)]
        return Batch(images=images[0], extra_crops=images[1:], **meta)

    def _fill(self, i: int, sample_id: int, position: int, u: np.ndarray, views, labels,
              windows: dict | None = None) -> str | None:
        """Read and crop sample ``sample_id`` into slot ``i``: None, or why it failed. With ``windows``, a
        JPEG that ``"roi"`` decodes by window is only read and its crop boxes drawn, into ``windows[i]``."""
        try:
            data, labels[i] = self.reader.read_sample(sample_id)
        except ShardsError:
            raise
        except MissingShard as exc:
            if self.on_missing == "fail":
                raise BrokenShardSet(
                    f"{exc}, which the manifest of {self.shardset.root} lists: the shard set is incomplete; "
                    "restore it, or set data.on_missing=skip to train on without it") from None
            return self._skip(sample_id, position, exc.reason, exc)
        except Exception as exc:  # noqa: BLE001 - a bad sample is counted, never fatal
            return self._skip(sample_id, position, getattr(exc, "reason", "unreadable"), exc)
        try:
            if self.decode == "gpu":   # the geometry only: the pixels are decoded in the iterating process
                views[0][i] = (data, crop_boxes(data, u, self.specs, jpeg_frame(data)))
            elif windows is not None and windowed(frame := jpeg_frame(data)):
                windows[i] = (sample_id, position, data, crop_boxes(data, u, self.specs, frame))
            else:
                decode_crops(data, u, self.specs, [v[i] for v in views], self.decoder)
        except Exception as exc:  # noqa: BLE001 - a decoder error on damaged data is counted too
            return self._skip(sample_id, position, "decode", exc)
        return None

    def _cut_windows(self, windows: dict, views) -> list[int]:
        """Cut the crops of the ``windows`` (slot -> sample ID, position, bytes, crop boxes) decoded
        together (:func:`cut_windowed_crops`); returns the slots whose pixels did not decode."""
        if not windows:
            return []
        slots = list(windows)
        errors = cut_windowed_crops([windows[i][2] for i in slots], [windows[i][3] for i in slots],
                                    [s.size for s in self.specs], [[v[i] for v in views] for i in slots])
        for i, exc in zip(slots, errors):
            if exc is not None:
                self._skip(windows[i][0], windows[i][1], "decode", exc)
        return [i for i, exc in zip(slots, errors) if exc is not None]

    def _skip(self, sample_id: int, position: int, reason: str, exc: Exception) -> str:
        """Log a skipped sample: a warning for the first one of each (shard, reason), then debug."""
        key = (sample_id // self.shardset.shard_size, reason)
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        log.log(level, "skipping sample %d (stream position %d, %s): %s", sample_id, position, reason, exc)
        return reason


def _encoded(slots: list, num_views: int) -> EncodedCrops:
    """The kept slots' ``(bytes, boxes)`` as :class:`EncodedCrops`."""
    boxes = np.array([b for _, b in slots], dtype=np.int64).reshape(len(slots), num_views, 5)
    top, left = boxes[:, :, 0], boxes[:, :, 1]
    bottom, right = top + boxes[:, :, 2], left + boxes[:, :, 3]
    regions = np.stack([top.min(1, initial=2**62), left.min(1, initial=2**62), bottom.max(1, initial=0),
                        right.max(1, initial=0)], 1)
    regions[:, 2:] -= regions[:, :2]
    return EncodedCrops([d for d, _ in slots], regions, boxes)


def _error_batch(step: int, err: ShardsError) -> Batch:
    """An empty batch carrying why the shard set is broken (raised by the loader, in the process that
    iterates: one line, not a worker's traceback)."""
    empty = torch.empty(0, dtype=torch.int64)
    return Batch(images=torch.empty(0, dtype=torch.uint8), ids=empty, labels=empty, step=step,
                 positions=empty, error=str(err))


def _generator(seed: int, step: int, view: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, step, view)``."""
    state = np.random.SeedSequence([seed % 2**64, step, view]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class _WindowStream(IterableDataset):
    """Yields this rank's batches ``start_step, start_step + 1, ...`` split across workers."""

    def __init__(self, maker: _BatchMaker, scheduler: SlidingWindowScheduler, batch_size: int,
                 rank: int, world_size: int, start_step: int, num_steps: int | None):
        self.maker, self.scheduler = maker, scheduler
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start_step, self.num_steps = start_step, num_steps

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, sched = self.maker.reader, self.scheduler
        reader.worker, reader.num_workers = worker, workers
        size = self.maker.shardset.shard_size
        planned = None
        for step in worker_steps(self.start_step, self.num_steps, worker, workers):
            pos = batch_positions(step, self.batch_size, self.rank, self.world_size)
            first, last = sched.window_of(int(pos[0])), sched.window_of(int(pos[-1]))
            if (first, last) != planned:
                current = np.union1d(sched.shards_of_window(first, size),
                                     sched.shards_of_window(last, size))
                try:
                    reader.plan(current, sched.shards_of_next_stride(last, size))
                except ShardsError as err:   # shard records that stay damaged
                    yield _error_batch(step, err)
                    return
                planned = (first, last)
            ids = sched.ids_at(int(pos[0]), int(pos[-1]) + 1)
            yield self.maker.make(step, pos, ids, _spares(sched, step, self.batch_size, self.rank,
                                                          self.world_size))


def _spares(sched, step: int, batch_size: int, rank: int, world_size: int):
    """Rank ``rank``'s refill candidates for global batch ``step`` (see the module doc), read lazily:
    nothing is computed unless a slot needs a refill."""
    chunk = batch_size * world_size
    end = (step + 1) * chunk
    taken = set(sched.ids_at(end - chunk, end).tolist())
    stop = end + sched.window
    for lo in range(end, stop, chunk):
        for position, sample_id in enumerate(sched.ids_at(lo, min(lo + chunk, stop)).tolist(), lo):
            if sample_id not in taken:
                taken.add(sample_id)
                if (position - end) % world_size == rank:
                    yield sample_id


class WindowLoader:
    """Iterable of :class:`Batch` for one rank, following a scheduler's stream of IDs.

    Reads only the current window's shards (plus the next stride's, prefetched): local shards by
    ranged reads, remote ones fetched whole into ``cache_dir`` (a temporary folder when ``None``)
    bounded by ``cache_bytes``. ``workers=0`` runs everything in the calling process. Iterating
    again restarts at ``start_step``. ``num_steps=None`` is an endless stream.

    ``augment`` (e.g. :class:`PhotometricAugment`, for training without an accelerator) is called
    as ``augment(uint8 images, generator)`` on every view inside the workers, with a generator
    seeded from ``(seed, step, view)``; the batch then carries its output (float32) instead.
    ``on_missing`` ("fail" or "skip"): what a shard the manifest lists but the storage lacks does.
    ``pin_memory``: with workers, the DataLoader pins each batch in this process (for CUDA copies
    that do not block; with none, the copy to the device pins its own source).
    ``decode="gpu"``: the workers pass each sample's bytes and crop boxes (:class:`EncodedCrops`) and this
    process decodes them with ``decode_regions(bytes, regions)`` (uint8 ``(h, w, 3)`` tensors, one per
    region) and cuts the views with :func:`~.device_crops.cut_views` on the tensors' device.
    """

    def __init__(self, shardset, scheduler: SlidingWindowScheduler, batch_size: int, *,
                 image_size: int = 224, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 flip: bool = True, multi_crop: Sequence[tuple] | None = None, rank: int = 0,
                 world_size: int = 1, workers: int | None = None, start_step: int = 0,
                 num_steps: int | None = None, seed: int = 0, decoder: str = "auto",
                 cache_dir: str | None = None, cache_bytes: int = 32 << 30, prefetch: bool = True,
                 pin_memory: bool = False, prefetch_factor: int = 2, augment=None, on_missing: str = "fail",
                 decode: str = "cpu", decode_regions=None):
        if scheduler.num_instances != len(shardset):
            raise ValueError(f"scheduler has {scheduler.num_instances} IDs, shards {len(shardset)}")
        if batch_size < 1 or not 0 <= rank < world_size or start_step < 0:
            raise ValueError("need batch_size >= 1, 0 <= rank < world_size, start_step >= 0")
        check_decoder(decoder)
        if decode not in DECODE_MODES or (decode == "gpu") != (decode_regions is not None) or (
                decode == "gpu" and augment is not None):
            raise ValueError(f"decode must be one of {DECODE_MODES}; 'gpu' takes decode_regions and no augment")
        self.decode_regions = decode_regions
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {ON_MISSING}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start_step, self.num_steps = start_step, num_steps
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self.specs = crop_specs(image_size, crop_scale, crop_ratio, flip, multi_crop)
        self._tmp_cache = None
        if cache_dir is None and not is_local(shardset.shard_url(0)):
            cache_dir = self._tmp_cache = tempfile.mkdtemp(prefix="picstream-shards-")
            weakref.finalize(self, shutil.rmtree, cache_dir, True)
        self.reader = ShardReader(shardset, cache_dir, cache_bytes, prefetch)
        maker = _BatchMaker(shardset, self.reader, self.specs, seed, decoder, augment, on_missing, decode)
        self.dataset = _WindowStream(maker, copy.deepcopy(scheduler), batch_size, rank,
                                     world_size, start_step, num_steps)
        self.pin_memory, self._prefetch_factor = pin_memory, prefetch_factor
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless WindowLoader (num_steps=None) has no length")
        return self.num_steps

    def __iter__(self) -> Iterator[Batch]:
        if self.workers == 0:
            batches = iter(self.dataset)
        else:
            if self._loader is None:
                self._loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                          persistent_workers=True, multiprocessing_context="fork",
                                          prefetch_factor=self._prefetch_factor, pin_memory=self.pin_memory)
            batches = iter(self._loader)
        for batch in batches:
            if batch.error is not None:
                raise BrokenShardSet(batch.error)
            if batch.encoded is not None and len(batch):
                batch = self._decoded(batch)
            if len(batch) == 0:
                reasons = ", ".join(f"{n} {r}" for r, n in sorted(batch.skip_reasons.items()))
                raise UnreadableStream(
                    f"no readable sample for step {batch.step}: its samples and the next "
                    f"{self.dataset.scheduler.window} stream positions all failed ({reasons}); "
                    f"check that the shards under {self.reader.shardset.root} are present and intact")
            yield batch

    def _decoded(self, batch: Batch) -> Batch:
        """``batch`` with its views decoded by ``decode_regions`` and cut by :func:`cut_views`."""
        enc = batch.encoded
        views = cut_views(self.decode_regions(enc.data, enc.regions), enc.regions[:, :2], enc.boxes,
                          [s.size for s in self.specs])
        return replace(batch, images=views[0], extra_crops=views[1:], encoded=None)

    def close(self) -> None:
        """Stop the worker processes and remove a temporary shard cache."""
        iterator = getattr(self._loader, "_iterator", None)   # persistent workers live there
        if iterator is not None:
            iterator._shutdown_workers()
        self._loader = None
        self.reader.close()
        if self._tmp_cache is not None:
            shutil.rmtree(self._tmp_cache, ignore_errors=True)
            self._tmp_cache = None

    def __enter__(self) -> "WindowLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
