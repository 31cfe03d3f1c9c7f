"""WindowLoader / EvalLoader on real shards of real JPEGs: crops, determinism, split, resume, errors."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchcodec.decoders import decode_jpeg
from torchvision.transforms import RandomResizedCrop

from PIL import Image

from picstream.loader import EvalLoader, WindowLoader
from picstream.loader.decode import jpeg_frame
from picstream.loader.stream import BrokenShardSet
from picstream.loader.geometry import (DRAWS_PER_CROP, CropSpec, random_resized_crop,
                                       sample_uniforms)
from picstream.scheduler import EpochScheduler, SlidingWindowScheduler
from picstream.shards import ShardSet, make_shards


@pytest.fixture(scope="module")
def photos(imagenet_sample_dir, tmp_path_factory) -> ShardSet:
    """96 real ImageNet photos (various sizes) in 6 shards of 16."""
    src = tmp_path_factory.mktemp("photos-src")
    for f in sorted(imagenet_sample_dir.iterdir())[:96]:
        (src / f.name).symlink_to(f)
    out = tmp_path_factory.mktemp("photos-shards")
    make_shards(src, out, shard_size=16, seed=1, labels=False, progress=False)
    return ShardSet.open(out)


@pytest.fixture(scope="module")
def labelled(imagenet_sample_dir, tmp_path_factory) -> ShardSet:
    """100 other photos in two class folders (labels 0, 1), in shards of 8 (the last one short)."""
    src = tmp_path_factory.mktemp("labelled-src")
    files = sorted(imagenet_sample_dir.iterdir())[200:300]
    for cls, chunk in (("a", files[:50]), ("b", files[50:])):
        (src / cls).mkdir()
        for f in chunk:
            (src / cls / f.name).symlink_to(f)
    out = tmp_path_factory.mktemp("labelled-shards")
    make_shards(src, out, shard_size=8, seed=2, progress=False)
    return ShardSet.open(out)


def decoded(ss: ShardSet, sample_id: int) -> torch.Tensor:
    return decode_jpeg(ss.read(sample_id), mode="RGB")


def reference_crop(ss: ShardSet, sample_id: int, position: int, seed: int, spec: CropSpec,
                   which: int = 0, crops: int = 1) -> torch.Tensor:
    """The crop recomputed independently: ShardSet.read → decode → torchvision resized_crop."""
    img = decoded(ss, sample_id)
    u = sample_uniforms(seed, np.array([position]), DRAWS_PER_CROP * crops)[0]
    top, left, h, w, flip = random_resized_crop(img.shape[1], img.shape[2],
                                                u[which * DRAWS_PER_CROP:(which + 1) * DRAWS_PER_CROP],
                                                spec)
    out = TF.resized_crop(img, top, left, h, w, [spec.size, spec.size], antialias=True)
    return TF.horizontal_flip(out) if flip else out


def batches(loader) -> list:
    with loader:
        return list(loader)


def test_crop_geometry_matches_torchvision_distribution():
    """Our counter-driven RandomResizedCrop vs torchvision's get_params: same distribution."""
    spec = CropSpec(224)
    u = sample_uniforms(0, np.arange(8000), DRAWS_PER_CROP)
    ours = np.array([random_resized_crop(375, 500, row, spec)[:4] for row in u], dtype=float)
    torch.manual_seed(0)
    img = torch.empty(3, 375, 500)
    theirs = np.array([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3])
                       for _ in range(8000)], dtype=float)
    for col in range(4):
        q = np.linspace(0.05, 0.95, 10)
        np.testing.assert_allclose(np.quantile(ours[:, col], q), np.quantile(theirs[:, col], q),
                                   rtol=0.05, atol=6)
    tiny = random_resized_crop(10, 400, u[0], spec)          # extreme aspect: centre fallback
    assert tiny[:4] == (0, (400 - round(10 * 4 / 3)) // 2, 10, round(10 * 4 / 3))


@pytest.mark.parametrize("decoder", ["simplejpeg", "torchcodec"])
def test_crops_match_independent_reference(photos, decoder):
    sched = SlidingWindowScheduler(len(photos), 48, 16, seed=3)
    loader = WindowLoader(photos, sched, 8, image_size=96, workers=0, num_steps=2, seed=11,
                          decoder=decoder)
    spec = loader.specs[0]
    flips = 0
    for b in batches(loader):
        assert b.images.dtype == torch.uint8 and b.images.shape == (8, 3, 96, 96)
        np.testing.assert_array_equal(b.ids.numpy(), sched.ids_at(b.step * 8, b.step * 8 + 8))
        for i in range(len(b)):
            ref = reference_crop(photos, int(b.ids[i]), int(b.positions[i]), 11, spec)
            assert (b.images[i].int() - ref.int()).abs().max() <= 1
            u = sample_uniforms(11, b.positions[i:i + 1].numpy(), DRAWS_PER_CROP)[0]
            flips += u[-1] < 0.5
    assert 0 < flips < 16


def test_draft_decoding_is_close_to_full_decode(photos):
    """decoder='auto' uses JPEG DCT downscaling for small crops: close to the full-size result."""
    sched = EpochScheduler(len(photos), seed=0)
    loader = WindowLoader(photos, sched, 16, image_size=48, crop_scale=(0.5, 1.0), workers=0,
                          num_steps=1, seed=5, decoder="auto")
    b = batches(loader)[0]
    refs = torch.stack([reference_crop(photos, int(i), int(p), 5, loader.specs[0])
                        for i, p in zip(b.ids, b.positions)])
    diff = (b.images.float() - refs.float()).abs()
    assert diff.mean() < 4 and diff.mean(dim=(1, 2, 3)).max() < 12


def test_same_batches_for_any_worker_count(labelled):
    sched = SlidingWindowScheduler(len(labelled), 40, 8, seed=1)
    kw = dict(image_size=24, num_steps=7, seed=4, multi_crop=[(16, 1), (8, 2)])
    a = batches(WindowLoader(labelled, sched, 6, workers=0, **kw))
    b = batches(WindowLoader(labelled, sched, 6, workers=3, **kw))
    assert [x.step for x in b] == list(range(7))
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.ids, y.ids)
        assert len(x.extra_crops) == 3 and all(torch.equal(c, d) for c, d in
                                                zip(x.extra_crops, y.extra_crops))
    assert [c.shape[-1] for c in a[0].extra_crops] == [16, 8, 8]


