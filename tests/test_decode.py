"""The JPEG decoders agree pixel for pixel; `auto` falls back to Pillow; nothing uses a deprecated API."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from picstream.loader.decode import DECODERS, DEFAULT_FULL, decode


@pytest.fixture(scope="module")
def jpegs(imagenet_sample_dir) -> list[bytes]:
    return [f.read_bytes() for f in sorted(imagenet_sample_dir.iterdir())[:24]]


def test_full_decoders_are_bit_identical(jpegs):
    assert DEFAULT_FULL == "simplejpeg" and {"simplejpeg", "torchcodec"} <= set(DECODERS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in jpegs:
            ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            outs = [decode(data, d) for d in ("auto", "simplejpeg", "torchcodec")]
            assert all(o.dtype == torch.uint8 and o.shape == ref.shape for o in outs)
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
            # Pillow's libjpeg-turbo build may round differently in the upsampling
            assert np.abs(outs[0].numpy().astype(int) - ref).max() <= 2


def test_auto_falls_back_to_pillow_for_other_formats():
    img = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    png = io.BytesIO()
    img.save(png, "PNG")
    np.testing.assert_array_equal(decode(png.getvalue(), "auto").numpy(), np.asarray(img))
    gray = io.BytesIO()
    Image.new("L", (5, 3), 77).save(gray, "JPEG")
    assert decode(gray.getvalue(), "simplejpeg").shape == (3, 5, 3)
    with pytest.raises(ValueError):
        decode(png.getvalue(), "simplejpeg")
    with pytest.raises(RuntimeError):
        decode(png.getvalue(), "torchcodec")
    with pytest.raises(ValueError, match="decoder must be one of"):
        decode(png.getvalue(), "torchvision")
