"""Which plan inputs are removed as copies, in bounded memory (external sorts, plan.ExternalSort).

Items are the hashed training inputs (plan position `g`) and evaluation images (`src` = their eval set).
Every item has a rank: evaluation images first, then the larger picture (width × height), then a JPEG
(pack stores it byte-identical) before other formats, then the larger file (for JPEGs of one size: the
higher quality), then the name; of two copies the higher-ranked one is kept.

1. exact: sort by pixel hash; in each group of identical pixels the first item is kept. The others are
   `duplicate` (same bytes or same pixels), or `contaminates <eval set>` when the first is an
   evaluation image. Only the first item of each group goes on.
2. equal perceptual hashes (mode `near`): sort by hash; in each group the first goes on, the other
   training items are removed for it (`near-duplicate` or `contaminates`, hamming 0), so a bucket
   never holds two equal hashes (many all-black images cost a sort, not pairwise compares).
3. near (mode `near`, or any eval set): each item enters BANDS band buckets (bits [16b, 16b+16) of its
   128-bit perceptual hash, an Entry without the pixel and file hashes); two items within `threshold`
   bits share a bucket whenever they differ in fewer than BANDS bits (pigeonhole), and for copies
   almost always up to the default threshold (the low-frequency bands stay equal; measured in
   benchmarks/README.md). In each bucket, streamed in rank order BLOCK items at a time, every training
   item is compared with the higher-ranked ones; the highest-ranked match within the threshold, over
   all buckets, is what it is removed for: `near-duplicate`, or `contaminates <eval set>` (evaluation
   images outrank every training input). Without mode `near` only evaluation images are matched.

A removed input names the item it matches, which is kept or itself removed with its own match (a chain
of ever higher rank ending at a kept input or an eval image). Memory, independent of N and of the
bucket sizes: at most two sorts fill a buffer (RUN items) while one or two merge (plan.FAN_IN x BATCH
items each), plus one bucket's MEM_BLOCKS x BLOCK rows (the rest of a larger bucket is spilled and read
back a block at a time) and one BLOCK x BLOCK tile of distances.
"""
from __future__ import annotations

import itertools
import os
import pickle
import shutil
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from .plan import ExternalSort

MODES = ("exact", "near", "none")
DEFAULT_THRESHOLD = 24  # of the 128 bits
BANDS, BAND_BITS = 8, 16  # the bands of the 128-bit perceptual hash
BLOCK = 1024  # bucket items compared at once (BLOCK x BLOCK distances in memory)
MEM_BLOCKS = 16  # row blocks of a bucket held in memory; a larger bucket's others are spilled to disk
RUN = 16384  # items per spilled run of each sort (at most two fill a buffer while two merge)
BATCH = 256  # items per pickled batch (a merge holds FAN_IN batches)
_TOP = (1 << 63) - 1
_WORD = (1 << 64) - 1


class Item(NamedTuple):
    rank: bytes  # sort key: lower = kept first
    g: int  # plan position (-1: an evaluation image)
    name: str
    src: str | None  # the eval set of an evaluation image
    file: bytes
    pixels: bytes
    phash: int


class Entry(NamedTuple):
    """What a band bucket holds of an item."""
    rank: bytes
    g: int
    name: str
    src: str | None
    phash: int


class Removal(NamedTuple):
    g: int
    reason: str
    detail: str
    match: str  # name of the input (or eval image) it copies


def rank_key(is_eval: bool, area: int, jpeg: bool, size: int, name: str, serial: int) -> bytes:
    """Items in keeping order: eval images, larger pictures, JPEGs (stored as they are), larger files,
    names; `serial` makes it unique."""
    return (bytes([0 if is_eval else 1]) + (_TOP - area).to_bytes(8, "big") + bytes([0 if jpeg else 1])
            + (_TOP - size).to_bytes(8, "big") + name.encode() + b"\0" + serial.to_bytes(8, "big"))


