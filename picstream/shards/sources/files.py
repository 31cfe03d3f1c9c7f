"""Source adapter for image files: a folder tree or a text/CSV file list (local or any fsspec URL)."""
from __future__ import annotations

import csv
import io
import os

import fsspec

from ..format import ShardsError
from .base import Input, Listing, code_labels, is_url


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
        inputs, names = _list_folder(fs, path, local, labels, exclude)
        kind = "folder"
    else:
        inputs, names = _list_file(fs, path, local, labels)
        kind = "list"
    if not inputs:
        raise ShardsError(f"no inputs found in {src}")
    return Listing(url, kind, inputs, names)


def _list_folder(fs, root: str, local: bool, labels: bool, exclude: str | None):
    if local:
        root = os.path.abspath(root)
        if exclude and exclude.startswith("file://"):
            exclude = exclude[len("file://"):]
        skip = os.path.abspath(exclude) if exclude and not is_url(exclude) else None
        files, seen = [], {os.path.realpath(root)}
        for d, dirs, names in os.walk(root, onerror=_unlistable, followlinks=True):
            real = {x: os.path.realpath(os.path.join(d, x)) for x in dirs}
            dirs[:] = [x for x in dirs if os.path.join(d, x) != skip and real[x] not in seen]
            seen.update(real[x] for x in dirs)  # symlinked folders are followed once (no cycles)
            files += [os.path.join(d, f) for f in names]
        rels = sorted(os.path.relpath(f, root).replace(os.sep, "/") for f in files)
        locators = [os.path.join(root, r) for r in rels]
    else:
        root = root.rstrip("/")
        found = sorted(fs.find(root, withdirs=False))
        rels = [p[len(root):].lstrip("/") for p in found]
        locators = [fs.unstrip_protocol(p) for p in found]
    classes = sorted({r.split("/", 1)[0] for r in rels if "/" in r}) if labels else []
    index = {c: i for i, c in enumerate(classes)}
    inputs = [Input(r, loc, index[r.split("/", 1)[0]] if "/" in r and classes else -1)
              for r, loc in zip(rels, locators)]
    return inputs, classes or None


def _unlistable(err: OSError):
    raise ShardsError(f"cannot list {err.filename}: {err.strerror}")


def _list_file(fs, path: str, local: bool, labels: bool):
    try:
        text = fs.cat_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise ShardsError(f"{path} is neither a folder nor a text file list") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if r and r[0].strip() and not r[0].startswith("#")]
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    base = os.path.dirname(os.path.abspath(path)) if local else fs.unstrip_protocol(path).rsplit("/", 1)[0]
    entries = [r[0].strip() for r in rows]
    raw = [r[1].strip() if labels and len(r) > 1 and r[1].strip() else None for r in rows]
    names, codes = code_labels(raw)

    def locate(entry: str) -> str:
        if is_url(entry) or (local and os.path.isabs(entry)):
            return entry
        return os.path.join(base, entry) if local else base + "/" + entry

    return [Input(e, locate(e), c) for e, c in zip(entries, codes)], names


def read_input(locator: str, storage_options: dict | None = None) -> bytes:
    if not is_url(locator):
        with open(locator, "rb") as f:
            return f.read()
    fs, path = fsspec.core.url_to_fs(locator, **(storage_options or {}))
    return fs.cat_file(path)
