"""Counter-based row initialisation: row ``i`` of a store is a pure function of ``(seed, i)``.

Rows that were never written are not stored; they are regenerated on demand from a splitmix64 hash of
``(seed, id, column)`` mapped to ``uniform(-1/sqrt(D), 1/sqrt(D))``.
"""
from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def init_rows(seed: int, ids: np.ndarray, dim: int, dtype=np.float32) -> np.ndarray:
    """Initial weights of rows ``ids`` (shape ``(len(ids), dim)``), uniform in ``±1/sqrt(dim)``."""
    ids = np.asarray(ids, dtype=np.uint64).reshape(-1, 1)
    key = _mix(np.array([seed], dtype=np.uint64) * _GAMMA + _GAMMA)
    with np.errstate(over="ignore"):
        counter = ids * np.uint64(dim) + np.arange(dim, dtype=np.uint64)
        bits = _mix(key + counter * _GAMMA)
    unit = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    return ((2.0 * unit - 1.0) / np.sqrt(dim)).astype(dtype)
