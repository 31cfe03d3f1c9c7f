"""`ShardSet`: random and sequential access to a shard set through its manifest (local path or any URL).

Remote reads go through one :class:`RetryPolicy`; every index is checked against the manifest's
sha256 and, in format v2, every sample's bytes against their checksum in the index.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Callable, TypeVar

import numpy as np

from . import format as F
from .format import DamagedData, MissingShard, ShardsError
from .records import Records
from .retry import RetryPolicy, RetryStats, Unavailable, filesystem_for_reads

INDEX_CACHE_SHARDS = 4096  # per-shard index arrays kept (32 bytes per sample)
RANGE_BYTES = 64 << 20  # iter_range reads at most this many bytes per request
SHARD_KEYS = {"name": str, "index": str, "first_id": int, "count": int, "bytes": int, "sha256": str,
              "index_sha256": str}
T = TypeVar("T")
log = logging.getLogger(__name__)


class _BadBody(OSError):
    """A manifest whose bytes are not a JSON document (retried when remote: it may be a cut body)."""


class _Damaged(_BadBody):
    """A manifest that does not match its own digest (retried when remote: it may be damaged in transit)."""


class DamagedManifest(ShardsError):
    """A manifest whose content does not match its digest."""


class ShardSet:
    """A shard set opened from `…/manifest.json` or its folder. Safe to pickle and to use after fork.

    ``retry`` is the policy of every remote read; ``retry_stats`` counts its retries in this process.
    """

    def __init__(self, root: str, manifest: dict, storage_options: dict | None = None,
                 retry: RetryPolicy | None = None, retry_stats: RetryStats | None = None):
        check_manifest(manifest, root)
        self.root = root.rstrip("/")
        self.manifest = manifest
        self.storage_options = dict(storage_options or {})
        self.digest: str | None = manifest.get(F.DIGEST_KEY)  # checked by open(); None: unverified
        self.version: int = manifest["version"]
        self.shard_size: int = manifest["shard_size"]
        self.num_shards: int = manifest["num_shards"]
        self.label_names: list[str] | None = manifest["label_names"]
        self.remote = not F.is_local(self.root)
        self.retry = retry or RetryPolicy()
        self.retry_stats = retry_stats or RetryStats()
        self._n: int = manifest["num_samples"]
        self._fs = None
        self._pid = None
        if self.version >= 3:  # records in a sidecar: header checked now, blocks read when needed
            self._shards = Records(lambda: self.fs, self.root, manifest,
                                   self.retry if self.remote else None, self.retry_stats)
            self._shards.open()
        else:
            self._shards = manifest["shards"]
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()
        self._failed: dict[int, OSError] = {}  # shards whose index could not be read, this run

    @classmethod
    def open(cls, url, storage_options: dict | None = None, retry: RetryPolicy | None = None) -> "ShardSet":
        """Open `url` (a manifest or its folder); every problem is a one-line :class:`ShardsError`
        (:class:`DamagedManifest` when its bytes do not match its digest, after the retries if remote)."""
        url = str(url)
        manifest_url = url if url.endswith(".json") else F.join(url, F.MANIFEST)
        retry, stats = retry or RetryPolicy(), RetryStats()
        try:
            fs, path = filesystem_for_reads(manifest_url, storage_options)
        except (ValueError, ImportError) as err:
            raise ShardsError(f"cannot open shard manifest {manifest_url}: {err}") from None

        def load() -> dict:
            raw = fs.cat_file(path)
            if not raw.strip():
                raise _BadBody("is empty")
            try:
                manifest = json.loads(raw)
            except ValueError as err:
                raise _BadBody(f"is not valid JSON (truncated?): {err}") from None
            check_digest(manifest)
            return manifest

        try:
            if F.is_local(manifest_url):
                manifest = load()
            else:
                manifest = retry.call(load, what=f"reading {manifest_url}", kind="manifest", stats=stats)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ShardsError(f"shard manifest not found: {manifest_url}") from None
        except _Damaged as err:
            raise DamagedManifest(f"shard manifest {manifest_url} {err}: it is damaged; restore it (or "
                                  "run make_shards finalize again)") from None
        except _BadBody as err:
            raise ShardsError(f"shard manifest {manifest_url} {err}") from None
        except Unavailable as err:
            cause = err.__cause__
            if isinstance(cause, _Damaged):
                raise DamagedManifest(f"shard manifest {manifest_url} {cause} in {retry.attempts} reads: "
                                      "the copy there is damaged") from None
            detail = f"{cause}" if isinstance(cause, _BadBody) else f"{err}"
            raise ShardsError(f"cannot read shard manifest {manifest_url}: {detail}") from None
        except PermissionError as err:
            raise ShardsError(f"cannot read shard manifest {manifest_url}: access denied ({err}): check the "
                              "credentials and the permissions of where it lies") from None
        except OSError as err:
            raise ShardsError(f"cannot read shard manifest {manifest_url}: {err}") from None
        root = manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else "."
        shardset = cls(root, manifest, storage_options, retry, stats)
        if shardset.digest is None:
            log.warning("shard manifest %s has no digest (written by an older make_shards): its content "
                        "is unverified", manifest_url)
        return shardset

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": None}

    @property
    def fs(self):
        """The filesystem, created lazily in each process (never shared across a fork)."""
        if self._fs is None or self._pid != os.getpid():
            self._fs = filesystem_for_reads(self.root, self.storage_options)[0]
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

    def shard_record(self, k: int) -> dict:
        """Shard k as the manifest lists it (v3: its records file): name, index, first_id, count, bytes,
        sha256, index_sha256."""
        return self._shards[k]

    def shard_url(self, k: int) -> str:
        return F.join(self.root, self._shards[k]["name"])

    def index_url(self, k: int) -> str:
        return F.join(self.root, self._shards[k]["index"])

    def remote_call(self, fn: Callable[[], T], *, what: str, kind: str) -> T:
        """``fn()`` under the retry policy when the shard set is remote; once when it is local."""
        if not self.remote:
            return fn()
        return self.retry.call(fn, what=what, kind=kind, stats=self.retry_stats)

    def index(self, k: int) -> np.ndarray:
        """int64 (count, 3): offset of the image bytes in the tar, their size, label (-1 unlabeled)."""
        return self._index_rows(k)[:, :3]

    def checksums(self, k: int) -> np.ndarray | None:
        """int64 (count,): each sample's image checksum (format v2), None for a v1 shard set."""
        return self._index_rows(k)[:, 3] if self.version >= 2 else None

    def check_sample(self, sample_id: int, data: bytes) -> bytes:
        """`data` if it is sample `sample_id`'s image as indexed; else :class:`DamagedData`."""
        k, i = divmod(int(sample_id), self.shard_size)
        sums = self.checksums(k)
        if sums is not None and F.sample_checksum(data) != sums[i]:
            raise DamagedData(f"sample {sample_id} (shard {k}) does not match its checksum")
        return data

    def has_index(self, k: int) -> bool:
        """True when shard k's index is loaded in this process (reading it makes no request)."""
        return k in self._rows

    def _index_rows(self, k: int) -> np.ndarray:
        rows = self._rows.get(k)
        if rows is not None:
            self._rows.move_to_end(k)
            return rows
        if k in self._failed:
            raise self._failed[k]
        try:
            rows = self.remote_call(lambda: self._load_index(k), what=f"reading the index of shard {k}",
                                    kind="index")
        except OSError as err:  # remembered: one failure per shard and run, not one per sample
            self._failed[k] = err
            raise
        self._rows[k] = rows
        if len(self._rows) > INDEX_CACHE_SHARDS:
            self._rows.popitem(last=False)
        return rows

    def _load_index(self, k: int) -> np.ndarray:
        s = self._shards[k]
        try:
            data = self.fs.cat_file(F.join(self.root, s["index"]))
        except FileNotFoundError:
            raise MissingShard(f"index of shard {k} is missing: {self.index_url(k)}") from None
        if F.sha256_hex(data) != s["index_sha256"]:
            raise DamagedData(f"index of shard {k} ({s['index']}, {len(data)} bytes) does not match "
                                "its sha256 in the manifest")
        columns = F.INDEX_COLUMNS[self.version]
        rows = np.frombuffer(data, dtype=F.INDEX_DTYPE).reshape(-1, columns).astype(np.int64)
        if len(rows) != s["count"]:
            raise DamagedData(f"index of shard {k} has {len(rows)} rows, the manifest says {s['count']}")
        rows.setflags(write=False)
        return rows

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
        """The image bytes of one sample, with one ranged read, checked against its checksum."""
        k = self.shard_of(sample_id)
        offset, size, _ = (int(v) for v in self.index(k)[int(sample_id) - k * self.shard_size])
        return self.remote_call(
            lambda: self.check_sample(sample_id, self._read_range(k, offset, offset + size)),
            what=f"reading sample {sample_id}", kind="range")

    def iter_range(self, start: int, stop: int):
        """Yield `(id, image bytes, label)` for IDs in [start, stop), reading contiguous byte ranges
        (every sample checked; a damaged one raises :class:`DamagedData`)."""
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
                block_rows, block_first = rows[i:j], sample_id

                def read_block() -> list[bytes]:
                    block = self._read_range(k, lo, int(block_rows[-1, 0] + block_rows[-1, 1]))
                    return [self.check_sample(block_first + n, block[off - lo:off - lo + size])
                            for n, (off, size, _) in enumerate(block_rows)]
                samples = self.remote_call(read_block, what=f"reading samples {block_first}.."
                                           f"{block_first + len(block_rows) - 1}", kind="range")
                for data, label in zip(samples, block_rows[:, 2]):
                    yield sample_id, data, int(label)
                    sample_id += 1
                i = j

    def verify(self, shards=None) -> list[str]:
        """Check the given shards (all by default) against the manifest: tar size and sha256, index
        sha256 and, in format v2, every sample's checksum (v3, all shards: also the records file's
        sha256). One line per damaged file, empty if none."""
        problems = []
        if self.version >= 3 and shards is None:
            entry = self.manifest["records"]
            url = F.join(self.root, entry["name"])
            data = self.remote_call(lambda: self.fs.cat_file(url), what=f"reading {url}", kind="records")
            if F.sha256_hex(data) != entry["sha256"]:
                problems.append(f"records: {entry['name']} does not match its sha256 in the manifest")
        for k in range(self.num_shards) if shards is None else shards:
            s = self._shards[k]
            url = F.join(self.root, s["name"])
            try:
                tar = self.remote_call(lambda: self.fs.cat_file(url), what=f"reading {url}", kind="shard")
            except FileNotFoundError:
                problems.append(f"shard {k}: {s['name']} is missing")
                tar = None
            if tar is not None and (len(tar) != s["bytes"] or F.sha256_hex(tar) != s["sha256"]):
                what = (f"has {len(tar)} bytes, expected {s['bytes']}" if len(tar) != s["bytes"]
                        else "checksum mismatch")
                damaged = self._damaged_samples(k, tar)
                problems.append(f"shard {k}: {s['name']} {what}"
                                + (f"; damaged samples: {damaged}" if damaged else ""))
            try:
                self.remote_call(lambda: self._load_index(k), what=f"reading the index of shard {k}",
                                 kind="index")
            except OSError as err:
                problems.append(f"shard {k}: {err}")
        return problems

    def _damaged_samples(self, k: int, tar: bytes) -> list[int]:
        """IDs of shard k's samples whose bytes in `tar` fail their checksum (none known for v1)."""
        try:
            rows, sums = self.index(k), self.checksums(k)
        except OSError:
            return []
        if sums is None:
            return []
        first = k * self.shard_size
        return [first + i for i, ((off, size, _), want) in enumerate(zip(rows.tolist(), sums.tolist()))
                if F.sample_checksum(tar[off:off + size]) != want]

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