def removals(items: Iterable[Item], mode: str, threshold: int, with_eval: bool, folder: str) -> Iterator[Removal]:
    """The removals among `items` (training inputs and, when `with_eval`, evaluation images), in plan
    order. `folder`: local scratch space, emptied first and removed at the end."""
    shutil.rmtree(folder, ignore_errors=True)  # never reuse the runs of another resolution
    try:
        os.makedirs(folder)
        sort = (lambda name: ExternalSort(os.path.join(folder, name), RUN, batch=BATCH))
        out, groups = sort("removed"), sort("exact")
        bands = sort("bands") if mode == "near" or with_eval else None
        same = sort("phash") if mode == "near" else None
        for it in items:
            groups.add(it.pixels + it.rank, it)
        survivor = ((lambda it: same.add(it.phash.to_bytes(16, "big") + it.rank, it)) if same is not None
                    else (lambda it: _add_bands(bands, it)) if bands is not None else None)
        stages = [_exact(groups, mode, survivor)]
        if same is not None:
            stages.append(_same_phash(same, bands))
        if bands is not None:
            stages.append(_near(bands, mode, threshold, folder))
        for stage in stages:  # each stage's input is complete once the one before has run
            for r in stage:
                out.add(r.g.to_bytes(8, "big"), r)
        yield from out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _add_bands(bands: ExternalSort, it: Item) -> None:
    """Enter `it` into its BANDS band buckets, as an Entry."""
    entry = Entry(it.rank, it.g, it.name, it.src, it.phash)
    for b in range(BANDS):
        v = (it.phash >> (BAND_BITS * b)) & ((1 << BAND_BITS) - 1)
        bands.add(bytes([b]) + v.to_bytes(BAND_BITS // 8, "big") + it.rank, (b, v, entry))


def _exact(groups: ExternalSort, mode: str, survivor) -> Iterator[Removal]:
    """Removals of identical pictures; the kept item of each group goes on to `survivor` (if any)."""
    for _, group in itertools.groupby(groups, key=lambda it: it.pixels):
        first = next(group)
        if survivor is not None:
            survivor(first)
        for it in group:
            if it.src is not None or (first.src is None and mode == "none"):
                continue
            how = "identical bytes" if it.file == first.file else "identical pixels"
            reason = "duplicate" if first.src is None else f"contaminates {first.src}"
            yield Removal(it.g, reason, how, first.name)


def _same_phash(same: ExternalSort, bands: ExternalSort) -> Iterator[Removal]:
    """Mode near: of each group of equal perceptual hashes only the first goes on into `bands`; the
    other training items are removed for it (hamming 0), without pairwise compares."""
    for _, group in itertools.groupby(same, key=lambda it: it.phash):
        first = next(group)
        _add_bands(bands, first)
        reason = "near-duplicate" if first.src is None else f"contaminates {first.src}"
        for it in group:
            if it.src is None:
                yield Removal(it.g, reason, "hamming 0", first.name)


def _near(bands: ExternalSort, mode: str, threshold: int, folder: str) -> Iterator[Removal]:
    """Removals of near copies: the best match of each training item over all band buckets."""
    matches = ExternalSort(os.path.join(folder, "matches"), RUN, batch=BATCH)
    for (b, _), entries in itertools.groupby(bands, key=lambda e: e[:2]):
        for g, best, d in bucket_matches((e[2] for e in entries), mode == "near", threshold,
                                         os.path.join(folder, "rows")):
            matches.add(g.to_bytes(8, "big") + best.rank + bytes([b]), (g, best, d))
    for _, found in itertools.groupby(matches, key=lambda m: m[0]):
        g, best, d = next(found)
        reason = "near-duplicate" if best.src is None else f"contaminates {best.src}"
        yield Removal(g, reason, f"hamming {d}", best.name)


class _Rows:
    """The items of one bucket that may be kept for a later one, in rank order and blocks of at most
    BLOCK: (bucket positions, hashes, their Entries); the first MEM_BLOCKS blocks in memory, the others
    appended to a scratch file and read back one block at a time."""

    def __init__(self, path: str):
        self.path, self.held, self.spilled, self.file = path, [], 0, None

    def add(self, pos: np.ndarray, hashes: np.ndarray, entries: list[Entry]) -> None:
        if len(self.held) < MEM_BLOCKS:
            self.held.append((pos, hashes, entries))
            return
        if self.file is None:
            self.file = open(self.path, "wb")
        pickle.dump((pos, hashes, entries), self.file, protocol=pickle.HIGHEST_PROTOCOL)
        self.file.flush()
        self.spilled += 1

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, list[Entry]]]:
        yield from self.held
        if self.spilled:
            with open(self.path, "rb") as f:
                for _ in range(self.spilled):
                    yield pickle.load(f)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            os.remove(self.path)


def bucket_matches(entries: Iterable[Entry], train_pairs: bool, threshold: int,
                   spill: str) -> Iterator[tuple[int, Entry, int]]:
    """(g, i, d) for each training item g of a rank-ordered bucket (streamed) that has a higher-ranked
    match i within `threshold` bits (the first such i): an evaluation image, or with `train_pairs` any
    item. Holds BLOCK columns, MEM_BLOCKS x BLOCK rows (the others in `spill`) and one BLOCK x BLOCK tile."""
    rows = _Rows(spill)
    try:
        start = 0
        for block in iter(lambda: list(itertools.islice(entries, BLOCK)), []):
            pos = np.arange(start, start + len(block))
            start += len(block)
            hashes = np.array([(e.phash >> 64, e.phash & _WORD) for e in block], dtype=np.uint64)
            is_eval = np.array([e.src is not None for e in block])
            keep = np.ones(len(block), bool) if train_pairs else is_eval
            if keep.any():
                rows.add(pos[keep], hashes[keep], [e for e, k in zip(block, keep) if k])
            cols = np.flatnonzero(~is_eval)
            best = np.full(len(cols), -1)  # the first match of each column (row order = rank order)
            found = [None] * len(cols)
            for rpos, rhash, rentries in rows.blocks() if len(cols) else ():
                dist = sum(np.bitwise_count(rhash[:, None, w] ^ hashes[None, cols, w]) for w in range(2))
                ok = (dist <= threshold) & (rpos[:, None] < pos[None, cols])
                first = ok.argmax(axis=0)
                for c in np.flatnonzero(ok.any(axis=0) & (best < 0)):
                    best[c], found[c] = dist[first[c], c], rentries[first[c]]
                if (best >= 0).all():
                    break
            for c in np.flatnonzero(best >= 0):
                yield block[cols[c]].g, found[c], int(best[c])
    finally:
        rows.close()
