"""Shard format, writing (`make_shards`) and reading (`ShardSet`); see shards/README.md for the format."""
from .build import ShardSummary, make_shards, plan_shards
from .finalize import finalize
from .format import ShardsError
from .pack import pack
from .reader import ShardSet

__all__ = ["ShardSet", "ShardSummary", "ShardsError", "finalize", "make_shards", "pack", "plan_shards"]
