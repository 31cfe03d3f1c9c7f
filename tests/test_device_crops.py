"""`cut_views` (the GPU decode path's crop step) on pixels decoded by the CPU decoder: the views equal
`decode_crops`' with the same full decoder exactly, from a whole image or from the union of the boxes; the
float32 resize of non-CPU devices is within 1 level of the uint8 kernel; the batched nvImageCodec region
decode (CPU back end) equals the host decode exactly, its host fallbacks counted; the loader's GPU decode
mode with it yields the CPU path's batches."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require
from odd_jpegs import ODD_JPEGS
from picstream.config import ConfigError, load_config
from picstream.distributed import World
from picstream.loader import WindowLoader
from picstream.loader.decode import DEFAULT_FULL, _resize, crop_boxes, decode, decode_crops, decode_regions_on_host
from picstream.loader.device_crops import cut_views
from picstream.loader.geometry import DRAWS_PER_CROP, random_resized_crop, sample_uniforms
from picstream.loader.nvimgcodec_regions import (FAILED, FOUR_COMPONENTS, NOT_JPEG, NvImageCodecRegions,
                                                 UndecodableSample)
from picstream.loader.stream import _encoded, crop_specs
from picstream.scheduler import SlidingWindowScheduler
from picstream.shards import ShardSet, make_shards
from picstream.train_data import train_loader_from_config


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


def test_float_resize_is_within_one_level_of_the_uint8_kernel(imagenet_sample_dir):
    """The float32 → round → uint8 resize (what non-CPU devices run, forced here on the CPU) against torch's
    uint8 antialias kernel, on the 224 + 2x96 crops of 100 photos (down- and upscaling): at most 1 level
    apart (measured: 1, on about 16 % of the values; the uint8 kernel rounds fixed-point weights)."""
    files = sorted(imagenet_sample_dir.iterdir())[:100]
    specs = crop_specs(224, multi_crop=[(96, 2)])
    u = sample_uniforms(0, np.arange(len(files)), DRAWS_PER_CROP * len(specs)).reshape(len(files), len(specs), -1)
    worst, differing, values, scales = 0, 0, 0, set()
    for f, row in zip(files, u):
        data = f.read_bytes()
        img = decode(data, DEFAULT_FULL)
        for (top, left, h, w, _), spec in zip(crop_boxes(data, row, specs), specs):
            x = img[top:top + h, left:left + w]
            got = _resize(x, (spec.size, spec.size), via_float=True)
            assert got.dtype == torch.uint8 and got.shape == (spec.size, spec.size, 3)
            d = (got.int() - _resize(x, (spec.size, spec.size)).int()).abs()
            worst, differing, values = max(worst, int(d.max())), differing + int((d > 0).sum()), values + d.numel()
            scales.add(min(h, w) > spec.size)
    assert scales == {True, False}
    assert worst == 1 and 0.05 < differing / values < 0.3


def _union_regions(datas: list[bytes], seed: int, specs) -> np.ndarray:
    """Each sample's region as the loader's workers send it: the union of its crop boxes."""
    u = sample_uniforms(seed, np.arange(len(datas)), DRAWS_PER_CROP * len(specs)).reshape(len(datas), len(specs), -1)
    return _encoded([(d, crop_boxes(d, row, specs)) for d, row in zip(datas, u)], len(specs)).regions


def assert_regions_equal_the_host_decode(decode_regions, datas: list[bytes], regions: np.ndarray) -> None:
    got = decode_regions(datas, regions)
    want = decode_regions_on_host(datas, regions)
    assert len(got) == len(want) == len(datas)
    for (_, _, h, w), x, y in zip(regions.tolist(), got, want):
        assert x.shape == (h, w, 3) and x.dtype == torch.uint8 and x.device == torch.device("cpu")
        assert torch.equal(x, y)


def test_batched_region_decode_equals_the_host_decode(imagenet_sample_dir):
    """Tolerance 0, the CPU back end, the whole ImageNet sample in batches of 100 (one decode call each),
    the regions the loader sends for 1x224 + 2x96 crops: no sample falls back to the host."""
    require("nvidia.nvimgcodec")
    decode_regions = NvImageCodecRegions("cpu")
    files = sorted(imagenet_sample_dir.iterdir())
    specs = crop_specs(224, multi_crop=[(96, 2)])
    for start in range(0, len(files), 100):
        datas = [f.read_bytes() for f in files[start:start + 100]]
        assert_regions_equal_the_host_decode(decode_regions, datas, _union_regions(datas, start, specs))
    assert not decode_regions.fallbacks


def test_batched_region_decode_equals_the_host_decode_on_odd_jpegs():
    """Tolerance 0 on every kind of ODD_JPEGS in one batch, 10 draws of 1x40 + 3x24 crops each; the CMYK and
    YCCK JPEGs (only they) take the host's full decode, and are counted."""
    require("nvidia.nvimgcodec")
    decode_regions = NvImageCodecRegions("cpu")
    datas = [data for data, _, _ in ODD_JPEGS.values()] * 10
    regions = _union_regions(datas, 0, crop_specs(40, multi_crop=[(24, 3)]))
    assert_regions_equal_the_host_decode(decode_regions, datas, regions)
    four = sum(components == 4 for _, components, _ in ODD_JPEGS.values())
    assert four == 2 and decode_regions.fallbacks == {FOUR_COMPONENTS: 10 * four}


