"""The JPEG decoders agree pixel for pixel; `auto` falls back to Pillow; region-of-interest decode (`roi`) cuts
the full decode's crops; nothing uses a deprecated API."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require
from odd_jpegs import ODD_JPEGS
from picstream.loader.stream import crop_specs
from picstream.loader.decode import DECODERS, DEFAULT_FULL, check_decoder, decode, decode_crops, jpeg_frame
from picstream.loader.geometry import DRAWS_PER_CROP, sample_uniforms


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


def crops(data: bytes, u: np.ndarray, specs, decoder: str) -> list[torch.Tensor]:
    outs = [torch.empty(s.size, s.size, 3, dtype=torch.uint8) for s in specs]
    decode_crops(data, u, specs, outs, decoder)
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("multi_crop", [None, [(96, 3)]], ids=["one crop", "1x224 + 3x96"])
def test_roi_crops_equal_the_full_decode_crops(imagenet_sample_dir, multi_crop):
    """Tolerance 0: on every photo of the ImageNet sample (977 RGB and 23 grayscale baseline JPEGs) the crops
    cut from the decoded window (the union of the sample's crop boxes) are the full decode's, pixel for pixel."""
    require("nvidia.nvimgcodec")
    files = sorted(imagenet_sample_dir.iterdir())
    specs = crop_specs(224, multi_crop=multi_crop)
    u = sample_uniforms(0, np.arange(len(files)), DRAWS_PER_CROP * len(specs))
    for f, row in zip(files, u.reshape(len(files), len(specs), DRAWS_PER_CROP)):
        data = f.read_bytes()
        for roi, full in zip(crops(data, row, specs, "roi"), crops(data, row, specs, "simplejpeg")):
            assert torch.equal(roi, full), f.name


@pytest.mark.parametrize("name", ODD_JPEGS)
def test_roi_crops_equal_the_full_decode_crops_on_odd_jpegs(name):
    """Tolerance 0 against simplejpeg (the default full decoder) on each kind of JPEG, 1x40 + 3x24 crops
    from 20 draws. CMYK / YCCK take the full decode (nvImageCodec's RGB conversion of them is up to 2
    levels off simplejpeg's, which is itself up to 2 off Pillow's). EXIF orientation: neither simplejpeg nor
    Pillow's decode applies it (the pixels come out as stored, width x height as in the frame header), and
    "roi" crops the same unrotated pixels."""
    require("nvidia.nvimgcodec")
    simplejpeg = require("simplejpeg")
    data, components, header = ODD_JPEGS[name]
    width, height, frame_components = jpeg_frame(data)
    assert frame_components == components and simplejpeg.decode_jpeg_header(data)[2:] == header
    assert Image.open(io.BytesIO(data)).size == (width, height) and decode(data).shape == (height, width, 3)
    assert (b"\xff\xc2" in data) == ("progressive" in name)     # SOF2: progressive frame
    assert (b"\xff\xd0" in data) == ("restart" in name)         # RST0
    specs = crop_specs(40, multi_crop=[(24, 3)])
    u = sample_uniforms(0, np.arange(20), DRAWS_PER_CROP * len(specs))
    for row in u.reshape(20, len(specs), DRAWS_PER_CROP):
        for roi, full in zip(crops(data, row, specs, "roi"), crops(data, row, specs, "simplejpeg")):
            assert torch.equal(roi, full)


def test_roi_decodes_what_is_not_a_jpeg_in_full():
    require("nvidia.nvimgcodec")
    img = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    png = io.BytesIO()
    img.save(png, "PNG")
    specs = crop_specs(16)
    row = sample_uniforms(0, np.arange(1), DRAWS_PER_CROP).reshape(1, DRAWS_PER_CROP)
    assert torch.equal(crops(png.getvalue(), row, specs, "roi")[0], crops(png.getvalue(), row, specs, "auto")[0])


def test_check_decoder_says_what_roi_needs():
    with pytest.raises(ValueError, match="decoder must be one of"):
        check_decoder("torchvision")
    try:
        import nvidia.nvimgcodec  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs nvImageCodec"):
            check_decoder("roi")
    else:
        check_decoder("roi")


def test_resized_crops_come_out_in_the_decoders_layout(jpegs):
    """The resize writes HWC (channels-last) pixels, whole image or a crop of it: torch reads a view's
    layout from its strides, and a planar result made copying each crop out of it 35x slower."""
    from picstream.loader.decode import _resize

    img = decode(jpegs[0])
    for x in (img, img[10:200, 5:301], img[:150, :150]):
        y = _resize(x, (64, 48))
        assert y.shape == (64, 48, 3) and y.is_contiguous()
