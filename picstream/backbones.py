"""Backbones by name: torchvision ResNets / ResNeXts / Wide ResNets / RegNets, and any timm model.

``model.arch`` is a torchvision name (``resnet50``, ``regnet_y_800mf``) or ``timm/<name>``
(``timm/vit_small_patch16_224``, ``timm/convnext_tiny``), built without weights and without its
classifier (timm: ``num_classes=0``; torchvision: ``fc`` replaced by identity), so its output is the
pooled feature vector. ``model.arch_kwargs`` go to the constructor. The feature width is read from
the model (timm: ``head_hidden_size``; torchvision: ``fc.in_features``), never from a table.
"""
from __future__ import annotations

import functools
import importlib
import json
from typing import Optional

import torch
import torchvision
from torch import nn

from . import narrow_resnet
from .config import ConfigError, ModelConfig

TIMM_PREFIX = "timm/"
TORCHVISION_FAMILIES = ("resnet", "resnext", "wide_resnet", "regnet_")
RESNET_FAMILIES = ("resnet", "resnext", "wide_resnet")  # conv1 + maxpool stem, widths in multiples of 64


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def timm_name(arch: str) -> str:
    """``timm/<name>`` → ``<name>``."""
    return arch[len(TIMM_PREFIX):]


def import_timm(arch: str):
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise ConfigError(f"config key 'model.arch' = {arch} needs timm: pip install 'picstream[timm]'") from None


def torchvision_archs() -> list[str]:
    """The torchvision names ``model.arch`` accepts (classification models with an ``fc`` layer)."""
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                  if n.startswith(TORCHVISION_FAMILIES))


def norm_layer(norm: str):
    """``nn.BatchNorm2d`` or a GroupNorm(32 groups) of the same signature."""
    return nn.BatchNorm2d if norm == "batch" else (lambda channels: nn.GroupNorm(32, channels))


def torchvision_backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    """A torchvision ResNet/RegNet with `fc` replaced by identity; `cifar_stem` swaps a ResNet's 7×7/2
    conv + max-pool for a 3×3/1 conv without pooling (for 32 px inputs)."""
    backbone = getattr(torchvision.models, config.arch)(weights=None, norm_layer=norm_layer(config.norm),
                                                        **config.arch_kwargs)
    if config.cifar_stem:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return backbone, width


def timm_backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    """``timm.create_model(name, num_classes=0, **arch_kwargs)`` (no weights) and its pooled width."""
    timm = import_timm(config.arch)
    backbone = timm.create_model(timm_name(config.arch), pretrained=False, num_classes=0, **config.arch_kwargs)
    return backbone, feature_width(backbone)


def feature_width(model: nn.Module) -> int:
    """The width of a timm model's pooled (pre-logits) features."""
    return getattr(model, "head_hidden_size", None) or model.num_features


def check_backbone(config: ModelConfig, input_sizes: list[int]) -> None:
    """One-line `ConfigError` unless ``config.arch`` names a model that builds with its ``arch_kwargs``,
    takes square inputs of every size in ``input_sizes`` (the main crop, then the multi-crop views)
    and returns pooled features of the width it declares. The model is built on the meta device
    (no memory, no random numbers drawn), falling back to the CPU for constructors that need data."""
    arch = config.arch
    if is_timm(arch):
        timm = import_timm(arch)
        if not timm.is_model(timm_name(arch)):
            near = timm.list_models(f"*{timm_name(arch)[:8]}*")[:5]
            raise ConfigError(f"config key 'model.arch': timm has no model {timm_name(arch)!r}"
                              + (f" (similar: {', '.join(near)})" if near else ""))
        if config.cifar_stem:
            raise ConfigError("config key 'model.cifar_stem' applies to torchvision ResNets; a timm model "
                              "takes its stem from model.arch_kwargs")
    else:
        if arch in narrow_resnet.ARCHS:
            pass  # picstream's own (its refusals: config.validate)
        elif arch not in torchvision_archs():
            raise ConfigError(f"config key 'model.arch': {arch!r} is not a torchvision ResNet, ResNeXt, "
                              "Wide ResNet or RegNet; use timm/<name> for any timm model (ViTs, ConvNeXts, ...)")
        if not arch.startswith(RESNET_FAMILIES) and (config.cifar_stem or config.norm == "group"):
            raise ConfigError(f"config keys 'model.cifar_stem' and 'model.norm = group' apply to ResNets, "
                              f"not to {arch}")
    problem = _probe(arch, json.dumps(config.arch_kwargs, sort_keys=True), config.cifar_stem, config.norm,
                     tuple(dict.fromkeys(input_sizes)))
    if problem:
        raise ConfigError(problem)


@functools.lru_cache(maxsize=32)
def _probe(arch: str, arch_kwargs: str, cifar_stem: bool, norm: str, sizes: tuple[int, ...]) -> Optional[str]:
    """What is wrong with building ``arch`` and running it on each of ``sizes`` (None: nothing)."""
    config = ModelConfig(arch=arch, arch_kwargs=json.loads(arch_kwargs), cifar_stem=cifar_stem, norm=norm)
    try:
        backbone, width = build_off_device(config)
    except Exception as err:  # noqa: BLE001 - any constructor error is the user's arch_kwargs
        return f"config key 'model.arch_kwargs': {arch} does not build with {arch_kwargs}: {_first_line(err)}"
    device = next(backbone.parameters()).device
    backbone.eval()
    for i, size in enumerate(sizes):
        try:
            with torch.no_grad():
                out = backbone(torch.zeros(1, 3, size, size, device=device))
        except Exception as err:  # noqa: BLE001 - the model's own shape check
            what = "data.image_size" if i == 0 else "data.multi_crop"
            return (f"model.arch {arch} does not take {size} px inputs ({what}): {_first_line(err)}; a timm "
                    "ViT takes several sizes with model.arch_kwargs.dynamic_img_size=true, one with "
                    "model.arch_kwargs.img_size")
        if tuple(out.shape) != (1, width):
            return (f"model.arch {arch} with model.arch_kwargs {arch_kwargs} returns features of shape "
                    f"{tuple(out.shape)}, not pooled ones of width {width}")
    return None


def build_off_device(config: ModelConfig) -> tuple[nn.Module, int]:
    """The backbone on the meta device; a constructor that reads tensor values (meta tensors have
    none) builds on the CPU instead, without touching the random number generator."""
    from .model import build_backbone

    try:
        with torch.device("meta"):
            return build_backbone(config)
    except (TypeError, ValueError):  # wrong arguments: the same on any device
        raise
    except Exception:  # noqa: BLE001 - e.g. `.item()` of a meta tensor
        with torch.random.fork_rng(devices=[]):
            return build_backbone(config)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200].rstrip(".")
