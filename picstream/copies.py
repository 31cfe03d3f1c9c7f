"""Known copies of images, to measure duplicate detection: each transformation makes one copy of an
image's bytes (tests/test_dedup*.py and benchmarks/dedup.py)."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps


def _decoded(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def _save(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _scaled(img: Image.Image, f: float) -> Image.Image:
    return img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.Resampling.LANCZOS)


def _cropped(img: Image.Image, f: float) -> Image.Image:
    dx, dy = round(img.width * f), round(img.height * f)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def _shifted(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(ImageEnhance.Color(img).enhance(1.15)).enhance(1.06)


# name -> (what it does, function of the original bytes)
TRANSFORMS = {
    "bytes": ("exact byte copy", lambda d: d),
    "png": ("decoded and saved as PNG (same pixels)", lambda d: _save(_decoded(d), "PNG")),
    "jpeg-q50": ("re-encoded as JPEG quality 50", lambda d: _save(_decoded(d), quality=50)),
    "jpeg-q95": ("re-encoded as JPEG quality 95", lambda d: _save(_decoded(d), quality=95)),
    "half": ("resized to 0.5x, JPEG q90", lambda d: _save(_scaled(_decoded(d), 0.5), quality=90)),
    "up": ("resized to 1.5x, JPEG q90", lambda d: _save(_scaled(_decoded(d), 1.5), quality=90)),
    "crop": ("3% cropped off each border", lambda d: _save(_cropped(_decoded(d), 0.03), quality=90)),
    "colour": ("saturation +15%, brightness +6%", lambda d: _save(_shifted(_decoded(d)), quality=90)),
    "flip": ("mirrored left-right", lambda d: _save(ImageOps.mirror(_decoded(d)), quality=90)),
}


def write_copies(originals: list[Path], distinct: list[Path], folder: Path,
                 transforms: dict = TRANSFORMS) -> dict[str, tuple[int, str]]:
    """Write each original, one copy of it per transformation and each distinct image into `folder`;
    returns {file name: (group, transformation)} (group -1: a distinct image, "original": the original)."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for g, path in enumerate(originals):
        data = path.read_bytes()
        for t, (_, fn) in {"original": (None, lambda d: d), **transforms}.items():
            name = f"g{g:05d}-{t}.{'png' if t == 'png' else 'jpg'}"
            (folder / name).write_bytes(fn(data))
            truth[name] = (g, t)
    for k, path in enumerate(distinct):
        name = f"d{k:05d}{path.suffix.lower()}"
        (folder / name).write_bytes(path.read_bytes())
        truth[name] = (-1, "distinct")
    return truth


def score(skipped: list[dict], truth: dict[str, tuple[int, str]]) -> dict[str, dict]:
    """Per transformation: copies, recall (original and copy end in the same kept input, following the
    removals' matches) and precision (removals whose match is of the same group); and the distinct
    images removed. `skipped`: the manifest's skip records."""
    match = {s["input"]: s.get("match") for s in skipped}

    def root(name):
        while match.get(name) is not None:
            name = match[name]
        return name

    table = {}
    originals = {g: n for n, (g, t) in truth.items() if t == "original"}
    for t in ["original", *TRANSFORMS, "distinct"]:
        names = [n for n, (_, tt) in truth.items() if tt == t]
        removed = [n for n in names if n in match]
        right = [n for n in removed if truth[n][0] >= 0 and truth.get(match[n], (-2,))[0] == truth[n][0]]
        found = [n for n in names if truth[n][0] >= 0 and root(n) == root(originals[truth[n][0]])]
        table[t] = dict(n=len(names), removed=len(removed),
                        recall=len(found) / len(names) if t not in ("original", "distinct") else None,
                        precision=len(right) / len(removed) if removed else None)
    return table
