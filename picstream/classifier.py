"""The instance classifier: cosine (or plain) softmax logits over recent-K device rows or all N rows.

:class:`InstanceClassifier` is the contract the trainer and the run's lifecycle hold a classifier to;
``build_classifier`` / ``classifier_from_config`` make one. Per step::

    loss = clf.loss([z, *extra_views], ids)   # admits the batch's rows once; every view scored
    loss.backward()
    clf.step(lr)                              # SGD on the rows; the backbone has its own optimiser

``read_ahead(next_ids, lr)`` before a step names the next step's global batch (a hint, from the
schedule) and this step's learning rate: with ``overlap`` the recent classifier then reads those
rows from its store and brings them forward past this step in the background, right after this
step's admission (:meth:`RecentRows.read_ahead`).

``loss`` is built from ``logits`` (admission), ``view_logits`` (another view, the same rows) and
``cross_entropy``. In a distributed run (``world``), ``z`` and ``ids`` are this rank's block of the
global batch: the features are all-gathered, every rank admits the global batch's IDs into the same
slot table, holds only the rows its part of the row store owns, and ``cross_entropy`` is the softmax
over all ranks' rows (:mod:`picstream.distributed`).
"""
from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, ConfigError
from .distributed import World, gather_features, sharded_cross_entropy
from .lifecycle import PartitionedState
from .rowstore import RecentRows, RowStore, StoreError, StoreNotFound, TransitionLog, init_rows, store_url_of_rank
from .rowstore.overlap import overlap_matches_synchronous
from .transfer import to_device

NORM_EPS = 1e-6
ROW_INITS = ("random", "feature")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each row divided by its eps-guarded L2 norm."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def _cosine_or_plain(z: torch.Tensor, w: torch.Tensor, loss: str, temperature: float) -> torch.Tensor:
    """Logits in float32 (float64 for float64 rows), outside autocast: cosine ``ẑ·ŵ/τ`` with
    eps-guarded norms, or plain ``z·w``."""
    with torch.autocast(z.device.type, enabled=False):
        dtype = torch.promote_types(w.dtype, torch.float32)
        z, w = z.to(dtype), w.to(dtype)
        if loss == "plain":
            return z @ w.t()
        return _unit(z) @ _unit(w).t() / temperature


