"""The end of make_shards' plan phase (before `plan.json`): duplicate removal and eval decontamination.

1. The eval sets (any make_shards source, a shard set included: its tars are a webdataset) are listed
   into `plan/eval-<k>-<c>.pkl`.
2. The hash pass: every plan list file and eval list is hashed into `plan/hashes-<list>` (hashing.py),
   one task per file, in local processes or as Dask tasks. A re-run keeps the hash files it finds.
3. The removals are decided in bounded memory (dedup.py) and each removed input's locator in its plan
   list becomes a `Removed`, which pack reads as a skip with the reason and the matched key: pack and
   finalize are unchanged, and packed + skipped = N still holds.
"""
from __future__ import annotations

import itertools
import os
import pickle
import tempfile
from collections import Counter
from contextlib import closing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Iterator

from . import format as F
from .convert import Skip
from .dedup import DEFAULT_THRESHOLD, MODES, Item, rank_key, removals
from .format import ShardsError
from .hashing import hash_file, load_hashes
from .plan import CHUNK, Plan, main_name, output_op, plan_path, spare_name
from .sources import Input, list_inputs


@dataclass(frozen=True)
class Hygiene:
    """What to remove: `dedup` exact | near | none, `threshold` (near copies: Hamming distance of the
    perceptual hashes), `evals` (sources whose images, and their copies, must not be trained on)."""
    dedup: str = "exact"
    threshold: int = DEFAULT_THRESHOLD
    evals: tuple[str, ...] = ()

    def __post_init__(self):
        if self.dedup not in MODES:
            raise ShardsError(f"--dedup must be one of {', '.join(MODES)}, got {self.dedup!r}")
        if not 0 <= self.threshold <= 32:
            raise ShardsError(f"--near-threshold must be in [0, 32], got {self.threshold}")

    @property
    def active(self) -> bool:
        return self.dedup != "none" or bool(self.evals)

    def options(self) -> dict:
        """The fingerprinted options (the threshold only where near copies are searched)."""
        near = self.dedup == "near" or bool(self.evals)
        return dict(dedup=self.dedup, **(dict(near_threshold=self.threshold) if near else {}),
                    **(dict(decontaminate=list(self.evals)) if self.evals else {}))


@dataclass(frozen=True)
class Removed:
    """The locator of a removed input: reading it raises the skip that records why."""
    reason: str
    detail: str
    match: str

    def read(self, storage_options=None):
        raise Skip(self.reason, self.detail, self.match)


def list_files(plan: Plan) -> list[tuple[str, int]]:
    """(plan list file, plan position of its first input), in plan order."""
    spare = [(spare_name(c), plan.units * plan.shard_size + c * CHUNK)
             for c in range(max(1, -(-plan.reserve // CHUNK)))]
    return [(main_name(u), u * plan.shard_size) for u in range(plan.units)] + spare


def clean_plan(plan: Plan, hygiene: Hygiene, out: str, fs, root: str, *, storage_options: dict | None = None,
               workers: int = 1, client=None, tmp: str | None = None) -> dict[str, int]:
    """Hash, decide and record the removals of OUT's plan lists; returns the count per reason."""
    so = storage_options or {}
    evals = [(src, _write_eval_lists(src, k, out, fs, root, so)) for k, src in enumerate(hygiene.evals)]
    lists = list_files(plan)
    names = [n for n, _ in lists] + [n for _, files in evals for n in files]
    run_hash_pass(names, out, so, workers, client)
    scratch = os.path.join(tmp or tempfile.gettempdir(), f"picstream-dedup-{plan.fingerprint[:20]}")
    found = removals(_items(fs, root, lists, evals), hygiene.dedup, hygiene.threshold, bool(evals), scratch)
    with closing(found):
        return _record(found, fs, root, lists, out)


def run_hash_pass(names: list[str], out: str, so: dict, workers: int, client) -> None:
    """`hash_file` for every name: as Dask tasks on `client`, else in `workers` local processes."""
    if client is not None:
        from .cluster import hash_on_dask
        hash_on_dask(names, out, client, so)
    elif workers > 1 and len(names) > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(hash_file, names, itertools.repeat(out), itertools.repeat(so)))
    else:
        for name in names:
            hash_file(name, out, so)


def _write_eval_lists(src: str, k: int, out: str, fs, root: str, so: dict) -> list[str]:
    """List eval set `src` into plan/eval-<k>-<c>.pkl (CHUNK inputs each); returns the file names."""
    listing = list_inputs(src, labels=False, storage_options=so, exclude=out)
    names, it = [], iter(listing.inputs)
    while chunk := [Input(i.name, i.locator, None) for i in itertools.islice(it, CHUNK)]:
        names.append(f"eval-{k:03d}-{len(names):06d}.pkl")
        data = pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
        output_op(out, lambda: F.write_atomic(fs, F.join(plan_path(root), names[-1]), data))
    if not names:
        raise ShardsError(f"eval set {src} has no inputs")
    return names


def _items(fs, root: str, lists: list, evals: list) -> Iterator[Item]:
    """The hashed training inputs (in plan order), then the eval images."""
    for name, g0 in lists:
        for i, inp, h in _hashed(fs, root, name):
            yield Item(rank_key(False, h.area, h.jpeg, h.size, inp.name, g0 + i), g0 + i, inp.name, None,
                       h.file, h.pixels, h.phash)
    serial = itertools.count()
    for src, files in evals:
        for name in files:
            for _, inp, h in _hashed(fs, root, name):
                yield Item(rank_key(True, h.area, h.jpeg, h.size, inp.name, next(serial)), -1, inp.name, src,
                           h.file, h.pixels, h.phash)


def _hashed(fs, root: str, name: str):
    """(index, Input, ImageHash) of the decodable inputs of plan list `name`."""
    inputs = pickle.loads(fs.cat_file(F.join(plan_path(root), name)))
    for i, (inp, h) in enumerate(zip(inputs, load_hashes(fs, root, name))):
        if h is not None:
            yield i, inp, h


def _record(found: Iterator, fs, root: str, lists: list, out: str) -> dict[str, int]:
    """Rewrite each plan list holding removed inputs with their `Removed` locators."""
    counts: Counter = Counter()
    pending = next(found, None)
    for name, g0 in lists:
        if pending is None:
            break
        path = F.join(plan_path(root), name)
        inputs = pickle.loads(fs.cat_file(path))
        changed = False
        while pending is not None and pending.g < g0 + len(inputs):
            inp = inputs[pending.g - g0]
            inputs[pending.g - g0] = Input(inp.name, Removed(pending.reason, pending.detail, pending.match),
                                           inp.label)
            counts[pending.reason] += 1
            changed = True
            pending = next(found, None)
        if changed:
            data = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)
            output_op(out, lambda: F.write_atomic(fs, path, data))
    return dict(sorted(counts.items()))
