"""`ShardSet`: random and sequential access to a shard set through its manifest (local path or any URL)."""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict

import fsspec
import numpy as np

from . import format as F

INDEX_CACHE_SHARDS = 4096  # per-shard index arrays kept (24 bytes per sample)
RANGE_BYTES = 64 << 20  # iter_range reads at most this many bytes per request


class ShardSet:
    """A shard set opened from `…/manifest.json` or its folder. Safe to pickle and to use after fork."""

    def __init__(self, root: str, manifest: dict, storage_options: dict | None = None):
        if manifest.get("format") != F.FORMAT_NAME or manifest.get("version") != F.FORMAT_VERSION:
            raise ValueError(f"not a {F.FORMAT_NAME} v{F.FORMAT_VERSION} manifest: {root}")
        self.root = root.rstrip("/")
        self.manifest = manifest
        self.storage_options = dict(storage_options or {})
        self.shard_size: int = manifest["shard_size"]
        self.num_shards: int = manifest["num_shards"]
        self.label_names: list[str] | None = manifest["label_names"]
        self._shards = manifest["shards"]
        self._n: int = manifest["num_samples"]
        self._fs = None
        self._pid = None
        self._index: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def open(cls, url, storage_options: dict | None = None) -> "ShardSet":
        url = str(url)
        manifest_url = url if url.endswith(".json") else F.join(url, F.MANIFEST)
        fs, path = fsspec.core.url_to_fs(manifest_url, **(storage_options or {}))
        manifest = json.loads(fs.cat_file(path))
        return cls(manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else ".", manifest, storage_options)

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": None}

    @property
    def fs(self):
        """The filesystem, created lazily in each process (never shared across a fork)."""
        if self._fs is None or self._pid != os.getpid():
            self._fs = fsspec.core.url_to_fs(self.root, **self.storage_options)[0]
            self._pid = os.getpid()
        return self._fs

    def __len__(self) -> int:
        return self._n

    def shard_of(self, sample_id: int) -> int:
        self._check(sample_id)
        return int(sample_id) // self.shard_size

    def shard_ids(self, k: int) -> tuple[int, int]:
        """(first_id, count) of shard k."""
        s = self._shards[k]
        return s["first_id"], s["count"]

    def shard_url(self, k: int) -> str:
        return F.join(self.root, self._shards[k]["name"])

    def index(self, k: int) -> np.ndarray:
        """int64 (count, 3): offset of the image bytes in the tar, their size, label (-1 unlabeled)."""
        idx = self._index.get(k)
        if idx is None:
            data = self.fs.cat_file(F.join(self.root, self._shards[k]["index"]))
            idx = np.frombuffer(data, dtype=F.INDEX_DTYPE).reshape(-1, F.INDEX_COLUMNS).astype(np.int64)
            idx.setflags(write=False)
            if len(idx) != self._shards[k]["count"]:
                raise ValueError(f"index of shard {k} has {len(idx)} rows, the manifest says "
                                 f"{self._shards[k]['count']}")
            self._index[k] = idx
            if len(self._index) > INDEX_CACHE_SHARDS:
                self._index.popitem(last=False)
        else:
            self._index.move_to_end(k)
        return idx

    def labels(self, ids) -> np.ndarray:
        """int64 labels of `ids` (-1 for unlabeled samples)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self._n):
            raise IndexError(f"sample IDs must be in [0, {self._n})")
        out = np.empty(ids.shape, dtype=np.int64)
        shard = ids // self.shard_size
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self.index(int(k))[ids[sel] - k * self.shard_size, 2]
        return out

    def read(self, sample_id: int) -> bytes:
        """The image bytes of one sample, with one ranged read."""
        k = self.shard_of(sample_id)
        offset, size, _ = self.index(k)[int(sample_id) - k * self.shard_size]
        return self._read_range(k, int(offset), int(offset + size))

    def iter_range(self, start: int, stop: int):
        """Yield `(id, image bytes, label)` for IDs in [start, stop), reading contiguous byte ranges."""
        start, stop = max(0, int(start)), min(self._n, int(stop))
        sample_id = start
        while sample_id < stop:
            k = sample_id // self.shard_size
            first = k * self.shard_size
            idx = self.index(k)
            rows = idx[sample_id - first:min(stop, first + len(idx)) - first]
            i = 0
            while i < len(rows):
                lo = int(rows[i, 0])
                j = i + 1 + int(np.searchsorted(rows[i + 1:, 0] + rows[i + 1:, 1], lo + RANGE_BYTES, "right"))
                hi = int(rows[j - 1, 0] + rows[j - 1, 1])
                block = self._read_range(k, lo, hi)
                for off, size, label in rows[i:j]:
                    yield sample_id, block[off - lo:off - lo + size], int(label)
                    sample_id += 1
                i = j

    def verify(self, shards=None) -> list[str]:
        """Check sizes and sha256 of the given shards (all by default); a list of problems, empty if none."""
        problems = []
        for k in range(self.num_shards) if shards is None else shards:
            s = self._shards[k]
            for name, key in ((s["name"], "sha256"), (s["index"], "index_sha256")):
                try:
                    data = self.fs.cat_file(F.join(self.root, name))
                except FileNotFoundError:
                    problems.append(f"shard {k}: {name} is missing")
                    continue
                if key == "sha256" and len(data) != s["bytes"]:
                    problems.append(f"shard {k}: {name} has {len(data)} bytes, expected {s['bytes']}")
                elif hashlib.sha256(data).hexdigest() != s[key]:
                    problems.append(f"shard {k}: {name} checksum mismatch")
        return problems

    def _read_range(self, k: int, start: int, end: int) -> bytes:
        data = self.fs.cat_file(self.shard_url(k), start=start, end=end)
        if len(data) != end - start:
            if len(data) == self._shards[k]["bytes"]:  # a server that ignores Range sent the whole file
                return data[start:end]
            raise OSError(f"short read from {self.shard_url(k)}: {len(data)} of {end - start} bytes")
        return data

    def _check(self, sample_id: int) -> None:
        if not 0 <= sample_id < self._n:
            raise IndexError(f"sample ID {sample_id} out of range [0, {self._n})")
