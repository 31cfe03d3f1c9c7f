"""Content hashes of one image for make_shards' duplicate removal (dedup.py), and the hash pass that
computes them for the inputs of one plan list file (run as local processes or Dask tasks, like pack).

Per valid image: `file` (xxh3-64 of the file), `pixels` (xxh3-128 of the size and the decoded RGB
pixels after EXIF orientation: equal for the same picture under any lossless encoding), `phash`
(PHASH_BITS = 128-bit perceptual hash) and the area, format and size that choose which copy is kept. The
perceptual hash is a pHash made blind to horizontal flips (the trainer's augmentation flips, so an image
and its mirror are one instance): the grayscale 64x64 thumbnail's 2-D DCT, the 128 coefficients with
v = 0..15 and an even horizontal frequency u = 0, 2, ..., 14 (the ones a mirror leaves unchanged), one
bit each for "above their median"; bit 127 - k is coefficient k's (v-major), so a 16-bit band of the
hash is two rows v. An input that cannot be decoded gets no hash (pack then skips it with its reason).
The hash files are named after the hash (HASH_PREFIX): those of the former 64-bit hash are never read
as these, a re-run of the plan computes them anew.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass

import fsspec
import numpy as np
import xxhash
from PIL import Image, ImageOps

from . import format as F
from .convert import JPEG_FORMATS, ORIENTATION_TAG, _decode, _open, to_rgb
from .plan import output_op, plan_path
from .sources import read_sample

THUMB = 64  # side of the grayscale thumbnail the perceptual hash is computed from
ROWS = 16  # its vertical frequencies v = 0..ROWS-1 (horizontal: u = 0, 2, ..., 14)
PHASH_BITS = ROWS * 8
HASH_PREFIX = "hashes-p128-"  # plan/hashes-p128-<list file>: one record (or None) per input of that list


@dataclass(frozen=True)
class ImageHash:
    file: bytes  # xxh3-64 of the file
    pixels: bytes  # xxh3-128 of (width, height, RGB pixels)
    phash: int  # PHASH_BITS bits, flip-blind
    area: int  # width * height
    jpeg: bool  # a JPEG file (pack stores it as it is; other formats are re-encoded)
    size: int  # file bytes


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d


_DCT = _dct_matrix(THUMB)


def perceptual_hash(gray: np.ndarray) -> int:
    """The flip-blind pHash of a THUMB x THUMB grayscale array (float)."""
    coeffs = (_DCT[:ROWS] @ gray @ _DCT[0:16:2].T).ravel()  # rows v = 0..15, even columns u = 0..14
    return int.from_bytes(np.packbits(coeffs > np.median(coeffs)).tobytes(), "big")


def image_hash(data: bytes) -> ImageHash | None:
    """The hashes of one image file; None when it does not decode."""
    try:
        img = _open(data)
        jpeg = img.format in JPEG_FORMATS
        turned = img.getexif().get(ORIENTATION_TAG, 1) in range(2, 9)
        _decode(img)
        img = to_rgb(ImageOps.exif_transpose(img) if turned else img)
    except Exception:  # noqa: BLE001 - pack reports why the input is unusable
        return None
    w, h = img.size
    pixels = xxhash.xxh3_128(w.to_bytes(4, "big") + h.to_bytes(4, "big"))
    pixels.update(img.tobytes())
    gray = img.convert("L")
    factor = min(w, h) // (2 * THUMB)
    thumb = (gray.reduce(factor) if factor > 1 else gray).resize((THUMB, THUMB), Image.Resampling.BOX)
    return ImageHash(xxhash.xxh3_64_digest(data), pixels.digest(),
                     perceptual_hash(np.asarray(thumb, dtype=np.float64)), w * h, jpeg, len(data))


def hash_inputs(inputs, so: dict | None = None) -> list[ImageHash | None]:
    """The hashes of each input (None: unreadable or not an image)."""
    out = []
    for inp in inputs:
        try:
            data, _ = read_sample(inp.locator, so)
        except Exception:  # noqa: BLE001 - read errors are pack's to report
            out.append(None)
            continue
        out.append(image_hash(data))
    return out


def hash_file(name: str, out: str, storage_options: dict | None = None) -> int:
    """Hash the inputs of OUT's plan list `name` into `plan/hashes-<name>` (kept if it exists: the lists
    of one plan fingerprint never change). Returns the number of inputs hashed now."""
    fs, root = output_op(out, lambda: fsspec.core.url_to_fs(out, **(storage_options or {})))
    folder = plan_path(root)
    target = F.join(folder, HASH_PREFIX + name)
    if fs.exists(target):
        return 0
    inputs = pickle.loads(fs.cat_file(F.join(folder, name)))
    data = pickle.dumps(hash_inputs(inputs, storage_options), protocol=pickle.HIGHEST_PROTOCOL)
    output_op(out, lambda: F.write_atomic(fs, target, data))
    return len(inputs)


def load_hashes(fs, root: str, name: str) -> list[ImageHash | None]:
    """The hashes of OUT's plan list `name` (root: OUT's path on `fs`)."""
    return pickle.loads(fs.cat_file(F.join(plan_path(root), HASH_PREFIX + name)))
