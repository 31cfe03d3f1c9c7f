"""The self-check behind ``classifier.overlap = auto``: on this device, a short run of admissions
with evictions, its store writes deferred (:class:`RecentRows` with ``overlap``) and synchronous,
must leave bit-identical resident rows and stored rows."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch

from .recent import RecentRows
from .store import RowStore
from .transitions import TransitionLog

NUM_ROWS, DIM, CAPACITY, BATCH, STEPS = 64, 8, 16, 8, 12


def _run(overlap: bool, folder: Path, device: torch.device, dtype: torch.dtype):
    """Every stored row and the resident table after ``STEPS`` admissions of a fixed stream."""
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    store = RowStore.create(str(folder / f"rows-{overlap}.zarr"), NUM_ROWS, DIM, chunk_rows=16,
                            dtype=np_dtype)
    rows = RecentRows(store, TransitionLog(0.9, 1e-4), CAPACITY, device, dtype, overlap=overlap)
    stream = np.random.default_rng(0)
    grads = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        rows.admit(stream.choice(NUM_ROWS, BATCH, replace=False))
        grad = torch.randn(rows.weight.shape, generator=grads, dtype=dtype).to(device)
        rows.sgd_step(grad * rows.valid[:, None], lr=0.1 / (1 + step))
    rows.write_pending()
    stored = store.read(np.arange(NUM_ROWS))
    store.close(flush=False)
    return [t.cpu() for t in (rows.weight, rows.momentum, rows.valid)], stored


@functools.lru_cache(maxsize=None)
def overlap_matches_synchronous(device, dtype: torch.dtype = torch.float32) -> bool:
    """True when deferred write-back gives the synchronous path's rows bit for bit on ``device``
    (checked once per process, device and dtype)."""
    with tempfile.TemporaryDirectory(prefix="picstream-overlap-") as tmp:
        (on_rows, on_store), (off_rows, off_store) = (_run(o, Path(tmp), torch.device(device), dtype)
                                                      for o in (True, False))
    return (all(torch.equal(a, b) for a, b in zip(on_rows, off_rows))
            and all(np.array_equal(a, b) for a, b in zip(on_store, off_store)))
