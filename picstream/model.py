"""The PIC network: a torchvision ResNet backbone and a 2-layer MLP projection head."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from . import narrow_resnet
from .config import ModelConfig


def norm_layer(norm: str):
    """``nn.BatchNorm2d`` or a GroupNorm(32 groups) of the same signature."""
    return nn.BatchNorm2d if norm == "batch" else (lambda channels: nn.GroupNorm(32, channels))


def build_backbone(arch: str, cifar_stem: bool = False, norm: str = "batch") -> nn.Module:
    """A torchvision ResNet without its `fc` layer (replaced by identity); output = pooled features.

    `cifar_stem` swaps the 7×7/2 conv + max-pool for a 3×3/1 conv without pooling (for 32 px inputs).
    """
    if arch in narrow_resnet.ARCHS:
        return narrow_resnet.narrow_resnet18(norm_layer(norm))
    backbone = getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer(norm))
    if cifar_stem:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()
    return backbone


def backbone_dim(arch: str) -> int:
    if arch in narrow_resnet.ARCHS:
        return narrow_resnet.FEATURE_DIM
    return 512 if arch in ("resnet18", "resnet34") else 2048


class PICNet(nn.Module):
    """backbone → pooled features → Linear-BN-ReLU-Linear head (or one Linear with ``head='linear'``)
    → z (unnormalised); ``norm='group'`` puts GroupNorm wherever BatchNorm would be."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.backbone = build_backbone(config.arch, config.cifar_stem, config.norm)
        dim = backbone_dim(config.arch)
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
