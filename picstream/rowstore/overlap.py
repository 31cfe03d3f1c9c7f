"""The self-check behind ``classifier.overlap = auto``: on this device, a short run of admissions
with evictions and log folds, its store writes deferred and the next admission's rows read ahead
and corrected ahead (:class:`RecentRows` with ``overlap``) and synchronous, must leave
bit-identical resident rows and stored rows."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch

from .recent import RecentRows
from .store import RowStore
from .transitions import TransitionLog

NUM_ROWS, DIM, CAPACITY, BATCH, STEPS, FOLD_STEPS = 64, 8, 16, 8, 12, 2
HINTED_LR = {"right": lambda lr: lr, "wrong": lambda lr: 2 * lr, "none": lambda lr: None}


def _run(overlap: bool, folder: Path, device: torch.device, dtype: torch.dtype, ahead: int = 1,
         lr: str = "right"):
    """The resident table, every stored row, ``RecentRows.reads`` and ``.corrections`` and the
    log's state after ``STEPS`` admissions of a fixed stream (the log folded every ``FOLD_STEPS``
    steps); each admission names to ``read_ahead`` the batch ``ahead`` admissions later (1: the
    next one; any other: a wrong hint) and the step's learning rate (``lr``: ``right``, ``wrong``
    or ``none``)."""
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    store = RowStore.create(str(folder / f"rows-{overlap}.zarr"), NUM_ROWS, DIM, chunk_rows=16,
                            dtype=np_dtype)
    rows = RecentRows(store, TransitionLog(0.9, 1e-4), CAPACITY, device, dtype,
                      compact_min_steps=FOLD_STEPS, overlap=overlap)
    stream = np.random.default_rng(0)
    batches = [stream.choice(NUM_ROWS, BATCH, replace=False) for _ in range(STEPS + ahead)]
    grads = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        rows.admit(batches[step])
        rows.read_ahead(batches[step + ahead], HINTED_LR[lr](0.1 / (1 + step)))
        grad = torch.randn(rows.weight.shape, generator=grads, dtype=dtype).to(device)
        rows.sgd_step(grad * rows.valid[:, None], lr=0.1 / (1 + step))
    rows.close()
    stored = store.read(np.arange(NUM_ROWS))
    store.close(flush=False)
    return ([t.cpu() for t in (rows.weight, rows.momentum, rows.valid)], stored, rows.reads,
            rows.corrections, rows.log.state_dict())


@functools.lru_cache(maxsize=None)
def overlap_matches_synchronous(device, dtype: torch.dtype = torch.float32) -> bool:
    """True when deferred write-back and read-ahead give the synchronous path's rows bit for bit on
    ``device`` (checked once per process, device and dtype)."""
    with tempfile.TemporaryDirectory(prefix="picstream-overlap-") as tmp:
        (on_rows, on_store, *_), (off_rows, off_store, *_) = (_run(o, Path(tmp), torch.device(device), dtype)
                                                              for o in (True, False))
    return (all(torch.equal(a, b) for a, b in zip(on_rows, off_rows))
            and all(np.array_equal(a, b) for a, b in zip(on_store, off_store)))
