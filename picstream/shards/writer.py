"""Write one shard: the tar (temp name, renamed when complete) and its index."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .. import iopoints
from . import format as F


@dataclass(frozen=True)
class ShardRecord:
    """One shard as listed in the manifest (and its sidecar)."""

    name: str
    index: str
    first_id: int
    count: int
    bytes: int
    sha256: str
    index_sha256: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


class ShardWriter:
    """Appends samples `first_id, first_id + 1, ...` to shard `k` under `root` on filesystem `fs`."""

    def __init__(self, fs, root: str, k: int, first_id: int):
        self.fs, self.k, self.first_id = fs, k, first_id
        self.path = F.join(root, F.shard_name(k))
        self.index_path = F.join(root, F.index_name(k))
        self._tmp = self.path + ".tmp"
        self._file = fs.open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._pos = 0
        self._rows: list[tuple[int, int, int, int]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def _member(self, name: str, data: bytes) -> int:
        self._write(F.tar_header(name, len(data)))
        offset = self._pos
        self._write(data)
        self._write(F.padding(len(data)))
        return offset

    def add(self, image: bytes, label: int, meta: dict) -> int:
        """Append one sample (JPEG bytes, label or -1, metadata); returns its ID."""
        sample_id = self.first_id + len(self._rows)
        offset = self._member(F.member_name(sample_id, "jpg"), image)
        if label >= 0:
            self._member(F.member_name(sample_id, "cls"), str(label).encode())
        self._member(F.member_name(sample_id, "json"), F.json_bytes(meta))
        self._rows.append((offset, len(image), label, F.sample_checksum(image)))
        return sample_id

    def close(self) -> ShardRecord:
        """Finish the tar, write the index, rename the tar into place."""
        self._write(F.end_of_archive(self._pos))
        self._file.close()
        columns = F.INDEX_COLUMNS[F.FORMAT_VERSION]
        index = np.asarray(self._rows, dtype=F.INDEX_DTYPE).reshape(-1, columns).tobytes()
        F.write_atomic(self.fs, self.index_path, index)
        iopoints.point("rename", self.path)
        self.fs.mv(self._tmp, self.path)
        return ShardRecord(F.shard_name(self.k), F.index_name(self.k), self.first_id, len(self._rows),
                           self._pos, self._sha.hexdigest(), F.sha256_hex(index))

    def abort(self) -> None:
        self._file.close()
        self.fs.rm(self._tmp)
