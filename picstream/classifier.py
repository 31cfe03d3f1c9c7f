"""The instance classifier: cosine (or plain) softmax logits over recent-K device rows or all N rows.

``build_classifier`` is the trainer's only interface to classifier rows. Per step::

    logits, targets = clf.logits(z, ids)   # admits the batch's rows (recent) / all rows (full)
    more = clf.view_logits(z2, detach_rows=True)   # optional: another view, the same rows
    loss = F.cross_entropy(logits, targets); loss.backward()
    clf.step(lr)                           # SGD on the rows; the backbone has its own optimiser
"""
from __future__ import annotations

import atexit
import shutil
import tempfile

import numpy as np
import torch

from .rowstore import RecentRows, RowStore, StoreError, StoreNotFound, TransitionLog, init_rows

NORM_EPS = 1e-6


def _cosine_or_plain(z: torch.Tensor, w: torch.Tensor, loss: str, temperature: float) -> torch.Tensor:
    """Logits in float32 (float64 for float64 rows), outside autocast: cosine ``ẑ·ŵ/τ`` with
    eps-guarded norms, or plain ``z·w``."""
    with torch.autocast(z.device.type, enabled=False):
        dtype = torch.promote_types(w.dtype, torch.float32)
        z, w = z.to(dtype), w.to(dtype)
        if loss == "plain":
            return z @ w.t()
        zn = z / z.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        wn = w / w.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        return zn @ wn.t() / temperature


class RecentClassifier:
    """Softmax over the K most recently visited rows; the other rows live in a :class:`RowStore`."""

    def __init__(self, store: RowStore, capacity: int, *, loss: str, temperature: float,
                 momentum: float, weight_decay: float, correction: str, device, dtype, store_url=None,
                 compact_min_steps: int = 1024):
        self.store, self.loss, self.temperature = store, loss, temperature
        self.store_url = store_url
        self.log = TransitionLog(momentum, weight_decay)
        self.rows = RecentRows(store, self.log, capacity, device, dtype, correction, compact_min_steps)
        self._leaf: torch.Tensor | None = None

    def logits(self, z: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B×K logits, targets)``; empty slots are masked with −inf; targets are slot indices."""
        ids = ids.cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
        targets = self.rows.admit(ids)
        self._leaf = self.rows.weight.detach().requires_grad_(True)
        return self.view_logits(z), targets

    def view_logits(self, z: torch.Tensor, detach_rows: bool = False) -> torch.Tensor:
        """Logits of another view of the last ``logits`` batch over the same resident rows (no
        admission); ``detach_rows``: no gradient reaches the rows from this view."""
        if self._leaf is None:
            raise RuntimeError("view_logits needs a logits() call earlier in the same step")
        rows = self._leaf.detach() if detach_rows else self._leaf
        out = _cosine_or_plain(z, rows, self.loss, self.temperature)
        return out.masked_fill(~self.rows.valid, float("-inf"))

    def step(self, lr: float) -> None:
        """Apply one SGD step to every resident row (gradient from the last ``logits`` call)."""
        grad = None if self._leaf is None else self._leaf.grad
        self._leaf = None
        self.rows.sgd_step(grad, lr)

    def min_row_norm(self) -> float:
        norms = self.rows.weight.norm(dim=1).masked_fill(~self.rows.valid, float("inf"))
        return float(norms.min()) if len(self.rows) else float("nan")

    def device_bytes(self) -> int:
        return self.rows.device_bytes()

    def prefetch(self, start: int, stop: int) -> None:
        self.store.prefetch(start, stop)

    def checkpoint_state(self) -> dict:
        """Device rows, transition log, and the store's identity and generation just committed."""
        return {"sampling": "recent", "store_id": self.store.store_id, "generation": self.store.commit(),
                "rows": self.rows.state_dict(), "log": self.log.state_dict()}

    def forget_before(self, state: dict) -> None:
        """No checkpoint older than ``state`` will be resumed: drop the store's older undo logs."""
        self.store.prune(int(state["generation"]))

    def load_checkpoint_state(self, state: dict) -> None:
        """Return the store to the checkpoint's generation (refused when it is another store)."""
        if state.get("store_id") != self.store.store_id:
            raise StoreError(f"row store {self.store_url} (id {self.store.store_id}) is not the one the "
                             f"checkpoint was saved with (id {state.get('store_id')})")
        self.store.restore(int(state["generation"]))
        self.log.load_state_dict(state["log"])
        self.rows.load_state_dict(state["rows"])

    def close(self, flush: bool = True) -> None:
        """Release the store (``flush=False``: leave its unflushed rows unwritten)."""
        self.store.close(flush)


