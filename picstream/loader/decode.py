"""Decoding sample bytes and cutting crops out of them.

Images are handled as uint8 ``(H, W, 3)`` (what libjpeg-turbo produces; batches are channels-last).
Full decoders (all libjpeg-turbo, compared on the same JPEGs in benchmarks/loader.py):
``"simplejpeg"`` (the fastest, HWC numpy out), ``"torchcodec"`` (PyTorch's successor to torchvision's
deprecated image decoding, bit-identical to it) and ``"pil"`` (Pillow; pillow-simd when installed, it
is a drop-in PIL). ``"auto"``: Pillow with ``draft`` (JPEG DCT-domain downscaling) when every crop of
the sample is at least twice its output size, otherwise the fastest installed full decoder
(``DEFAULT_FULL``), falling back to Pillow for anything it cannot read. ``"roi"``: region-of-interest
decode of each sample's crops (the rows and columns of the union of its crop boxes only), through
nvImageCodec's libjpeg-turbo CPU back end (optional: the ``nvimgcodec`` extra; the loader's workers decode
a batch's windows in one call, :func:`cut_windowed_crops`); its crops equal the full
decoders' exactly on the ImageNet sample and on odd JPEGs (progressive, restart markers, every chroma
subsampling, grayscale, odd sizes; tests/test_decode.py); anything else it decodes like ``"auto"``'s full
decoders, and so are CMYK / YCCK JPEGs (nvImageCodec's RGB conversion of them differs). No decoder
applies EXIF orientation (``"roi"`` neither). Crops are resized with torch's antialiased bilinear kernel
on uint8, which is several times faster than ``PIL.Image.resize`` on CPU (see benchmarks/README.md); off
the CPU, where torch has no such uint8 kernel, in float32 and rounded (within 1 level of it).
"""
from __future__ import annotations

import importlib.util
import io
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .geometry import CropSpec, center_crop_box, random_resized_crop, resize_short_size

try:
    import simplejpeg
except ImportError:  # optional: Pillow does everything
    simplejpeg = None
try:
    from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg
except (ImportError, OSError, RuntimeError):  # optional; its native library must match torch
    torchcodec_decode_jpeg = None

__all__ = ["DECODERS", "DEFAULT_FULL", "check_decoder", "crop_boxes", "cut_crops", "cut_windowed_crops", "decode",
           "decode_crops", "decode_center", "decode_regions_on_host", "decode_windows", "nvimgcodec_decoder",
           "union_box", "windowed"]


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # start-of-frame markers


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG's frame header, or None when ``data`` is not a JPEG.

    A few byte reads instead of ``PIL.Image.open`` (a noticeable share of a 224 px crop's cost).
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in _SOF:
            return (int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big"),
                    data[i + 9])
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's frame header, or None when ``data`` is not a JPEG."""
    frame = jpeg_frame(data)
    return None if frame is None else frame[:2]


def _pil_to_hwc(im: Image.Image) -> torch.Tensor:
    if im.mode != "RGB":
        im = im.convert("RGB")
    return torch.from_numpy(np.array(im))


def _pil(data: bytes) -> torch.Tensor:
    return _pil_to_hwc(Image.open(io.BytesIO(data)))


def _simplejpeg(data: bytes) -> torch.Tensor:
    return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB"))


def _torchcodec(data: bytes) -> torch.Tensor:
    return torchcodec_decode_jpeg(data, mode="RGB").permute(1, 2, 0)   # a HWC view of libjpeg's output


# Full decoders, the fastest first (benchmarks/loader.py); `auto` uses the first one installed.
_FULL = {"simplejpeg": _simplejpeg if simplejpeg is not None else None,
         "torchcodec": _torchcodec if torchcodec_decode_jpeg is not None else None}
DEFAULT_FULL = next((name for name, fn in _FULL.items() if fn is not None), "pil")
DECODERS = ("auto", "pil", *_FULL, "roi")
_ROI_DECODER: dict[int, tuple] = {}   # pid -> (nvimgcodec module, Decoder, DecodeParams): one per process


def nvimgcodec_installed() -> bool:
    """Whether nvImageCodec (``nvidia.nvimgcodec``, the nvimgcodec extra) can be imported."""
    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ModuleNotFoundError:   # no `nvidia` namespace at all
        return False


def check_decoder(decoder: str) -> None:
    """Raise ValueError for a decoder name that is unknown or whose library is not installed."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    if decoder == "roi":
        if not nvimgcodec_installed():
            raise ValueError("decoder 'roi' needs nvImageCodec (pip install -e '.[nvimgcodec]')")


def nvimgcodec_decoder(cuda_index: int | None = None, threads: int = 1) -> tuple:
    """``(nvimgcodec module, Decoder, DecodeParams)`` decoding as the full decoders do (fancy upsampling,
    sRGB, no EXIF rotation): on CUDA device ``cuda_index`` with nvImageCodec's default back ends (GPU
    first), or on its libjpeg-turbo CPU back end when None; ``threads``: its CPU threads (0: one per core)."""
    from nvidia import nvimgcodec
    cpu_only = dict(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)])
    where = dict(device_id=cuda_index) if cuda_index is not None else cpu_only
    decoder = nvimgcodec.Decoder(max_num_cpu_threads=threads, options=":fancy_upsampling=1", **where)
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.SRGB)
    return nvimgcodec, decoder, params


def _roi_decoder() -> tuple:
    """This process's nvImageCodec CPU decoder (made after a fork, never inherited through one)."""
    pid = os.getpid()
    if pid not in _ROI_DECODER:
        _ROI_DECODER.clear()
        _ROI_DECODER[pid] = nvimgcodec_decoder()
    return _ROI_DECODER[pid]


