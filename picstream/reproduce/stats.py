"""A stated test per claim: Welch's t on the seeds' k-NN top-1, a bootstrap interval of the mean
difference, and the smallest difference the seeds could have detected."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["MIN_SEEDS", "Comparison", "compare"]

MIN_SEEDS = 3          # no verdict from fewer seeds per side
ALPHA, POWER = 0.05, 0.8
BOOTSTRAP = 10000


@dataclass(frozen=True)
class Comparison:
    gap: float                       # mean(a) - mean(b), points
    ci: tuple[float, float]          # bootstrap 95% interval of the gap (seeds resampled per side)
    p: float                         # Welch's t, two-sided
    detectable: float                # smallest |gap| found at ALPHA with POWER, given these seeds' spread


def compare(a: list[float], b: list[float], seed: int = 0) -> Comparison:
    """Welch's t-test of ``a`` against ``b`` (both with at least 2 values) and its companions."""
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    gap = float(a_.mean() - b_.mean())
    va, vb = a_.var(ddof=1) / len(a_), b_.var(ddof=1) / len(b_)
    se = float(np.sqrt(va + vb))
    if se == 0:
        p = 1.0 if gap == 0 else 0.0
        df = float(len(a_) + len(b_) - 2)
    else:
        p = float(stats.ttest_ind(a_, b_, equal_var=False).pvalue)
        df = (va + vb) ** 2 / (va ** 2 / (len(a_) - 1) + vb ** 2 / (len(b_) - 1))
    detectable = float((stats.t.ppf(1 - ALPHA / 2, df) + stats.t.ppf(POWER, df)) * se)
    rng = np.random.default_rng(seed)
    means = (rng.choice(a_, (BOOTSTRAP, len(a_))).mean(1) - rng.choice(b_, (BOOTSTRAP, len(b_))).mean(1))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Comparison(gap, (float(lo), float(hi)), p, detectable)
