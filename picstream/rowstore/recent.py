"""The K most recently visited classifier rows, resident on the device and updated by SGD every step."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from ..transfer import HostCopy, to_device
from .readahead import ReadAhead
from .store import RowStore
from .transitions import TransitionLog


class RecentRows:
    """The K most recently visited rows: a K-slot table of IDs, and the rows of the slots this
    process owns on ``device``; the row store holds every other row.

    ``admit(ids)`` makes a batch's rows resident: rows already resident are reused, missing ones are
    read from the store, brought forward to the current step by the transition log and placed into the
    slots of the least recently visited rows outside the batch, which are written back to the store.
    A resident row is authoritative: the store's copy of it is stale until it is evicted.

    With ``overlap``, the store write of an admission's evicted rows is deferred: their copy to the
    host starts at once (:class:`HostCopy`) and the write happens at the next admission, before it
    reads the store (or before anything else reads, commits or restores the store:
    :meth:`write_pending`). The rows, the store and the transition log are then bit-identical to the
    synchronous path's; only the time of the store write moves, by at most one admission.

    With ``overlap``, ``read_ahead(next_ids, lr)`` right after an admission moves the next
    admission's store work to a background thread (:class:`ReadAhead`): the deferred write, then the
    read of the rows ``admit(next_ids)`` would fetch (this process's rows of ``next_ids`` not
    resident) and, given this step's ``lr``, their correction on a copy of the log as it will be
    after this step's ``sgd_step(..., lr)``. The next admission uses that read only if it fetches
    exactly those rows (else it reads the store itself), and that correction only if its log then
    equals the copy bit for bit (else it brings the rows forward itself, as the synchronous path
    does). While the job is in flight only its thread reads or writes the store: every other use of
    the store waits for it first (``write_pending``), so the store sees the same writes and reads in
    the same order.

    Each rank of a distributed run keeps the same slot table (a function of the global ID stream)
    but holds and updates only the rows of its part of the store (``store.owner``), in a device table
    of its own: ``row_of_slot`` maps a slot to its row there (−1 where another rank holds it). That
    table has about K / world rows, and grows in the rare step that needs more.
    """

    def __init__(self, store: RowStore, log: TransitionLog, capacity: int, device="cpu",
                 dtype: torch.dtype = torch.float32, correction: str = "exact",
                 compact_min_steps: int = 1024, overlap: bool = False):
        self.store, self.log, self.capacity = store, log, int(capacity)
        self.overlap = overlap
        self._pending: tuple | None = None  # (ids, HostCopy w, HostCopy u, step) not yet in the store
        self.reads: Counter[str] = Counter()  # admissions that fetched rows: read "ahead" or "here"
        self.corrections: Counter[str] = Counter()  # and brought them forward "ahead" or "here"
        self.device, self.dtype, self.correction = torch.device(device), dtype, correction
        self._read_ahead = ReadAhead(self.device)
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        if self._np_dtype != store.dtype:
            raise ValueError(f"device dtype {dtype} differs from the store's {store.dtype}")
        k = self.capacity
        self.slot_ids = np.full(k, -1, dtype=np.int64)
        self.last_visit = np.full(k, -1, dtype=np.int64)
        self.row_of_slot = np.full(k, -1, dtype=np.int64)
        self._slot_of: dict[int, int] = {}
        self._clock = 0
        self._allocate(k if store.world == 1 else min(k, -(-k * 5 // (4 * store.world))))
        # how many rows the store holds with each last_step > 0 (steps with none are dropped): the
        # oldest one bounds the log
        self._stored_at: Counter[int] = Counter()
        self.compact_min_steps = int(compact_min_steps)

    def _allocate(self, rows: int) -> None:
        """A device table of ``rows`` rows that holds the rows of the current one (if any)."""
        d = self.store.dim
        table = (torch.zeros(rows, d, dtype=self.dtype, device=self.device),
                 torch.zeros(rows, d, dtype=self.dtype, device=self.device),
                 torch.zeros(rows, dtype=torch.bool, device=self.device), np.full(rows, -1, np.int64))
        if hasattr(self, "weight"):
            for new, old in zip(table, (self.weight, self.momentum, self.valid, self.slot_of_row)):
                new[:len(old)] = old
        self.weight, self.momentum, self.valid, self.slot_of_row = table

    def __len__(self) -> int:
        return len(self._slot_of)

    def device_bytes(self) -> int:
        """Bytes of the device tensors (independent of N)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.momentum, self.valid))

    def admit(self, ids, init: torch.Tensor | None = None) -> torch.Tensor:
        """The device-table rows (LongTensor) of ``ids``, −1 for rows another rank holds; fetches and
        evicts rows as needed. ``init`` (``len(ids)`` × D on the device, aligned with ``ids``): a row
        visited for the first time (not resident, never written to the store) starts as ``init`` at
        its first occurrence in ``ids``, with momentum 0, instead of its stored initial value."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.write_pending()
        ahead = self._read_ahead.take()
        uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        if uniq.size > self.capacity:
            raise ValueError(f"batch has {uniq.size} distinct ids, more than the {self.capacity} slots")
        slots = np.fromiter((self._slot_of.get(i, -1) for i in uniq.tolist()), np.int64, uniq.size)
        missing = slots < 0
        if missing.any():
            slots[missing] = self._fill(uniq[missing], slots[~missing], first[missing], init, ahead)
        # visit time = stream position of an id's last occurrence: a strict LRU order, no ties
        last_pos = np.zeros(uniq.size, np.int64)
        np.maximum.at(last_pos, inverse.reshape(-1), np.arange(ids.size))
        self.last_visit[slots] = self._clock + last_pos
        self._clock += ids.size
        return to_device(torch.from_numpy(self.row_of_slot[slots[inverse.reshape(-1)]]), self.device)

    def _fill(self, new_ids: np.ndarray, keep: np.ndarray, first: np.ndarray,
              init: torch.Tensor | None, ahead: tuple | None) -> np.ndarray:
        """Place ``new_ids`` into the least recently visited slots not in ``keep``; returns the slots
        (``first``: their positions in the batch, for ``init``; ``ahead``: the read-ahead job)."""
        priority = self.last_visit.copy()  # empty slots have −1, so they go first
        priority[keep] = np.iinfo(np.int64).max
        n = new_ids.size
        free = np.argpartition(priority, n - 1)[:n] if n < self.capacity else np.arange(n)
        self._evict_and_write_back(free)
        self.row_of_slot[free] = -1
        self.slot_ids[free] = new_ids
        self._slot_of.update(zip(new_ids.tolist(), free.tolist()))
        mine = self.store.owner(new_ids) == self.store.rank
        if mine.any():
            self._load(new_ids[mine], free[mine], first[mine], init, ahead)
        return free

    def _evict_and_write_back(self, slots: np.ndarray) -> None:
        """Empty ``slots``: the rows this process holds there are written back to the store."""
        old, rows = self.slot_ids[slots], self.row_of_slot[slots]
        for i in old[old >= 0].tolist():
            del self._slot_of[i]
        evict = rows >= 0
        if evict.any():
            idx = to_device(torch.from_numpy(rows[evict]), self.device)
            ids, step = old[evict], self.log.num_steps
            w, u = (HostCopy(t.index_select(0, idx)) for t in (self.weight, self.momentum))
            if step > 0:  # stored from now on: the log keeps their step until they are re-admitted
                self._stored_at[step] += int(ids.size)
            self._pending = (ids, w, u, step)
            if not self.overlap:
                self.write_pending()
            self.valid.index_fill_(0, idx, False)
            self.slot_of_row[rows[evict]] = -1

    def _load(self, ids: np.ndarray, slots: np.ndarray, first: np.ndarray,
              init: torch.Tensor | None, ahead: tuple | None) -> None:
        """Read rows from the store (or take the read-ahead's read of exactly them), bring them to
        the current step and put them on the device; the never-written ones start as ``init[first]``
        when ``init`` is given."""
        used = ahead is not None and np.array_equal(ahead[0], ids)
        self.reads["ahead" if used else "here"] += 1
        w, u, last, never, corrected = ahead[1] if used else (*self._read(ids, never=init is not None), None)
        fresh = None if init is None else np.flatnonzero(never)
        steps, counts = np.unique(last[last > 0], return_counts=True)
        for step, n in zip(steps.tolist(), counts.tolist()):  # these copies are stale from now on
            left = self._stored_at[step] - n
            if left > 0:
                self._stored_at[step] = left
            else:
                self._stored_at.pop(step, None)
        by_job = corrected is not None and self.log.equals(corrected[0])
        self.corrections["ahead" if by_job else "here"] += 1
        w, u = corrected[1:] if by_job else self.log.advance(w, u, last, self.correction)
        free_rows = np.flatnonzero(self.slot_of_row < 0)
        if free_rows.size < ids.size:
            size = len(self.slot_of_row)
            self._allocate(min(self.capacity, max(2 * size, size - free_rows.size + ids.size)))
            free_rows = np.flatnonzero(self.slot_of_row < 0)
        rows = free_rows[:ids.size]
        idx = to_device(torch.from_numpy(rows), self.device)
        self.weight.index_copy_(0, idx, to_device(torch.from_numpy(w), self.device))
        self.momentum.index_copy_(0, idx, to_device(torch.from_numpy(u), self.device))
        if fresh is not None and fresh.size:
            at, pos = (to_device(torch.from_numpy(a[fresh]), self.device) for a in (rows, first))
            self.weight.index_copy_(0, at, init.index_select(0, pos))
            self.momentum.index_fill_(0, at, 0)
        self.valid.index_fill_(0, idx, True)
        self.slot_of_row[rows] = slots
        self.row_of_slot[slots] = rows

    @torch.no_grad()
    def sgd_step(self, grad: torch.Tensor | None, lr: float) -> None:
        """One ``torch.optim.SGD`` step (the log's momentum and weight decay) on every resident row."""
        m, lam = self.log.momentum, self.log.weight_decay
        d = self.weight * lam if grad is None else torch.add(grad, self.weight, alpha=lam)
        self.momentum.mul_(m).add_(d)
        self.weight.add_(self.momentum, alpha=-lr)
        self.log.append(lr)
        keep = self._fold_point(self.log.num_steps)
        if keep is not None:
            self.log.compact(keep)

    def _read(self, ids: np.ndarray, never: bool) -> tuple:
        """``(w, u, last_step, never_written or None)`` of rows ``ids`` from the store."""
        w, u, last = self.store.read(ids)
        return w, u, last, self.store.never_written(ids) if never else None

    def _write(self, pending: tuple | None) -> None:
        """Write evicted rows ``(ids, HostCopy w, HostCopy u, step)`` to the store."""
        if pending is not None:
            ids, w, u, step = pending
            self.store.write(ids, w.result().numpy(), u.result().numpy(), step)

    def _write_read_and_correct(self, pending: tuple | None, ids: np.ndarray, step: tuple | None) -> tuple:
        """The read-ahead job: the deferred write, then the read of ``ids``; with ``step = (log, lr,
        keep)`` also their correction on ``log`` (a copy) after ``lr`` is appended to it and it is
        folded at ``keep`` (None: not folded), as ``sgd_step`` will do to the log. Returns
        ``(w, u, last_step, never_written, (log, w, u) corrected or None)``."""
        self._write(pending)
        w, u, last, never = self._read(ids, never=True)
        if step is None:
            return w, u, last, never, None
        log, lr, keep = step
        log.append(lr)
        if keep is not None:
            log.compact(keep)
        return w, u, last, never, (log, *log.advance(w, u, last, self.correction))

    def read_ahead(self, ids, lr: float | None = None) -> None:
        """With ``overlap``, called right after an admission: start the store work of ``admit(ids)``
        as the next admission in the background (the deferred write, then the read of this
        process's rows of ``ids`` not resident now and, given ``lr``, the learning rate this step's
        ``sgd_step`` will apply, their correction to the step after it). Without ``overlap`` it
        does nothing."""
        if not self.overlap:
            return
        self._read_ahead.drain()
        uniq = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        new = uniq[np.fromiter((i not in self._slot_of for i in uniq.tolist()), bool, uniq.size)]
        fetch = new[self.store.owner(new) == self.store.rank]
        pending, self._pending = self._pending, None
        step = None
        if lr is not None and fetch.size:  # the log after sgd_step(..., lr): _stored_at is final now
            step = (self.log.copy(), float(lr), self._fold_point(self.log.num_steps + 1))
        self._read_ahead.start(fetch, self._write_read_and_correct, pending, fetch, step)

    def write_pending(self) -> None:
        """Write the last admission's evicted rows to the store, if not yet written; first wait
        for the read-ahead in flight (its error is raised here)."""
        self._read_ahead.drain()
        pending, self._pending = self._pending, None
        self._write(pending)

    def close(self) -> None:
        """Write the last admission's evicted rows and stop the read-ahead thread."""
        try:
            self.write_pending()
        finally:
            self._read_ahead.close()

    def _fold_point(self, num_steps: int) -> int | None:
        """Where the log of ``num_steps`` steps is folded (None: not folded): before the oldest
        stored row's last step once there are at least ``compact_min_steps`` steps before it (a
        deterministic function of the stream, so a resumed run folds at the same steps)."""
        oldest = min(self._stored_at, default=num_steps)
        return oldest if oldest - self.log.offset >= self.compact_min_steps else None

    def peek(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Current ``(w, u)`` of rows this process holds or the store has (not of rows resident on
        another rank), without changing residency or the store."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.write_pending()
        slots = np.fromiter((self._slot_of.get(i, -1) for i in ids.tolist()), np.int64, ids.size)
        rows = np.where(slots >= 0, self.row_of_slot[slots], -1)
        if np.any((slots >= 0) & (rows < 0)):
            raise ValueError("peek: some rows are resident on another rank")
        res = rows >= 0
        w, u, last = self.store.read(ids)
        w[~res], u[~res] = self.log.advance(w[~res], u[~res], last[~res], self.correction)
        idx = torch.from_numpy(rows[res]).to(self.device)
        w[res] = self.weight.index_select(0, idx).cpu().numpy()
        u[res] = self.momentum.index_select(0, idx).cpu().numpy()
        return w, u

    def load_parts(self, states: list[dict]) -> None:
        """Take over this process's rows from the states of a run with ``len(states)`` ranks (or 1):
        the same slot table, its rows re-partitioned by this store part's ownership."""
        self.write_pending()
        first = states[0]
        slot_ids = first["slot_ids"].numpy().astype(np.int64)
        held = slot_ids >= 0
        mine = np.flatnonzero(held & (self.store.owner(np.where(held, slot_ids, 0)) == self.store.rank))
        rows = max(mine.size, len(self.slot_of_row))
        w = torch.zeros(rows, self.store.dim, dtype=self.dtype)
        u = torch.zeros_like(w)
        for state in states:
            at = state.get("row_of_slot", torch.from_numpy(np.where(held, np.arange(held.size), -1)))
            at = at.numpy()[mine]
            have = np.flatnonzero(at >= 0)
            w[have], u[have] = state["weight"][at[have]], state["momentum"][at[have]]
        row_of_slot = np.full(self.capacity, -1, np.int64)
        row_of_slot[mine] = np.arange(mine.size)
        empty = torch.zeros(0, dtype=torch.int64)
        self.load_state_dict({**first, "row_of_slot": torch.from_numpy(row_of_slot), "weight": w,
                              "momentum": u, "stored_steps": empty, "stored_counts": empty})
        # the rows this part now stores, except the resident ones (their stored copies are stale)
        counts = self.store.stored_step_counts()
        last = self.store.read(slot_ids[mine])[2]
        counts.subtract(Counter(last[last > 0].tolist()))
        self._stored_at = Counter({s: n for s, n in counts.items() if n > 0})

    def state_dict(self) -> dict:
        """The slot table (the same on every rank) and this process's rows and stored-step counts."""
        live = sorted(self._stored_at)
        return {"slot_ids": torch.from_numpy(self.slot_ids.copy()),
                "last_visit": torch.from_numpy(self.last_visit.copy()),
                "row_of_slot": torch.from_numpy(self.row_of_slot.copy()),
                "weight": self.weight.cpu(), "momentum": self.momentum.cpu(), "clock": self._clock,
                "stored_steps": torch.tensor(live, dtype=torch.int64),
                "stored_counts": torch.tensor([self._stored_at[s] for s in live], dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.write_pending()
        self._read_ahead.take()  # read before the store or the slot table changed: dropped
        self.slot_ids = state["slot_ids"].numpy().astype(np.int64).copy()
        self.last_visit = state["last_visit"].numpy().astype(np.int64).copy()
        if "row_of_slot" in state:
            self.row_of_slot = state["row_of_slot"].numpy().astype(np.int64).copy()
        else:  # a 1-process checkpoint of format 1: row = slot
            self.row_of_slot = np.where(self.slot_ids >= 0, np.arange(self.capacity), -1)
        del self.weight
        self._allocate(state["weight"].shape[0])
        self.weight.copy_(state["weight"])
        self.momentum.copy_(state["momentum"])
        held = np.flatnonzero(self.row_of_slot >= 0)
        self.slot_of_row[self.row_of_slot[held]] = held
        self.valid.copy_(torch.from_numpy(self.slot_of_row >= 0))
        self._clock = int(state["clock"])
        self._stored_at = Counter(dict(zip(state["stored_steps"].tolist(), state["stored_counts"].tolist())))
        occupied = np.flatnonzero(self.slot_ids >= 0)
        self._slot_of = dict(zip(self.slot_ids[occupied].tolist(), occupied.tolist()))
