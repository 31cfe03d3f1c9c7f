"""Generated JPEGs of every kind a decoder may trip on (progressive, restart markers, each chroma
subsampling, grayscale, CMYK / YCCK, odd sizes, EXIF-rotated), shared by the decoder tests."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


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
