"""Bad and unusual inputs: the exact manifest outcome, and the decoded content of converted images."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from picstream.shards import ShardSet, make_shards

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(a, b, size=(48, 24)) -> Image.Image:
    """Left half colour a, right half colour b."""
    img = Image.new("RGB", size, a)
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), b), (size[0] // 2, 0))
    return img


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def make_corpus(root):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ok = encode(noise, "JPEG", quality=90)
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (16, 32), (*BLUE, 255)), (0, 0))
    gray16 = np.zeros((16, 48), dtype=np.uint16)
    gray16[:, 16:32], gray16[:, 32:] = 32896, 65535
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored image rotated 90 degrees clockwise
    exif0 = Image.Exif()
    exif0[0x0112] = 0  # invalid orientation (seen in real photos): ignored
    files = {
        "ok.jpg": ok,
        "gray.jpg": encode(Image.new("L", (20, 20), 90), "JPEG"),
        "zero.jpg": b"",
        "truncated.jpg": ok[: len(ok) // 2],
        "text.jpg": b"this is not an image\n",
        "alpha.png": encode(rgba, "PNG"),
        "palette.gif": encode(halves(RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4),
                              "GIF"),
        "gray16.png": encode(Image.fromarray(gray16), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", quality=95),
        "rotated.jpg": encode(halves(RED, BLUE), "JPEG", quality=95, exif=exif.tobytes()),
        "exif0.jpg": encode(halves(RED, BLUE), "JPEG", exif=exif0.tobytes()),
        "photo.webp": encode(halves(RED, GREEN), "WEBP", quality=95),
        "scan.tiff": encode(halves(GREEN, BLUE), "TIFF"),
        "old.bmp": encode(halves(BLUE, RED), "BMP"),
        "icon.ico": encode(halves(RED, RED, (32, 32)), "ICO"),
        "bomb.png": png_claiming(100_000, 100_000),  # beyond 2x MAX_IMAGE_PIXELS: Pillow refuses to open
        "bomb-warn.png": png_claiming(10_000, 10_000),  # between 1x and 2x MAX_IMAGE_PIXELS
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


EXPECTED_SKIPS = {
    "zero.jpg": "empty", "truncated.jpg": "truncated", "text.jpg": "not_image", "icon.ico": "unsupported",
    "bomb.png": "bomb", "bomb-warn.png": "bomb",
}
EXPECTED_PACKED = {
    "ok.jpg": None, "gray.jpg": None, "exif0.jpg": None,
    "alpha.png": "format PNG", "palette.gif": "format GIF",
    "gray16.png": "format PNG", "cmyk.jpg": "mode CMYK", "rotated.jpg": "exif orientation 6",
    "photo.webp": "format WEBP", "scan.tiff": "format TIFF", "old.bmp": "format BMP",
}


def decoded(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.mode == "RGB"
    return np.asarray(img).astype(int)


def close(pixel, colour, tol=40) -> bool:
    return bool(np.abs(np.asarray(pixel) - colour).max() <= tol)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("bad"), tmp_path_factory.mktemp("out")
    files = make_corpus(src)
    summary = make_shards(src, out, shard_size=4, workers=2, progress=False)
    return files, out, summary


def test_manifest_outcome(packed):
    files, out, summary = packed
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["input"]: s["reason"] for s in manifest["skipped"]} == EXPECTED_SKIPS
    assert summary.packed + summary.skipped == summary.inputs == len(files)
    assert summary.converted == manifest["converted"] == sum(v is not None for v in EXPECTED_PACKED.values())
    metas = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    metas[meta["src"]] = (int(m.name.split(".")[0]), meta)
    assert {k: v[1]["converted"] for k, v in metas.items()} == EXPECTED_PACKED
    ss = ShardSet.open(out)
    assert sorted(v[0] for v in metas.values()) == list(range(len(ss)))
    assert ss.label_names is None and set(ss.labels(range(len(ss)))) == {-1}
    got = {name: ss.read(sid) for name, (sid, _) in metas.items()}
    for name in ("ok.jpg", "gray.jpg", "exif0.jpg"):
        assert got[name] == files[name]
    assert metas["rotated.jpg"][1]["width"] == 24 and metas["rotated.jpg"][1]["height"] == 48


def test_converted_content(packed):
    files, out, _ = packed
    ss = ShardSet.open(out)
    got = {}
    for sid in range(len(ss)):
        with tarfile.open(out / f"shard-{sid // 4:06d}.tar") as tar:
            meta = json.loads(tar.extractfile(f"{sid:012d}.json").read())
        if meta["converted"]:
            got[meta["src"]] = decoded(ss.read(sid))
    a = got["alpha.png"]  # left half opaque blue, right half transparent -> white
    assert close(a[16, 4], BLUE) and close(a[16, 28], (255, 255, 255))
    g = got["palette.gif"]
    assert close(g[12, 4], RED) and close(g[12, 44], BLUE)
    g16 = got["gray16.png"]  # 0, 32896, 65535 -> 0, 128, 255
    assert close(g16[8, 4], (0, 0, 0), 3) and close(g16[8, 24], (128, 128, 128), 3)
    assert close(g16[8, 44], (255, 255, 255), 3)
    assert close(got["cmyk.jpg"][12, 12], RED)
    r = got["rotated.jpg"]  # 48x24 stored, rotated clockwise for display: 24 wide, 48 high, left half on top
    assert r.shape == (48, 24, 3) and close(r[10, 12], RED) and close(r[38, 12], BLUE)
    assert close(got["photo.webp"][12, 4], RED) and close(got["photo.webp"][12, 44], GREEN)
    assert close(got["scan.tiff"][12, 4], GREEN) and close(got["scan.tiff"][12, 44], BLUE)
    assert close(got["old.bmp"][12, 4], BLUE) and close(got["old.bmp"][12, 44], RED)


@pytest.mark.parametrize("kw, size", [(dict(max_side=16), (16, 8)), (dict(resize_short=12), (24, 12)),
                                      (dict(max_side=100), None)])
def test_resize_options(tmp_path, kw, size):
    src = tmp_path / "src"
    src.mkdir()
    original = encode(halves(RED, BLUE), "JPEG", quality=95)
    (src / "a.jpg").write_bytes(original)
    make_shards(src, tmp_path / "o", progress=False, quality=80, **kw)
    data = ShardSet.open(tmp_path / "o").read(0)
    if size is None:
        assert data == original
    else:
        img = Image.open(io.BytesIO(data))
        assert img.size == size and close(np.asarray(img)[size[1] // 2, 1], RED)
