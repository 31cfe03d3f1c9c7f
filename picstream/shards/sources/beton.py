"""Source adapter for FFCV .beton files (read with ffcv's reader): an RGBImageField in JPEG mode gives
the stored JPEG bytes (kept as-is when valid), raw mode gives pixels, handed on as a lossless PPM that
make_shards encodes at `--quality`; the label is a named IntField (`--label-column`, default `label`).
The inputs are made one at a time from the numpy metadata columns (tens of bytes per input)."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..format import ShardsError
from .base import Input, Labels, Listing, local_path, nonempty, read_range


@dataclass(frozen=True)
class BetonSample:
    """Locator of one sample's stored image: JPEG bytes, or raw RGB pixels of width x height."""
    path: str
    offset: int
    size: int
    jpeg: bool
    width: int
    height: int

    def read(self, storage_options: dict | None = None) -> tuple[bytes, dict]:
        data = read_range(self.path, self.offset, self.size)
        if self.jpeg:
            return data, {}
        pixels = np.frombuffer(data, np.uint8).reshape(self.height, self.width, 3)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PPM")
        return out.getvalue(), {}


def list_beton(src: str, *, labels: bool, image_field: str | None, label_field: str | None,
               storage_options: dict) -> Listing:
    from ...beton import BetonSet

    path = local_path(src)
    if path is None:
        raise ShardsError(f"a .beton source must be a local file (FFCV maps it into memory): {src}")
    try:
        beton = BetonSet(path, image_field=image_field, label_field=label_field)
    except (OSError, ValueError, ImportError, AssertionError) as e:
        raise ShardsError(str(e)) from None
    table = beton.image_table()  # numpy columns (FFCV holds the file's metadata table whole)
    codes = beton.labels_of_indices(np.arange(len(beton))) if labels else np.full(len(beton), -1)
    inputs = (Input(str(i), BetonSample(beton.path, int(o), int(n), bool(j), int(w), int(h)),
                    str(int(c)) if c >= 0 else None)
              for i, (o, n, j, w, h, c) in enumerate(zip(table["offset"], table["size"], table["jpeg"],
                                                         table["width"], table["height"], codes)))
    options = dict(image_column=beton.image_field, label_column=beton.label_field if labels else None)
    return Listing(beton.path, "beton", nonempty(inputs, f"no samples in {src}"), Labels(), options)
