"""Schedules by step: the learning rate (linear warm-up, then cosine decay to zero) and a cosine ramp."""
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


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """A value going from `start` at step 0 to `end` at `total_steps` along a half cosine (DINO's
    weight-decay schedule, 0.04 → 0.4 for ViTs); exactly `start` when `start == end`."""
    if start == end:
        return start
    progress = min(1.0, step / max(1, total_steps))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))
