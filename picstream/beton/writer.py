"""`write_beton`: a shard set as an FFCV .beton in picstream's ID order — fields `id` (IntField, = the
beton index), `label` (IntField, -1 when unlabeled) and `image` (RGBImageField in JPEG mode holding the
shards' JPEG bytes as they are; FFCV's own writer would re-encode them at quality 90)."""
from __future__ import annotations

import os

import numpy as np

from ..loader.decode import jpeg_size
from ..shards import ShardSet
from .dataset import import_ffcv

class _Samples:
    """The indexable dataset FFCV's writer reads: (id, label, (jpeg bytes, width, height))."""

    def __init__(self, shardset: ShardSet):
        self.shardset = shardset

    def __len__(self) -> int:
        return len(self.shardset)

    def __getitem__(self, i):
        data = self.shardset.read(int(i))
        width, height = jpeg_size(data)
        return int(i), int(self.shardset.labels([int(i)])[0]), (data, width, height)


def _store_jpeg_as_is(destination, value, malloc) -> None:
    """RGBImageField.encode for (JPEG bytes, width, height): JPEG mode, bytes unchanged."""
    data, width, height = value
    destination["mode"], destination["width"], destination["height"] = 0, width, height
    destination["data_ptr"], storage = malloc(len(data))
    storage[:] = np.frombuffer(data, np.uint8)


def write_beton(shardset: ShardSet, path: str, *, workers: int = 1) -> str:
    """Write `path` (atomically: `path.tmp`, then renamed); returns the path. Every stored sample is a
    JPEG (at most 65535 px a side, as FFCV's uint16 sizes need), so no writer worker can fail on one —
    which matters: FFCV's writer hangs when a worker raises."""
    writer_mod = import_ffcv("ffcv.writer")
    fields = import_ffcv("ffcv.fields")
    image = fields.RGBImageField(write_mode="jpg")
    image.encode = _store_jpeg_as_is  # an instance attribute: the field's type (and type id) stay FFCV's
    tmp = f"{path}.tmp"
    writer = writer_mod.DatasetWriter(tmp, {"id": fields.IntField(), "label": fields.IntField(),
                                            "image": image}, num_workers=workers)
    writer.from_indexed_dataset(_Samples(shardset), chunksize=64)
    os.replace(tmp, path)
    return path
