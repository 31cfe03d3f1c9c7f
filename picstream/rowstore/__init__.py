"""Classifier rows out of device memory: zarr row store, exact lazy correction, recent-K device table."""
from .init import init_rows
from .recent import RecentRows
from .store import RowStore, StoreError, StoreNotFound, store_url_of_rank
from .transitions import TransitionLog

__all__ = ["RecentRows", "RowStore", "StoreError", "StoreNotFound", "TransitionLog", "init_rows",
           "store_url_of_rank"]