def test_region_decode_falls_back_to_the_host_and_counts_it():
    """A non-JPEG (a PNG) and a CMYK JPEG take the host's full decode, cut to the region, counted by reason;
    a truncated JPEG (its header intact, as a worker passes it) fails on nvImageCodec and on the host: it
    raises UndecodableSample naming its place in the batch, and so does a byte string that is no image."""
    require("nvidia.nvimgcodec")
    png = io.BytesIO()
    Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)).save(png, "PNG")
    rgb, cmyk = ODD_JPEGS["4:2:0"][0], ODD_JPEGS["CMYK"][0]
    regions = np.array([[3, 5, 30, 41], [10, 20, 100, 200], [0, 0, 251, 333]])
    decode_regions = NvImageCodecRegions("cpu")
    got = decode_regions([png.getvalue(), cmyk, rgb], regions)
    assert torch.equal(got[0], decode(png.getvalue(), "auto")[3:33, 5:46])
    assert torch.equal(got[1], decode(cmyk, DEFAULT_FULL)[10:110, 20:220])
    assert torch.equal(got[2], decode(rgb, DEFAULT_FULL))
    assert decode_regions.fallbacks == {NOT_JPEG: 1, FOUR_COMPONENTS: 1}
    for bad, reason in ((rgb[:len(rgb) // 2], FAILED), (b"not an image", NOT_JPEG)):
        with pytest.raises(UndecodableSample, match="sample 1 of the batch") as err:
            decode_regions([rgb, bad], regions[1:])
        assert err.value.index == 1 and decode_regions.fallbacks[reason] >= 1
    assert decode_regions.fallbacks == {NOT_JPEG: 2, FOUR_COMPONENTS: 1, FAILED: 1}


@pytest.fixture(scope="module")
def sample_shards(imagenet_sample_dir, tmp_path_factory):
    """40 photos of the ImageNet sample as a shard set of 8-sample shards: its folder."""
    root = tmp_path_factory.mktemp("sample-shards")
    (root / "src").mkdir()
    for f in sorted(imagenet_sample_dir.iterdir())[:40]:
        (root / "src" / f.name).symlink_to(f)
    make_shards(root / "src", root / "shards", shard_size=8, seed=3, labels=False, progress=False)
    return root / "shards"


@pytest.mark.parametrize("decoder", ["host", "nvimgcodec"],
                         ids=["host decode", "nvImageCodec CPU back end"])
def test_gpu_mode_batches_equal_the_cpu_path(sample_shards, decoder):
    """decode="gpu" with the host decoder, or nvImageCodec's batched region decode on its CPU back end, in
    place of the device call: the workers pass bytes and boxes, the iterating process decodes and cuts
    them; the batches equal the CPU path's exactly (any worker count)."""
    if decoder == "nvimgcodec":
        require("nvidia.nvimgcodec")
    decode_regions = NvImageCodecRegions("cpu", DEFAULT_FULL) if decoder == "nvimgcodec" else decode_regions_on_host
    shards = ShardSet.open(sample_shards)
    sched = SlidingWindowScheduler(len(shards), 24, 8, seed=1)
    kw = dict(image_size=32, num_steps=6, seed=2, multi_crop=[(16, 2)], decoder=DEFAULT_FULL)
    with WindowLoader(shards, sched, 7, workers=0, **kw) as cpu:
        want = list(cpu)
    for workers in (0, 2):
        with WindowLoader(shards, sched, 7, workers=workers, decode="gpu",
                          decode_regions=decode_regions, **kw) as gpu:
            got = list(gpu)
        assert len(got) == len(want) == 6
        for a, b in zip(want, got):
            assert torch.equal(a.ids, b.ids) and b.images.is_contiguous(memory_format=torch.channels_last)
            assert all(torch.equal(x, y) for x, y in zip([a.images, *a.extra_crops], [b.images, *b.extra_crops]))
    assert not getattr(decode_regions, "fallbacks", None)


def test_trainer_loader_decodes_gpu_mode_with_the_given_call(sample_shards):
    """`train_loader_from_config` under data.decode: gpu: refused in one line on the CPU without a decode
    call (the trainer's own, nvImageCodec on the device, needs CUDA); given nvImageCodec's CPU back end, its
    batches are those with the host decode given (the CPU path's, test above)."""
    require("nvidia.nvimgcodec")
    shards = ShardSet.open(sample_shards)
    sched = SlidingWindowScheduler(len(shards), 24, 8, seed=1)
    config = load_config(None, [f"data.train={sample_shards}", "data.image_size=32", "data.workers=0",
                                "optim.batch_size=7", "data.multi_crop=[[16,2]]", "data.decode=gpu"])
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="gpu needs a CUDA device and nvImageCodec"):
        train_loader_from_config(config, shards, sched, World(), cpu, start_step=0, num_steps=3)
    batches = {}
    for name, decode_regions in (("host", decode_regions_on_host), ("nvimgcodec", NvImageCodecRegions(cpu))):
        with train_loader_from_config(config, shards, sched, World(), cpu, start_step=0, num_steps=3,
                                      decode_regions=decode_regions) as loader:
            assert loader.decode_regions is decode_regions
            batches[name] = list(loader)
    assert len(batches["host"]) == len(batches["nvimgcodec"]) == 3 and not decode_regions.fallbacks
    for a, b in zip(batches["host"], batches["nvimgcodec"]):
        assert torch.equal(a.ids, b.ids) and len(b.extra_crops) == 2
        assert all(torch.equal(x, y) for x, y in zip([a.images, *a.extra_crops], [b.images, *b.extra_crops]))


def test_trainer_loader_decodes_with_data_decoder(sample_shards):
    """`data.decoder: roi` reaches the WindowLoader, whose batches equal those of a full decoder."""
    require("nvidia.nvimgcodec")
    shards = ShardSet.open(sample_shards)
    sched = SlidingWindowScheduler(len(shards), 24, 8, seed=1)
    batches = {}
    for decoder in ("roi", "simplejpeg"):
        config = load_config(None, [f"data.train={sample_shards}", "data.image_size=32", "data.workers=0",
                                    "optim.batch_size=7", "data.multi_crop=[[16,2]]", f"data.decoder={decoder}"])
        with train_loader_from_config(config, shards, sched, World(), torch.device("cpu"), start_step=0,
                                      num_steps=3) as loader:
            assert loader.dataset.maker.decoder == decoder
            batches[decoder] = list(loader)
    for a, b in zip(batches["roi"], batches["simplejpeg"], strict=True):
        assert torch.equal(a.ids, b.ids)
        assert all(torch.equal(x, y) for x, y in zip([a.images, *a.extra_crops], [b.images, *b.extra_crops]))
