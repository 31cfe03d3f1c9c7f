"""Batched region decode by nvImageCodec: the ``decode_regions`` of ``WindowLoader(decode="gpu")``.

:class:`NvImageCodecRegions` decodes each sample's region (the union of its crop boxes) with one
``Decoder.decode`` call per batch, on one torch device: on CUDA with nvImageCodec's default back ends
(GPU first), the images handed to torch on that device through DLPack (no host copy); on the CPU with
its libjpeg-turbo back end (as ``decoder="roi"``), where the regions equal
:func:`~.decode.decode_regions_on_host`'s exactly (tests/test_device_crops.py). The same code does both;
only the decoder and the hand-off differ. A sample it does not decode on the device takes the host's
full decode, cut to its region and moved to the device, counted by reason in ``fallbacks``: a non-JPEG,
a 4-component (CMYK / YCCK) JPEG (nvImageCodec's RGB conversion of them differs from simplejpeg's), or
one nvImageCodec fails on (no image, or not the region's shape). Bytes the host cannot decode either
raise :class:`UndecodableSample`.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from .decode import decode, jpeg_frame, nvimgcodec_decoder

__all__ = ["FALLBACK_REASONS", "NvImageCodecRegions", "UndecodableSample"]

log = logging.getLogger(__name__)

NOT_JPEG, FOUR_COMPONENTS, FAILED = "not a JPEG", "CMYK / YCCK", "nvImageCodec failed"
FALLBACK_REASONS = (NOT_JPEG, FOUR_COMPONENTS, FAILED)


class UndecodableSample(ValueError):
    """Sample ``index`` of a batch is decoded by neither nvImageCodec nor the host decoder."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class NvImageCodecRegions:
    """``decode_regions(datas, regions)`` on ``device`` (``regions[i]`` = ``(top, left, h, w)``) → one uint8
    ``(h, w, 3)`` tensor per sample on ``device``; ``host_decoder``: the fallback's full decoder.

    The nvImageCodec decoder is made on first use in each process (never inherited through a fork), on
    ``device``'s index (a bare ``"cuda"``: the current CUDA device then).
    ``fallbacks`` counts the samples decoded on the host, by reason (:data:`FALLBACK_REASONS`).
    """

    def __init__(self, device: torch.device | str, host_decoder: str = "auto"):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"nvImageCodec decodes on a CUDA device or the CPU, not {self.device}")
        self.host_decoder = host_decoder
        self.fallbacks: Counter[str] = Counter()
        self._made: tuple | None = None   # (pid, nvimgcodec module, Decoder, DecodeParams)

    def _decoder(self) -> tuple:
        if self._made is None or self._made[0] != os.getpid():
            cuda_index = None   # the CPU back end
            if self.device.type == "cuda":   # a bare "cuda" is the current device (a rank's, once it is set)
                cuda_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._made = (os.getpid(), *nvimgcodec_decoder(cuda_index, threads=0))
        return self._made[1:]

    def __call__(self, datas: Sequence[bytes], regions: np.ndarray) -> list[torch.Tensor]:
        nvimgcodec, decoder, params = self._decoder()
        regions = np.asarray(regions).tolist()
        out: list[torch.Tensor | None] = [None] * len(datas)
        on_host: dict[int, str] = {}
        streams, at = [], []
        for i, (data, (top, left, h, w)) in enumerate(zip(datas, regions)):
            frame = jpeg_frame(data)
            if frame is None or frame[2] == 4:
                on_host[i] = NOT_JPEG if frame is None else FOUR_COMPONENTS
                continue
            try:
                region = nvimgcodec.Region(top, left, top + h, left + w)
                streams.append(nvimgcodec.CodeStream(data).get_sub_code_stream(region=region))
                at.append(i)
            except RuntimeError:   # a header nvImageCodec cannot parse
                on_host[i] = FAILED
        if streams:
            cuda_stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
            for i, image in zip(at, decoder.decode(streams, params=params, cuda_stream=cuda_stream)):
                x = None if image is None else self._tensor(image)
                if x is None or tuple(x.shape) != (regions[i][2], regions[i][3], 3):
                    on_host[i] = FAILED
                else:
                    out[i] = x
        for i, reason in sorted(on_host.items()):
            out[i] = self._decode_on_host(i, datas[i], regions[i], reason)
        return out

    def _tensor(self, image) -> torch.Tensor:
        """A decoded nvImageCodec image as a torch tensor on ``self.device``, without a copy."""
        if self.device.type == "cuda":
            return torch.from_dlpack(image)   # synchronised with torch's current stream by the DLPack protocol
        return torch.from_numpy(np.asarray(image))   # a view of the host Image's buffer, which it keeps alive

    def _decode_on_host(self, index: int, data: bytes, region, reason: str) -> torch.Tensor:
        """Sample ``index``'s region from the host's full decode, on the device; counted under ``reason``."""
        level = logging.DEBUG if self.fallbacks[reason] else logging.WARNING
        self.fallbacks[reason] += 1
        log.log(level, "decoding a sample on the host (%s; %d so far)", reason, self.fallbacks[reason])
        top, left, h, w = region
        try:
            image = decode(data, self.host_decoder)
        except (ValueError, RuntimeError, OSError) as err:
            raise UndecodableSample(index, f"sample {index} of the batch ({len(data)} bytes) is decoded by "
                                           f"neither nvImageCodec ({reason}) nor {self.host_decoder!r}: {err}") from err
        return image[top:top + h, left:left + w].to(self.device)
