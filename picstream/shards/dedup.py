"""Which plan inputs are removed as copies, in bounded memory (external sorts, plan.ExternalSort).

Items are the hashed training inputs (plan position `g`) and evaluation images (`src` = their eval set).
Every item has a rank: evaluation images first, then the larger picture (width × height), then a JPEG
(pack stores it byte-identical) before other formats, then the larger file (for JPEGs of one size: the
higher quality), then the name; of two copies the higher-ranked one is kept.

1. exact: sort by pixel hash; in each group of identical pixels the first item is kept. The others are
   `duplicate` (same bytes or same pixels), or `contaminates <eval set>` when the first is an
   evaluation image. Only the first item of each group goes on.
2. near (mode `near`, or any eval set): each item enters BANDS band buckets (bits [8b, 8b+8) of its
   perceptual hash); two items within `threshold` bits share a bucket whenever they differ in fewer
   than BANDS bits (pigeonhole), and almost always at BANDS bits or more (measured in
   benchmarks/README.md). In each bucket every training item is compared with the higher-ranked ones;
   the highest-ranked match within the threshold, over all buckets, is what it is removed for:
   `near-duplicate`, or `contaminates <eval set>` (evaluation images outrank every training input).
   Without mode `near` only evaluation images are matched.

A removed input names the item it matches, which is kept or itself removed with its own match (a chain
of ever higher rank ending at a kept input or an eval image). Memory: at most two sorts fill a buffer
(RUN items) while one or two merge (plan.FAN_IN x BATCH items each), plus the largest bucket (one band
value: about N / 256 survivors for uniform hashes).
"""
from __future__ import annotations

import itertools
import os
import shutil
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from .plan import ExternalSort

MODES = ("exact", "near", "none")
DEFAULT_THRESHOLD = 8
BANDS = 8  # 8-bit bands of the 64-bit perceptual hash
BLOCK = 1024  # bucket items compared at once (BLOCK x BLOCK distances in memory)
RUN = 16384  # items per spilled run of each sort (at most two fill a buffer while two merge)
BATCH = 256  # items per pickled batch (a merge holds FAN_IN batches)
_TOP = (1 << 63) - 1


class Item(NamedTuple):
    rank: bytes  # sort key: lower = kept first
    g: int  # plan position (-1: an evaluation image)
    name: str
    src: str | None  # the eval set of an evaluation image
    file: bytes
    pixels: bytes
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
        out = ExternalSort(os.path.join(folder, "removed"), RUN, batch=BATCH)
        bands = ExternalSort(os.path.join(folder, "bands"), RUN, batch=BATCH) if mode == "near" or with_eval else None
        groups = ExternalSort(os.path.join(folder, "exact"), RUN, batch=BATCH)
        for it in items:
            groups.add(it.pixels + it.rank, it)
        for r in _exact(groups, mode, bands):
            out.add(r.g.to_bytes(8, "big"), r)
        if bands is not None:
            for r in _near(bands, mode, threshold, os.path.join(folder, "matches")):
                out.add(r.g.to_bytes(8, "big"), r)
        yield from out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _exact(groups: ExternalSort, mode: str, bands: ExternalSort | None) -> Iterator[Removal]:
    """Removals of identical pictures; the kept item of each group goes on into `bands`."""
    for _, group in itertools.groupby(groups, key=lambda it: it.pixels):
        first = next(group)
        if bands is not None:
            for b in range(BANDS):
                v = (first.phash >> (8 * b)) & 255
                bands.add(bytes([b, v]) + first.rank, (b, v, first))
        for it in group:
            if it.src is not None or (first.src is None and mode == "none"):
                continue
            how = "identical bytes" if it.file == first.file else "identical pixels"
            reason = "duplicate" if first.src is None else f"contaminates {first.src}"
            yield Removal(it.g, reason, how, first.name)


def _near(bands: ExternalSort, mode: str, threshold: int, folder: str) -> Iterator[Removal]:
    """Removals of near copies: the best match of each training item over all band buckets."""
    matches = ExternalSort(folder, RUN, batch=BATCH)
    for (b, _), entries in itertools.groupby(bands, key=lambda e: e[:2]):
        bucket = [e[2] for e in entries]
        for j, i, d in bucket_matches(bucket, mode == "near", threshold):
            matches.add(bucket[j].g.to_bytes(8, "big") + bucket[i].rank + bytes([b]), (bucket[j].g, bucket[i], d))
    for _, found in itertools.groupby(matches, key=lambda m: m[0]):
        g, best, d = next(found)
        reason = "near-duplicate" if best.src is None else f"contaminates {best.src}"
        yield Removal(g, reason, f"hamming {d}", best.name)


def bucket_matches(bucket: list[Item], train_pairs: bool, threshold: int) -> Iterator[tuple[int, int, int]]:
    """(j, i, d) for each training item j of a rank-ordered bucket that has a higher-ranked match i
    within `threshold` bits (the first such i): an evaluation image, or with `train_pairs` any item."""
    hashes = np.array([it.phash for it in bucket], dtype=np.uint64)
    is_eval = np.array([it.src is not None for it in bucket])
    if not train_pairs and (is_eval.all() or not is_eval.any()):
        return
    allowed = np.flatnonzero(np.ones(len(bucket), bool) if train_pairs else is_eval)
    for lo in range(0, len(bucket), BLOCK):
        cols = np.arange(lo, min(lo + BLOCK, len(bucket)))
        best = np.full(len(cols), -1)  # the first match of each column (row order = rank order)
        dist_best = np.zeros(len(cols), int)
        candidates = allowed[allowed < cols[-1]]  # the items that may be kept for one of these
        for r0 in range(0, len(candidates), BLOCK):
            rows = candidates[r0:r0 + BLOCK]
            dist = np.bitwise_count(hashes[rows, None] ^ hashes[None, cols])  # (BLOCK, BLOCK)
            ok = (dist <= threshold) & (rows[:, None] < cols[None, :]) & ~is_eval[None, cols]
            new = ok.any(axis=0) & (best < 0)
            first = ok.argmax(axis=0)
            best[new], dist_best[new] = rows[first[new]], dist[first[new], np.flatnonzero(new)]
        for c in np.flatnonzero(best >= 0):
            yield int(cols[c]), int(best[c]), int(dist_best[c])
