"""Source adapter for image files: a folder tree or a text/CSV file list (local or any fsspec URL).

Both are streamed: a folder tree is walked depth first with each folder's entries sorted (a folder sorts
as its name + "/"), which is the sorted order of the relative paths while holding one folder's entries
per level; a list file is read line by line."""
from __future__ import annotations

import csv
import io
import os
from typing import Callable, Iterator

import fsspec

from ..format import ShardsError
from .base import Input, Labels, Listing, is_url, nonempty


def list_files(src: str, *, labels: bool = True, storage_options: dict | None = None,
               exclude: str | None = None) -> Listing:
    """Every file of a folder tree (labels = first-level sub-folder names), or every entry of a list file.
    `exclude`: a local folder (the output) left out of a local source tree."""
    src = str(src)
    fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
    local = not is_url(src) or src.startswith("file://")
    try:
        exists = fs.exists(path)
    except Exception as e:  # noqa: BLE001 - network errors are just as fatal
        raise ShardsError(f"cannot access source {src}: {e}") from None
    if not exists:
        raise ShardsError(f"source not found: {src}")
    url = os.path.abspath(path) if local else src
    if fs.isdir(path):
        inputs, kind, coder = _list_folder(fs, path, local, labels, exclude), "folder", Labels(numeric=False)
    else:
        inputs, kind, coder = _list_file(fs, path, local, labels), "list", Labels()
    return Listing(url, kind, nonempty(inputs, f"no inputs found in {src}"), coder)


def _list_folder(fs, root: str, local: bool, labels: bool, exclude: str | None) -> Iterator[Input]:
    if local:
        root = os.path.abspath(root)
        if exclude and exclude.startswith("file://"):
            exclude = exclude[len("file://"):]
        skip = os.path.abspath(exclude) if exclude and not is_url(exclude) else None
        paths = _tree(_local_lister(root, skip), root)
        locate = lambda p: p  # noqa: E731
    else:
        root = root.rstrip("/")
        paths = _tree(lambda d: _remote_entries(fs, d), root)
        locate = fs.unstrip_protocol
    for p in paths:
        rel = p[len(root):].lstrip("/")
        yield Input(rel, locate(p), rel.split("/", 1)[0] if labels and "/" in rel else None)


def _tree(entries: Callable[[str], list[tuple[str, bool]]], folder: str) -> Iterator[str]:
    """The file paths under `folder` in sorted order; `entries(folder)` gives its (name, is folder)."""
    for name, is_dir in sorted(entries(folder), key=lambda e: e[0] + "/" if e[1] else e[0]):
        path = folder.rstrip("/") + "/" + name
        if is_dir:
            yield from _tree(entries, path)
        else:
            yield path


def _local_lister(root: str, skip: str | None):
    """Entries of local folders; symlinked folders are followed once (no cycles), `skip` is left out."""
    seen = {os.path.realpath(root)}

    def entries(folder: str) -> list[tuple[str, bool]]:
        try:
            with os.scandir(folder) as it:
                found = [(e.name, _is_dir(e)) for e in it]
        except OSError as err:
            raise ShardsError(f"cannot list {err.filename}: {err.strerror}") from None
        kept = []
        for name, is_dir in found:
            if is_dir:
                path = os.path.join(folder, name)
                real = os.path.realpath(path)
                if path == skip or real in seen:
                    continue
                seen.add(real)
            kept.append((name, is_dir))
        return kept

    return entries


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _remote_entries(fs, folder: str) -> list[tuple[str, bool]]:
    found = []
    for info in fs.ls(folder, detail=True):
        path = info["name"].rstrip("/")
        if path != folder.rstrip("/"):
            found.append((path.rsplit("/", 1)[-1], info["type"] == "directory"))
    return found


def _list_file(fs, path: str, local: bool, labels: bool) -> Iterator[Input]:
    base = os.path.dirname(os.path.abspath(path)) if local else fs.unstrip_protocol(path).rsplit("/", 1)[0]

    def locate(entry: str) -> str:
        if is_url(entry) or (local and os.path.isabs(entry)):
            return entry
        return os.path.join(base, entry) if local else base + "/" + entry

    first = True
    for r in _rows(fs, path):
        if not r or not r[0].strip() or r[0].startswith("#"):
            continue
        if first and r[0].strip().lower() == "path":
            first = False
            continue
        first = False
        entry = r[0].strip()
        yield Input(entry, locate(entry), r[1].strip() if labels and len(r) > 1 and r[1].strip() else None)


def _rows(fs, path: str) -> Iterator[list[str]]:
    try:
        with fs.open(path, "rb") as f:
            yield from csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
    except (UnicodeDecodeError, csv.Error):
        raise ShardsError(f"{path} is neither a folder nor a text file list") from None


def read_input(locator: str, storage_options: dict | None = None) -> bytes:
    if not is_url(locator):
        with open(locator, "rb") as f:
            return f.read()
    fs, path = fsspec.core.url_to_fs(locator, **(storage_options or {}))
    return fs.cat_file(path)
