"""Phase 1 of make_shards: list the inputs once, put them in the ID permutation with an external-memory
sort, and write the plan: per-unit input lists and `plan/plan.json` (written last, with the fingerprint).

The permutation sorts the inputs by `blake2b(name, key=str(seed), digest_size=8)` (big-endian), ties by
listing position. Layout of a plan of N inputs, shard size s, `spare` r per unit:

    units   M = N // (s + r) (M = 0 without `spare`: the one-command form packs everything in order)
    main    unit u: permutation positions [u·s, (u+1)·s)           plan/main-%06d.pkl
    reserve positions [M·s, N), unit u's share [⌊uR/M⌋, ⌊(u+1)R/M⌋)  plan/spare-%06d.pkl (CHUNK each)

`pack` makes shard u from unit u's main inputs, then its reserve until it has s valid samples;
`finalize` packs the reserve inputs the units did not use, in order, as shards M, M+1, .... With no
input skipped that is exactly permutation order, the layout of a sequential build.

A killed plan resumes: the sorted runs of the listing are kept in `spill_folder` until `plan.json` is
written, and a re-run reuses those whose listing lines are unchanged (`ExternalSort`).
The listing is consumed as a stream (labels coded after it ends, see `sources.Labels`). Peak memory of
the sort: (RUN + FAN_IN·BATCH) inputs, independent of N.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import json
import math
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator

import fsspec

from ..iopoints import point, replace_file
from . import format as F
from .format import ShardsError
from .sources import Input

BUILD_FILE = "build.json"  # claims OUT for one fingerprint (written first)
PLAN_DIR = "plan"
PLAN_FILE = "plan.json"  # the plan is complete (written last)
CHUNK = 4096  # reserve inputs per plan file
RUN = 1 << 17  # inputs sorted in memory per spilled run
FAN_IN = 64  # runs merged at once
BATCH = 1024  # inputs per pickled batch of a run
RUNS_FILE = "runs.json"  # the recorded runs of a spill folder
MERGED = "merged-"  # intermediate merges (removed as read)


@dataclass(frozen=True)
class Plan:
    fingerprint: str
    num_inputs: int
    shard_size: int
    units: int  # M
    seed: int
    options: dict
    source: dict  # url, kind
    label_names: list | None
    spare: int | None  # reserve inputs per unit (None: no units)
    removed: dict | None = None  # inputs removed as copies, per reason (hygiene.py)

    @property
    def reserve(self) -> int:
        return self.num_inputs - self.units * self.shard_size

    def reserve_range(self, u: int) -> tuple[int, int]:
        """Unit u's share of the reserve (indices into the reserve region)."""
        return self.reserve * u // self.units, self.reserve * (u + 1) // self.units


def sort_key(name: str, key: bytes, position: int) -> bytes:
    """The permutation's sort key: keyed blake2b of the name (big-endian), then the listing position."""
    return hashlib.blake2b(name.encode(), digest_size=8, key=key).digest() + position.to_bytes(8, "big")


