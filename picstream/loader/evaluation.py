"""The evaluation loader: every ID in order, resized and centre-cropped (kNN / linear evaluation)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .cache import ShardReader, is_local
from .decode import decode_center
from .stream import Batch

__all__ = ["EvalLoader", "default_resize"]

log = logging.getLogger(__name__)


def default_resize(image_size: int) -> int | None:
    """Short side before the centre crop: ``image_size·8/7`` (256 for 224), none below 64 px."""
    return int(round(image_size * 8 / 7)) if image_size >= 64 else None


class _EvalStream(IterableDataset):
    def __init__(self, shardset, reader: ShardReader, batch_size: int, image_size: int,
                 resize: int | None, decoder: str):
        self.shardset, self.reader = shardset, reader
        self.batch_size, self.image_size, self.resize, self.decoder = (
            batch_size, image_size, resize, decoder)

    def __len__(self) -> int:
        return -(-len(self.shardset) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n, size = len(self.shardset), self.shardset.shard_size
        for step in range(worker, len(self), workers):
            ids = np.arange(step * self.batch_size, min(n, (step + 1) * self.batch_size))
            nxt = min(n, (step + workers + 1) * self.batch_size)
            shards = np.arange(ids[0] // size, (ids[-1]) // size + 1)
            self.reader.plan(shards, np.arange(shards[-1] + 1, (nxt - 1) // size + 1))
            images = torch.empty((len(ids), self.image_size, self.image_size, 3), dtype=torch.uint8)
            labels = np.full(len(ids), -1, dtype=np.int64)
            ok = np.zeros(len(ids), dtype=bool)
            for i, sample_id in enumerate(ids.tolist()):
                try:
                    data, labels[i] = self.reader.read_sample(sample_id)
                    decode_center(data, self.image_size, self.resize, images[i], self.decoder)
                    ok[i] = True
                except Exception as exc:  # noqa: BLE001 - a bad sample is counted, never fatal
                    log.warning("skipping sample %d: %s", sample_id, exc)
            keep = torch.from_numpy(np.flatnonzero(ok))
            yield Batch(images=images[keep].permute(0, 3, 1, 2), ids=torch.from_numpy(ids)[keep],
                        labels=torch.from_numpy(labels)[keep], step=step,
                        positions=torch.from_numpy(ids)[keep], skipped=int(len(ids) - ok.sum()))


class EvalLoader:
    """All IDs ``0..N-1`` in order as :class:`Batch` es: short side resized to ``resize`` (default
    :func:`default_resize`), centre crop ``image_size``. ``workers=0`` runs in this process."""

    def __init__(self, shardset, batch_size: int, image_size: int, resize: int | None = None,
                 workers: int | None = None, *, decoder: str = "auto", cache_dir: str | None = None,
                 cache_bytes: int = 32 << 30, pin_memory: bool = False):
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        resize = default_resize(image_size) if resize is None else resize
        if cache_dir is None and not is_local(shardset.shard_url(0)):
            cache_dir = tempfile.mkdtemp(prefix="picstream-shards-")
            weakref.finalize(self, shutil.rmtree, cache_dir, True)
        self.reader = ShardReader(shardset, cache_dir, cache_bytes)
        self.dataset = _EvalStream(shardset, self.reader, batch_size, image_size, resize, decoder)
        self._pin = pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        if self.workers == 0:
            return iter(self.dataset)
        return iter(DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                               multiprocessing_context="fork", pin_memory=self._pin))
