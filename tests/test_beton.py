"""FFCV .beton files: as a make_shards source (JPEG bytes as stored, raw pixels encoded), written by
`make_shards --format beton` in ID order, and trained on in place by BetonLoader (FFCV's Loader under
picstream's sliding-window order): the exact stream, rank split, resume, crops, and a training run."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require
from picstream.scheduler import SlidingWindowScheduler
from picstream.shards import ShardSet, make_shards

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "bird", "cat")
PER_CLASS = 16


@pytest.fixture(scope="module")
def ffcv():
    threads = torch.get_num_threads()  # importing ffcv sets torch to one thread
    module = require("ffcv")
    torch.set_num_threads(threads)
    return module


def write_beton(path: Path, rows, mode: str) -> None:
    """rows: (RGB uint8 array, label) with FFCV's own DatasetWriter (fields: image, label)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Rows:
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i][0], rows[i][1]

    DatasetWriter(str(path), {"image": RGBImageField(write_mode=mode), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Rows())


@pytest.fixture(scope="module")
def cifar_rows(cifar10_dir):
    """3 classes x 16 CIFAR-10 images as pixels, class-sorted (as FFCV's ImageNet recipe writes them)."""
    return [(np.asarray(Image.open(f).convert("RGB")), k) for k, c in enumerate(CLASSES)
            for f in sorted((cifar10_dir / "train" / c).iterdir())[:PER_CLASS]]


def by_src(out: Path) -> dict[str, tuple[bytes, int]]:
    ss = ShardSet.open(out)
    srcs = {}
    for k in range(ss.num_shards):
        import tarfile
        with tarfile.open(ss.shard_url(k)) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    srcs[int(m.name.split(".")[0])] = json.loads(tar.extractfile(m).read())["src"]
    labels = ss.labels(range(len(ss)))
    return {srcs[i]: (ss.read(i), int(labels[i])) for i in range(len(ss))}


def test_beton_source_jpeg_mode_is_stored_as_is(ffcv, cifar_rows, tmp_path):
    from ffcv.fields.rgb_image import encode_jpeg

    write_beton(tmp_path / "c.beton", cifar_rows, "jpg")
    summary = make_shards(tmp_path / "c.beton", tmp_path / "out", shard_size=16, progress=False)
    assert (summary.packed, summary.converted, summary.skipped) == (48, 0, 0)
    got = by_src(tmp_path / "out")
    # FFCV stored its own quality-90 encoding of each image: those bytes, unchanged, with the label
    assert got == {str(i): (encode_jpeg(img, 90).tobytes(), label) for i, (img, label) in enumerate(cifar_rows)}
    labels = ShardSet.open(tmp_path / "out").labels(range(48)).tolist()
    assert labels != sorted(labels)  # one permutation: the class-sorted beton is not class-sorted here


def test_beton_source_raw_mode_is_encoded(ffcv, cifar_rows, tmp_path):
    write_beton(tmp_path / "r.beton", cifar_rows[::4], "raw")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(tmp_path / "r.beton"),
                          str(tmp_path / "out"), "--quality", "100", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = by_src(tmp_path / "out")
    assert ShardSet.open(tmp_path / "out").manifest["converted"] == len(got) == 12
    for i, (img, label) in enumerate(cifar_rows[::4]):
        data, lab = got[str(i)]
        decoded = np.asarray(Image.open(io.BytesIO(data)))
        assert lab == label and decoded.shape == img.shape
        assert np.abs(decoded.astype(int) - img).mean() < 2  # JPEG at quality 100 (chroma subsampled)


def test_format_beton_round_trip(ffcv, cifar10_dir, tmp_path):
    """make_shards --format beton: shards + a .beton in the same ID order, JPEG bytes unchanged; the .beton
    read back as a source gives the same images and labels."""
    src = tmp_path / "src"
    for c in CLASSES:
        (src / c).mkdir(parents=True)
        for f in sorted((cifar10_dir / "train" / c).iterdir())[:10]:
            (src / c / f.name).symlink_to(f)
    run = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(src),
                          str(tmp_path / "c.beton"), "--format", "beton", "--shard-size", "8"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ss = ShardSet.open(tmp_path / "c.beton.shards")
    from picstream.beton import BetonSet
    beton = BetonSet(tmp_path / "c.beton")
    assert len(beton) == 30 and beton.order.tolist() == list(range(30))  # picstream order: ID = index
    table = beton.image_table()
    raw = (tmp_path / "c.beton").read_bytes()
    for i in range(30):
        assert raw[table["offset"][i]:table["offset"][i] + table["size"][i]] == ss.read(i)
    assert beton.labels_of_indices(range(30)).tolist() == ss.labels(range(30)).tolist()
    make_shards(tmp_path / "c.beton", tmp_path / "back", shard_size=8, progress=False)
    assert by_src(tmp_path / "back") == {str(i): (ss.read(i), int(ss.labels([i])[0])) for i in range(30)}
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(src), str(tmp_path / "x"),
                          "--format", "beton"], capture_output=True, text=True)
    assert bad.returncode == 2 and "ending in .beton" in bad.stderr