class ExternalSort:
    """Sort (key, item) pairs (unique keys) in bounded memory: runs of `run` pairs are sorted and pickled
    to `folder` in batches of `batch`, then merged `fan_in` at a time with heapq (fan_in x batch pairs
    in memory).

    Resumable: each run is recorded in `folder/runs.json` with the sha256 of the `line`s added with its
    pairs, and kept until the folder is removed. A sort started again in the same folder reuses each
    recorded run whose lines match and makes the first one that differs, and those after it, again."""

    def __init__(self, folder: str, run: int | None = None, fan_in: int | None = None, batch: int | None = None):
        self.folder, self.run, self.fan_in, self.batch = folder, run or RUN, fan_in or FAN_IN, batch or BATCH
        self.buf: list = []
        self.digest = hashlib.sha256()
        self.runs: list[str] = []  # this sort's runs, in listing order
        self.reused = 0
        try:
            with open(os.path.join(folder, RUNS_FILE)) as f:
                self.recorded: list[str] = json.load(f)
        except FileNotFoundError:
            self.recorded = []

    def add(self, key: bytes, item, line: bytes = b"") -> None:
        self.buf.append((key, item))
        self.digest.update(line)
        if len(self.buf) >= self.run:
            self._close_run()

    def _close_run(self) -> None:
        k, digest = len(self.runs), self.digest.hexdigest()
        path = os.path.join(self.folder, f"run-{k:06d}.pkl")
        if self.recorded[k:k + 1] == [digest]:
            self.reused += 1
        else:
            if len(self.recorded) > k:  # forget run k before its file is replaced
                self._record(self.recorded[:k])
            self._spill(sorted(self.buf), path)
            self._record(self.recorded + [digest])
        self.runs.append(path)
        self.buf, self.digest = [], hashlib.sha256()

    def _record(self, digests: list[str]) -> None:
        self.recorded = digests
        replace_file(os.path.join(self.folder, RUNS_FILE), json.dumps(digests).encode())

    def _spill(self, pairs: Iterable, path: str) -> None:
        os.makedirs(self.folder, exist_ok=True)
        point("create", path)
        with open(path, "wb") as f:
            it = iter(pairs)
            while batch := list(itertools.islice(it, self.batch)):
                pickle.dump(batch, f, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def _read(path: str) -> Iterator:
        with open(path, "rb") as f:
            while True:
                try:
                    yield from pickle.load(f)
                except EOFError:
                    break
        if os.path.basename(path).startswith(MERGED):
            os.unlink(path)

    def __iter__(self) -> Iterator:
        """The items in key order (each consumed once)."""
        if not self.runs:
            yield from (item for _, item in sorted(self.buf))
            return
        if self.buf:
            self._close_run()
        runs = list(self.runs)
        for m in itertools.count():
            if len(runs) <= self.fan_in:
                break
            group, runs = runs[:self.fan_in], runs[self.fan_in:]
            runs.append(os.path.join(self.folder, f"{MERGED}{m}.pkl"))
            self._spill(heapq.merge(*map(self._read, group)), runs[-1])
        yield from (item for _, item in heapq.merge(*map(self._read, runs)))


def make_plan(listing, out: str, fs, root: str, *, seed: int, shard_size: int, options: dict,
              spare: float | None, tmp: str | None = None, clean=None) -> Plan:
    """Write the plan of `listing` under OUT (or reuse a finished one of the same fingerprint).
    `clean(plan)`: run on the written lists before `plan.json`, returns the removal counts."""
    header = dict(version=F.FORMAT_VERSION, seed=seed, shard_size=shard_size, options=options,
                  spare=spare)
    digest = hashlib.sha256(F.json_bytes(header))
    key = str(seed).encode()[:64]
    folder = spill_folder(out, listing.url, header, tmp)
    ext = ExternalSort(folder)
    n = 0
    for n, inp in enumerate(listing.inputs, 1):
        listing.labels.add(inp.label)
        line = F.json_bytes([inp.name, inp.label]) + b"\n"
        digest.update(line)
        ext.add(sort_key(inp.name, key, n - 1), inp, line)
    label_names = listing.labels.finish()
    digest.update(F.json_bytes(label_names))
    fingerprint = digest.hexdigest()
    _claim(out, fs, root, fingerprint, dict(source=listing.url, seed=seed, options=options))
    plan = _read_plan(fs, root)
    if plan is None or plan.fingerprint != fingerprint:
        r = None if spare is None else math.ceil(shard_size * spare)
        units = 0 if r is None else n // (shard_size + r)
        plan = Plan(fingerprint, n, shard_size, units, seed, options, dict(url=listing.url, kind=listing.kind),
                    label_names, r)
        coded = (Input(i.name, i.locator, listing.labels.code(i.label)) for i in ext)
        _write_lists(fs, plan_path(root), coded, plan)
        if clean is not None:
            plan = dataclasses.replace(plan, removed=clean(plan))
        F.write_atomic(fs, F.join(plan_path(root), PLAN_FILE), json.dumps(plan.__dict__, indent=1).encode())
    shutil.rmtree(folder, ignore_errors=True)
    return plan


def spill_folder(out: str, src: str, header: dict, tmp: str | None) -> str:
    """The local folder of a plan's sorted runs: one per (output, source, options), so a killed plan
    finds its runs again; removed when the plan is finished."""
    name = hashlib.sha256(F.json_bytes([out, src, header])).hexdigest()[:20]
    return os.path.join(tmp or tempfile.gettempdir(), f"picstream-plan-{name}")


def _claim(out: str, fs, root: str, fingerprint: str, describe: dict) -> None:
    """Create/claim the output folder; refuse one that holds shards of a different build."""
    def claim():
        fs.makedirs(plan_path(root), exist_ok=True)
        path = F.join(root, BUILD_FILE)
        if fs.exists(path):
            if json.loads(fs.cat_file(path))["fingerprint"] != fingerprint:
                raise ShardsError(f"{out} holds shards of a different source or options; use a new output")
            return
        if fs.exists(F.join(root, F.MANIFEST)) or fs.exists(F.join(root, F.sidecar_name(0))):
            raise ShardsError(f"{out} holds shards not made by this command; use a new output")
        F.write_atomic(fs, path, json.dumps(dict(fingerprint=fingerprint, **describe), indent=1).encode())
    output_op(out, claim)


def _write_lists(fs, folder: str, ordered: Iterator[Input], plan: Plan) -> None:
    for u in range(plan.units):
        F.write_atomic(fs, F.join(folder, main_name(u)), _dump(itertools.islice(ordered, plan.shard_size)))
    for c in itertools.count():
        chunk = list(itertools.islice(ordered, CHUNK))
        if not chunk and c > 0:
            return
        F.write_atomic(fs, F.join(folder, spare_name(c)), _dump(chunk))


def _dump(inputs: Iterable[Input]) -> bytes:
    return pickle.dumps(list(inputs), protocol=pickle.HIGHEST_PROTOCOL)


def plan_path(root: str) -> str:
    return F.join(root, PLAN_DIR)


def main_name(u: int) -> str:
    return f"main-{u:06d}.pkl"


def spare_name(c: int) -> str:
    return f"spare-{c:06d}.pkl"


def _read_plan(fs, root: str) -> Plan | None:
    try:
        return Plan(**json.loads(fs.cat_file(F.join(plan_path(root), PLAN_FILE))))
    except FileNotFoundError:
        return None


def load_plan(out: str, storage_options: dict | None = None):
    """(fs, root, Plan) of OUT; a missing plan is a one-line error."""
    fs, root = output_op(out, lambda: fsspec.core.url_to_fs(str(out), **(storage_options or {})))
    plan = _read_plan(fs, root)
    if plan is None:
        raise ShardsError(f"{out} has no finished plan; run `make_shards plan SRC {out}` first")
    return fs, root, plan


def main_inputs(fs, root: str, u: int) -> list[Input]:
    return pickle.loads(fs.cat_file(F.join(plan_path(root), main_name(u))))


def reserve_inputs(fs, root: str, start: int, stop: int) -> Iterator[Input]:
    """Reserve inputs [start, stop), streamed chunk by chunk."""
    c = start // CHUNK
    while start < stop:
        chunk = pickle.loads(fs.cat_file(F.join(plan_path(root), spare_name(c))))
        lo = start - c * CHUNK
        hi = min(stop - c * CHUNK, len(chunk))
        yield from chunk[lo:hi]
        start, c = c * CHUNK + hi, c + 1


def output_op(out: str, op):
    """Run an operation on the output; any failure is a fatal ShardsError naming the output."""
    try:
        return op()
    except ShardsError:
        raise
    except Exception as e:  # noqa: BLE001 - filesystems raise many types for "cannot write"
        raise ShardsError(f"cannot write to {out}: {type(e).__name__}: {e}") from None
