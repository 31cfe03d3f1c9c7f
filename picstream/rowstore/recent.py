"""The K most recently visited classifier rows, resident on the device and updated by SGD every step."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from .store import RowStore
from .transitions import TransitionLog


class RecentRows:
    """A K-slot table of rows on ``device``; the row store holds every other row.

    ``admit(ids)`` makes a batch's rows resident: rows already resident are reused, missing ones are
    read from the store, brought forward to the current step by the transition log and placed into the
    slots of the least recently visited rows outside the batch, which are written back to the store.
    A resident row is authoritative: the store's copy of it is stale until it is evicted.
    """

    def __init__(self, store: RowStore, log: TransitionLog, capacity: int, device="cpu",
                 dtype: torch.dtype = torch.float32, correction: str = "exact",
                 compact_min_steps: int = 1024):
        self.store, self.log, self.capacity = store, log, int(capacity)
        self.device, self.dtype, self.correction = torch.device(device), dtype, correction
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        if self._np_dtype != store.dtype:
            raise ValueError(f"device dtype {dtype} differs from the store's {store.dtype}")
        k, d = self.capacity, store.dim
        self.weight = torch.zeros(k, d, dtype=dtype, device=self.device)
        self.momentum = torch.zeros(k, d, dtype=dtype, device=self.device)
        self.valid = torch.zeros(k, dtype=torch.bool, device=self.device)
        self.slot_ids = np.full(k, -1, dtype=np.int64)
        self.last_visit = np.full(k, -1, dtype=np.int64)
        self._slot_of: dict[int, int] = {}
        self._clock = 0
        # how many rows the store holds with each last_step > 0 (steps with none are dropped): the
        # oldest one bounds the log
        self._stored_at: Counter[int] = Counter()
        self.compact_min_steps = int(compact_min_steps)

    def __len__(self) -> int:
        return len(self._slot_of)

    def device_bytes(self) -> int:
        """Bytes of the device tensors (independent of N)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.momentum, self.valid))

    def admit(self, ids) -> torch.Tensor:
        """Device slots (LongTensor) of ``ids``, fetching and evicting rows as needed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(ids, return_inverse=True)
        if uniq.size > self.capacity:
            raise ValueError(f"batch has {uniq.size} distinct ids, more than the {self.capacity} slots")
        slots = np.fromiter((self._slot_of.get(i, -1) for i in uniq.tolist()), np.int64, uniq.size)
        missing = slots < 0
        if missing.any():
            slots[missing] = self._fill(uniq[missing], slots[~missing])
        # visit time = stream position of an id's last occurrence: a strict LRU order, no ties
        last_pos = np.zeros(uniq.size, np.int64)
        np.maximum.at(last_pos, inverse.reshape(-1), np.arange(ids.size))
        self.last_visit[slots] = self._clock + last_pos
        self._clock += ids.size
        return torch.from_numpy(slots[inverse.reshape(-1)]).to(self.device)

    def _fill(self, new_ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Place ``new_ids`` into the least recently visited slots not in ``keep``; returns the slots."""
        priority = self.last_visit.copy()  # empty slots have −1, so they go first
        priority[keep] = np.iinfo(np.int64).max
        n = new_ids.size
        free = np.argpartition(priority, n - 1)[:n] if n < self.capacity else np.arange(n)
        old = self.slot_ids[free]
        evict = old >= 0
        if evict.any():
            idx = torch.from_numpy(free[evict]).to(self.device)
            w = self.weight.index_select(0, idx).cpu().numpy()
            u = self.momentum.index_select(0, idx).cpu().numpy()
            self._stored(old[evict], w, u)
            for i in old[evict].tolist():
                del self._slot_of[i]
        w, u, last = self.store.read(new_ids)
        steps, counts = np.unique(last[last > 0], return_counts=True)
        for step, n in zip(steps.tolist(), counts.tolist()):  # these copies are stale from now on
            left = self._stored_at[step] - n
            if left > 0:
                self._stored_at[step] = left
            else:
                self._stored_at.pop(step, None)
        w, u = self.log.advance(w, u, last, self.correction)
        idx = torch.from_numpy(free).to(self.device)
        self.weight.index_copy_(0, idx, torch.from_numpy(w).to(self.device, non_blocking=True))
        self.momentum.index_copy_(0, idx, torch.from_numpy(u).to(self.device, non_blocking=True))
        self.valid.index_fill_(0, idx, True)
        self.slot_ids[free] = new_ids
        self._slot_of.update(zip(new_ids.tolist(), free.tolist()))
        return free

    @torch.no_grad()
    def sgd_step(self, grad: torch.Tensor | None, lr: float) -> None:
        """One ``torch.optim.SGD`` step (the log's momentum and weight decay) on every resident row."""
        m, lam = self.log.momentum, self.log.weight_decay
        d = self.weight * lam if grad is None else torch.add(grad, self.weight, alpha=lam)
        self.momentum.mul_(m).add_(d)
        self.weight.add_(self.momentum, alpha=-lr)
        self.log.append(lr)
        self._compact_log()

    def _stored(self, ids: np.ndarray, w: np.ndarray, u: np.ndarray) -> None:
        """Write rows back to the store, valid at the current step."""
        self.store.write(ids, w, u, self.log.num_steps)
        if self.log.num_steps > 0:
            self._stored_at[self.log.num_steps] += int(ids.size)

    def _compact_log(self) -> None:
        """Fold the log's steps before the oldest stored row's last step once there are at least
        ``compact_min_steps`` of them (a deterministic function of the stream, so a resumed run
        folds at the same steps)."""
        oldest = min(self._stored_at, default=self.log.num_steps)
        if oldest - self.log.offset >= self.compact_min_steps:
            self.log.compact(oldest)

    def peek(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Current ``(w, u)`` of any rows, without changing residency or the store."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        slots = np.fromiter((self._slot_of.get(i, -1) for i in ids.tolist()), np.int64, ids.size)
        res = slots >= 0
        w, u, last = self.store.read(ids)
        w[~res], u[~res] = self.log.advance(w[~res], u[~res], last[~res], self.correction)
        idx = torch.from_numpy(slots[res]).to(self.device)
        w[res] = self.weight.index_select(0, idx).cpu().numpy()
        u[res] = self.momentum.index_select(0, idx).cpu().numpy()
        return w, u

    def write_back_all(self) -> None:
        """Write every resident row to the store and empty the table."""
        occupied = np.flatnonzero(self.slot_ids >= 0)
        if occupied.size:
            idx = torch.from_numpy(occupied).to(self.device)
            self._stored(self.slot_ids[occupied], self.weight[idx].cpu().numpy(),
                         self.momentum[idx].cpu().numpy())
        self.weight.zero_()
        self.momentum.zero_()
        self.valid.zero_()
        self.slot_ids[:] = -1
        self.last_visit[:] = -1
        self._slot_of.clear()

    def state_dict(self) -> dict:
        live = sorted(self._stored_at)
        return {"slot_ids": torch.from_numpy(self.slot_ids.copy()),
                "last_visit": torch.from_numpy(self.last_visit.copy()),
                "weight": self.weight.cpu(), "momentum": self.momentum.cpu(), "clock": self._clock,
                "stored_steps": torch.tensor(live, dtype=torch.int64),
                "stored_counts": torch.tensor([self._stored_at[s] for s in live], dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.slot_ids = state["slot_ids"].numpy().astype(np.int64).copy()
        self.last_visit = state["last_visit"].numpy().astype(np.int64).copy()
        self.weight.copy_(state["weight"])
        self.momentum.copy_(state["momentum"])
        self.valid.copy_(torch.from_numpy(self.slot_ids >= 0))
        self._clock = int(state["clock"])
        self._stored_at = Counter(dict(zip(state["stored_steps"].tolist(), state["stored_counts"].tolist())))
        occupied = np.flatnonzero(self.slot_ids >= 0)
        self._slot_of = dict(zip(self.slot_ids[occupied].tolist(), occupied.tolist()))
