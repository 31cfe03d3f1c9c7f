"""FFCV .beton files: read (`BetonSet`), written from shards in picstream's ID order (`write_beton`),
and trained on in place through FFCV's `Loader` with the sliding-window stream (`BetonLoader`).
Needs the `ffcv` extra (`make ffcv`)."""
from .dataset import BetonSet, import_ffcv, is_beton

__all__ = ["BetonSet", "import_ffcv", "is_beton"]
