"""Multi-crop PIC: several views of every image, one loss over the same rows, one backward.

The recipe of the authors' public code (PIC with multi-crop, ResNet-50, ImageNet: 68.6 top-1 at 200
epochs, 70.3 at 400) is one 160 px crop at scale (0.14, 1) and three 96 px crops at scale
(0.08, 0.14); each view goes through the same backbone and head (its own forward, so its own
BatchNorm statistics); the loss is the cross-entropy over all views' logits concatenated, i.e. the
mean of the per-view losses; the small crops' logits use a detached classifier, so only the large
crop trains the rows. In picstream that is ``data.image_size=160``, ``data.crop_scale=[0.14, 1]``,
``data.multi_crop=[[96, 3, 0.08, 0.14]]``, ``classifier.multi_crop_rows=main`` (the default).
``multi_crop_rows=all`` lets every view's gradient reach the rows (summed, then divided by the
number of views like the loss). The loss itself is the classifier's (``InstanceClassifier.loss``).
"""
from __future__ import annotations

__all__ = ["loader_crops"]


def loader_crops(multi_crop: list[list[float]]) -> list[tuple]:
    """``data.multi_crop`` items → the loader's ``(size, count[, (scale_low, scale_high)])``."""
    crops = []
    for item in multi_crop:
        size, count = int(item[0]), int(item[1])
        crops.append((size, count, (item[2], item[3])) if len(item) == 4 else (size, count))
    return crops
