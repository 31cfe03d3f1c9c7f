"""Per-sample geometry: counter-based random numbers and torchvision's crop rules.

Every random number of a sample is a hash of ``(seed, stream position, draw index)``, so a sample's
crop and flip do not depend on which process draws them, in which order, or after a resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["sample_uniforms", "CropSpec", "random_resized_crop", "crop_box",
           "center_crop_box", "resize_short_size", "DRAWS_PER_CROP"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ATTEMPTS = 10
DRAWS_PER_CROP = 2 * _ATTEMPTS + 3   # (area, log-ratio) per attempt, top, left, flip


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64 with full avalanche)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, positions: np.ndarray, count: int) -> np.ndarray:
    """Uniform floats in ``[0, 1)``, shape ``(len(positions), count)``, a pure function of the inputs."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed % 2**64], dtype=np.uint64) + _GOLDEN)
        keys = _mix64(np.asarray(positions, dtype=np.int64).astype(np.uint64) ^ key)
        steps = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(keys[:, None] + steps[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class CropSpec:
    """One crop of a sample: output side, area-scale range, aspect-ratio range, flip."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


def random_resized_crop(height: int, width: int, u: np.ndarray, spec: CropSpec
                        ) -> tuple[int, int, int, int, bool]:
    """torchvision's ``RandomResizedCrop.get_params`` driven by ``u`` (``DRAWS_PER_CROP`` uniforms).

    Returns ``(top, left, h, w, flip)``: up to 10 tries at a random area and log-uniform aspect
    ratio, falling back to a centre crop clamped to the ratio range.
    """
    top, left, h, w = crop_box(height, width, u, spec.scale[0], spec.scale[1], spec.ratio[0], spec.ratio[1])
    return top, left, h, w, bool(spec.flip and u[-1] < 0.5)


def crop_box(height: int, width: int, u: np.ndarray, scale_lo: float, scale_hi: float,
             ratio_lo: float, ratio_hi: float) -> tuple[int, int, int, int]:
    """The box of :func:`random_resized_crop`, from plain numbers only (numba compiles it as it is
    for the FFCV loader's decoder)."""
    area = height * width
    lo, hi = math.log(ratio_lo), math.log(ratio_hi)
    for a in range(_ATTEMPTS):
        target = area * (scale_lo + (scale_hi - scale_lo) * u[2 * a])
        aspect = math.exp(lo + (hi - lo) * u[2 * a + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[-3] * (height - h + 1)), int(u[-2] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio_lo:
        w, h = width, int(round(width / ratio_lo))
    elif in_ratio > ratio_hi:
        h, w = height, int(round(height * ratio_hi))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_short_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's ``Resize(short)`` output size ``(h, w)``."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``CenterCrop(size)`` top-left corner ``(top, left)``."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
