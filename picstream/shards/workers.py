"""Validate/convert inputs in worker processes, in order (at most 4 chunks per worker in flight)."""
from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable

from ..parentdeath import die_with_parent
from .convert import CORRUPT, READ_ERROR, Skip, prepare
from .format import ShardsError
from .sources import Input, read_sample

CHUNK = 8  # inputs per task sent to a worker

_OPTIONS: dict = {}


def _init(options: dict, so: dict) -> None:
    _OPTIONS.clear()
    _OPTIONS.update(options=options, so=so)


def _init_worker(parent: int, options: dict, so: dict) -> None:
    die_with_parent(parent)  # the pool's queues alone do not end a worker whose parent was SIGKILLed
    _init(options, so)


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


def prepared(todo: Iterable[Input], workers: int, options: dict, so: dict):
    """Yield the result for each input of `todo` (any iterable), in order."""
    chunks = _chunks(todo)
    head = list(itertools.islice(chunks, 2))
    chunks = itertools.chain(head, chunks)
    if workers == 1 or len(head) <= 1:
        _init(options, so)
        for chunk in chunks:
            yield from _work(chunk)
        return
    ctx = multiprocessing.get_context("spawn")  # no inherited threads (fsspec, tqdm) in the workers
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(os.getpid(), options, so)) as pool:
        pending: deque = deque(pool.submit(_work, c) for c in itertools.islice(chunks, 4 * workers))
        while pending:
            try:
                results = pending.popleft().result()
            except BrokenProcessPool:
                raise ShardsError("a worker process died (out of memory, or a decoder crash); "
                                  "re-run the command to continue") from None
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(pool.submit(_work, nxt))
            yield from results


def _chunks(todo: Iterable[Input]):
    it = iter(todo)
    while chunk := [i.locator for i in itertools.islice(it, CHUNK)]:
        yield chunk
