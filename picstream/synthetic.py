"""A procedurally generated labeled image corpus (shapes on clutter) for the demo and tests.

The class is the shape; brightness, colour cast, position, size, rotation and background clutter
are random and carry no class information. A bright shape on a dark background: to tell instances
apart under crops and colour jitter a network has to see the shape, which is what k-NN then uses.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bars", "diamond", "arc")


def _polygon(center: tuple[float, float], radius: float, sides: int, angle: float) -> list[tuple]:
    cx, cy = center
    return [(cx + radius * math.cos(angle + 2 * math.pi * i / sides),
             cy + radius * math.sin(angle + 2 * math.pi * i / sides)) for i in range(sides)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, center, radius: float, angle: float,
                color: tuple, width: int) -> None:
    cx, cy = center
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.polygon(_polygon(center, radius * 1.2, 4, angle), fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(center, radius * 1.2, 3, angle), fill=color)
    elif shape == "diamond":
        pts = _polygon(center, radius * 1.2, 4, angle)
        squash = [(cx + (x - cx) * (0.5 if i % 2 else 1.0), cy + (y - cy) * (0.5 if i % 2 else 1.0))
                  for i, (x, y) in enumerate(pts)]
        draw.polygon(squash, fill=color)
    elif shape == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(a), radius * math.sin(a)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=color, width=width)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=width)
    elif shape == "bars":
        for offset in (-0.6, 0.0, 0.6):
            nx, ny = -math.sin(angle) * radius * offset, math.cos(angle) * radius * offset
            dx, dy = radius * math.cos(angle), radius * math.sin(angle)
            draw.line((cx + nx - dx, cy + ny - dy, cx + nx + dx, cy + ny + dy), fill=color,
                      width=max(1, width // 2))
    elif shape == "arc":
        start = math.degrees(angle)
        draw.arc(box, start, start + 180, fill=color, width=width)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One image of class `label` (an index into SHAPES)."""
    scale = 4  # draw large, then downsample: anti-aliased edges like a photo
    canvas = size * scale
    tint = rng.uniform(0.6, 1.0, 3)  # a faint colour cast shared by the whole image
    background = tuple(int(v) for v in rng.uniform(0, 90) * tint)
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):  # clutter: small blobs
        x, y = rng.uniform(0, canvas, 2)
        r = rng.uniform(canvas * 0.03, canvas * 0.08)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.uniform(60, 200) * tint))
    radius = rng.uniform(canvas * 0.25, canvas * 0.38)
    center = tuple(rng.uniform(radius, canvas - radius, 2))
    color = tuple(int(v) for v in rng.uniform(170, 255) * tint)
    _draw_shape(draw, SHAPES[label], center, radius, rng.uniform(0, 2 * math.pi), color,
                width=max(2, int(radius * 0.3)))
    image = image.resize((size, size), Image.Resampling.BOX)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))


def write_corpus(root: Path, per_class: int, *, size: int = 32, seed: int = 0,
                 num_classes: int = len(SHAPES)) -> Path:
    """Write `root/<shape>/<n>.jpg` for `per_class` images of each of the first `num_classes` shapes."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in range(num_classes):
        folder = root / SHAPES[label]
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            render(label, rng, size).save(folder / f"{n:05d}.jpg", quality=92)
    return root