def check_digest(manifest) -> None:
    """Raise :class:`_Damaged` unless `manifest` matches its digest; one without a digest passes
    (unverified) unless one of its keys is one character away from the digest's (a damaged key)."""
    if not isinstance(manifest, dict):
        return
    if F.DIGEST_KEY in manifest:
        if manifest[F.DIGEST_KEY] != F.manifest_digest(manifest):
            raise _Damaged("does not match its digest")
        return
    for key in manifest:
        if len(key) == len(F.DIGEST_KEY) and sum(a != b for a, b in zip(key, F.DIGEST_KEY)) == 1:
            raise _Damaged(f"has a damaged digest key ({key!r})")


def check_manifest(manifest, where: str) -> None:
    """Raise a one-line :class:`ShardsError` unless `manifest` is a consistent shard manifest (v3: its
    header; the records file is checked when read)."""
    def bad(why: str):
        return ShardsError(f"{where}: not a valid {F.FORMAT_NAME} manifest: {why}")

    if not isinstance(manifest, dict) or manifest.get("format") != F.FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardsError(f"{where}: not a {F.FORMAT_NAME} manifest (format: {found!r})")
    version = manifest.get("version")
    if version not in F.READABLE_VERSIONS:
        raise ShardsError(f"{where}: shard format version {version!r} is not supported (this picstream "
                          f"reads versions {', '.join(map(str, F.READABLE_VERSIONS))})")
    for key in ("num_samples", "shard_size", "num_shards"):
        if type(manifest.get(key)) is not int or manifest[key] < 0:
            raise bad(f"'{key}' must be a non-negative integer, got {manifest.get(key)!r}")
    if not isinstance(manifest.get("label_names", 0), (list, type(None))):
        raise bad("'label_names' must be a list or null")
    if version >= 3:
        entry = manifest.get("records")
        if not isinstance(entry, dict) or any(type(entry.get(k)) is not str
                                              for k in ("name", "sha256", "table_sha256")):
            raise bad("'records' must name the records file with its sha256 and table_sha256")
        if manifest["num_samples"] == 0 or manifest["num_shards"] != -(-manifest["num_samples"]
                                                                      // max(manifest["shard_size"], 1)):
            raise bad(f"{manifest['num_samples']} samples in {manifest['num_shards']} shards of "
                      f"{manifest['shard_size']}")
        return
    shards, size = manifest.get("shards"), manifest["shard_size"]
    if not isinstance(shards, list) or len(shards) != manifest["num_shards"]:
        raise bad(f"'shards' must list num_shards={manifest['num_shards']} shards")
    for k, s in enumerate(shards):
        if not isinstance(s, dict) or any(type(s.get(key)) is not tp for key, tp in SHARD_KEYS.items()):
            raise bad(f"shard {k} must have {', '.join(SHARD_KEYS)}")
        last = k == len(shards) - 1
        if s["first_id"] != k * size or not 0 < s["count"] <= size or (s["count"] != size and not last):
            raise bad(f"shard {k} holds IDs [{s['first_id']}, {s['first_id'] + s['count']}), expected "
                      f"{'up to ' if last else ''}[{k * size}, {(k + 1) * size})")
    held = sum(s["count"] for s in shards)
    if held != manifest["num_samples"]:
        raise bad(f"it claims {manifest['num_samples']} samples but its shards hold {held}")
    if held == 0:
        raise ShardsError(f"{where}: the shard set holds no samples")
