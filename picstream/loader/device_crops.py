"""Crops of already decoded pixels, on whatever device holds them (the GPU decode path's last step).

:func:`cut_views` takes per-sample uint8 ``(h, w, 3)`` images that cover each sample's crop boxes
(the union of the boxes, or the whole image, with its top-left corner given) and yields one
channels-last uint8 ``(b, 3, s, s)`` tensor per view, as :func:`decode.decode_crops` fills them: the
same box, the same resize (:func:`decode._resize`; off the CPU its float32 form, within 1 level), the
same flip.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .decode import cut_crops

__all__ = ["cut_views"]


def cut_views(images: Sequence[torch.Tensor], origins: np.ndarray, boxes: np.ndarray,
              sizes: Sequence[int]) -> list[torch.Tensor]:
    """``images[i]``: sample ``i``'s pixels from ``origins[i]`` = ``(top, left)`` on; ``boxes[i, v]`` =
    ``(top, left, h, w, flip)`` of view ``v`` in image coordinates; ``sizes[v]``: its output side."""
    device = images[0].device
    views = [torch.empty((len(images), s, s, 3), dtype=torch.uint8, device=device) for s in sizes]
    for i, img in enumerate(images):
        cut_crops(img, int(origins[i][0]), int(origins[i][1]), boxes[i].tolist(), sizes, [v[i] for v in views])
    return [v.permute(0, 3, 1, 2) for v in views]
