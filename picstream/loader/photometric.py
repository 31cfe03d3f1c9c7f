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

from ..transfer import device_constant, to_device

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
    m = device_constant(tuple(mean), x.dtype, x.device).view(1, 3, 1, 1)
    s = device_constant(tuple(std), x.dtype, x.device).view(1, 3, 1, 1)
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
    maxc = x.amax(dim=1, keepdim=True)
    minc = x.amin(dim=1, keepdim=True)
    cr = maxc - minc
    r, g, b = x.split(1, dim=1)
    # hue in sextants, as torchvision's _rgb2hsv computes it (one division)
    h = torch.where(maxc == r, g - b,
                    torch.where(maxc == g, (b - r).add_(cr, alpha=2.0), (r - g).add_(cr, alpha=4.0)))
    h = h.div_(torch.where(cr == 0, 1.0, cr)).add_(6.0 * _per_sample(shift))
    n = device_constant((5.0, 3.0, 1.0), x.dtype, x.device).view(1, 3, 1, 1)
    k = torch.remainder(h + n, 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.sub(maxc, w.mul_(cr), out=x)


def gaussian_kernel_size(size: int) -> int:
    """SimCLR's blur kernel: about 10% of the image side, odd."""
    return max(3, int(0.1 * size) | 1)


def _reflect_blur_matrix(kernels: torch.Tensor, n: int) -> torch.Tensor:
    """(b, n, n) matrices ``M`` with ``M @ v`` = the 1-D blur of ``v`` with reflect padding."""
    b, size = kernels.shape
    p = size // 2
    src = torch.arange(n, device=kernels.device).view(-1, 1) + torch.arange(size, device=kernels.device) - p
    src = torch.where(src < 0, -src, torch.where(src >= n, 2 * (n - 1) - src, src))   # (n, K)
    m = torch.zeros(b, n, n, dtype=kernels.dtype, device=kernels.device)
    return m.scatter_add_(2, src.expand(b, n, size), kernels.view(b, 1, size).expand(b, n, size))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur with torchvision's kernel and reflect padding.

    The two separable passes are matrix products with banded per-sample matrices that fold the
    padding in: a batched GEMM, far faster than a depthwise convolution on CPU and on GPU.
    """
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)                                        # (b, K)
    h, w = x.shape[-2:]
    rows = _reflect_blur_matrix(k, h).unsqueeze(1)                             # (b, 1, H, H)
    cols = _reflect_blur_matrix(k, w).transpose(1, 2).unsqueeze(1)             # (b, 1, W, W)
    return torch.matmul(rows, torch.matmul(x, cols))


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
    With a CPU generator the parameters, and every decision taken on them (which samples take which
    op), stay on the host: augmenting a batch on an accelerator never waits for it.
    """

    _COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    CPU_CHUNK = 16

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8,
                 gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), blur_kernel: int | None = None,
                 solarize_p=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, block=(0, 1)):
        inf = float("inf")
        self.ranges = (_range(brightness, 1.0, "brightness", (0.0, inf)),
                       _range(contrast, 1.0, "contrast", (0.0, inf)),
                       _range(saturation, 1.0, "saturation", (0.0, inf)),
                       _range(hue, 0.0, "hue", (-0.5, 0.5)))
        self.jitter_p, self.gray_p, self.blur_p, self.solarize_p = jitter_p, gray_p, blur_p, solarize_p
        self.blur_sigma = tuple(blur_sigma)
        self.blur_kernel = blur_kernel
        self.mean, self.std = tuple(mean), tuple(std)
        self.block = tuple(block)  # (rank, world): a batch is that block of a world × larger one

    @classmethod
    def from_config(cls, augment, world) -> "PhotometricAugment":
        """From ``config.augment`` (:class:`picstream.config.AugmentConfig`), drawing the parameters of
        ``world``'s rank block of every global batch."""
        return cls(brightness=augment.brightness, contrast=augment.contrast,
                   saturation=augment.saturation, hue=augment.hue, jitter_p=augment.jitter_p,
                   gray_p=augment.gray_p, blur_p=augment.blur_p, solarize_p=augment.solarize_p,
                   block=(world.rank, world.size))

    def sample_params(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw every sample's parameters (13 uniforms per sample, on the generator's device); in
        block ``(r, R)``, rows ``r·batch …`` of the draw for the ``R·batch`` global batch."""
        rank, world = self.block
        u = torch.rand(batch * world, 13, generator=generator, device=generator.device,
                       dtype=torch.float64)[rank * batch:(rank + 1) * batch]
        lo = device_constant(tuple(r[0] for r in self.ranges), u.dtype, u.device)
        hi = device_constant(tuple(r[1] for r in self.ranges), u.dtype, u.device)
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
        return self.apply(images, self.sample_params(images.shape[0], generator))

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment with given per-sample parameters (as returned by :meth:`sample_params`, on the
        host or on the images' device: the grouping is computed where they are).

        On CPU the batch goes through in chunks of :attr:`CPU_CHUNK` images: temporaries of that
        size are recycled by the allocator instead of being page-faulted in afresh (~30% faster).
        """
        b = images.shape[0]
        if images.device.type != "cpu" or b <= self.CPU_CHUNK:
            return self._apply(images, params)
        out = torch.empty((b, *images.shape[1:]), dtype=torch.float32)
        for i in range(0, b, self.CPU_CHUNK):
            j = min(b, i + self.CPU_CHUNK)
            out[i:j] = self._apply(images[i:j], {k: v[i:j] for k, v in params.items()})
        return out

    def _apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch is first sorted by ColorJitter op order, so each of the (at most 24) orders
        is a contiguous slice that the four ops transform in place; one gather in, one out."""
        powers = device_constant((64, 16, 4, 1), torch.int64, params["order"].device)
        code = torch.where(params["jitter"], (params["order"] * powers).sum(1), 256)
        code, perm = code.sort(stable=True)
        groups, counts = torch.unique_consecutive(code, return_counts=True)
        p = {k: v[perm] for k, v in params.items()}   # all drawn on one device
        perm = to_device(perm, images.device)
        x = images.to(torch.float32, memory_format=torch.contiguous_format).index_select(0, perm)
        if images.dtype == torch.uint8:
            x.div_(255.0)
        factors = to_device(p["factors"].to(x.dtype), x.device)
        start = 0
        for group, count in zip(groups.tolist(), counts.tolist()):
            if group != 256:
                sl = slice(start, start + count)
                for op in (group // 64, group // 16 % 4, group // 4 % 4, group % 4):
                    if self.ranges[op][0] != self.ranges[op][1] or self.ranges[op][0] != (op < 3):
                        self._COLOR_OPS[op](x[sl], factors[sl, op])
            start += count
        _apply_subset(x, p["gray"], lambda s: _grayscale(s).expand(-1, 3, -1, -1))
        kernel = self.blur_kernel or gaussian_kernel_size(min(x.shape[-2:]))
        _apply_subset(x, p["blur"], gaussian_blur, p["sigma"].to(x.dtype), kernel)
        _apply_subset(x, p["solarize"], solarize)
        _normalize_(x, self.mean, self.std)
        return torch.empty_like(x).index_copy_(0, perm, x)


def _apply_subset(x: torch.Tensor, mask: torch.Tensor, fn, *args) -> None:
    """``x[mask] = fn(x[mask], args[0][mask], *args[1:])`` in place (the whole batch if all set);
    ``mask`` and ``args[0]`` are where the parameters are (the indices are found there)."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    if idx.numel() == x.shape[0]:
        out = fn(x, *((to_device(args[0], x.device), *args[1:]) if args else ()))
        if out.data_ptr() != x.data_ptr():
            x.copy_(out)
        return
    sub_args = (to_device(args[0][idx], x.device), *args[1:]) if args else ()
    idx = to_device(idx, x.device)
    x.index_copy_(0, idx, fn(x.index_select(0, idx), *sub_args))
