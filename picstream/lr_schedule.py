"""Learning rate by step: linear warm-up, then cosine decay to zero."""
from __future__ import annotations

import math


def warmup_cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """The lr applied at 0-based `step` of `total_steps`.

    Warm-up rises linearly to `base_lr` over `warmup_steps` (the first step already gets a non-zero
    lr); afterwards the lr follows a half cosine from `base_lr` to 0 at `total_steps`.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