# Training in place --------------------------------------------------------------------------------

COLOURS = 40


@pytest.fixture(scope="module")
def coloured(ffcv, tmp_path_factory):
    """A .beton of 40 flat-colour 24x20 images, image i coloured (6i, 250 - 6i, 128): any crop says i."""
    path = tmp_path_factory.mktemp("coloured") / "c.beton"
    rows = [(np.full((24, 20, 3), (6 * i, 250 - 6 * i, 128), np.uint8), i % 3) for i in range(COLOURS)]
    write_beton(path, rows, "jpg")
    return path


def which(images: torch.Tensor) -> list[int]:
    return [round(float(im[0].float().mean()) / 6) for im in images]


def loader(path, batch, steps, **kw):
    from picstream.beton import BetonSet
    from picstream.beton.loader import BetonLoader

    beton = BetonSet(path, seed=5)
    sched = SlidingWindowScheduler(len(beton), 16, 4, seed=2)
    return beton, sched, BetonLoader(beton, sched, batch, image_size=8, num_steps=steps, seed=1, **kw)


def test_beton_loader_yields_the_window_stream(coloured):
    beton, sched, plain = loader(coloured, 6, 9, workers=2)
    assert sorted(beton.order.tolist()) == list(range(COLOURS)) and beton.order.tolist() != list(range(COLOURS))
    assert plain.pass_steps == 7 and len(plain) == 9  # passes of ceil(40 / 6) steps, the second cut short
    batches = list(plain)
    assert [b.step for b in batches] == list(range(9))
    for b in batches:
        ids = sched.ids_at(b.step * 6, b.step * 6 + 6)
        assert b.ids.tolist() == ids.tolist() and b.positions.tolist() == list(range(b.step * 6, b.step * 6 + 6))
        assert which(b.images) == beton.order[ids].tolist()  # FFCV decoded exactly those samples
        assert b.labels.tolist() == (beton.order[ids] % 3).tolist()
        assert b.images.dtype == torch.uint8 and b.images.is_contiguous(memory_format=torch.channels_last)
    # two ranks split each global batch; a resume at any step continues the same stream, bit for bit
    ranks = [list(loader(coloured, 3, 9, rank=r, world_size=2, workers=1)[2]) for r in (0, 1)]
    for j in range(9):
        assert ranks[0][j].ids.tolist() + ranks[1][j].ids.tolist() == sched.ids_at(6 * j, 6 * j + 6).tolist()
    resumed = list(loader(coloured, 6, 4, start_step=5, workers=1)[2])
    for a, b in zip(batches[5:], resumed):
        assert a.step == b.step and torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)
    # multi-crop: one decoder per view, every view of a slot cut from the same sample
    multi = list(loader(coloured, 6, 3, multi_crop=[(4, 2)], workers=2)[2])
    for a, b in zip(batches, multi):
        assert torch.equal(a.images, b.images) and [c.shape[-1] for c in b.extra_crops] == [4, 4]
        assert which(b.extra_crops[0]) == which(b.extra_crops[1]) == which(a.images)


@pytest.mark.parametrize("override", ["data.decode=gpu", "data.decoder=roi"])
def test_a_beton_refuses_picstreams_decoders_in_one_line(coloured, override):
    """FFCV decodes a .beton itself: picstream's decode settings are refused, naming the key."""
    from picstream.beton import BetonSet
    from picstream.config import ConfigError, load_config
    from picstream.distributed import World
    from picstream.train_data import train_loader_from_config

    beton = BetonSet(coloured, seed=5)
    config = load_config(None, [f"data.train={coloured}", "data.image_size=8", "optim.batch_size=6", override])
    with pytest.raises(ConfigError, match=f"config key 'data.{override[5:].split('=')[0]}': .* a .beton is decoded"):
        train_loader_from_config(config, beton, SlidingWindowScheduler(len(beton), 16, 4, seed=2), World(),
                                 torch.device("cpu"), start_step=0, num_steps=2)


