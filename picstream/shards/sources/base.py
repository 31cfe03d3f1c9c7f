"""What every source adapter produces: a `Listing` that streams `Input`s, each with a locator its worker
can read, and the `Labels` that code their label strings once the stream has ended."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import fsspec

from ..format import ShardsError


@dataclass(frozen=True)
class SourceOptions:
    """How to read SRC. `kind`: auto | files | webdataset | parquet | datasets | beton.
    `image_column`/`label_column`: parquet/datasets columns or .beton fields; `label_key`: the label's key
    in a webdataset sample's `.json`; `staging_dir`: local folder for the staged copy of table sources."""
    kind: str = "auto"
    image_column: str | None = None
    label_column: str | None = None
    label_key: str | None = None
    staging_dir: str | None = None


@dataclass(frozen=True)
class Input:
    name: str  # how the input is recorded: path relative to the source, list entry, or container/key
    locator: object  # a local path or URL (str), or a container record with `read(storage_options)`
    label: int | str | None  # in a Listing the label string (None: unlabeled); in a plan its code (-1)


class Labels:
    """Codes the label strings of a listing once all of them are seen, holding only the distinct strings:
    when `numeric` and every label is a non-negative integer, the integers themselves (names "0".."max",
    or `class_names` extended to max), otherwise the rank among the sorted distinct strings."""

    def __init__(self, numeric: bool = True, class_names: list[str] | None = None):
        self.numeric, self.class_names, self.seen = numeric, class_names, set()
        self._index: dict | None = None

    def add(self, raw: str | None) -> None:
        if raw is not None:
            self.seen.add(raw)

    def finish(self) -> list[str] | None:
        """The label names (None: no label at all); `code` works from here on."""
        if not self.seen:
            self._index = {}
            return None
        if self.numeric and all(x.isdigit() for x in self.seen):
            known = self.class_names or []
            return known + [str(i) for i in range(len(known), max(int(x) for x in self.seen) + 1)]
        names = sorted(self.seen)
        self._index = {c: i for i, c in enumerate(names)}
        return names

    def code(self, raw: str | None) -> int:
        if raw is None:
            return -1
        return int(raw) if self._index is None else self._index[raw]


@dataclass(frozen=True)
class Listing:
    url: str
    kind: str  # "folder" | "list" | "webdataset" | "parquet" | "datasets" | "beton"
    inputs: Iterator[Input]  # streamed once, in listing order, labels as strings
    labels: Labels
    options: dict = field(default_factory=dict)  # source options that change the output (fingerprinted)
    cleanup: Callable[[], None] | None = None  # removes staged copies once the shards are complete


def nonempty(inputs: Iterable[Input], message: str) -> Iterator[Input]:
    """`inputs`, passed on; a ShardsError(`message`) at the end if there was none."""
    empty = True
    for inp in inputs:
        empty = False
        yield inp
    if empty:
        raise ShardsError(message)


def is_url(s: str) -> bool:
    return "://" in s


def local_path(url: str) -> str | None:
    """The local path of `url` (plain path or file://), None for a remote URL."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if is_url(url) else url


def read_range(url: str, start: int, size: int, storage_options: dict | None = None) -> bytes:
    """`size` bytes of a local file or URL from `start` (one ranged read)."""
    path = local_path(url)
    if path is not None:
        with open(path, "rb") as f:
            return os.pread(f.fileno(), size, start)
    fs, p = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.cat_file(p, start=start, end=start + size)


def expand(src: str, suffix: str, storage_options: dict) -> tuple[list[str], str]:
    """The files of SRC ending in `suffix`: SRC itself, every such file under a folder (recursively), or
    the files matching a brace and/or glob pattern. Returns (sorted URLs or paths, common root)."""
    from webdataset.shardlists import expand_urls  # brace expansion exactly as webdataset does it

    found: list[str] = []
    for pattern in expand_urls(src):
        fs, path = fsspec.core.url_to_fs(pattern, **storage_options)
        try:
            if any(c in path for c in "*?["):
                paths = sorted(fs.glob(path))
            elif fs.isdir(path):
                paths = sorted(p for p in fs.find(path, withdirs=False) if p.endswith(suffix))
            else:
                paths = [path] if fs.exists(path) else []
        except Exception as e:  # noqa: BLE001 - network errors are just as fatal
            raise ShardsError(f"cannot access source {pattern}: {e}") from None
        if not paths and "{" not in src:
            raise ShardsError(f"source not found: {pattern}")
        local = local_path(pattern) is not None
        found += [os.path.abspath(p) if local else fs.unstrip_protocol(p) for p in paths]
    if not found:
        raise ShardsError(f"no {suffix} files found in {src}")
    found = sorted(dict.fromkeys(found))
    return found, common_root(found)


def common_root(paths: list[str]) -> str:
    """The deepest folder (path or URL) holding all of `paths`."""
    parts = [p.split("/") for p in paths]
    common = os.path.commonprefix(parts)
    if len(common) == len(parts[0]):  # a single file: its folder
        common = common[:-1]
    return "/".join(common)


def relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if root else path
