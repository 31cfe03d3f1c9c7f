"""The backbone's optimizer (backbone + head): SGD, AdamW or LARS, its schedule and gradient clipping.

The classifier rows are not here: they are SGD with momentum on the rows' own settings
(``optim.base_lr``, ``momentum``, ``weight_decay``), stepped by the classifier with the exact lazy
correction, whatever ``optim.name`` is (docs/design.md, "Two optimizers").

- ``sgd``: ``torch.optim.SGD`` over every parameter, weight decay on all of them (the paper's).
- ``adamw``: ``torch.optim.AdamW``; ``lars``: :class:`LARS`. Both in two groups: weights, and the
  parameters of one dimension or named ``*.bias`` (norms, biases), which get no weight decay (and no
  LARS trust ratio), as DINO, MoCo v3's LARS and timm do.
- Per step (:func:`apply_schedule`): every group's lr follows the rows' warm-up + cosine shape scaled to
  ``backbone_lr``; the decayed group's weight decay follows a cosine from ``backbone_weight_decay`` to
  ``backbone_weight_decay_end`` (DINO) or stays constant; then the gradients are clipped.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import OptimConfig
from .lr_schedule import cosine_ramp, warmup_cosine_lr

NO_DECAY = "no_weight_decay"  # param-group flag: biases and norms (no weight decay, no LARS trust ratio)


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step of each weight tensor is scaled by its trust ratio (You et al.,
    2017, in the form SimCLR, BYOL and MoCo v3 use): ``d = g + λ·w``, ``d ← η·‖w‖/‖d‖ · d`` (1 where
    either norm is 0), ``u ← m·u + d``, ``w ← w − lr·u``. Groups flagged ``no_weight_decay`` take the
    plain momentum step without decay or trust ratio."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group.get(NO_DECAY, False):
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                u = state["momentum_buffer"]
                u.mul_(group["momentum"]).add_(d)
                p.add_(u, alpha=-group["lr"])
        return loss


def decay_groups(model: nn.Module) -> list[dict]:
    """``[weights, biases and norms]`` as param groups (the second flagged ``no_weight_decay``)."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": exempt, NO_DECAY: True}]


def backbone_peak_lr(optim: OptimConfig) -> float:
    """The backbone's lr after warm-up: its base lr scaled linearly from base_batch_size to batch_size."""
    base = optim.base_lr if optim.backbone_lr is None else optim.backbone_lr
    return base * optim.batch_size / optim.base_batch_size


def backbone_weight_decay(optim: OptimConfig) -> tuple[float, float]:
    """``(start, end)`` of the backbone's weight decay (equal: constant)."""
    start = optim.weight_decay if optim.backbone_weight_decay is None else optim.backbone_weight_decay
    return start, start if optim.backbone_weight_decay_end is None else optim.backbone_weight_decay_end


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of every parameter of ``model`` (backbone + head), as ``optim.name`` says."""
    lr, (wd, _) = backbone_peak_lr(optim), backbone_weight_decay(optim)
    if optim.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=optim.momentum, weight_decay=wd)
    groups = decay_groups(model)
    groups[1]["weight_decay"] = 0.0
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), weight_decay=wd)
    return LARS(groups, lr=lr, momentum=optim.momentum, weight_decay=wd, trust_coefficient=optim.lars_trust)


def apply_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, step: int, total_steps: int,
                   warmup_steps: int) -> None:
    """Before the optimizer's step at 0-based ``step`` (gradients computed): set each group's lr and
    weight decay for this step, then clip the gradients (``optim.clip_grad``)."""
    lr = warmup_cosine_lr(step, total_steps, backbone_peak_lr(optim), warmup_steps)
    wd = cosine_ramp(step, total_steps, *backbone_weight_decay(optim))
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = 0.0 if group.get(NO_DECAY, False) else wd
    if optim.clip_grad is not None:
        clip_gradients([p for g in optimizer.param_groups for p in g["params"] if p.grad is not None],
                       optim.clip_grad, optim.clip_mode)


def clip_gradients(params: list[torch.Tensor], max_norm: float, mode: str) -> None:
    """Scale the gradients so that their L2 norm is at most ``max_norm``: of all of them as one vector
    (``norm``, ``torch.nn.utils.clip_grad_norm_``) or of each tensor on its own (``per_tensor``, DINO's
    rule: ``g ← g · min(1, max_norm / (‖g‖ + 1e-6))``). No host synchronisation either way."""
    if mode == "norm":
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    for p in params:
        p.grad.mul_(torch.clamp(max_norm / (torch.linalg.vector_norm(p.grad) + 1e-6), max=1.0))
