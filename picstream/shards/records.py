"""The per-shard records of a version 3 manifest: a fixed-width binary sidecar read lazily by block.

Layout of `shards.bin` (all integers little-endian int64):

    header   magic b"PSRECRD1", num_shards, block (records per block)
    table    sha256 of each block of records (32 bytes per block)
    records  num_shards × (first_id, count, bytes, sha256[32], index_sha256[32])  (88 bytes each)

`manifest.json` holds the sha256 of header + table (`table_sha256`) and of the whole file (`sha256`).
Opening reads header + table (32 bytes per `block` shards: 32 KB at 1M shards of 1024) and checks it;
the records of shard k are one ranged read of its block, checked against the table before any record
of it is used. On a remote set a read that fails its check is retried by the shard set's retry policy
(kind "records"); one that still fails, or a local one, is a one-line :class:`ShardsError`. A fixed-width file
needs no library, is read by offset on any fsspec filesystem, and costs 88 bytes per shard.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from . import format as F
from .format import DamagedData, ShardsError
from .retry import RetryPolicy, RetryStats

RECORDS_FILE = "shards.bin"
MAGIC = b"PSRECRD1"
HEADER = struct.Struct("<8sqq")
RECORD = struct.Struct("<qqq32s32s")
BLOCK = 1024  # records per checked block (88 KB)
BLOCK_CACHE = 64  # blocks kept per process


def record_bytes(r: dict) -> bytes:
    """One shard's fixed-width record (from a dict with first_id, count, bytes, sha256, index_sha256)."""
    return RECORD.pack(r["first_id"], r["count"], r["bytes"], bytes.fromhex(r["sha256"]),
                       bytes.fromhex(r["index_sha256"]))


def assemble(body: bytes, block: int = BLOCK) -> bytes:
    """The sidecar bytes of concatenated records: header, block table, records."""
    step = block * RECORD.size
    table = b"".join(hashlib.sha256(body[i:i + step]).digest() for i in range(0, len(body), step))
    return HEADER.pack(MAGIC, len(body) // RECORD.size, block) + table + body


def describe(data: bytes) -> dict:
    """The manifest's entry for sidecar bytes from :func:`assemble`."""
    _, n, block = HEADER.unpack_from(data)
    table_end = HEADER.size + 32 * -(-n // block)
    return dict(name=RECORDS_FILE, sha256=F.sha256_hex(data), table_sha256=F.sha256_hex(data[:table_end]))


class Records:
    """Shard records of a v3 set, `records[k]` → the v2-style dict; blocks loaded on first use and
    checked against the table. ``retry`` (None: local, read once) is the policy of every read, its
    retries counted in ``stats``. Pickles without its cache (each process reads what it needs)."""

    def __init__(self, fs_of, root: str, manifest: dict, retry: RetryPolicy | None = None,
                 stats: RetryStats | None = None):
        self._fs_of, self.root, self.entry = fs_of, root, manifest["records"]
        self.retry, self.stats = retry, stats
        self.size, self.n = manifest["shard_size"], manifest["num_shards"]
        self.num_samples = manifest["num_samples"]
        self.url = F.join(root, self.entry["name"])
        self._table: list[bytes] | None = None
        self._block = 0
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()

    def __getstate__(self):
        return {**self.__dict__, "_cache": OrderedDict()}

    def __len__(self) -> int:
        return self.n

    def _checked(self, fn, what: str):
        """``fn()`` (a read and its check), under the retry policy when remote; a final failure is a
        one-line ShardsError."""
        try:
            return fn() if self.retry is None else self.retry.call(fn, what=f"reading {what}",
                                                                   kind="records", stats=self.stats)
        except FileNotFoundError:
            raise ShardsError(f"shard records {self.url} are missing") from None
        except OSError as err:
            raise ShardsError(f"shard records {self.url}: {err}") from None

    def _read(self, start: int, end: int) -> bytes:
        data = self._fs_of().cat_file(self.url, start=start, end=end)
        if len(data) > end - start:  # a server that ignores Range sent the whole file (checked below)
            data = data[start:end]
        if len(data) != end - start:
            raise DamagedData(f"read {len(data)} of {end - start} bytes at {start} (truncated?)")
        return data

    def open(self) -> None:
        """Read and check the header and the block table."""
        self._table, self._block = self._checked(self._read_table, "the header and block table")
        last = self[self.n - 1] if self.n else None
        held = (self.n - 1) * self.size + last["count"] if last else 0
        if held != self.num_samples:
            raise ShardsError(f"shard records {self.url}: the shards hold {held} samples, the manifest "
                              f"claims {self.num_samples}")

    def _read_table(self) -> tuple[list[bytes], int]:
        head = self._read(0, HEADER.size)
        magic, n, block = HEADER.unpack(head)
        table_end = HEADER.size + 32 * -(-n // block) if n == self.n and block >= 1 else HEADER.size
        raw = self._read(HEADER.size, table_end)
        if F.sha256_hex(head + raw) != self.entry["table_sha256"]:
            raise DamagedData("header and block table do not match their sha256 in the manifest")
        return [raw[i:i + 32] for i in range(0, len(raw), 32)], block

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < self.n:
            raise IndexError(f"shard {k} out of range [0, {self.n})")
        if self._table is None:
            self.open()
        b, i = divmod(k, self._block)
        block = self._cache.get(b)
        if block is None:
            block = self._load(b)
            self._cache[b] = block
            if len(self._cache) > BLOCK_CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(b)
        return block[i]

    def _load(self, b: int) -> list[dict]:
        first = b * self._block
        count = min(self._block, self.n - first)
        start = HEADER.size + 32 * len(self._table) + first * RECORD.size

        def read() -> bytes:
            data = self._read(start, start + count * RECORD.size)
            if hashlib.sha256(data).digest() != self._table[b]:
                raise DamagedData(f"block {b} (shards {first}..{first + count - 1}) does not match its "
                                  "checksum")
            return data
        data = self._checked(read, f"block {b}")
        out = []
        for j, (first_id, n, size, sha, isha) in enumerate(RECORD.iter_unpack(data)):
            k = first + j
            last = k == self.n - 1
            if first_id != k * self.size or not 0 < n <= self.size or (n != self.size and not last):
                raise ShardsError(f"shard records {self.url}: shard {k} holds IDs [{first_id}, "
                                  f"{first_id + n}), expected [{k * self.size}, {(k + 1) * self.size})")
            out.append(dict(name=F.shard_name(k), index=F.index_name(k), first_id=first_id, count=n,
                            bytes=size, sha256=sha.hex(), index_sha256=isha.hex()))
        return out