def first_visit_rows(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``classifier.row_init = feature``: the rows a batch's instances start from at their first
    visit, their L2-normalised features (detached, in the rows' ``dtype``, outside autocast)."""
    with torch.autocast(z.device.type, enabled=False):
        return _unit(z.detach().to(dtype))


@runtime_checkable
class InstanceClassifier(PartitionedState, Protocol):
    """What the trainer and the run's lifecycle call on a classifier (both classifiers implement all
    of it; :class:`PartitionedState` is the lifecycle's part: commit, load, re-partition, retire,
    forget)."""

    def loss(self, zs: list[torch.Tensor], ids) -> torch.Tensor: ...

    def logits(self, z: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]: ...

    def view_logits(self, z: torch.Tensor, detach_rows: bool = False) -> torch.Tensor: ...

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def step(self, lr: float) -> None: ...

    def prefetch(self, start: int, stop: int) -> None: ...

    def read_ahead(self, next_ids, lr: float | None = None) -> None: ...

    def min_row_norm(self) -> float: ...

    def device_bytes(self) -> int: ...

    def close(self, flush: bool = True) -> None: ...


class MultiViewLoss:
    """``loss``: the mean over views of the cross-entropy against the instance rows (multi-crop,
    :mod:`picstream.multicrop`). The batch's rows are admitted once, by the main view's ``logits``;
    the other views are scored against the same rows, detached when ``multi_crop_rows == 'main'``."""

    multi_crop_rows = "main"

    def loss(self, zs: list[torch.Tensor], ids) -> torch.Tensor:
        """The PIC loss of one step: ``zs`` are the views' features, main view first."""
        logits, targets = self.logits(zs[0], ids)
        views = [logits] + [self.view_logits(z, detach_rows=self.multi_crop_rows == "main") for z in zs[1:]]
        return torch.stack([self.cross_entropy(v, targets) for v in views]).mean()


class RecentClassifier(MultiViewLoss):
    """Softmax over the K most recently visited rows; the other rows live in a :class:`RowStore`.
    A row was visited iff it is resident or the store has written it (``RowStore.never_written``)."""

    def __init__(self, store: RowStore, capacity: int, *, loss: str, temperature: float,
                 momentum: float, weight_decay: float, correction: str, device, dtype, store_url=None,
                 storage_options=None, compact_min_steps: int = 1024, world: World | None = None,
                 multi_crop_rows: str = "main", overlap: bool = False, row_init: str = "random"):
        self.store, self.loss_kind, self.temperature = store, loss, temperature
        self.multi_crop_rows, self.row_init = multi_crop_rows, row_init
        self.store_url, self.storage_options = store_url, storage_options
        self.world = world or World()
        self.log = TransitionLog(momentum, weight_decay)
        self.rows = RecentRows(store, self.log, capacity, device, dtype, correction, compact_min_steps,
                               overlap=overlap)
        self._leaf: torch.Tensor | None = None
        self._next_ids = None  # the next batch's IDs, read ahead after this step's admission
        self._lr = None  # this step's learning rate, for the correction of the rows read ahead

    def logits(self, z: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B×K logits, targets)``; empty slots are masked with −inf; targets are slot indices.
        With ``row_init = feature`` a row's first visit starts it from its feature in ``z`` (every
        rank's rows from the global batch's features) before the logits are computed."""
        ids = self.world.gather_ids(torch.as_tensor(ids).cpu()).numpy()
        z = gather_features(z, self.world)
        init = first_visit_rows(z, self.rows.dtype) if self.row_init == "feature" else None
        targets = self.rows.admit(ids, init)
        if self._next_ids is not None:
            self.rows.read_ahead(self._next_ids, self._lr)
            self._next_ids = self._lr = None
        self._leaf = self.rows.weight.detach().requires_grad_(True)
        return self._scores(z, self._leaf), targets

    def view_logits(self, z: torch.Tensor, detach_rows: bool = False) -> torch.Tensor:
        """Logits of another view of the last ``logits`` batch over the same resident rows (no
        admission); ``detach_rows``: no gradient reaches the rows from this view."""
        if self._leaf is None:
            raise RuntimeError("view_logits needs a logits() call earlier in the same step")
        rows = self._leaf.detach() if detach_rows else self._leaf
        return self._scores(gather_features(z, self.world), rows)

    def _scores(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The global batch's logits over this rank's resident rows (empty slots −inf)."""
        out = _cosine_or_plain(z, rows, self.loss_kind, self.temperature)
        return out.masked_fill(~self.rows.valid, float("-inf"))

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the global batch over every rank's rows."""
        return sharded_cross_entropy(logits, targets, self.world)

    def step(self, lr: float) -> None:
        """Apply one SGD step to every resident row (gradient from the last ``logits`` call)."""
        grad = None if self._leaf is None else self._leaf.grad
        self._leaf = None
        self.rows.sgd_step(grad, lr)

    def min_row_norm(self) -> float:
        """Over every rank's resident rows (a collective: every rank calls it)."""
        norms = self.rows.weight.norm(dim=1).masked_fill(~self.rows.valid, float("inf"))
        low = self.world.all_min(float(norms.min()) if norms.numel() else float("inf"))
        return low if len(self.rows) else float("nan")

    def device_bytes(self) -> int:
        return self.rows.device_bytes()

    def prefetch(self, start: int, stop: int) -> None:
        self.store.prefetch(start, stop)

    def read_ahead(self, next_ids, lr: float | None = None) -> None:
        """The next step's global batch IDs: their rows are read ahead after this step's admission
        (with ``overlap``; a wrong hint costs only the read) and, given this step's ``lr``,
        corrected past this step there too (a wrong ``lr`` costs only that correction)."""
        self._next_ids = np.asarray(next_ids, dtype=np.int64)
        self._lr = lr

    def commit_state(self) -> dict:
        """Commit the row store; returns the device rows, the transition log, and the store's
        identity and the generation just committed (with the last admission's evicted rows)."""
        self.rows.write_pending()
        return {"sampling": "recent", "store_id": self.store.store_id, "generation": self.store.commit(),
                "part": [self.store.rank, self.store.world], "rows": self.rows.state_dict(),
                "log": self.log.state_dict()}

    def forget_before(self, state: dict) -> None:
        """No checkpoint older than ``state`` will be resumed: drop the store's older undo logs."""
        self.rows.write_pending()
        self.store.prune(int(state["generation"]))

    def _check_store(self, state: dict) -> None:
        if state.get("store_id") != self.store.store_id:
            raise StoreError(f"row store {self.store_url} (id {self.store.store_id}) is not the one the "
                             f"checkpoint was saved with (id {state.get('store_id')})")

    def load_state(self, state: dict) -> None:
        """Return the store to the checkpoint's generation (refused when it is another store)."""
        self._check_store(state)
        self.rows.write_pending()
        self.store.restore(int(state["generation"]))
        self.log.load_state_dict(state["log"])
        self.rows.load_state_dict(state["rows"])

    def _open_part(self, part: tuple[int, int]) -> RowStore:
        return RowStore.open(self.store_url, cache_rows=self.store.chunk_rows, part=part,
                             storage_options=self.storage_options, durable=self.store.durable)

    def load_resized(self, states: list[dict]) -> None:
        """Continue from the classifier states of a checkpoint of ``len(states)`` ranks in a world of
        another size, on one shared store: every old part returns to its generation (old part ``o`` by
        rank ``o mod world``), this rank's part starts afresh, and the resident rows are re-partitioned.
        Every rank calls it; the lifecycle then saves a checkpoint and calls ``retire_other_parts``."""
        for state in states:
            self._check_store(state)
        self.rows.write_pending()
        for o in range(self.world.rank, len(states), self.world.size):
            part = self._open_part((o, len(states)))
            part.restore(int(states[o]["generation"]))
            part.close(flush=False)
        self.world.barrier()
        self.store.retire()
        # every log holds the same steps; the least folded one reaches every stored row
        self.log.load_state_dict(min((s["log"] for s in states), key=lambda log: int(log["offset"])))
        self.rows.load_parts([s["rows"] for s in states])

    def retire_other_parts(self) -> None:
        """Retire the store's parts of other world sizes (shared among the ranks): no checkpoint of
        another world size can then be resumed onto rows this world has changed."""
        self.rows.write_pending()
        for i, part in enumerate(self.store.other_parts()):
            if i % self.world.size == self.world.rank:
                store = self._open_part(part)
                store.retire()
                store.close(flush=False)

    def close(self, flush: bool = True) -> None:
        """Release the store (``flush=False``: leave its unflushed rows unwritten)."""
        self.rows.close()
        self.store.close(flush)


class FullClassifier(MultiViewLoss):
    """The reference: a dense N-row parameter over all rows with stock ``torch.optim.SGD``; with
    ``row_init = feature``, a host flag per row says whether it was visited."""

    def __init__(self, num_rows: int, dim: int, *, loss: str, temperature: float, momentum: float,
                 weight_decay: float, seed: int, device, dtype, multi_crop_rows: str = "main",
                 row_init: str = "random"):
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        init = torch.from_numpy(init_rows(seed, np.arange(num_rows), dim, np_dtype))
        self.weight = torch.nn.Parameter(init.to(device))
        self.optimizer = torch.optim.SGD([self.weight], lr=0.0, momentum=momentum,
                                         weight_decay=weight_decay)
        self.loss_kind, self.temperature, self.multi_crop_rows = loss, temperature, multi_crop_rows
        self.visited = np.zeros(num_rows, bool) if row_init == "feature" else None

    def logits(self, z: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B×N logits, targets = ids)``; with ``row_init = feature`` the rows visited for the first
        time start from their features in ``z`` first."""
        if self.visited is not None:
            self._start_first_visits(z, ids)
        targets = to_device(torch.as_tensor(ids, dtype=torch.long), self.weight.device)
        return self.view_logits(z), targets

    @torch.no_grad()
    def _start_first_visits(self, z: torch.Tensor, ids) -> None:
        """Rows of ``ids`` not visited before take the feature of their first occurrence, momentum 0."""
        uniq, first = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1), return_index=True)
        new = ~self.visited[uniq]
        if not new.any():
            return
        at, pos = (to_device(torch.from_numpy(a[new]), self.weight.device) for a in (uniq, first))
        self.weight.index_copy_(0, at, first_visit_rows(z, self.weight.dtype).index_select(0, pos))
        buf = self.optimizer.state.get(self.weight, {}).get("momentum_buffer")
        if buf is not None:
            buf.index_fill_(0, at, 0)
        self.visited[uniq[new]] = True

    def view_logits(self, z: torch.Tensor, detach_rows: bool = False) -> torch.Tensor:
        """Logits of another view over all rows; ``detach_rows``: no gradient reaches the rows."""
        rows = self.weight.detach() if detach_rows else self.weight
        return _cosine_or_plain(z, rows, self.loss_kind, self.temperature)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

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

    def read_ahead(self, next_ids, lr: float | None = None) -> None:
        """Nothing to read ahead: every row is resident."""

    def commit_state(self) -> dict:
        """Every row and its momentum (there is no store to commit)."""
        buf = self.optimizer.state.get(self.weight, {}).get("momentum_buffer")
        visited = {} if self.visited is None else {"visited": torch.from_numpy(self.visited.copy())}
        return {"sampling": "full", "weight": self.weight.detach().cpu(),
                "momentum": torch.zeros_like(self.weight, device="cpu") if buf is None else buf.cpu(),
                **visited}

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            self.weight.copy_(state["weight"])
        self.optimizer.state[self.weight]["momentum_buffer"] = state["momentum"].to(self.weight)
        if self.visited is not None:
            self.visited = state["visited"].numpy().copy()

    def load_resized(self, states: list[dict]) -> None:
        """Refused: only a 1-process run samples every row (and so only one saves such a state)."""
        raise ConfigError(f"classifier.sampling = full cannot continue a checkpoint of {len(states)} "
                          "processes: resume it with the number of processes that saved it")

    def retire_other_parts(self) -> None:
        """Nothing to retire: the rows have no store."""

    def forget_before(self, state: dict) -> None:
        """Nothing to forget: the checkpoint holds every row."""

    def close(self, flush: bool = True) -> None:
        """Nothing to release."""


def _temporary_store_url() -> str:
    path = tempfile.mkdtemp(prefix="picstream-rows-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path + "/rows.zarr"


def _prepare_store(url, num_rows, dim, *, fresh, run_id, seed, chunk_rows, dtype, opts) -> None:
    """Make sure a row store for this run exists at ``url``: fresh (``fresh``), or the existing one."""
    opts = {**opts, "cache_rows": chunk_rows}  # opened only to check and create: one cache slot
    try:
        store = RowStore.open(url, **opts)
    except StoreNotFound:
        store = None
    if store is not None:
        store.close(flush=False)
        if fresh:
            if store.run_id != run_id:
                raise StoreError(f"row store {url} belongs to another run (run id {store.run_id}); "
                                 "give this run its own classifier.store")
            RowStore.destroy(url, opts["storage_options"])
            store = None
    if store is None:
        RowStore.create(url, num_rows, dim, seed=seed, chunk_rows=chunk_rows, dtype=dtype, run_id=run_id,
                        **opts).close(flush=False)


def build_classifier(num_rows: int, dim: int, *, sampling: str = "recent", capacity: int = 65536,
                     loss: str = "cosine", temperature: float = 0.2, momentum: float = 0.9,
                     weight_decay: float = 1e-4, correction: str = "exact", store_url: str | None = None,
                     storage_options: dict | None = None, seed: int = 0, chunk_rows: int = 4096,
                     cache_rows: int | None = None, dtype: torch.dtype = torch.float32,
                     device="cpu", fresh: bool = False, run_id: str | None = None,
                     durable: bool = False, compact_min_steps: int = 1024, world: World | None = None,
                     multi_crop_rows: str = "main", overlap: bool = False, row_init: str = "random"):
    """A classifier over ``num_rows`` instances of dimension ``dim``.

    ``sampling='recent'`` keeps ``capacity`` rows on ``device`` and the rest in a row store at
    ``store_url`` (opened if it exists, else created for ``run_id``; a temporary folder when None).
    ``fresh=True`` starts from initial rows: an existing store of the same ``run_id`` is replaced, one
    of another run is refused. ``durable`` makes store commits survive a power loss. The transition
    log folds steps no stored row can start from, ``compact_min_steps`` at a time.
    In a distributed ``world`` each rank opens its part of the store (``store_url`` shared by all
    ranks, or per rank when it contains ``{rank}``); ``cache_rows`` is then per rank.
    ``sampling='full'`` is the dense reference over all N rows (one process only).
    ``multi_crop_rows``: which views' gradients reach the rows (:meth:`MultiViewLoss.loss`).
    ``overlap``: the store write of evicted rows is deferred to the next admission, and with
    ``read_ahead`` hints the next admission's store work runs in the background (:class:`RecentRows`).
    ``row_init``: a row's first visit keeps its random initial value (``random``) or starts it from
    its instance's L2-normalised feature of the main view, with momentum 0 (``feature``).
    """
    if loss not in ("cosine", "plain"):
        raise ValueError(f"unknown loss {loss!r}")
    world = world or World()
    if multi_crop_rows not in ("main", "all"):
        raise ValueError(f"multi_crop_rows must be 'main' or 'all', got {multi_crop_rows!r}")
    if row_init not in ROW_INITS:
        raise ValueError(f"row_init must be one of {ROW_INITS}, got {row_init!r}")
    common = dict(loss=loss, temperature=temperature, momentum=momentum, weight_decay=weight_decay,
                  multi_crop_rows=multi_crop_rows, row_init=row_init)
    if sampling == "full":
        if world.size > 1:
            raise ValueError("classifier.sampling = full is the 1-process reference; use 'recent'")
        return FullClassifier(num_rows, dim, seed=seed, device=device, dtype=dtype, **common)
    if sampling != "recent":
        raise ValueError(f"unknown sampling {sampling!r}")
    url = store_url_of_rank(store_url or _temporary_store_url(), world.rank)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    opts = dict(storage_options=storage_options, durable=durable)
    prepare = lambda: _prepare_store(url, num_rows, dim, fresh=fresh, run_id=run_id, seed=seed,  # noqa: E731
                                     chunk_rows=chunk_rows, dtype=np_dtype, opts=opts)
    if store_url is not None and "{rank}" in store_url:
        prepare()
    else:
        world.on_main(prepare)
    store = RowStore.open(url, cache_rows=cache_rows, part=(world.rank, world.size), **opts)
    if (store.num_rows, store.dim, store.dtype) != (num_rows, dim, np_dtype):
        raise ValueError(f"row store at {url} has shape ({store.num_rows}, {store.dim}), "
                         f"dtype {store.dtype}; expected ({num_rows}, {dim}), {np_dtype}")
    return RecentClassifier(store, min(capacity, num_rows), correction=correction, device=device,
                            dtype=dtype, store_url=url, storage_options=storage_options,
                            compact_min_steps=compact_min_steps, world=world, overlap=overlap, **common)


def resolve_overlap(setting: str, device, dtype: torch.dtype, say=lambda m: print(m, file=sys.stderr),
                    check=overlap_matches_synchronous) -> bool:
    """``classifier.overlap``: ``on``/``off`` as set; ``auto`` is on where deferred write-back has
    matched the synchronous path bit for bit on this device in this process (``check``), else off,
    saying so."""
    if setting != "auto":
        return setting == "on"
    if check(torch.device(device), dtype):
        return True
    say(f"note: classifier.overlap = auto: deferred row write-back differs from the synchronous path "
        f"on {device}; training with classifier.overlap = off")
    return False


def classifier_from_config(config: Config, num_rows: int, world: World, *, store_url: str, fresh: bool,
                           run_id: str, cache_rows: int, dtype: torch.dtype, device,
                           say=lambda m: print(m, file=sys.stderr)) -> InstanceClassifier:
    """The run's classifier over ``num_rows`` instances, from ``config.classifier`` (its rows' SGD
    from ``config.optim``; its row store at ``store_url``, for run ``run_id``, fresh or continued);
    ``say`` gets the one line of an ``overlap = auto`` that stays off."""
    cls = config.classifier
    overlap = cls.sampling == "recent" and resolve_overlap(cls.overlap, device, dtype, say)
    return build_classifier(
        num_rows, config.model.feature_dim, sampling=cls.sampling, capacity=min(cls.recent_k, num_rows),
        loss=cls.loss, temperature=cls.temperature, momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay, correction=cls.correction, store_url=store_url,
        seed=config.run.seed, chunk_rows=cls.chunk_rows, cache_rows=cache_rows, dtype=dtype, device=device,
        fresh=fresh, run_id=run_id, durable=config.train.durability == "power", world=world,
        multi_crop_rows=cls.multi_crop_rows, overlap=overlap, row_init=cls.row_init)
