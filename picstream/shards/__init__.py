"""Shard format, writing (`make_shards`) and reading (`ShardSet`); see shards/README.md for the format."""
from .build import ShardSummary, make_shards
from .format import ShardsError
from .reader import ShardSet

__all__ = ["ShardSet", "ShardSummary", "ShardsError", "make_shards"]
