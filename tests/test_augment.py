"""Batched photometric augmentation against torchvision's functional ops applied image by image."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from picstream.loader.photometric import (IMAGENET_MEAN, IMAGENET_STD, PhotometricAugment,
                                          adjust_brightness, adjust_contrast, adjust_hue,
                                          adjust_saturation, gaussian_blur, gaussian_kernel_size,
                                          normalize, solarize)

ATOL = 2e-5


def images(b=6, h=24, w=20, seed=0) -> torch.Tensor:
    """Random uint8 images plus pixels that hit the hue formula's ties (gray, max in two channels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    x[0, :, :4, :] = 128                                  # gray: max == min
    x[1, 0, :4, :], x[1, 1, :4, :] = 200, 200             # r == g == max
    x[1, 2, 4:8, :] = x[1, 1, 4:8, :]                     # g == b
    x[2, :, :, :3] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    return x


def per_image(fn_tv, x: torch.Tensor, values) -> torch.Tensor:
    return torch.stack([fn_tv(img, float(v)) for img, v in zip(x, values)])


@pytest.mark.parametrize("ours,theirs,values", [
    (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.0, 1.2, 0.9]),
    (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.0, 1.2, 0.9]),
    (adjust_saturation, TF.adjust_saturation, [0.6, 1.0, 1.4, 0.0, 1.2, 0.9]),
    (adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.1, 0.5, -0.5, 0.037]),
])
def test_color_ops_match_torchvision_per_sample(ours, theirs, values):
    x = images().float() / 255
    expected = per_image(theirs, x, values)
    got = ours(x.clone(), torch.tensor(values))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_blur_matches_torchvision_per_sample():
    x = images(h=40, w=36).float() / 255
    sigmas = [0.1, 0.5, 1.0, 1.5, 2.0, 0.77]
    for k in (3, gaussian_kernel_size(224)):
        expected = torch.stack([TF.gaussian_blur(img, [k, k], [s, s]) for img, s in zip(x, sigmas)])
        got = gaussian_blur(x.clone(), torch.tensor(sigmas), k)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert gaussian_kernel_size(224) == 23 and gaussian_kernel_size(32) == 3


def test_solarize_and_normalize_match_torchvision():
    u8 = images()
    x = u8.float() / 255
    torch.testing.assert_close(solarize(x), torch.stack([TF.solarize(i, 0.5) for i in x]))
    expected = torch.stack([TF.normalize(i, IMAGENET_MEAN, IMAGENET_STD) for i in x])
    torch.testing.assert_close(normalize(u8), expected, atol=1e-6, rtol=0)


def reference_pipeline(aug: PhotometricAugment, u8: torch.Tensor, params) -> torch.Tensor:
    """The same augmentation written image by image with torchvision's functional ops."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i, img in enumerate(u8.float() / 255):
        if params["jitter"][i]:
            for op in params["order"][i].tolist():
                img = ops[op](img, float(params["factors"][i, op]))
        if params["gray"][i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if params["blur"][i]:
            k = gaussian_kernel_size(min(img.shape[-2:]))
            s = float(params["sigma"][i])
            img = TF.gaussian_blur(img, [k, k], [s, s])
        if params["solarize"][i]:
            img = TF.solarize(img, 0.5)
        out.append(TF.normalize(img, aug.mean, aug.std))
    return torch.stack(out)


def test_full_pipeline_matches_per_image_reference():
    aug = PhotometricAugment(solarize_p=0.3)
    u8 = images(b=32, h=48, w=48, seed=1)
    params = aug.sample_params(32, torch.Generator().manual_seed(5))
    assert 0 < params["jitter"].sum() < 32 and 0 < params["gray"].sum() < 32
    assert 0 < params["blur"].sum() < 32 and 0 < params["solarize"].sum() < 32
    got = aug.apply(u8, params)
    torch.testing.assert_close(got, reference_pipeline(aug, u8, params), atol=1e-4, rtol=0)


def test_parameters_are_drawn_per_sample_with_the_right_rates():
    aug = PhotometricAugment()
    p = aug.sample_params(20000, torch.Generator().manual_seed(0))
    assert abs(p["jitter"].float().mean() - 0.8) < 0.015
    assert abs(p["gray"].float().mean() - 0.2) < 0.015
    assert abs(p["blur"].float().mean() - 0.5) < 0.015
    assert not p["solarize"].any()
    f = p["factors"]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and f[:, 3].abs().max() <= 0.1
    assert len(set(map(tuple, p["order"][:200].tolist()))) > 12    # many of the 24 orders

    same = images()[:1].expand(16, -1, -1, -1).contiguous()       # one image, 16 copies
    out = aug(same, torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and out.shape == same.shape
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) > 8


def test_reproducible_from_generator_state():
    aug = PhotometricAugment()
    x = images(b=8)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    aug = PhotometricAugment(solarize_p=0.3)
    x = images(b=16, h=64, w=64)
    params = aug.sample_params(16, torch.Generator().manual_seed(2))
    cpu = aug.apply(x, params)
    gpu = aug.apply(x.cuda(), {k: v.cuda() for k, v in params.items()})
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    out = aug(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert out.is_cuda and out.dtype == torch.float32
