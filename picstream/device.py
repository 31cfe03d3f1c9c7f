"""Device selection with a clean CPU fallback."""
from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but no CUDA device is available")
    return torch.device(name)