def decode_windows(datas: Sequence[bytes], windows: Sequence[tuple[int, int, int, int]]
                   ) -> list[torch.Tensor | None]:
    """Rows ``[top, top+h)`` × columns ``[left, left+w)`` (``windows[i]`` = ``(top, left, h, w)``) of each
    JPEG as uint8 ``(h, w, 3)``, decoding only that window, in one nvImageCodec call (per-call overhead
    is paid once per batch); None for an image it cannot decode."""
    nvimgcodec, decoder, params = _roi_decoder()
    streams = [nvimgcodec.CodeStream(d).get_sub_code_stream(region=nvimgcodec.Region(t, l, t + h, l + w))
               for d, (t, l, h, w) in zip(datas, windows)]
    out = []
    for image, (_, _, h, w) in zip(decoder.decode(streams, params=params), windows):
        x = None if image is None else torch.from_numpy(np.asarray(image))   # a view the Image keeps alive
        out.append(x if x is not None and tuple(x.shape) == (h, w, 3) else None)
    return out


def union_box(boxes: Sequence[tuple]) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the smallest window holding every ``(top, left, h, w, ...)`` box."""
    top, left = min(b[0] for b in boxes), min(b[1] for b in boxes)
    return top, left, max(b[0] + b[2] for b in boxes) - top, max(b[1] + b[3] for b in boxes) - left


def windowed(frame: tuple[int, int, int] | None) -> bool:
    """Whether ``"roi"`` decodes a JPEG with this frame header by window: 1- or 3-component ones
    (CMYK / YCCK ones in full: nvImageCodec's conversion of them to RGB differs from simplejpeg's by up
    to 2 levels, benchmarks/README.md, "Region-of-interest decode")."""
    return frame is not None and frame[2] in (1, 3)


def decode(data: bytes, decoder: str = "auto") -> torch.Tensor:
    """Decode to uint8 ``(H, W, 3)``; ``"auto"`` (and ``"roi"``, for a whole image) uses ``DEFAULT_FULL``
    and Pillow when it fails."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    decoder = "auto" if decoder == "roi" else decoder
    name = DEFAULT_FULL if decoder == "auto" else decoder
    if name != "pil":
        if _FULL[name] is None:
            raise ValueError(f"decoder {name!r} is not installed")
        try:
            return _FULL[name](data)
        except (ValueError, RuntimeError):   # not a JPEG libjpeg-turbo reads (never stored by make_shards)
            if decoder != "auto":
                raise
    return _pil(data)


