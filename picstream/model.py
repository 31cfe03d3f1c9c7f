"""The PIC network: a backbone (picstream.backbones) and a 2-layer MLP projection head."""
from __future__ import annotations

import torch
from torch import nn

from . import narrow_resnet
from .backbones import is_timm, timm_backbone, torchvision_backbone
from .config import ModelConfig


def build_backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    """The backbone ``config.arch`` names (pooled features out) and the width of its features."""
    if is_timm(config.arch):
        return timm_backbone(config)
    if config.arch in narrow_resnet.ARCHS:
        return narrow_resnet.narrow_resnet18(), narrow_resnet.FEATURE_DIM
    return torchvision_backbone(config)


class PICNet(nn.Module):
    """backbone → pooled features → Linear-BN-ReLU-Linear head (or one Linear with ``head='linear'``)
    → z (unnormalised); ``norm='group'`` puts GroupNorm wherever BatchNorm would be (a timm backbone
    keeps its own normalisation)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.backbone, dim = build_backbone(config)
        if config.head == "linear":
            self.head = nn.Linear(dim, config.feature_dim)
            return
        self.head = nn.Sequential(
            nn.Linear(dim, config.head_hidden),
            nn.BatchNorm1d(config.head_hidden) if config.norm == "batch" else nn.GroupNorm(32, config.head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(config.head_hidden, config.feature_dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))
