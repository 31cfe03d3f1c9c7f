"""picstream: streaming Parametric Instance Classification pre-training on corpora of any size."""
from .scheduler import EpochScheduler, SlidingWindowScheduler
from .shards import ShardSet, make_shards

__version__ = "0.1.0"
__all__ = ["EpochScheduler", "ShardSet", "SlidingWindowScheduler", "make_shards"]
