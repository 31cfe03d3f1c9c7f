"""The shard format: file names, tar member layout, index layout, sample checksums and atomic writes
(see shards/README.md)."""
from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import xxhash
from fsspec.utils import get_protocol

from .. import iopoints

FORMAT_NAME = "picstream-shards"
FORMAT_VERSION = 2  # what make_shards writes with the shard records inline in manifest.json
RECORDS_VERSION = 3  # the same shards, with the records in a sidecar (large sets; see records.py)
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
DIGEST_KEY = "digest"  # manifest.json's own digest (manifest_digest); manifests without one are unverified
INDEX_DTYPE = np.dtype("<i8")
# v1 rows: (offset of the image bytes inside the tar, size, label or -1); v2 adds the image's checksum
INDEX_COLUMNS = {1: 3, 2: 4, 3: 4}
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar files are padded to a whole record, like tarfile/GNU tar do


class ShardsError(Exception):
    """A fatal condition, phrased for the user (missing source, no inputs, unwritable output, foreign
    output folder, a manifest that cannot be read or is not a valid one)."""


class SampleError(OSError):
    """A sample that cannot be used; ``reason`` names why (the key its skip is counted under)."""

    reason = "unreadable"


class MissingShard(SampleError, FileNotFoundError):
    reason = "missing"


class DamagedData(SampleError):
    reason = "damaged"


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs (a pure string test: creates no filesystem)."""
    return get_protocol(str(url)) in ("file", "local")


def sample_checksum(data: bytes) -> int:
    """The index v2 checksum of a sample's image bytes: xxh3-64 as a signed int64."""
    value = xxhash.xxh3_64_intdigest(data)
    return value - (1 << 64) if value >= 1 << 63 else value


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def index_name(k: int) -> str:
    return f"shard-{k:06d}.idx"


def sidecar_name(k: int) -> str:
    """Written atomically after shard k is complete; holds its checksums and the inputs it consumed."""
    return f"shard-{k:06d}.json"


def member_name(sample_id: int, ext: str) -> str:
    return f"{sample_id:012d}.{ext}"


def tar_header(name: str, size: int) -> bytes:
    """A reproducible ustar header (mtime 0, uid/gid 0, no owner names, mode 0644); equal to what
    `tarfile.TarInfo.tobuf(USTAR_FORMAT)` gives for those fields, built ~4x faster."""
    raw = name.encode("ascii")
    if len(raw) > 100 or not 0 <= size < 8**11:
        raise ValueError(f"cannot store {name!r} of {size} bytes in a ustar header")
    buf = bytearray(BLOCK)
    buf[0:len(raw)] = raw
    buf[100:124] = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
    buf[124:136] = b"%011o\x00" % size
    buf[136:157] = b"00000000000\x00        0"  # mtime, checksum placeholder, type "0" (file)
    buf[257:265] = b"ustar\x0000"
    buf[148:155] = b"%06o\x00" % sum(buf)
    return bytes(buf)


def padding(size: int, unit: int = BLOCK) -> bytes:
    return b"\0" * (-size % unit)


def end_of_archive(position: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record."""
    position += 2 * BLOCK
    return b"\0" * (2 * BLOCK) + padding(position, RECORD)


def json_bytes(obj) -> bytes:
    """Canonical JSON (sorted keys, compact) so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The manifest's digest: ``sha256:`` and the sha256 of its canonical JSON without the digest."""
    return "sha256:" + sha256_hex(json_bytes({k: v for k, v in manifest.items() if k != DIGEST_KEY}))


def manifest_bytes(manifest: dict) -> bytes:
    """The bytes of ``manifest.json``: `manifest` with its digest under DIGEST_KEY."""
    return json.dumps({**manifest, DIGEST_KEY: manifest_digest(manifest)}, indent=1).encode()


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename it into place."""
    tmp = path + ".tmp"
    iopoints.point("create", tmp)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    iopoints.point("rename", path)
    fs.mv(tmp, path)
