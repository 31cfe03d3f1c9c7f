"""Classifier rows out of device memory: zarr row store, exact lazy correction, recent-K device table."""
from .init import init_rows
from .recent import RecentRows
from .store import RowStore
from .transitions import TransitionLog

__all__ = ["RecentRows", "RowStore", "TransitionLog", "init_rows"]
