"""The training set and its loader, chosen by `data.train`: a shard set (`WindowLoader`) or an FFCV
.beton trained on in place (`BetonLoader`, FFCV's Loader under picstream's sliding-window order)."""
from __future__ import annotations

import torch

from .beton import BetonSet, is_beton
from .config import Config, ConfigError
from .distributed import World
from .loader import WindowLoader
from .loader.decode import check_decoder, nvimgcodec_installed
from .loader.nvimgcodec_regions import NvImageCodecRegions
from .multicrop import loader_crops
from .shards import ShardSet, ShardsError


def open_train_set(url: str, *, seed: int = 0):
    """`ShardSet` for a manifest (or its folder), `BetonSet` for a `.beton` (its ID order from `seed`);
    a .beton that cannot be opened is a `ShardsError` too (one line from the CLI)."""
    if not is_beton(url):
        return ShardSet.open(url)
    try:
        return BetonSet(url, seed=seed)
    except (OSError, ValueError, ImportError, AssertionError) as e:  # AssertionError: FFCV's version check
        raise ShardsError(f"cannot open {url}: {e}") from None


def train_loader(train_set, scheduler, batch_size: int, *, cache_dir=None, cache_bytes=None, augment=None,
                 on_missing: str = "fail", pin_memory: bool = False, **kw):
    """The loader for `train_set`. On a .beton, FFCV reads a local file (no shard cache, no shards to
    miss) and decodes in threads of this process, so the colour augmentation stays with the trainer.
    `on_missing` is `data.on_missing` (see `WindowLoader`); `pin_memory`: the WindowLoader's workers'
    batches are pinned (page-locked) in the trainer process, for copies to CUDA that do not block."""
    if isinstance(train_set, BetonSet):
        from .beton.loader import BetonLoader
        return BetonLoader(train_set, scheduler, batch_size, **kw)
    return WindowLoader(train_set, scheduler, batch_size, cache_dir=cache_dir, cache_bytes=cache_bytes,
                        augment=augment, on_missing=on_missing, pin_memory=pin_memory, **kw)


def check_decode(config: Config, device: torch.device) -> None:
    """Refuse, in one line, ``data.decode: gpu`` without a CUDA device or without nvImageCodec, and a
    ``data.decoder`` whose library is not installed."""
    try:
        check_decoder(config.data.decoder)
    except ValueError as err:
        raise ConfigError(f"config key 'data.decoder': {err}") from None
    if config.data.decode == "gpu" and (device.type != "cuda" or not nvimgcodec_installed()):
        raise ConfigError("config key 'data.decode': gpu needs a CUDA device and nvImageCodec (pip install -e "
                          f"'.[nvimgcodec]'); this run has {'no CUDA device' if device.type != 'cuda' else 'no nvImageCodec'}")


def train_loader_from_config(config: Config, train_set, scheduler, world: World, device: torch.device, *,
                             start_step: int, num_steps: int, augment=None, decode_regions=None):
    """``world``'s rank of the training stream from ``start_step`` for ``num_steps`` global batches
    of ``config.optim.batch_size``, as ``config.data`` says, for training on ``device`` (CUDA: the
    batches come pinned); ``augment``: colour augmentation in the loader's workers (None: the
    trainer does it). Under ``data.decode: gpu`` the batches are decoded in this process by
    ``decode_regions`` (default: nvImageCodec on ``device``, which must be a CUDA device)."""
    data = config.data
    if isinstance(train_set, BetonSet):   # FFCV decodes a .beton itself
        for key, value, default in (("decode", data.decode, "cpu"), ("decoder", data.decoder, "auto")):
            if value != default:
                raise ConfigError(f"config key 'data.{key}': {value} decodes shard sets; a .beton is decoded by "
                                  f"FFCV (data.{key}={default})")
        decoding = {}
    elif data.decode == "gpu":
        if decode_regions is None:
            check_decode(config, device)
            decode_regions = NvImageCodecRegions(device)
        decoding = dict(decode="gpu", decode_regions=decode_regions)
    else:
        decoding = dict(decoder=data.decoder)
    return train_loader(
        train_set, scheduler, config.optim.batch_size // world.size, rank=world.rank,
        world_size=world.size, image_size=data.image_size, crop_scale=tuple(data.crop_scale),
        multi_crop=loader_crops(data.multi_crop), workers=data.workers, start_step=start_step,
        num_steps=num_steps, seed=config.run.seed, cache_dir=data.cache_dir,
        cache_bytes=int(data.cache_gb * 2**30), augment=augment, on_missing=data.on_missing,
        pin_memory=device.type == "cuda", **decoding)