def test_labels_and_extra_crop_scales(labelled):
    sched = EpochScheduler(len(labelled), seed=0)
    loader = WindowLoader(labelled, sched, 10, image_size=32, workers=0, num_steps=3, decoder="simplejpeg",
                          multi_crop=[(24, 1), (8, 2)])
    assert [s.scale for s in loader.specs] == [(0.2, 1.0), (0.2, 1.0), (0.08, 0.14), (0.08, 0.14)]
    for b in batches(loader):
        np.testing.assert_array_equal(b.labels.numpy(), labelled.labels(b.ids.numpy()))
        assert set(b.labels.tolist()) <= {0, 1}
        ref = reference_crop(labelled, int(b.ids[0]), int(b.positions[0]), 0, loader.specs[2], 2, 4)
        assert (b.extra_crops[1][0].int() - ref.int()).abs().max() <= 1


def test_resume_reproduces_the_same_batches(labelled):
    sched = SlidingWindowScheduler(len(labelled), 32, 8, seed=2)
    full = batches(WindowLoader(labelled, sched, 4, image_size=16, workers=0, num_steps=12, seed=1))
    resumed = batches(WindowLoader(labelled, sched, 4, image_size=16, workers=2, start_step=5,
                                   num_steps=7, seed=1))
    assert [b.step for b in resumed] == list(range(5, 12))
    for x, y in zip(full[5:], resumed):
        assert torch.equal(x.images, y.images) and torch.equal(x.ids, y.ids)


