"""Batched SimCLR colour augmentation with per-sample random parameters, on any device.

Each operation has the semantics of ``torchvision.transforms.functional`` (``adjust_brightness``,
``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale``, ``gaussian_blur``,
``solarize``) on float images in ``[0, 1]``, applied per sample with that sample's parameters, like
``RandomApply(ColorJitter, p) → RandomGrayscale → RandomApply(GaussianBlur) → RandomSolarize →
Normalize`` run image by image. ColorJitter visits its four ops in a random order per sample.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PhotometricAugment", "normalize", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)   # torchvision's rgb_to_grayscale weights


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (B,3,H,W) → float32 ``(x/255 − mean) / std``."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    return _normalize_(x, mean, std)


def _normalize_(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(b,3,H,W) → (b,1,H,W), torchvision's weights."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul_(_per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return x.mul_(f).add_((1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    gray = _grayscale(x)
    return x.mul_(f).add_((1.0 - f) * gray).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn) per sample.

    A hue rotation keeps each pixel's max and min channel; only which channel sits where between
    them changes, so the result is ``max − (max − min)·w(k)`` with the piecewise-linear HSV weight
    ``w`` — the same function as torchvision's rgb→hsv→rgb round trip, without the HSV tensor.
    """
    maxc, _ = x.max(dim=1, keepdim=True)
    minc, _ = x.min(dim=1, keepdim=True)
    cr = maxc - minc
    safe = torch.where(cr == 0, torch.ones_like(cr), cr)
    r, g, b = x.split(1, dim=1)
    # hue in sextants [0, 6), as torchvision's _rgb2hsv computes it
    h = torch.where(maxc == r, (g - b) / safe,
                    torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.remainder(h + 6.0 * _per_sample(shift), 6.0)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h, 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.sub(maxc, cr * w, out=x)


def gaussian_kernel_size(size: int) -> int:
    """SimCLR's blur kernel: about 10% of the image side, odd."""
    return max(3, int(0.1 * size) | 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur (torchvision's kernel and reflect padding), as two 1-D passes."""
    b, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)        # (b·c, K)
    p = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (p, p, p, p), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    return y.view(b, c, h, w)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def _range(value, center: float, name: str, bound: tuple[float, float]) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0")
        lo, hi = center - value, center + value
    else:
        lo, hi = (float(v) for v in value)
    lo, hi = max(lo, bound[0]), min(hi, bound[1])
    if lo > hi:
        raise ValueError(f"bad {name} range {value}")
    return lo, hi


class PhotometricAugment:
    """SimCLR colour augmentation on a uint8 batch, every parameter drawn per sample.

    ``__call__(images, generator)`` takes uint8 (B,3,H,W) on any device and returns float32
    normalised images on the same device. All random numbers come from ``generator`` (drawn on its
    device), a fixed number per sample, so the result is reproducible from the generator state.
    """

    _COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8,
                 gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), blur_kernel: int | None = None,
                 solarize_p=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        inf = float("inf")
        self.ranges = (_range(brightness, 1.0, "brightness", (0.0, inf)),
                       _range(contrast, 1.0, "contrast", (0.0, inf)),
                       _range(saturation, 1.0, "saturation", (0.0, inf)),
                       _range(hue, 0.0, "hue", (-0.5, 0.5)))
        self.jitter_p, self.gray_p, self.blur_p, self.solarize_p = jitter_p, gray_p, blur_p, solarize_p
        self.blur_sigma = tuple(blur_sigma)
        self.blur_kernel = blur_kernel
        self.mean, self.std = tuple(mean), tuple(std)

    def sample_params(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw every sample's parameters (13 uniforms per sample, on the generator's device)."""
        u = torch.rand(batch, 13, generator=generator, device=generator.device, dtype=torch.float64)
        lo = torch.tensor([r[0] for r in self.ranges], dtype=u.dtype, device=u.device)
        hi = torch.tensor([r[1] for r in self.ranges], dtype=u.dtype, device=u.device)
        sig_lo, sig_hi = self.blur_sigma
        return {
            "jitter": u[:, 0] < self.jitter_p,
            "factors": lo + (hi - lo) * u[:, 1:5],          # brightness, contrast, saturation, hue
            "order": u[:, 5:9].argsort(dim=1),              # ColorJitter's random op order
            "gray": u[:, 9] < self.gray_p,
            "blur": u[:, 10] < self.blur_p,
            "sigma": sig_lo + (sig_hi - sig_lo) * u[:, 11],
            "solarize": u[:, 12] < self.solarize_p,
        }

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B,3,H,W) images, got {tuple(images.shape)}")
        params = {k: v.to(images.device) for k, v in
                  self.sample_params(images.shape[0], generator).items()}
        return self.apply(images, params)

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment with given per-sample parameters (as returned by :meth:`sample_params`)."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float().clone()
        factors = params["factors"].to(x.dtype)
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=x.dtype, device=x.device)
        active = params["jitter"].unsqueeze(1) & (factors != identity)          # (B, 4)
        for slot in range(4):
            op_at_slot = params["order"][:, slot]
            for op, fn in enumerate(self._COLOR_OPS):
                _apply_subset(x, active[:, op] & (op_at_slot == op), fn, factors[:, op])
        _apply_subset(x, params["gray"], lambda s: _grayscale(s).expand(-1, 3, -1, -1))
        kernel = self.blur_kernel or gaussian_kernel_size(min(x.shape[-2:]))
        _apply_subset(x, params["blur"], gaussian_blur, params["sigma"].to(x.dtype), kernel)
        _apply_subset(x, params["solarize"], solarize)
        return _normalize_(x, self.mean, self.std)


def _apply_subset(x: torch.Tensor, mask: torch.Tensor, fn, *args) -> None:
    """``x[mask] = fn(x[mask], args[0][mask], *args[1:])`` in place (the whole batch if all set)."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    if idx.numel() == x.shape[0]:
        out = fn(x, *args)
        if out.data_ptr() != x.data_ptr():
            x.copy_(out)
        return
    sub_args = (args[0][idx], *args[1:]) if args else ()
    x.index_copy_(0, idx, fn(x.index_select(0, idx), *sub_args))
