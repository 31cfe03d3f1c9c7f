"""Streaming loader: window-driven shard reads, per-sample crops on CPU workers, batched colour
augmentation on the device, and the in-order evaluation loader."""
from .evaluation import EvalLoader
from .photometric import IMAGENET_MEAN, IMAGENET_STD, PhotometricAugment, normalize
from .stream import Batch, WindowLoader

__all__ = ["Batch", "EvalLoader", "IMAGENET_MEAN", "IMAGENET_STD", "PhotometricAugment",
           "WindowLoader", "normalize"]
