"""Source adapter for tables with an image column: parquet files (a file, a folder, a brace/glob pattern or
any fsspec URL) and folders written by Hugging Face `datasets.save_to_disk` (Arrow stream files).

The build visits rows in a random permutation of the whole corpus, but a parquet row can only be read
with its whole row group (compressed pages). So the listing streams the source once, one record batch
at a time (never a whole file), into a local staged copy: an uncompressed Arrow stream file with the
columns (name, label, image bytes, read error), which the workers memory-map and read row by row. A finished staged
copy is reused by a re-run; it is deleted when the shards are complete. The image column holds bytes, or
`{"bytes", "path"}` structs as `datasets` writes them (a null `bytes` reads the file at `path`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator

import fsspec

from ..convert import EMPTY, READ_ERROR, Skip
from ..format import ShardsError
from .base import Input, Labels, Listing, common_root, expand, is_url, nonempty, relative

BATCH_ROWS = 256  # rows per record batch while streaming (bounds memory with large images)


@dataclass(frozen=True)
class TableRow:
    """Locator of one row of a staged copy: record batch and row within it."""
    path: str
    batch: int
    row: int

    def read(self, storage_options: dict | None = None) -> tuple[bytes, dict]:
        batch = _staged_batches(self.path)[self.batch]
        value, error = batch.column(2)[self.row].as_py(), batch.column(3)[self.row].as_py()
        if error is not None:  # recorded while staging (unreadable `path`)
            raise Skip(READ_ERROR, error)
        if value is None:
            raise Skip(EMPTY, "null image")
        return value, {}


_MAPPED: dict[str, list] = {}  # staged path -> its record batches (memory-mapped), per process


def _staged_batches(path: str) -> list:
    import pyarrow as pa

    if path not in _MAPPED:
        _MAPPED[path] = list(pa.ipc.open_stream(pa.memory_map(path)))
    return _MAPPED[path]


def list_table(src: str, kind: str, *, labels: bool, image_column: str | None, label_column: str | None,
               storage_options: dict, staging_dir: str) -> Listing:
    """Every row of a parquet source (`kind="parquet"`) or a `datasets` folder (`kind="datasets"`)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ShardsError(f"reading {kind} sources needs pyarrow: pip install 'picstream[parquet]'") from None
    files, root = (_dataset_files(src, storage_options) if kind == "datasets"
                   else expand(src, ".parquet", storage_options))
    schema = _schema(files[0], kind, storage_options)
    image_column = image_column or _image_column(schema)
    if image_column not in schema.names:
        raise ShardsError(f"no image column {image_column!r} in {files[0]} (columns: {', '.join(schema.names)})")
    if label_column is not None and label_column not in schema.names:
        raise ShardsError(f"no label column {label_column!r} in {files[0]} (columns: {', '.join(schema.names)})")
    label_column = label_column or ("label" if "label" in schema.names else None)
    label_column = label_column if labels else None
    sizes = [fsspec.core.url_to_fs(f, **storage_options)[0].size(f) for f in files]  # changed: re-staged
    key = json.dumps([kind, files, sizes, image_column, label_column]).encode()
    staged = os.path.join(staging_dir, hashlib.sha256(key).hexdigest()[:20] + ".arrow")
    if not os.path.exists(staged):
        _stage(files, root, kind, image_column, label_column, storage_options, staged)
    options = dict(image_column=image_column, label_column=label_column)
    coder = Labels(class_names=_class_names(schema, label_column))
    return Listing(src, kind, nonempty(_rows(staged), f"no rows found in {src}"), coder, options,
                   cleanup=lambda: _remove(staged))


def _rows(staged: str) -> Iterator[Input]:
    """The rows of a staged copy, one record batch at a time."""
    import pyarrow as pa

    for b, batch in enumerate(pa.ipc.open_stream(pa.memory_map(staged))):
        for r, (name, label) in enumerate(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())):
            yield Input(name, TableRow(staged, b, r), label)


def _dataset_files(src: str, so: dict) -> tuple[list[str], str]:
    fs, path = fsspec.core.url_to_fs(src, **so)
    state = json.loads(fs.cat_file(path.rstrip("/") + "/state.json"))
    files = [src.rstrip("/") + "/" + f["filename"] for f in state["_data_files"]]
    files = [os.path.abspath(f) if not is_url(f) else f for f in files]
    return files, common_root(files)


def _schema(url: str, kind: str, so: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb", **so) as f:
        return pq.ParquetFile(f).schema_arrow if kind == "parquet" else pa.ipc.open_stream(f).schema


def _image_column(schema) -> str:
    """`image` if present, else the only column of bytes or {bytes, path} structs."""
    import pyarrow as pa

    if "image" in schema.names:
        return "image"
    found = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
             or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)]
    if len(found) != 1:
        raise ShardsError(f"cannot tell the image column among {', '.join(schema.names)}: use --image-column")
    return found[0]


def _class_names(schema, label_column: str | None) -> list[str] | None:
    """The ClassLabel names `datasets` records in the schema metadata, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if label_column is None or meta is None:
        return None
    feature = json.loads(meta).get("info", {}).get("features", {}).get(label_column, {})
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" and "names" in feature else None


def _stage(files, root, kind, image_column, label_column, so, staged) -> None:
    """Stream every file's image and label columns into one local uncompressed Arrow stream file."""
    import pyarrow as pa

    os.makedirs(os.path.dirname(staged), exist_ok=True)
    schema = pa.schema([("name", pa.string()), ("label", pa.string()), ("image", pa.large_binary()),
                        ("error", pa.string())])
    tmp = staged + ".tmp"
    columns = [image_column] + ([label_column] if label_column else [])
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for url in files:
            name, row, base = relative(url, root), 0, url.rsplit("/", 1)[0]
            for batch in _batches(url, kind, columns, so):
                cells = [_image_bytes(v, base, so) for v in batch.column(0).to_pylist()]
                labels = ([_label_string(v) for v in batch.column(1).to_pylist()] if label_column
                          else [None] * len(cells))
                names = [f"{name}/{row + i}" for i in range(len(cells))]
                row += len(cells)
                writer.write_batch(pa.record_batch([
                    pa.array(names), pa.array(labels, pa.string()),
                    pa.array([c if isinstance(c, bytes) else None for c in cells], pa.large_binary()),
                    pa.array([c if isinstance(c, str) else None for c in cells], pa.string())], schema=schema))
    os.replace(tmp, staged)


def _batches(url: str, kind: str, columns: list[str], so: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fsspec.open(url, "rb", **so) as f:
            if kind == "parquet":
                yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns)
            else:
                for batch in pa.ipc.open_stream(f):
                    yield from _split(batch.select(columns))
    except (OSError, pa.ArrowException) as e:
        raise ShardsError(f"cannot read {url}: {e}") from None


def _split(batch):
    for start in range(0, batch.num_rows, BATCH_ROWS):
        yield batch.slice(start, BATCH_ROWS)


def _image_bytes(value, base: str, so: dict):
    """bytes, None (null image) or an error message (str) for one cell of the image column."""
    if not isinstance(value, dict):
        return value
    if value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path")
    if not path:
        return None
    url = path if is_url(path) or os.path.isabs(path) else f"{base}/{path}"
    try:
        with fsspec.open(url, "rb", **so) as f:
            return f.read()
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def _label_string(value) -> str | None:
    if value is None or isinstance(value, bool) or (isinstance(value, int) and value < 0):
        return None
    return str(value)


def _remove(path: str) -> None:
    os.remove(path)
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass  # other staged copies remain
