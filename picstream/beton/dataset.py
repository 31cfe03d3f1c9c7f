"""`BetonSet`: a .beton opened with FFCV's reader — its image and label fields, labels, raw sample bytes,
and the instance-ID order used for training on it in place."""
from __future__ import annotations

import importlib
import os

import numpy as np
import torch

from ..shards.retry import RetryStats

ID_FIELD = "id"  # written by `write_beton`: the picstream ID of each sample (= its beton index)


def is_beton(url) -> bool:
    return str(url).endswith(".beton")


def import_ffcv(module: str = "ffcv"):
    """Import an ffcv module, keeping torch's thread count (importing ffcv sets it to 1)."""
    threads = torch.get_num_threads()
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"FFCV is not installed ({e}); run `make ffcv` (pip install 'picstream[ffcv]')") \
            from None
    finally:
        torch.set_num_threads(threads)


class BetonSet:
    """A .beton with one RGBImageField (`image_field`, default: the only one) and an optional IntField
    label (`label_field`, default `label` if present).

    Instance IDs: a beton written by `write_beton` is already in picstream's ID order (its `id` field is
    0..N-1), so ID = beton index. Any other beton (e.g. class-sorted) is visited through a fixed random
    permutation of its indices chosen by `seed`: ID i is beton index `order[i]`, so a window of
    contiguous IDs — contiguous rows of the classifier store — is a random sample of the corpus."""

    def __init__(self, path: str, *, image_field: str | None = None, label_field: str | None = None,
                 seed: int = 0):
        fields = import_ffcv("ffcv.fields")
        reader_mod = import_ffcv("ffcv.reader")
        self.path = os.path.abspath(str(path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no such .beton file: {path}")
        self.reader = reader_mod.Reader(self.path)
        handlers = self.reader.handlers
        images = [n for n, h in handlers.items() if isinstance(h, fields.RGBImageField)]
        self.image_field = image_field or (images[0] if len(images) == 1 else None)
        if self.image_field not in images:
            raise ValueError(f"{path}: name the image field with --image-column / data.image_field "
                             f"(RGBImageFields: {', '.join(images) or 'none'})")
        ints = [n for n, h in handlers.items() if isinstance(h, fields.IntField)]
        if label_field is not None and label_field not in ints:
            raise ValueError(f"{path}: no IntField {label_field!r} (IntFields: {', '.join(ints) or 'none'})")
        self.label_field = label_field or ("label" if "label" in ints else None)
        n = int(self.reader.num_samples)
        picstream_order = ID_FIELD in ints and np.array_equal(self.column(ID_FIELD), np.arange(n))
        self.order = (np.arange(n, dtype=np.int64) if picstream_order
                      else np.random.default_rng(seed).permutation(n).astype(np.int64))
        self.seed = seed
        self.retry_stats = RetryStats()  # what the trainer reads from a train set: a local file never retries

    def __len__(self) -> int:
        return len(self.order)

    def column(self, field: str) -> np.ndarray:
        """A field's metadata for every sample (FFCV names the metadata columns f0, f1, ...)."""
        return self.reader.metadata[f"f{self.reader.field_names.index(field)}"]

    def beton_indices(self, ids) -> np.ndarray:
        return self.order[np.asarray(ids, dtype=np.int64)]

    def labels_of_indices(self, indices) -> np.ndarray:
        """Labels (-1 without a label field) of beton indices."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.label_field is None:
            return np.full(len(indices), -1, dtype=np.int64)
        return self.column(self.label_field)[indices].astype(np.int64)

    def image_table(self) -> dict[str, np.ndarray]:
        """Per beton index: `jpeg` (bool: JPEG bytes, else raw RGB pixels), `offset` and `size` of the
        stored bytes in the file, `width`, `height`."""
        meta = self.column(self.image_field)
        table = self.reader.alloc_table
        by_ptr = np.argsort(table["ptr"], kind="stable")
        at = by_ptr[np.searchsorted(table["ptr"][by_ptr], meta["data_ptr"])]
        return dict(jpeg=meta["mode"] == 0, offset=meta["data_ptr"].astype(np.int64),
                    size=table["size"][at].astype(np.int64), width=meta["width"].astype(np.int64),
                    height=meta["height"].astype(np.int64))
