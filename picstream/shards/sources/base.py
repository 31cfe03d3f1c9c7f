"""What every source adapter produces: a `Listing` of `Input`s, each with a locator its worker can read."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

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
    label: int  # -1 when unlabeled


@dataclass(frozen=True)
class Listing:
    url: str
    kind: str  # "folder" | "list" | "webdataset" | "parquet" | "datasets" | "beton"
    inputs: list[Input]
    label_names: list[str] | None
    options: dict = field(default_factory=dict)  # source options that change the output (fingerprinted)
    cleanup: Callable[[], None] | None = None  # removes staged copies once the shards are complete


def is_url(s: str) -> bool:
    return "://" in s


def local_path(url: str) -> str | None:
    """The local path of `url` (plain path or file://), None for a remote URL."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if is_url(url) else url


def code_labels(raw: list[str | None]) -> tuple[list[str] | None, list[int]]:
    """Labels from per-input strings (None = unlabeled): non-negative integers are used as-is (names
    "0".."max"), otherwise the sorted distinct strings are the label names."""
    given = [x for x in raw if x is not None]
    if not given:
        return None, [-1] * len(raw)
    if all(x.isdigit() for x in given):
        return ([str(i) for i in range(max(int(x) for x in given) + 1)],
                [int(x) if x is not None else -1 for x in raw])
    names = sorted(set(given))
    index = {c: i for i, c in enumerate(names)}
    return names, [index[x] if x is not None else -1 for x in raw]


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