def _resize(x: torch.Tensor, size: tuple[int, int], via_float: bool | None = None) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 ``(h, w, 3)`` to ``size`` ``(h, w)``, HWC out.

    Channels-last uint8 is the layout torch's vectorised antialias kernel wants. The NCHW view is made
    from ``(1, h, w, 3)`` so its strides are the canonical channels-last ones: a view made from ``(3, h, w)``
    has a batch stride torch does not read as channels-last, and the kernel then writes planar output,
    which made copying each crop out 35x slower (benchmarks/README.md, "Region-of-interest decode").
    Off the CPU (torch has no uint8 antialias kernel on CUDA) it computes in float32 and rounds
    (``via_float``, None: off the CPU), within 1 level of the uint8 kernel (tests/test_device_crops.py).
    """
    if tuple(x.shape[:2]) == tuple(size):
        return x
    if via_float is None:
        via_float = x.device.type != "cpu"
    x = x.contiguous().unsqueeze(0).permute(0, 3, 1, 2)
    if via_float:
        y = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    else:
        y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0)


def crop_boxes(data: bytes, uniforms: Sequence[np.ndarray], specs: Sequence[CropSpec],
               frame: tuple[int, int, int] | None = None) -> list[tuple[int, int, int, int, bool]]:
    """Each spec's ``(top, left, h, w, flip)`` in the image (its size from the JPEG frame header
    ``frame`` when given, else read by Pillow; raises on bytes that are no image)."""
    width, height = frame[:2] if frame is not None else Image.open(io.BytesIO(data)).size
    return [random_resized_crop(height, width, u, s) for u, s in zip(uniforms, specs)]


def decode_regions_on_host(datas: Sequence[bytes], regions: np.ndarray,
                           decoder: str = DEFAULT_FULL) -> list[torch.Tensor]:
    """Rows ``[top, top+h)`` × columns ``[left, left+w)`` (``regions[i]`` = ``(top, left, h, w)``) of
    each image, full-decoded by ``decoder`` on the host: the CPU stand-in of the GPU decode call."""
    return [decode(d, decoder)[t:t + h, l:l + w] for d, (t, l, h, w) in zip(datas, regions.tolist())]


def decode_crops(data: bytes, uniforms: Sequence[np.ndarray], specs: Sequence[CropSpec],
                 outs: Sequence[torch.Tensor], decoder: str = "auto") -> None:
    """Decode once and write one RandomResizedCrop (+ flip) per spec into ``outs`` (uint8 (s,s,3)).

    ``uniforms[i]`` drives crop ``i`` (see :func:`geometry.random_resized_crop`). Raises on bytes
    that cannot be decoded.
    """
    frame = jpeg_frame(data)
    size = None if frame is None else frame[:2]
    boxes = crop_boxes(data, uniforms, specs, frame)
    reduce = min(min(h, w) / s.size for (_, _, h, w, _), s in zip(boxes, specs))
    if decoder in ("auto", "pil") and reduce >= 2 and size is not None:
        width, height = size
        header = Image.open(io.BytesIO(data))
        # DCT-domain downscaling; the crop boxes are then cut with sub-pixel accuracy by Pillow
        header.draft("RGB", (-(-width // int(reduce)), -(-height // int(reduce))))
        sx, sy = header.size[0] / width, header.size[1] / height
        img = header if header.mode == "RGB" else header.convert("RGB")
        for (top, left, h, w, flip), spec, out in zip(boxes, specs, outs):
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
            y = _pil_to_hwc(img.resize((spec.size, spec.size), Image.BILINEAR, box=box))
            out.copy_(y.flip(1) if flip else y)
        return
    sizes = [s.size for s in specs]
    if decoder == "roi" and windowed(frame):
        error = cut_windowed_crops([data], [boxes], sizes, [outs])[0]
        if error is not None:
            raise error
        return
    cut_crops(decode(data, decoder), 0, 0, boxes, sizes, outs)


def cut_crops(img: torch.Tensor, top0: int, left0: int, boxes: Sequence[tuple], sizes: Sequence[int],
              outs: Sequence[torch.Tensor]) -> None:
    """Write each ``(top, left, h, w, flip)`` box of the image, resized to ``sizes[i]`` square and flipped
    when told, into ``outs[i]``; ``img`` holds the image's pixels from ``(top0, left0)`` on."""
    for (top, left, h, w, flip), size, out in zip(boxes, sizes, outs):
        y = _resize(img[top - top0:top - top0 + h, left - left0:left - left0 + w], (size, size))
        out.copy_(y.flip(1) if flip else y)


def cut_windowed_crops(datas: Sequence[bytes], boxes: Sequence[Sequence[tuple]], sizes: Sequence[int],
                       outs: Sequence[Sequence[torch.Tensor]]) -> list[Exception | None]:
    """``"roi"`` for many JPEGs at once: the union of each one's crop ``boxes`` decoded in one
    :func:`decode_windows` call, then its crops cut into ``outs[i]`` (the full decode where nvImageCodec
    cannot); per JPEG, None or the error that stopped its decode."""
    windows = [union_box(b) for b in boxes]
    errors: list[Exception | None] = []
    for data, box, window, img, out in zip(datas, boxes, windows, decode_windows(datas, windows), outs):
        try:
            img, top, left = (decode(data), 0, 0) if img is None else (img, window[0], window[1])
            cut_crops(img, top, left, box, sizes, out)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - the caller decides what a bad sample costs
            errors.append(exc)
    return errors


def decode_center(data: bytes, size: int, resize: int | None, out: torch.Tensor,
                  decoder: str = "auto") -> None:
    """Evaluation view into ``out`` (uint8 (size,size,3)): resize the short side to ``resize`` (if
    set), centre-crop ``size``. An image whose short side is below ``size`` is first resized up to
    ``size`` (no padding)."""
    img = decode(data, decoder)
    h, w = img.shape[:2]
    short = resize if resize is not None else max(size, min(h, w))
    if short != min(h, w):
        img = _resize(img, resize_short_size(h, w, short))
        h, w = img.shape[:2]
    top, left = center_crop_box(h, w, size)
    out.copy_(img[top:top + size, left:left + size])
