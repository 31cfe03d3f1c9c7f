"""Source adapters for `make_shards`: each streams a corpus's inputs (name, locator, label string) and
reads one input's bytes. Image files (folder tree or list) `files`; webdataset/img2dataset tars `tars`; parquet and
`datasets` folders `tables`; FFCV .beton files `beton`."""
from __future__ import annotations

import os
import tempfile

import fsspec

from ..format import ShardsError
from .base import Input, Labels, Listing, SourceOptions, local_path
from .files import list_files, read_input

KINDS = ("auto", "files", "webdataset", "parquet", "datasets", "beton")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm")

__all__ = ["Input", "KINDS", "Labels", "Listing", "SourceOptions", "detect_kind", "list_inputs", "read_sample"]


def list_inputs(src: str, *, labels: bool = True, storage_options: dict | None = None,
                exclude: str | None = None, source: SourceOptions | None = None) -> Listing:
    """The inputs of SRC, read by the adapter of its kind (`source.kind`, or detected).
    `exclude`: the output, left out of a local source tree; table sources stage beside it when local."""
    src, so, source = str(src), storage_options or {}, source or SourceOptions()
    if source.kind not in KINDS:
        raise ShardsError(f"unknown source kind {source.kind!r} (one of {', '.join(KINDS)})")
    kind = detect_kind(src, so) if source.kind == "auto" else source.kind
    if kind == "files":
        return list_files(src, labels=labels, storage_options=so, exclude=exclude)
    if kind == "webdataset":
        from .tars import list_tars
        return list_tars(src, labels=labels, label_key=source.label_key, storage_options=so)
    if kind == "beton":
        from .beton import list_beton
        return list_beton(src, labels=labels, image_field=source.image_column,
                          label_field=source.label_column, storage_options=so)
    from .tables import list_table
    return list_table(src, kind, labels=labels, image_column=source.image_column,
                      label_column=source.label_column, storage_options=so,
                      staging_dir=source.staging_dir or _staging_dir(exclude))


def read_sample(locator, storage_options: dict | None = None) -> tuple[bytes, dict]:
    """The bytes of one input and the metadata its source keeps with it (e.g. a webdataset caption)."""
    if isinstance(locator, str):
        return read_input(locator, storage_options), {}
    return locator.read(storage_options)


def detect_kind(src: str, so: dict) -> str:
    """By suffix (.tar or a brace pattern of them, .parquet, .beton); a folder by its top level: a
    `datasets` state.json, else image files, else tars, else parquet files; anything else is files."""
    for suffix, kind in ((".tar", "webdataset"), (".parquet", "parquet"), (".beton", "beton")):
        if src.rstrip("/").endswith(suffix):
            return kind
    fs, path = fsspec.core.url_to_fs(src, **so)
    try:
        if not fs.isdir(path):
            return "files"
        entries = fs.ls(path, detail=False)
    except Exception:  # noqa: BLE001 - the files adapter reports access errors
        return "files"
    names = [e.rstrip("/").rsplit("/", 1)[-1].lower() for e in entries]
    if "state.json" in names and "dataset_info.json" in names:
        return "datasets"
    if any(n.endswith(IMAGE_SUFFIXES) for n in names):
        return "files"
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    return "files"


def _staging_dir(out: str | None) -> str:
    path = local_path(out) if out else None
    if path is not None:
        return os.path.join(os.path.abspath(path), ".staging")
    return os.path.join(tempfile.gettempdir(), "picstream-staging")