def test_beton_loader_crops_follow_the_rule(ffcv, cifar_rows, tmp_path):
    """Each crop recomputed independently: the documented hash → uniforms → picstream's box rule → flip,
    cut from the stored JPEG and resized with OpenCV's INTER_AREA (what FFCV's resize_crop uses); a wrong
    box or flip would differ by tens of levels."""
    import cv2
    import simplejpeg

    from picstream.beton import BetonSet
    from picstream.beton.loader import BetonLoader
    from picstream.loader.geometry import DRAWS_PER_CROP, CropSpec, random_resized_crop

    write_beton(tmp_path / "c.beton", cifar_rows, "jpg")
    beton = BetonSet(tmp_path / "c.beton", seed=0)
    sched = SlidingWindowScheduler(len(beton), 24, 8, seed=0)
    seed, size = 7, 20
    batches = list(BetonLoader(beton, sched, 8, image_size=size, num_steps=3, seed=seed, workers=2,
                               multi_crop=[(12, 1, (0.3, 0.5))]))
    views = [(CropSpec(size), lambda b: b.images), (CropSpec(12, (0.3, 0.5)), lambda b: b.extra_crops[0])]
    table, raw = beton.image_table(), (tmp_path / "c.beton").read_bytes()
    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)
    golden = 0x9E3779B97F4A7C15
    flips = 0
    for view, (spec, output) in enumerate(views):
        key = int(np.random.SeedSequence([seed, view]).generate_state(1, np.uint64)[0])
        for b in batches:
            indices = beton.beton_indices(b.ids.numpy())
            batch_key = key
            for i in indices:
                batch_key = mix(batch_key ^ int(i))
            for slot, i in enumerate(indices):
                sample_key = mix((batch_key + (slot + 1) * golden) & mask)
                u = np.array([(mix((sample_key + (d + 1) * golden) & mask) >> 11) / 2**53
                              for d in range(DRAWS_PER_CROP)])
                img = simplejpeg.decode_jpeg(raw[table["offset"][i]:table["offset"][i] + table["size"][i]])
                top, left, h, w, flip = random_resized_crop(32, 32, u, spec)
                ref = cv2.resize(img[top:top + h, left:left + w], (spec.size,) * 2, interpolation=cv2.INTER_AREA)
                ref = ref[:, ::-1] if flip else ref
                flips += flip
                diff = np.abs(output(b)[slot].permute(1, 2, 0).numpy().astype(int) - ref)
                assert diff.mean() < 1.5 and diff.max() <= 10  # libjpeg-turbo builds differ by a few levels
    assert 0 < flips < 48


@pytest.mark.slow
def test_training_on_a_beton_in_place(ffcv, shapes_shards, tmp_path):
    """A few CPU steps on a .beton: loss decreases; a resume from a checkpoint is bit-identical."""
    from picstream.beton.writer import write_beton as write_picstream_beton
    from picstream.checkpoint import list_checkpoints, load_checkpoint
    from test_train import losses, train_cmd

    train, _ = shapes_shards  # 320 images
    beton = write_picstream_beton(ShardSet.open(train), str(tmp_path / "shapes.beton"))
    reference = tmp_path / "reference"
    subprocess.run(train_cmd(reference, beton, "optim.epochs=6"), check=True, capture_output=True, timeout=900)
    curve = [loss for _, loss in losses(reference)]
    # the loss first rises while the classifier meets new IDs (as on shards), then falls
    assert len(curve) == 60 and np.mean(curve[-10:]) < np.mean(curve[10:20]) - 0.2

    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for ckpt in list_checkpoints(resumed / "checkpoints"):
        if load_checkpoint(ckpt)["step"] > 30:
            ckpt.unlink()
    result = subprocess.run(train_cmd(resumed, beton, "optim.epochs=6"), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0 and "resumed from" in result.stderr, result.stderr
    assert losses(resumed) == losses(reference)
    final = [load_checkpoint(list_checkpoints(d / "checkpoints")[-1]) for d in (reference, resumed)]
    for key, value in final[0]["model"].items():
        assert torch.equal(value, final[1]["model"][key]), key
    missing = subprocess.run(train_cmd(tmp_path / "x", tmp_path / "missing.beton"), capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"picstream-train: error: cannot open {tmp_path / 'missing.beton'}: no such .beton file: "
        f"{tmp_path / 'missing.beton'}"]
