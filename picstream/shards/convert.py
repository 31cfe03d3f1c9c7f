"""Validate one input image and decide how it is stored: original JPEG bytes, or re-encoded RGB JPEG."""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Formats we decode and (unless a plain JPEG) convert; anything else Pillow opens is "unsupported".
SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "WEBP", "TIFF", "BMP", "PPM"}
JPEG_FORMATS = {"JPEG", "MPO"}
JPEG_MODES_AS_IS = {"RGB", "L"}
ORIENTATION_TAG = 0x0112

# Skip reasons (the `reason` field of manifest["skipped"]).
EMPTY, NOT_IMAGE, UNSUPPORTED, TRUNCATED, CORRUPT, BOMB, READ_ERROR = (
    "empty", "not_image", "unsupported", "truncated", "corrupt", "bomb", "read_error")


class Skip(Exception):
    """The input cannot be packed; `reason` is one of the skip reasons, `detail` says why, `match` names
    the input or eval image a removed copy matches (duplicate removal, dedup.py)."""

    def __init__(self, reason: str, detail: str, match: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.match = reason, detail, match

    def __reduce__(self):
        return Skip, (self.reason, self.detail, self.match)


@dataclass(frozen=True)
class Prepared:
    data: bytes  # JPEG bytes to store
    width: int  # of the original image (after EXIF orientation)
    height: int
    converted: str | None  # why the image was re-encoded, None when stored byte-identical


def prepare(data: bytes, *, max_side: int | None = None, resize_short: int | None = None,
            quality: int = 90) -> Prepared:
    """Validate `data` fully (decoding it) and return the bytes to store; raise `Skip` for bad input."""
    if not data:
        raise Skip(EMPTY, "zero-byte file")
    img = _open(data)
    fmt = img.format
    if fmt not in SUPPORTED_FORMATS:
        raise Skip(UNSUPPORTED, f"unsupported format {fmt}")
    orientation = img.getexif().get(ORIENTATION_TAG, 1)
    if orientation not in range(2, 9):  # 1 = upright; 0 and other invalid values occur and mean nothing
        orientation = 1
    stored = img.size
    width, height = stored[::-1] if orientation in (5, 6, 7, 8) else stored
    scale = _scale(width, height, max_side, resize_short)
    reason = _conversion_reason(fmt, img.mode, orientation, scale)
    if fmt in JPEG_FORMATS:
        # A reduced-size decode still entropy-decodes every byte (which is what catches truncation):
        # 1/8 scale to validate a JPEG stored as-is, else the smallest scale not below the output size.
        target = 1 / 8 if reason is None else scale
        img.draft(img.mode, tuple(max(1, math.ceil(side * target)) for side in stored))
    _decode(img)
    if reason is None:
        return Prepared(data, width, height, None)
    img = to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if img.size != size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return Prepared(out.getvalue(), width, height, reason)


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Skip(BOMB, str(e)) from None
    except UnidentifiedImageError:
        raise Skip(NOT_IMAGE, "not a recognised image file") from None
    except Exception as e:  # noqa: BLE001 - a corrupt header can raise almost anything
        raise Skip(CORRUPT, f"{type(e).__name__}: {e}") from None
    pixels = img.width * img.height
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        raise Skip(BOMB, f"{img.width}x{img.height} = {pixels} pixels exceeds the limit "
                         f"{Image.MAX_IMAGE_PIXELS}")
    return img


def _decode(img: Image.Image) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "truncated images must not load"
    try:
        img.load()
    except OSError as e:
        raise Skip(TRUNCATED if "truncated" in str(e) else CORRUPT, str(e)) from None
    except Exception as e:  # noqa: BLE001 - decoders raise SyntaxError, ValueError, struct.error, ...
        raise Skip(CORRUPT, f"{type(e).__name__}: {e}") from None


def _scale(width: int, height: int, max_side: int | None, resize_short: int | None) -> float:
    scale = 1.0
    if max_side:
        scale = min(scale, max_side / max(width, height))
    if resize_short:
        scale = min(scale, resize_short / min(width, height))
    return scale


def _conversion_reason(fmt: str, mode: str, orientation: int, scale: float) -> str | None:
    if fmt not in JPEG_FORMATS:
        return f"format {fmt}"
    if mode not in JPEG_MODES_AS_IS:
        return f"mode {mode}"
    if orientation != 1:
        return f"exif orientation {orientation}"
    if scale < 1:
        return "resized"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited over white, 16/32-bit gray scaled to 8 bits, palettes expanded."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except ValueError as e:
            raise Skip(UNSUPPORTED, f"cannot convert mode {mode} to RGB: {e}") from None
    return img
