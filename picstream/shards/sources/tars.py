"""Source adapter for webdataset tars (img2dataset output included).

Samples are grouped by webdataset's own `group_by_keys` (key = path up to the first dot of the basename,
adjacent members), but the members come from `tarfile` in seekable mode: the build visits samples in a
random permutation of the whole corpus, so each sample must be readable on its own. tarfile lists the
members with their data offsets without reading the data (webdataset's iterator streams every byte), and
a sample is later read with one ranged read. A `.parquet` beside a tar (img2dataset's per-shard table)
adds its failed downloads as inputs that are skipped with their error message.
"""
from __future__ import annotations

import json
import sys
import tarfile
from dataclasses import dataclass
from typing import Iterator

import fsspec

from ..convert import Skip
from ..format import ShardsError
from .base import Input, Labels, Listing, expand, nonempty, read_range, relative

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image is the first of these a sample has
KEPT_EXTS = ("txt", "json")  # copied into the output's metadata
NO_IMAGE, NOT_DOWNLOADED = "no_image", "not_downloaded"  # skip reasons


@dataclass(frozen=True)
class TarSample:
    """Locator of one sample: its tar and the (ext, data offset, size) of the members it needs."""
    url: str
    members: tuple[tuple[str, int, int], ...]
    exts: tuple[str, ...]  # all member extensions of the sample (for the no-image message)

    def read(self, storage_options: dict | None = None) -> tuple[bytes, dict]:
        image = next((e for e in IMAGE_EXTS if e in self.exts), None)
        if image is None:
            raise Skip(NO_IMAGE, f"no {'/'.join(IMAGE_EXTS)} member (has {', '.join(self.exts)})")
        start = min(o for _, o, _ in self.members)
        blob = read_range(self.url, start, max(o + n for _, o, n in self.members) - start, storage_options)
        parts = {e: blob[o - start:o - start + n] for e, o, n in self.members}
        meta: dict = {}
        if "txt" in parts:
            meta["txt"] = parts["txt"].decode("utf-8", "replace")
        if "json" in parts:
            try:
                meta["json"] = json.loads(parts["json"])
            except ValueError:
                meta["json"] = parts["json"].decode("utf-8", "replace")
        return parts[image], meta


@dataclass(frozen=True)
class Missing:
    """Locator of an input listed by the source but absent from it (a failed download)."""
    reason: str
    detail: str

    def read(self, storage_options: dict | None = None):
        raise Skip(self.reason, self.detail)


def list_tars(src: str, *, labels: bool, label_key: str | None, storage_options: dict) -> Listing:
    """Every sample of every tar of SRC (a tar, a folder of tars, a brace/glob pattern or URL), streamed
    tar by tar (the tar URLs are listed first)."""
    urls, root = expand(src, ".tar", storage_options)
    options = {"label_key": label_key} if label_key else {}
    inputs = _inputs(urls, root, labels, label_key, storage_options)
    return Listing(src, "webdataset", nonempty(inputs, f"no samples found in {src}"), Labels(), options)


def _inputs(urls: list[str], root: str, labels: bool, label_key: str | None, so: dict) -> Iterator[Input]:
    for url in urls:
        name = relative(url, root)
        for key, locator, label in _samples(url, labels, label_key, so):
            yield Input(f"{name}/{key}", locator, label)
        for key, detail in _failures(url, so):
            yield Input(f"{name}/{key}", Missing(NOT_DOWNLOADED, detail), None)


def _samples(url: str, labels: bool, label_key: str | None, so: dict):
    """(key, TarSample, label string or None) for each sample of one tar, in tar order."""
    from webdataset.tariterators import group_by_keys, meta_prefix, meta_suffix

    try:
        with fsspec.open(url, "rb", **so) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            def members():
                for m in tar:
                    skip = "/" not in m.name and m.name.startswith(meta_prefix) and m.name.endswith(meta_suffix)
                    if m.isreg() and not skip:
                        yield dict(fname=m.name, data=m, __url__=url)

            for sample in group_by_keys(members()):
                parts = {e: m for e, m in sample.items() if not e.startswith("__")}
                wanted = [e for e in (*IMAGE_EXTS, *KEPT_EXTS) if e in parts]
                locator = TarSample(url, tuple((e, parts[e].offset_data, parts[e].size) for e in wanted),
                                    tuple(parts))
                yield sample["__key__"], locator, _label(tar, parts, labels, label_key)
    except (OSError, tarfile.TarError, ValueError) as e:
        raise ShardsError(f"cannot read tar {url}: {e}") from None


def _label(tar: tarfile.TarFile, parts: dict, labels: bool, label_key: str | None) -> str | None:
    """The sample's label as a string: from `.json[label_key]` when a key is given, else from `.cls`."""
    if not labels:
        return None
    if label_key is not None:
        if "json" not in parts:
            return None
        value = json.loads(tar.extractfile(parts["json"]).read()).get(label_key)
    elif "cls" in parts:
        value = tar.extractfile(parts["cls"]).read().decode().strip()
    else:
        return None
    if value is None or isinstance(value, bool) or (isinstance(value, int) and value < 0):
        return None
    return str(value)


def _failures(url: str, so: dict) -> Iterator[tuple[str, str]]:
    """(key, error message) of the failed downloads listed in img2dataset's parquet beside the tar."""
    table_url = url[:-len(".tar")] + ".parquet"
    fs, path = fsspec.core.url_to_fs(table_url, **so)
    if not fs.exists(path):
        return
    try:
        import pyarrow.parquet as pq
    except ImportError:
        print(f"make_shards: warning: pyarrow is not installed; failed downloads listed in {table_url} "
              "are not recorded (pip install 'picstream[parquet]')", file=sys.stderr)
        return
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if not {"key", "status"} <= set(pf.schema_arrow.names):
            return
        columns = ["key", "status"] + (["error_message"] if "error_message" in pf.schema_arrow.names else [])
        for batch in pf.iter_batches(columns=columns):
            rows = batch.to_pydict()
            for i, status in enumerate(rows["status"]):
                if status != "success":
                    message = rows.get("error_message", [None] * len(rows["status"]))[i]
                    yield str(rows["key"][i]), f"{status}: {message}"
