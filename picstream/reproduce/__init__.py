"""Reproduce the paper's ablations (Tables 1, 2, 4 and multi-crop) at CIFAR scale: `tools/reproduce.py`."""
from .grids import GRID_NAMES, SCALES, build_grids

__all__ = ["GRID_NAMES", "SCALES", "build_grids"]
