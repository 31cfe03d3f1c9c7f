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
@pytest.mark.loaders
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


def _photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Gradients plus noise: every 8x8 block differs, so a misplaced window shows."""
    y, x = np.mgrid[0:height, 0:width]
    a = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 3 % 256], -1)
    a = np.clip(a + np.random.default_rng(width * height).integers(-20, 20, a.shape), 0, 255)
    return Image.fromarray(a.astype(np.uint8)).convert(mode)


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def _ycck(cmyk: bytes) -> bytes:
    """A YCCK JPEG: Pillow writes CMYK with Adobe transform 0; transform 2 makes decoders read it as YCCK."""
    at = cmyk.index(b"Adobe") + 11
    assert cmyk[at] == 0
    return cmyk[:at] + b"\x02" + cmyk[at + 1:]


def _exif_rotated(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: rotate 90° clockwise to display
    return _jpeg(image, exif=exif.tobytes())


ODD_JPEGS = {   # name -> (bytes, components, what simplejpeg reads in the header: colour space, subsampling)
    "4:2:0": (_jpeg(_photo(333, 251), subsampling=2), 3, ("YCbCr", "420")),
    "4:2:2": (_jpeg(_photo(333, 251), subsampling=1), 3, ("YCbCr", "422")),
    "4:4:4": (_jpeg(_photo(333, 251), subsampling=0), 3, ("YCbCr", "444")),
    "progressive 4:2:0": (_jpeg(_photo(317, 203), progressive=True), 3, ("YCbCr", "420")),
    "progressive 4:4:4": (_jpeg(_photo(301, 199), progressive=True, subsampling=0), 3, ("YCbCr", "444")),
    "restart every 3 blocks": (_jpeg(_photo(333, 251), restart_marker_blocks=3), 3, ("YCbCr", "420")),
    "restart every MCU row": (_jpeg(_photo(333, 251), restart_marker_rows=1), 3, ("YCbCr", "420")),
    "grayscale": (_jpeg(_photo(333, 251, "L")), 1, ("Gray", "Gray")),
    "grayscale progressive": (_jpeg(_photo(317, 203, "L"), progressive=True), 1, ("Gray", "Gray")),
    "CMYK": (_jpeg(_photo(333, 251, "CMYK")), 4, ("CMYK", "444")),
    "YCCK": (_ycck(_jpeg(_photo(333, 251, "CMYK"))), 4, ("YCCK", "444")),
    "37x29": (_jpeg(_photo(37, 29)), 3, ("YCbCr", "420")),
    "1001x37": (_jpeg(_photo(1001, 37), subsampling=1), 3, ("YCbCr", "422")),
    "EXIF orientation 6": (_exif_rotated(_photo(333, 251)), 3, ("YCbCr", "420")),
}


@pytest.mark.loaders
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


@pytest.mark.loaders
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
