"""`cut_views` (the GPU decode path's crop step) on pixels decoded by the CPU decoder: the views equal
`decode_crops`' with the same full decoder exactly, from a whole image or from the union of the boxes."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from picstream.loader import WindowLoader
from picstream.loader.decode import DEFAULT_FULL, decode, decode_crops, decode_regions_on_host
from picstream.loader.device_crops import cut_views
from picstream.loader.geometry import DRAWS_PER_CROP, random_resized_crop, sample_uniforms
from picstream.loader.stream import crop_specs
from picstream.scheduler import SlidingWindowScheduler
from picstream.shards import ShardSet, make_shards


@pytest.mark.parametrize("window", [False, True], ids=["whole image", "union of the boxes"])
def test_cut_views_equal_the_cpu_crops(imagenet_sample_dir, window):
    jpegs = [f.read_bytes() for f in sorted(imagenet_sample_dir.iterdir())[:12]]
    specs = crop_specs(64, multi_crop=[(24, 2)])
    u = sample_uniforms(5, np.arange(len(jpegs)), DRAWS_PER_CROP * len(specs)).reshape(len(jpegs), len(specs), -1)
    expected = [torch.empty((len(jpegs), s.size, s.size, 3), dtype=torch.uint8) for s in specs]
    images, origins, boxes = [], [], []
    for i, data in enumerate(jpegs):
        decode_crops(data, u[i], specs, [e[i] for e in expected], DEFAULT_FULL)
        width, height = Image.open(io.BytesIO(data)).size
        box = [random_resized_crop(height, width, u[i, v], s) for v, s in enumerate(specs)]
        img, top0, left0 = decode(data, DEFAULT_FULL), 0, 0
        if window:
            top0, left0 = min(b[0] for b in box), min(b[1] for b in box)
            img = img[top0:max(b[0] + b[2] for b in box), left0:max(b[1] + b[3] for b in box)]
        images.append(img)
        origins.append((top0, left0))
        boxes.append(box)
    views = cut_views(images, np.array(origins), np.array(boxes, dtype=np.int64), [s.size for s in specs])
    assert any(b[4] for box in boxes for b in box) and any(not b[4] for box in boxes for b in box)
    for got, want in zip(views, expected):
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want.permute(0, 3, 1, 2))


def test_gpu_mode_batches_equal_the_cpu_path(imagenet_sample_dir, tmp_path):
    """decode="gpu" with the host decoder in place of the device call: the workers pass bytes and
    boxes, the iterating process decodes and cuts them; the batches equal the CPU path's exactly
    (any worker count)."""
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(imagenet_sample_dir.iterdir())[:40]:
        (src / f.name).symlink_to(f)
    make_shards(src, tmp_path / "shards", shard_size=8, seed=3, labels=False, progress=False)
    shards = ShardSet.open(tmp_path / "shards")
    sched = SlidingWindowScheduler(len(shards), 24, 8, seed=1)
    kw = dict(image_size=32, num_steps=6, seed=2, multi_crop=[(16, 2)], decoder=DEFAULT_FULL)
    with WindowLoader(shards, sched, 7, workers=0, **kw) as cpu:
        want = list(cpu)
    for workers in (0, 2):
        with WindowLoader(shards, sched, 7, workers=workers, decode="gpu",
                          decode_regions=decode_regions_on_host, **kw) as gpu:
            got = list(gpu)
        for a, b in zip(want, got):
            assert torch.equal(a.ids, b.ids) and b.images.is_contiguous(memory_format=torch.channels_last)
            assert all(torch.equal(x, y) for x, y in zip([a.images, *a.extra_crops], [b.images, *b.extra_crops]))
