"""Duplicate removal's decisions (dedup.py) against a brute-force oracle, and the image hashes."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image, ImageOps

from picstream.shards import dedup as D
from picstream.shards import plan as P
from picstream.shards.dedup import BANDS, Item, Removal, rank_key, removals
from picstream.shards.hashing import image_hash, perceptual_hash


def synthetic_items(n: int, n_eval: int, seed: int) -> list[Item]:
    """Items in clusters of near hashes (0-6 flipped bits from a centre), some with identical pixels."""
    rng = np.random.default_rng(seed)
    centres = [int.from_bytes(rng.bytes(16), "big") for _ in range(n // 4)]
    items = []
    for k in range(n + n_eval):
        c = centres[rng.integers(len(centres))]
        h = c ^ sum(1 << int(k) for k in rng.choice(128, rng.integers(0, 7), replace=False))
        pixels = (h % 5).to_bytes(16, "big") if rng.random() < 0.3 else rng.bytes(16)  # exact groups
        area, size = int(rng.integers(1, 4)) * 100, int(rng.integers(1, 3))
        is_eval = k >= n
        name = f"e{k}" if is_eval else f"t{k}"
        items.append(Item(rank_key(is_eval, area, True, size, name, k), -1 if is_eval else k, name,
                          "val" if is_eval else None, bytes([size]), pixels + bytes([area // 100]), h))
    return items


def oracle(items: list[Item], mode: str, threshold: int, with_eval: bool) -> list[Removal]:
    """The rule of dedup.py, by brute force over all pairs."""
    out = []
    survivors = []
    for _, group in itertools.groupby(sorted(items, key=lambda it: (it.pixels, it.rank)), lambda it: it.pixels):
        first, *rest = group
        survivors.append(first)
        for it in rest:
            if it.src is None and (first.src is not None or mode != "none"):
                out.append(Removal(it.g, "duplicate" if first.src is None else f"contaminates {first.src}",
                                   "identical bytes" if it.file == first.file else "identical pixels", first.name))
    if mode == "near":  # of equal perceptual hashes the first is searched, the others are its copies
        firsts = []
        for _, group in itertools.groupby(sorted(survivors, key=lambda it: (it.phash, it.rank)), lambda it: it.phash):
            first, *rest = group
            firsts.append(first)
            out += [Removal(it.g, "near-duplicate" if first.src is None else f"contaminates {first.src}",
                            "hamming 0", first.name) for it in rest if it.src is None]
        survivors = firsts
    if mode == "near" or with_eval:
        for j in survivors:
            if j.src is not None:
                continue
            cands = [i for i in survivors if i.rank < j.rank and bin(i.phash ^ j.phash).count("1") <= threshold
                     and (i.src is not None or mode == "near")]
            if cands:
                i = min(cands, key=lambda it: it.rank)
                out.append(Removal(j.g, "near-duplicate" if i.src is None else f"contaminates {i.src}",
                                   f"hamming {bin(i.phash ^ j.phash).count('1')}", i.name))
    return sorted(out)


@pytest.mark.parametrize("mode,n_eval", [("exact", 0), ("near", 0), ("none", 40), ("exact", 40), ("near", 40)])
def test_removals_match_the_brute_force_oracle(mode, n_eval, tmp_path, monkeypatch):
    # small runs and fan-in: every sort spills and merges in more than one pass
    monkeypatch.setattr(D, "RUN", 97)
    monkeypatch.setattr(P, "FAN_IN", 3)
    monkeypatch.setattr(D, "BATCH", 16)
    monkeypatch.setattr(D, "BLOCK", 2)  # buckets compared in several row and column blocks
    monkeypatch.setattr(D, "MEM_BLOCKS", 1)  # and the later row blocks of a bucket read back from disk
    items = synthetic_items(600, n_eval, seed=len(mode) + n_eval)
    threshold = BANDS - 1  # below BANDS differing bits the band search is exact (pigeonhole)
    got = list(removals(iter(items), mode, threshold, n_eval > 0, str(tmp_path / "scratch")))
    want = oracle(items, mode, threshold, n_eval > 0)
    assert got == want
    assert len({r.reason for r in got}) >= (2 if mode == "near" and n_eval else 1) and len(got) > 50
    assert not (tmp_path / "scratch").exists()


def test_the_kept_copy_is_the_largest_picture_then_a_jpeg_then_the_largest_file_then_the_first_name(tmp_path):
    def item(name, area, jpeg, size, g):
        return Item(rank_key(False, area, jpeg, size, name, g), g, name, None, b"f", b"p" * 16, 7)

    def kept(*items):
        got = list(removals(iter(items), "exact", 0, False, str(tmp_path / "s")))
        assert len(got) == len(items) - 1
        return {it.name for it in items} - {items[r.g].name for r in got}
    assert kept(item("b", 100, True, 5, 0), item("a", 100, True, 5, 1), item("c", 400, False, 1, 2)) == {"c"}
    assert kept(item("png", 100, False, 9, 0), item("q", 100, True, 5, 1), item("p", 100, True, 6, 2)) == {"p"}
    assert kept(item("b", 100, True, 5, 0), item("a", 100, True, 5, 1)) == {"a"}


def jpeg(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", **kw)
    return out.getvalue()


def test_image_hashes(imagenet_sample_dir):
    data = sorted(imagenet_sample_dir.iterdir())[0].read_bytes()
    img = Image.open(io.BytesIO(data)).convert("RGB")
    h = image_hash(data)
    png = io.BytesIO()
    img.save(png, "PNG")
    same = image_hash(png.getvalue())  # same pixels, another encoding
    assert (same.pixels, same.area) == (h.pixels, h.area) and same.file != h.file
    assert image_hash(jpeg(img, quality=40)).pixels != h.pixels
    mirror = image_hash(jpeg(ImageOps.mirror(img), quality=95))
    assert bin(mirror.phash ^ h.phash).count("1") <= 4  # the hash is blind to mirroring
    assert image_hash(b"not an image") is None and image_hash(data[:500]) is None
    # the perceptual hash: exactly 64 of the 128 coefficients above their median, mirror-invariant
    rng = np.random.default_rng(0)
    gray = rng.random((64, 64))
    assert bin(perceptual_hash(gray)).count("1") == 64
    assert perceptual_hash(gray) == perceptual_hash(gray[:, ::-1].copy())
