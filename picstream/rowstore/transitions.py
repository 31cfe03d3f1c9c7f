"""Exact lazy correction of classifier rows that received no gradient for a stretch of SGD steps.

A row with ``g = 0`` during steps ``(s, t]`` evolves by ``A_t ··· A_{s+1}``, with
``A_k = [[1 − η_k·λ, −η_k·m], [λ, m]]`` acting on ``(w, u)``. :class:`TransitionLog` keeps the
applied ``η_k`` and answers such range products exactly in float64 from a growable segment tree.
``compact(L)`` folds steps ``1..L`` into one matrix once no query can start inside them (only at 0,
for never-written rows, or at ``L`` and later), so the log holds about one sweep of steps, not all.
"""
from __future__ import annotations

import numpy as np
import torch

MODES = ("exact", "paper", "none")


class TransitionLog:
    """Per-step learning rates and a segment tree of their 2×2 transition matrices."""

    def __init__(self, momentum: float, weight_decay: float):
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self._lrs: list[float] = []  # the learning rates of steps offset+1 .. num_steps
        self._offset = 0
        self._base = np.eye(2)  # A_offset ··· A_1, for queries that start at step 0
        self._cap = 1
        self._tree = np.tile(np.eye(2), (2, 1, 1))  # node k = product of its range, later steps left

    @property
    def num_steps(self) -> int:
        return self._offset + len(self._lrs)

    @property
    def offset(self) -> int:
        """Steps ``1..offset`` are folded: a query may start at 0 or at ``offset`` and later."""
        return self._offset

    def compact(self, keep_from: int) -> None:
        """Fold the steps up to ``keep_from`` into the product for queries from step 0."""
        fold = min(int(keep_from), self.num_steps - 1) - self._offset  # keeps the last lr
        if fold <= 0:
            return
        for a in self.matrix(self._lrs[:fold]):
            self._base = a @ self._base
        self._lrs = self._lrs[fold:]
        self._offset += fold
        self._rebuild(max(1, 1 << (len(self._lrs) - 1).bit_length()))

    def copy(self) -> "TransitionLog":
        """An independent log in the same state (appends and folds on it leave this one unchanged)."""
        other = TransitionLog(self.momentum, self.weight_decay)
        other._lrs, other._offset, other._base = list(self._lrs), self._offset, self._base.copy()
        other._cap, other._tree = self._cap, self._tree.copy()
        return other

    def equals(self, other: "TransitionLog") -> bool:
        """Whether ``other`` holds the same steps, learning rates and matrices bit for bit, so that
        ``advance`` gives the same result on both."""
        return (self._offset == other._offset and self._cap == other._cap
                and (self.momentum, self.weight_decay) == (other.momentum, other.weight_decay)
                and self._lrs == other._lrs
                and all(np.array_equal(a.view(np.uint64), b.view(np.uint64))
                        for a, b in ((self._base, other._base), (self._tree, other._tree))))

    @property
    def last_lr(self) -> float:
        return self._lrs[-1] if self._lrs else 0.0

    def matrix(self, lr) -> np.ndarray:
        """``A`` for one or many learning rates (shape ``(..., 2, 2)``)."""
        lr = np.asarray(lr, dtype=np.float64)
        m, lam = self.momentum, self.weight_decay
        a = np.empty(lr.shape + (2, 2))
        a[..., 0, 0] = 1.0 - lr * lam
        a[..., 0, 1] = -lr * m
        a[..., 1, 0] = lam
        a[..., 1, 1] = m
        return a

    def _rebuild(self, cap: int) -> None:
        tree = np.tile(np.eye(2), (2 * cap, 1, 1))
        n = len(self._lrs)
        if n:
            tree[cap:cap + n] = self.matrix(self._lrs)
        lo, hi = cap // 2, cap
        while lo >= 1:
            tree[lo:hi] = tree[2 * lo + 1:2 * hi:2] @ tree[2 * lo:2 * hi:2]
            lo, hi = lo // 2, lo
        self._cap, self._tree = cap, tree

    def append(self, lr: float) -> None:
        """Record the learning rate of the step just applied."""
        self._lrs.append(float(lr))
        if len(self._lrs) > self._cap:
            self._rebuild(2 * self._cap)
            return
        k = self._cap + len(self._lrs) - 1
        self._tree[k] = self.matrix(lr)
        k //= 2
        while k >= 1:
            self._tree[k] = self._tree[2 * k + 1] @ self._tree[2 * k]
            k //= 2

    def products(self, starts: np.ndarray) -> np.ndarray:
        """``A_T ··· A_{s+1}`` for each ``s`` in ``starts`` (``T = num_steps``), shape ``(n, 2, 2)``."""
        starts = np.asarray(starts, dtype=np.int64)
        fresh = starts == 0
        if starts.size and (starts.max() > self.num_steps or (starts[~fresh] < self._offset).any()
                            or starts.min() < 0):
            raise ValueError(f"start steps must be 0 or lie in [{self._offset}, {self.num_steps}]")
        n = starts.size
        left = np.tile(np.eye(2), (n, 1, 1))   # earliest ranges, accumulated on the right
        left[fresh] = self._base
        right = np.tile(np.eye(2), (n, 1, 1))  # latest ranges, accumulated on the left
        lo = np.maximum(starts - self._offset, 0) + self._cap
        hi = np.full(n, len(self._lrs) + self._cap, dtype=np.int64)
        while True:
            active = lo < hi
            if not active.any():
                break
            take = active & (lo & 1).astype(bool)
            left[take] = self._tree[lo[take]] @ left[take]
            lo[take] += 1
            take = active & (hi & 1).astype(bool)
            hi[take] -= 1
            right[take] = right[take] @ self._tree[hi[take]]
            lo >>= 1
            hi >>= 1
        return right @ left

    def _paper_products(self, starts: np.ndarray) -> np.ndarray:
        """The paper's closed form: ``A(η_T)^(T − s)`` with the current learning rate."""
        gaps = self.num_steps - np.asarray(starts, dtype=np.int64)
        out = np.tile(np.eye(2), (gaps.size, 1, 1))
        base = self.matrix(self.last_lr)
        while gaps.any():
            odd = (gaps & 1).astype(bool)
            out[odd] = base @ out[odd]
            base = base @ base
            gaps = gaps >> 1
        return out

    def advance(self, w: np.ndarray, u: np.ndarray, last_step: np.ndarray, mode: str = "exact"):
        """Rows ``(w, u)`` last updated at ``last_step`` brought forward to ``num_steps``.

        The 2×2 products are computed in float64 (de-duplicated by start step); the result keeps
        the dtype of ``w``.
        """
        if mode not in MODES:
            raise ValueError(f"unknown correction mode {mode!r}; expected one of {MODES}")
        last_step = np.asarray(last_step, dtype=np.int64)
        if mode == "none" or last_step.size == 0:
            return w, u
        starts, inverse = np.unique(last_step, return_inverse=True)
        prods = self.products(starts) if mode == "exact" else self._paper_products(starts)
        # products in float64; applied in the rows' precision (float32 rows: 1e-7 relative)
        p = prods[inverse.reshape(-1)][:, :, :, None].astype(w.dtype)  # (n, 2, 2, 1)
        return p[:, 0, 0] * w + p[:, 0, 1] * u, p[:, 1, 0] * w + p[:, 1, 1] * u

    def state_dict(self) -> dict:
        return {"lrs": torch.tensor(self._lrs, dtype=torch.float64), "offset": self._offset,
                "base": torch.from_numpy(self._base.copy()),
                "momentum": self.momentum, "weight_decay": self.weight_decay}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = float(state["momentum"])
        self.weight_decay = float(state["weight_decay"])
        self._lrs = [float(x) for x in state["lrs"].tolist()]
        self._offset = int(state.get("offset", 0))
        self._base = state["base"].numpy().copy() if "base" in state else np.eye(2)
        cap = 1
        while cap < len(self._lrs):
            cap *= 2
        self._rebuild(cap)
