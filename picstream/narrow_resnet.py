"""ResNet-18 at a quarter width for 32 px images: the fast backbone of the CPU reproduction scale.

Channels 16-32-64-128 (ResNet-18's 64-128-256-512 divided by 4), two torchvision ``BasicBlock`` s per
stage, and a 3×3 stride-2 stem without max-pool, so the four stages see 16, 8, 4 and 2 px maps. On 2
CPU cores it trains ~20× faster than ResNet-18 with the ImageNet stem at 32 px.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock

__all__ = ["ARCHS", "FEATURE_DIM", "narrow_resnet18"]

WIDTHS = (16, 32, 64, 128)
FEATURE_DIM = WIDTHS[-1]
ARCHS = ("resnet18_quarter",)


def _stage(in_channels: int, channels: int, stride: int, norm_layer) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_channels != channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), norm_layer(channels))
    return nn.Sequential(BasicBlock(in_channels, channels, stride, downsample, norm_layer=norm_layer),
                         BasicBlock(channels, channels, norm_layer=norm_layer))


def narrow_resnet18(norm_layer=nn.BatchNorm2d) -> nn.Sequential:
    """The quarter-width ResNet-18 (output: ``FEATURE_DIM`` pooled features per image)."""
    layers = [nn.Conv2d(3, WIDTHS[0], 3, stride=2, padding=1, bias=False), norm_layer(WIDTHS[0]),
              nn.ReLU(inplace=True)]
    for i, channels in enumerate(WIDTHS):
        layers.append(_stage(WIDTHS[max(0, i - 1)], channels, 1 if i == 0 else 2, norm_layer))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
