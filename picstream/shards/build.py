"""`make_shards`: list → permute → validate/convert in worker processes → write shards in ID order →
manifest.

Resumable without a separate plan: the inputs are visited in permutation order, each shard's sidecar
(written atomically after the shard) records the permutation positions it consumed and the inputs it
skipped, so a re-run verifies the finished shards and continues after the last one. IDs are the ranks of
the valid inputs in the permutation, so they have no holes and do not depend on the worker count.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import fsspec
import numpy as np
from tqdm import tqdm

from . import format as F
from .format import ShardsError
from .convert import CORRUPT, READ_ERROR, Skip, prepare
from .sources import Input, SourceOptions, list_inputs, read_sample
from .writer import ShardWriter

BUILD_FILE = "build.json"
CHUNK = 8  # inputs per task sent to a worker
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


@dataclass(frozen=True)
class ShardSummary:
    inputs: int
    packed: int
    skipped: int
    converted: int
    num_shards: int
    resumed_shards: int  # finished shards found (and verified) from an earlier run
    processed: int  # inputs validated by this run (the others were in resumed shards)
    bytes: int
    seconds: float
    manifest: str

    def line(self) -> str:
        rate = (self.processed / self.seconds) if self.seconds > 0 else 0.0
        return (f"packed {self.packed} of {self.inputs} inputs into {self.num_shards} shards "
                f"({self.skipped} skipped, {self.converted} converted, {self.resumed_shards} shards resumed) "
                f"in {self.seconds:.1f} s ({rate:.0f} img/s): {self.manifest}")


def permutation(names: list[str], seed: int) -> np.ndarray:
    """The input order: sorted by a keyed hash of (seed, name), ties by listing position."""
    key = str(seed).encode()[:64]
    digests = b"".join(hashlib.blake2b(n.encode(), digest_size=8, key=key).digest() for n in names)
    return np.argsort(np.frombuffer(digests, dtype=">u8"), kind="stable")


def make_shards(src, out, *, shard_size: int = 1024, seed: int = 0, workers: int = 1, labels: bool = True,
                max_side: int | None = None, resize_short: int | None = None, quality: int = 90,
                progress: bool = True, storage_options: dict | None = None,
                source: SourceOptions | None = None) -> ShardSummary:
    """Pack the images of `src` (folder, list file, tars, parquet, `datasets` folder, .beton or a URL; see
    `SourceOptions`) into shards under `out` (folder or URL)."""
    t0 = time.perf_counter()
    if min(shard_size, workers, max_side or 1, resize_short or 1) < 1 or not 1 <= quality <= 100:
        raise ShardsError("shard size, workers, max side and resize short must be >= 1, quality in [1, 100]")
    so = storage_options or {}
    listing = list_inputs(src, labels=labels, storage_options=so, exclude=str(out), source=source)
    inputs = listing.inputs
    order = permutation([i.name for i in inputs], seed)
    options = dict(labels=labels, max_side=max_side, resize_short=resize_short, quality=quality,
                   **listing.options)
    fingerprint = F.sha256_hex(F.json_bytes(dict(
        version=F.FORMAT_VERSION, seed=seed, shard_size=shard_size, options=options,
        inputs=[[i.name, i.label] for i in inputs])))
    fs, root = _open_output(str(out), so, fingerprint, dict(source=listing.url, seed=seed, options=options))
    done = _verified_prefix(fs, root, fingerprint)
    start = done[-1]["input_stop"] if done else 0
    sidecars = list(done)
    tail_skips: list[dict] = []
    bar = tqdm(total=len(inputs), initial=start, unit="img", disable=not progress, dynamic_ncols=True,
               desc="make_shards", file=sys.stderr)
    try:
        todo = [inputs[order[p]] for p in range(start, len(inputs))]
        writer, skips, shard_start = None, [], start
        pos = start
        skipped_total = sum(len(s["skipped"]) for s in done)
        for inp, result in zip(todo, _prepared(todo, workers, options, so)):
            pos += 1
            bar.update(1)
            if isinstance(result, Skip):
                skips.append(dict(input=inp.name, reason=result.reason, detail=result.detail))
                skipped_total += 1
                bar.set_postfix_str(f"skipped={skipped_total}", refresh=False)
                continue
            raw_size, prep, extra = result
            if writer is None:
                k = len(sidecars)
                writer = _output_op(out, lambda: ShardWriter(fs, root, k, k * shard_size))
                converted = 0
            meta = dict(src=inp.name, bytes=raw_size, width=prep.width, height=prep.height,
                        converted=prep.converted, **extra)
            _output_op(out, lambda: writer.add(prep.data, inp.label, meta))
            converted += prep.converted is not None
            if len(writer) == shard_size:
                sidecars.append(
                    _finish(out, fs, root, writer, fingerprint, shard_start, pos, skips, converted))
                writer, skips, shard_start = None, [], pos
        if writer is not None:
            sidecars.append(_finish(out, fs, root, writer, fingerprint, shard_start, pos, skips, converted))
        else:
            tail_skips = skips
    finally:
        bar.close()
    manifest = _manifest(listing, seed, shard_size, options, fingerprint, sidecars, tail_skips)
    manifest_url = F.join(str(out), F.MANIFEST)
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    _output_op(out, lambda: F.write_atomic(fs, F.join(root, F.MANIFEST), manifest_bytes))
    if listing.cleanup is not None:
        listing.cleanup()
    summary = ShardSummary(
        inputs=len(inputs), packed=manifest["num_samples"], skipped=len(manifest["skipped"]),
        converted=manifest["converted"], num_shards=manifest["num_shards"], resumed_shards=len(done),
        processed=len(inputs) - start,
        bytes=sum(s["shard"]["bytes"] for s in sidecars), seconds=time.perf_counter() - t0,
        manifest=manifest_url)
    if progress:
        print(summary.line(), file=sys.stderr)
    return summary


# Output -------------------------------------------------------------------------------------------

def _output_op(out: str, op):
    """Run an operation on the output; any failure is a fatal ShardsError naming the output."""
    try:
        return op()
    except ShardsError:
        raise
    except Exception as e:  # noqa: BLE001 - filesystems raise many types for "cannot write"
        raise ShardsError(f"cannot write to {out}: {type(e).__name__}: {e}") from None


def _open_output(out: str, so: dict, fingerprint: str, describe: dict):
    """Create/claim the output folder; refuse one that holds shards of a different build."""
    def claim():
        fs, root = fsspec.core.url_to_fs(out, **so)
        fs.makedirs(root, exist_ok=True)
        path = F.join(root, BUILD_FILE)
        if fs.exists(path):
            if json.loads(fs.cat_file(path))["fingerprint"] != fingerprint:
                raise ShardsError(f"{out} holds shards of a different source or options; use a new output")
        elif fs.exists(F.join(root, F.MANIFEST)) or fs.exists(F.join(root, F.sidecar_name(0))):
            raise ShardsError(f"{out} holds shards not made by this command; use a new output")
        F.write_atomic(fs, path, json.dumps(dict(fingerprint=fingerprint, **describe), indent=1).encode())
        return fs, root
    return _output_op(out, claim)


def _verified_prefix(fs, root: str, fingerprint: str) -> list[dict]:
    """Sidecars of the finished shards 0, 1, ... whose files match their checksums."""
    done = []
    while True:
        path = F.join(root, F.sidecar_name(len(done)))
        if not fs.exists(path):
            return done
        side = json.loads(fs.cat_file(path))
        rec = side["shard"]
        try:
            ok = (side["fingerprint"] == fingerprint
                  and F.sha256_hex(fs.cat_file(F.join(root, rec["name"]))) == rec["sha256"]
                  and F.sha256_hex(fs.cat_file(F.join(root, rec["index"]))) == rec["index_sha256"])
        except FileNotFoundError:
            ok = False
        if not ok:
            return done
        done.append(side)


def _finish(out, fs, root, writer: ShardWriter, fingerprint, input_start, input_stop, skips,
            converted) -> dict:
    def op():
        rec = writer.close()
        side = dict(fingerprint=fingerprint, shard=rec.to_json(), input_start=input_start,
                    input_stop=input_stop, skipped=skips, converted=converted)
        F.write_atomic(fs, F.join(root, F.sidecar_name(writer.k)), json.dumps(side, indent=1).encode())
        return side
    return _output_op(out, op)


def _manifest(listing, seed, shard_size, options, fingerprint, sidecars, tail_skips) -> dict:
    shards = [s["shard"] for s in sidecars]
    return dict(
        format=F.FORMAT_NAME, version=F.FORMAT_VERSION,
        num_samples=sum(s["count"] for s in shards), shard_size=shard_size, num_shards=len(shards),
        label_names=listing.label_names, seed=seed,
        source=dict(url=listing.url, kind=listing.kind, inputs=len(listing.inputs)),
        options=options, fingerprint=fingerprint,
        converted=sum(s["converted"] for s in sidecars),
        skipped=[k for s in sidecars for k in s["skipped"]] + tail_skips,
        shards=shards)


# Validation / conversion in workers ---------------------------------------------------------------

_OPTIONS: dict = {}


def _init(options: dict, so: dict) -> None:
    _OPTIONS.clear()
    _OPTIONS.update(options=options, so=so)


def _init_worker(parent: int, options: dict, so: dict) -> None:
    _die_with_parent(parent)
    _init(options, so)


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker process when `parent` dies, however it dies (Linux; a
    no-op elsewhere). The pool's queues alone do not end a worker whose parent was SIGKILLed."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _work(locators: list[str]) -> list:
    """(raw size, Prepared, source metadata) or Skip for each input."""
    options, so = _OPTIONS["options"], _OPTIONS["so"]
    results = []
    for loc in locators:
        try:
            data, extra = read_sample(loc, so)
        except Skip as s:  # the source knows the input is unusable (e.g. a failed download)
            results.append(s)
            continue
        except Exception as e:  # noqa: BLE001 - unreadable input is skipped, never fatal
            results.append(Skip(READ_ERROR, f"{type(e).__name__}: {e}"))
            continue
        try:
            results.append((len(data), prepare(data, max_side=options["max_side"],
                                               resize_short=options["resize_short"],
                                               quality=options["quality"]), extra))
        except Skip as s:
            results.append(s)
        except Exception as e:  # noqa: BLE001 - a decoder bug on hostile input must not stop the run
            results.append(Skip(CORRUPT, f"{type(e).__name__}: {e}"))
    return results


def _prepared(todo: list[Input], workers: int, options: dict, so: dict):
    """Yield the result for each input, in order; at most 4 chunks per worker in flight."""
    chunks = [[i.locator for i in todo[j:j + CHUNK]] for j in range(0, len(todo), CHUNK)]
    if workers == 1 or len(chunks) <= 1:
        _init(options, so)
        for chunk in chunks:
            yield from _work(chunk)
        return
    ctx = multiprocessing.get_context("spawn")  # no inherited threads (fsspec, tqdm) in the workers
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(os.getpid(), options, so)) as pool:
        pending: deque = deque()
        it = iter(chunks)
        for chunk in it:
            pending.append(pool.submit(_work, chunk))
            if len(pending) >= 4 * workers:
                break
        while pending:
            try:
                results = pending.popleft().result()
            except BrokenProcessPool:
                raise ShardsError("a worker process died (out of memory, or a decoder crash); "
                                  "re-run the command to continue") from None
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_work, nxt))
            yield from results