class FullClassifier:
    """The reference: a dense N-row parameter over all rows with stock ``torch.optim.SGD``."""

    def __init__(self, num_rows: int, dim: int, *, loss: str, temperature: float, momentum: float,
                 weight_decay: float, seed: int, device, dtype):
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        init = torch.from_numpy(init_rows(seed, np.arange(num_rows), dim, np_dtype))
        self.weight = torch.nn.Parameter(init.to(device))
        self.optimizer = torch.optim.SGD([self.weight], lr=0.0, momentum=momentum,
                                         weight_decay=weight_decay)
        self.loss, self.temperature = loss, temperature

    def logits(self, z: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B×N logits, targets = ids)``."""
        targets = torch.as_tensor(ids, dtype=torch.long).to(self.weight.device)
        return self.view_logits(z), targets

    def view_logits(self, z: torch.Tensor, detach_rows: bool = False) -> torch.Tensor:
        """Logits of another view over all rows; ``detach_rows``: no gradient reaches the rows."""
        rows = self.weight.detach() if detach_rows else self.weight
        return _cosine_or_plain(z, rows, self.loss, self.temperature)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def min_row_norm(self) -> float:
        return float(self.weight.detach().norm(dim=1).min())

    def device_bytes(self) -> int:
        """Weight, gradient and momentum: three N×D tensors."""
        return 3 * self.weight.numel() * self.weight.element_size()

    def prefetch(self, start: int, stop: int) -> None:
        """Nothing to prefetch: every row is resident."""

    def checkpoint_state(self) -> dict:
        buf = self.optimizer.state.get(self.weight, {}).get("momentum_buffer")
        return {"sampling": "full", "weight": self.weight.detach().cpu(),
                "momentum": torch.zeros_like(self.weight, device="cpu") if buf is None else buf.cpu()}

    def forget_before(self, state: dict) -> None:
        """Nothing to forget: the checkpoint holds every row."""

    def load_checkpoint_state(self, state: dict) -> None:
        with torch.no_grad():
            self.weight.copy_(state["weight"])
        self.optimizer.state[self.weight]["momentum_buffer"] = state["momentum"].to(self.weight)

    def close(self, flush: bool = True) -> None:
        """Nothing to release."""


def _temporary_store_url() -> str:
    path = tempfile.mkdtemp(prefix="picstream-rows-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path + "/rows.zarr"


def build_classifier(num_rows: int, dim: int, *, sampling: str = "recent", capacity: int = 65536,
                     loss: str = "cosine", temperature: float = 0.2, momentum: float = 0.9,
                     weight_decay: float = 1e-4, correction: str = "exact", store_url: str | None = None,
                     storage_options: dict | None = None, seed: int = 0, chunk_rows: int = 4096,
                     cache_rows: int | None = None, dtype: torch.dtype = torch.float32,
                     device="cpu", fresh: bool = False, run_id: str | None = None,
                     durable: bool = False, compact_min_steps: int = 1024):
    """A classifier over ``num_rows`` instances of dimension ``dim``.

    ``sampling='recent'`` keeps ``capacity`` rows on ``device`` and the rest in a row store at
    ``store_url`` (opened if it exists, else created for ``run_id``; a temporary folder when None).
    ``fresh=True`` starts from initial rows: an existing store of the same ``run_id`` is replaced, one
    of another run is refused. ``durable`` makes store commits survive a power loss. The transition
    log folds steps no stored row can start from, ``compact_min_steps`` at a time.
    ``sampling='full'`` is the dense reference over all N rows.
    """
    if loss not in ("cosine", "plain"):
        raise ValueError(f"unknown loss {loss!r}")
    common = dict(loss=loss, temperature=temperature, momentum=momentum, weight_decay=weight_decay)
    if sampling == "full":
        return FullClassifier(num_rows, dim, seed=seed, device=device, dtype=dtype, **common)
    if sampling != "recent":
        raise ValueError(f"unknown sampling {sampling!r}")
    url = store_url or _temporary_store_url()
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    opts = dict(cache_rows=cache_rows, storage_options=storage_options, durable=durable)
    try:
        store = RowStore.open(url, **opts)
    except StoreNotFound:
        store = None
    if store is not None and fresh:
        if store.run_id != run_id:
            raise StoreError(f"row store {url} belongs to another run (run id {store.run_id}); "
                             "give this run its own classifier.store")
        RowStore.destroy(url, storage_options)
        store = None
    if store is None:
        store = RowStore.create(url, num_rows, dim, seed=seed, chunk_rows=chunk_rows, dtype=np_dtype,
                                run_id=run_id, **opts)
    if (store.num_rows, store.dim, store.dtype) != (num_rows, dim, np_dtype):
        raise ValueError(f"row store at {url} has shape ({store.num_rows}, {store.dim}), "
                         f"dtype {store.dtype}; expected ({num_rows}, {dim}), {np_dtype}")
    return RecentClassifier(store, min(capacity, num_rows), correction=correction, device=device,
                            dtype=dtype, store_url=url, compact_min_steps=compact_min_steps, **common)