def test_ranks_split_the_stream_exactly_once(labelled):
    sched = SlidingWindowScheduler(len(labelled), 64, 16, seed=0)
    per_rank = [batches(WindowLoader(labelled, sched, 5, image_size=8, rank=r, world_size=3,
                                     workers=2, num_steps=9)) for r in range(3)]
    assert all(len(b) == 9 for b in per_rank)
    ids = torch.cat([b.ids for rank in per_rank for b in rank]).numpy()
    np.testing.assert_array_equal(np.sort(ids), np.sort(sched.ids_at(0, 9 * 5 * 3)))
    np.testing.assert_array_equal(per_rank[2][4].ids.numpy(), sched.ids_at(4 * 15 + 10, 4 * 15 + 15))


def test_bad_samples_are_skipped_counted_and_refilled(labelled, tmp_path):
    """A damaged sample (fails its checksum) and an undecodable one (intact per its checksum): each
    is skipped with its reason and its slot refilled by the next stream ID after the batch."""
    broken_dir = tmp_path / "broken"
    shutil.copytree(labelled.root, broken_dir)
    damaged, undecodable = 13, 14
    size = labelled.shard_size
    for victim in (damaged, undecodable):
        offset, nbytes, _ = labelled.index(victim // size)[victim % size]
        with open(broken_dir / f"shard-{victim // size:06d}.tar", "r+b") as f:  # junk over the header
            f.seek(int(offset))
            f.write(b"\x00not an image" * 4)
    junk = (broken_dir / "shard-000001.tar").read_bytes()
    off, nbytes, _ = labelled.index(1)[undecodable % size]
    reindex(broken_dir, 1, undecodable % size, junk[off:off + nbytes])
    broken = ShardSet.open(broken_dir)
    sched = EpochScheduler(len(broken), seed=0)
    got = batches(WindowLoader(broken, sched, 25, image_size=16, workers=0, num_steps=4))
    bad = [b for b in got if b.skipped]
    assert sum(b.skipped for b in got) == 2 and all(len(b) == 25 for b in got)
    assert sum((Counter(b.skip_reasons) for b in bad), Counter()) == {"damaged": 1, "decode": 1}
    ids = torch.cat([b.ids for b in got]).tolist()
    assert damaged not in ids and undecodable not in ids
    for b in bad:   # the refill: the slot's position, the first later stream ID not in the batch
        stream = sched.ids_at(b.step * 25, b.step * 25 + 25).tolist()
        spares = [i for i in sched.ids_at(b.step * 25 + 25, b.step * 25 + 50).tolist() if i not in stream]
        slots = [stream.index(v) for v in (damaged, undecodable) if v in stream]
        assert [b.ids[s].item() for s in slots] == spares[:len(slots)]
        assert b.positions.tolist() == list(range(b.step * 25, b.step * 25 + 25))
    resumed = batches(WindowLoader(broken, sched, 25, image_size=16, workers=2, num_steps=1,
                                   start_step=bad[0].step))
    assert torch.equal(resumed[0].images, bad[0].images) and torch.equal(resumed[0].ids, bad[0].ids)


def test_roi_batches_equal_the_full_decode_batches(imagenet_sample_dir, tmp_path):
    """decoder="roi" decodes each batch's crop windows in one nvImageCodec call: its batches equal the full
    decoder's exactly (0 and 2 workers, multi-crop), with a CMYK JPEG, a grayscale one and a PNG among the
    photos (decoded in full), and in one batch a truncated JPEG (intact per its checksum, its frame header
    readable: skipped as "decode" only once its window fails) before a damaged sample (skipped at its read):
    both slots are refilled in slot order, as the full decoder's path does."""
    from conftest import require

    require("nvidia.nvimgcodec")
    src = tmp_path / "src"
    src.mkdir()
    files = sorted(imagenet_sample_dir.iterdir())[300:340]
    for f in files:
        (src / f.name).symlink_to(f)
    photo = Image.open(files[0])
    photo.convert("CMYK").save(src / "cmyk.jpg", quality=90)
    photo.convert("L").save(src / "gray.jpg", quality=90)
    photo.save(src / "photo.png")
    make_shards(src, tmp_path / "shards", shard_size=8, seed=4, labels=False, progress=False)
    ss = ShardSet.open(tmp_path / "shards")
    sched = EpochScheduler(len(ss), seed=0)
    first = sched.ids_at(0, 11).tolist()   # batch 0: a truncated JPEG, then a damaged sample in a later slot
    truncated_at = next(j for j, i in enumerate(first[:-1]) if (jpeg_frame(ss.read(i)) or (0, 0, 0))[2] == 3)
    victim, damaged = first[truncated_at], first[truncated_at + 1]
    data = ss.read(victim)
    for sample_id, junk in ((victim, None), (damaged, b"\x00not an image" * 4)):
        k, row = divmod(sample_id, ss.shard_size)
        offset, nbytes, _ = ss.index(k)[row]
        new = junk or data[:nbytes // 2].ljust(nbytes, b"\0")   # same length: the tar stays as it is
        with open(tmp_path / "shards" / f"shard-{k:06d}.tar", "r+b") as f:
            f.seek(int(offset))
            f.write(new)
        if junk is None:   # the truncated JPEG passes its checksum; the damaged sample does not
            reindex(tmp_path / "shards", k, row, new)
    ss = ShardSet.open(tmp_path / "shards")
    assert jpeg_frame(ss.read(victim)) == jpeg_frame(data)
    kw = dict(image_size=48, num_steps=4, seed=3, multi_crop=[(24, 2)])
    want = batches(WindowLoader(ss, sched, 11, workers=0, decoder="simplejpeg", **kw))   # all 43 samples
    assert want[0].skip_reasons == {"decode": 1, "damaged": 1}
    for workers in (0, 2):
        got = batches(WindowLoader(ss, sched, 11, workers=workers, decoder="roi", **kw))
        for x, y in zip(want, got, strict=True):
            assert torch.equal(x.ids, y.ids) and x.skip_reasons == y.skip_reasons
            assert all(torch.equal(p, q) for p, q in zip([x.images, *x.extra_crops], [y.images, *y.extra_crops]))


def reindex(root, k: int, row: int, data: bytes) -> None:
    """Make row `row` of shard k's index (and the manifest's index sha256) accept `data`."""
    from picstream.shards.format import manifest_bytes, sample_checksum, sha256_hex

    idx_path = root / f"shard-{k:06d}.idx"
    rows = np.fromfile(idx_path, dtype="<i8").reshape(-1, 4)
    rows[row, 3] = sample_checksum(data)
    idx_path.write_bytes(rows.tobytes())
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][k]["index_sha256"] = sha256_hex(rows.tobytes())
    (root / "manifest.json").write_bytes(manifest_bytes(manifest))


def test_len_and_validation(labelled):
    sched = EpochScheduler(len(labelled))
    assert len(WindowLoader(labelled, sched, 4, num_steps=3, workers=0)) == 3
    with pytest.raises(TypeError):
        len(WindowLoader(labelled, sched, 4, workers=0))
    with pytest.raises(ValueError):
        WindowLoader(labelled, EpochScheduler(len(labelled) + 1), 4, workers=0)
    with pytest.raises(ValueError):
        WindowLoader(labelled, sched, 4, rank=2, world_size=2, workers=0)


def test_eval_loader_in_order_with_center_crop(photos):
    loader = EvalLoader(photos, batch_size=20, image_size=64, workers=2)
    got = list(loader)
    assert len(loader) == len(got) == 5
    assert torch.cat([b.ids for b in got]).tolist() == list(range(len(photos)))
    b = got[1]
    for i in (0, 7):
        img = decoded(photos, int(b.ids[i]))
        ref = TF.center_crop(TF.resize(img, [73], antialias=True), [64, 64])    # 64·8/7 ≈ 73
        assert (b.images[i].int() - ref.int()).abs().max() <= 1
    small = next(iter(EvalLoader(photos, 4, image_size=32, workers=0)))   # < 64: no resize
    assert torch.equal(small.images[0], TF.center_crop(decoded(photos, 0), [32, 32]))


def test_augment_in_workers_is_deterministic(labelled):
    from picstream.loader import PhotometricAugment
    from picstream.loader.stream import _generator
    sched = SlidingWindowScheduler(len(labelled), 40, 8, seed=1)
    aug = PhotometricAugment()
    kw = dict(image_size=16, num_steps=3, seed=7, multi_crop=[(8, 1)])
    plain = batches(WindowLoader(labelled, sched, 5, workers=0, **kw))
    augmented = batches(WindowLoader(labelled, sched, 5, workers=2, augment=aug, **kw))
    for p, a in zip(plain, augmented):
        assert a.images.dtype == torch.float32 and a.images.shape == (5, 3, 16, 16)
        torch.testing.assert_close(a.images, aug(p.images, _generator(7, p.step, 0)))
        torch.testing.assert_close(a.extra_crops[0], aug(p.extra_crops[0], _generator(7, p.step, 1)))


def test_jpeg_size_matches_pillow(imagenet_sample_dir, tmp_path):
    import io

    from PIL import Image

    from picstream.loader.decode import jpeg_size
    files = sorted(imagenet_sample_dir.iterdir())[:200]
    for f in files:
        data = f.read_bytes()
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size
    img = Image.open(files[0]).convert("RGB")
    for fmt, kw in (("JPEG", dict(progressive=True)), ("JPEG", dict(exif=b"Exif\0\0" + b"\0" * 64))):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        assert jpeg_size(buf.getvalue()) == img.size
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert jpeg_size(buf.getvalue()) is None and jpeg_size(b"\xff\xd8\xff") is None


def test_refills_of_two_ranks_never_share_an_id(labelled, tmp_path):
    """Two ranks (as torchrun runs them: one loader per rank) over a set with a deleted shard, skips
    on: every slot is refilled, and no ID appears twice in any global batch."""
    root = tmp_path / "gappy"
    shutil.copytree(labelled.root, root)
    (root / "shard-000002.tar").unlink()
    ss = ShardSet.open(root)
    sched = SlidingWindowScheduler(len(ss), 48, 16, seed=3)
    ranks = [batches(WindowLoader(ss, sched, 6, image_size=8, rank=r, world_size=2, workers=0,
                                  num_steps=12, on_missing="skip")) for r in (0, 1)]
    assert all(len(b) == 6 for bs in ranks for b in bs)
    assert sum(b.skipped for bs in ranks for b in bs) >= 8
    for a, b in zip(*ranks):
        ids = torch.cat([a.ids, b.ids]).tolist()
        assert len(set(ids)) == len(ids) and not any(16 <= i < 24 for i in ids), a.step
    refilled = {b.step for bs in ranks for b in bs if b.skipped}
    assert len(refilled) >= 3                                   # refills in several global batches


def test_a_missing_shard_stops_the_loader_with_one_line(labelled, tmp_path):
    root = tmp_path / "gappy"
    shutil.copytree(labelled.root, root)
    (root / "shard-000002.tar").unlink()
    loader = WindowLoader(ShardSet.open(root), EpochScheduler(len(labelled), seed=0), 25, image_size=8,
                          workers=0, num_steps=4)
    with pytest.raises(BrokenShardSet) as err:
        batches(loader)
    assert str(err.value) == (f"shard 2 is missing: {root / 'shard-000002.tar'}, which the manifest of {root} "
                              "lists: the shard set is incomplete; restore it, or set data.on_missing=skip "
                              "to train on without it")
