"""make_shards duplicate removal: hashing cost, memory vs N, and detection quality.

1. Hashing throughput per core: `hashing.hash_inputs` (full decode, pixel hash, perceptual hash) vs
   pack's per-input work (`workers._work`: read, validate, decide how to store) on the same ImageNet
   JPEGs in one process; and the one-command make_shards with --dedup none / exact / near.
2. Peak RSS of the removal decisions (`dedup.removals`, --dedup near) over N synthetic hashed inputs
   (uniform random hashes, 1 in 10 with an exact and 1 in 10 with a near copy), each N in its own
   process (VmHWM reset after imports): flat in N.
3. Precision / recall per transformation at the default threshold (picstream.copies) on ImageNet and
   CIFAR-10 originals among distinct images.
4. The near search at N = 1e9, analytically (uniform hashes): bucket size, pair checks, chance pairs
   within the threshold, what one bucket holds in memory; the former design (64-bit hash, 8 bands of
   8 bits, whole bucket held) beside the present one.
5. `--adversarial`: peak RSS when all N inputs fall into one band bucket, half of them with one hash.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from picstream.shards import dedup as D  # noqa: E402
from picstream.shards.dedup import DEFAULT_THRESHOLD, Item, rank_key, removals  # noqa: E402
from picstream.shards.hashing import PHASH_BITS  # noqa: E402

DATA = Path(os.environ.get("PICSTREAM_SHARED_DATA", REPO.parent / "shared" / "data"))


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def synthetic_items(n: int):
    """N hashed inputs: random pictures and uniform PHASH_BITS-bit hashes; input 10k + 1 repeats input
    10k's picture, input 10k + 2 is a near copy of it (3 bits apart)."""
    rng = np.random.default_rng(0)
    for g in range(n):
        base = g - g % 10 if g % 10 in (1, 2) else g
        if g % 10 == 0 or base == g:
            h = int.from_bytes(rng.bytes(PHASH_BITS // 8), "big")
            first = h
        h = first ^ 0b1011 if g % 10 == 2 else first
        pixels = (base if g % 10 != 2 else g).to_bytes(16, "big")
        yield Item(rank_key(False, 1000, True, 5000, f"{g:012d}.jpg", g), g, f"{g:012d}.jpg", None,
                   pixels[:8], pixels, h)


def adversarial_items(n: int):
    """N hashed inputs in one band bucket: half of them one perceptual hash (as blank images have),
    half random hashes whose band 0 is that hash's; all pictures distinct."""
    rng = np.random.default_rng(0)
    for g in range(n):
        h = 0 if g % 2 == 0 else int.from_bytes(rng.bytes(PHASH_BITS // 8), "big") >> D.BAND_BITS << D.BAND_BITS
        yield Item(rank_key(False, 1000, True, 5000, f"{g:012d}.jpg", g), g, f"{g:012d}.jpg", None,
                   g.to_bytes(8, "big"), g.to_bytes(16, "big"), h)


def child_memory(n: int, tmp: str, items=synthetic_items) -> dict:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status("VmRSS")
    t0 = time.perf_counter()
    reasons: dict = {}
    for r in removals(items(n), "near", DEFAULT_THRESHOLD, False, os.path.join(tmp, f"d{n}")):
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    return dict(n=n, seconds=time.perf_counter() - t0, peak_mb=_status("VmHWM"), start_mb=start, reasons=reasons)


def memory_rows(sizes: list[int], tmp: str, kind: str = "uniform") -> list[dict]:
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), tmp, kind], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.splitlines()[-1]))
        r = rows[-1]
        print(f"| {n:.0e} | {r['seconds']:.1f} | {1e6 * r['seconds'] / n:.1f} | {r['peak_mb']:.0f} | "
              f"{r['reasons']} |", flush=True)
    return rows


def analytic(n: float = 1e9) -> list[dict]:
    """The near search over n survivors with uniform hashes: former and present design."""
    designs = [("former: 64-bit hash, 8 bands x 8 bits, whole bucket of Items held", 64, 8, 8, 8, None),
               (f"present: {PHASH_BITS}-bit hash, {D.BANDS} bands x {D.BAND_BITS} bits, streamed blocks",
                PHASH_BITS, D.BANDS, D.BAND_BITS, DEFAULT_THRESHOLD, D.MEM_BLOCKS * D.BLOCK)]
    print(f"\n| near search at N = {n:.0e} | threshold | bucket | pair checks | chance pairs | bucket memory |\n"
          "|---|---:|---:|---:|---:|---|")
    rows = []
    for what, bits, bands, width, t, held in designs:
        bucket = n / 2 ** width
        checks = bands * 2 ** width * bucket * (bucket - 1) / 2
        chance = n * (n - 1) / 2 * sum(math.comb(bits, k) for k in range(t + 1)) / 2 ** bits
        memory = (f"~{bucket * ITEM_BYTES / 1e9:.1f} GB, grows with N" if held is None else
                  f"{held} rows + {D.BLOCK}x{D.BLOCK} tile: ~{(held * ENTRY_BYTES + D.BLOCK ** 2 * 9) / 1e6:.0f} MB")
        print(f"| {what} | {t} | {bucket:.3g} | {checks:.2g} | {chance:.2g} | {memory} |")
        rows.append(dict(design=what, bucket=bucket, checks=checks, chance=chance))
    return rows


ITEM_BYTES = 460  # a former bucket's Item (ImageNet-like name) and its list slot, by sys.getsizeof
ENTRY_BYTES = 380  # an Entry, its hash words and bucket position, by sys.getsizeof


def throughput(images: list[Path], tmp: Path) -> dict:
    from picstream.shards import make_shards
    from picstream.shards import workers as W
    from picstream.shards.hashing import hash_inputs
    from picstream.shards.hygiene import Hygiene
    from picstream.shards.sources import Input
    inputs = [Input(p.name, str(p), None) for p in images]
    for p in images:  # warm the page cache
        p.read_bytes()
    W._init(dict(max_side=None, resize_short=None, quality=90), {})
    t0 = time.perf_counter()
    W._work([i.locator for i in inputs])
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hashes = hash_inputs(inputs)
    hash_s = time.perf_counter() - t0
    assert all(h is not None for h in hashes)
    src = tmp / "src"
    src.mkdir(parents=True)
    for p in images:
        (src / p.name).symlink_to(p)
    build = {}
    for mode in ("none", "exact", "near"):
        t0 = time.perf_counter()
        make_shards(src, tmp / f"out-{mode}", shard_size=256, progress=False, hygiene=Hygiene(mode))
        build[mode] = time.perf_counter() - t0
    n = len(images)
    print(f"| pack's per-input work (read, validate) | {n / pack_s:.0f} |\n"
          f"| hash pass (read, full decode, hashes) | {n / hash_s:.0f} |")
    for mode, s in build.items():
        print(f"| one-command make_shards --dedup {mode} | {n / s:.0f} |")
    return dict(pack=n / pack_s, hash=n / hash_s, **{f"build_{m}": n / s for m, s in build.items()})


def quality(tmp: Path, n_orig: int, n_distinct: int) -> dict:
    from picstream.copies import TRANSFORMS, score, write_copies
    from picstream.shards import make_shards
    from picstream.shards.hygiene import Hygiene
    step = max(1, 50_000 // (n_orig + n_distinct))
    for archive in ("imagenet-sample-1000.tar", "cifar10-jpeg.tar.gz"):
        with tarfile.open(DATA / archive) as tar:  # CIFAR-10: every step-th training image only
            members = [m for m in tar.getmembers() if "/test/" not in m.name and "cifar10/train/" not in m.name
                       or m.name.startswith("cifar10/train/") and zlib.crc32(m.name.encode()) % step == 0]
            tar.extractall(tmp / "data", members=members, filter="data")
    inet = sorted((tmp / "data" / "imagenet-sample-1000").iterdir())
    cifar = sorted((tmp / "data" / "cifar10" / "train").rglob("*.jpg"))
    h, d = n_orig // 2, n_distinct // 2
    truth = write_copies(inet[:h] + cifar[:h], inet[h:h + d] + cifar[h:h + d], tmp / "copies")
    make_shards(tmp / "copies", tmp / "copies-out", shard_size=256, progress=False, hygiene=Hygiene("near"))
    skipped = json.loads((tmp / "copies-out" / "manifest.json").read_text())["skipped"]
    table = score(skipped, truth)
    print(f"\n{len(truth)} inputs: {2 * h} originals with one copy per transformation, {2 * d} distinct\n")
    print("| copy | what | n | removed | recall | precision |\n|---|---|---:|---:|---:|---:|")
    what = {"original": "the original", "distinct": "distinct images", **{k: v[0] for k, v in TRANSFORMS.items()}}
    for t, row in table.items():
        fmt = (lambda x: "-" if x is None else f"{x:.3f}")
        print(f"| {t} | {what[t]} | {row['n']} | {row['removed']} | {fmt(row['recall'])} | "
              f"{fmt(row['precision'])} |")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size: N = 1e4, 1e5; 200 images")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                    help="N of the memory rows (default 1e5 1e6; --quick: 1e4 1e5)")
    ap.add_argument("--adversarial", type=int, nargs="*", metavar="N",
                    help="only the memory rows of one adversarial bucket of N inputs (default 2e4 1e5)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        items = adversarial_items if args.child[2] == "adversarial" else synthetic_items
        print(json.dumps(child_memory(int(args.child[0]), args.child[1], items)))
        return
    if args.adversarial is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print("| N in one bucket (half one hash) | s | µs/input | peak RSS MB | removed |\n|---:|---:|---:|---:|---|")
            memory_rows(args.adversarial or [20_000, 100_000], tmp, "adversarial")
        return
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [100_000, 1_000_000])
    analytic()
    n_images = 200 if args.quick else 1000
    with tempfile.TemporaryDirectory() as tmp:
        print("| N (synthetic hashes, --dedup near) | s | µs/input | peak RSS MB | removed |\n"
              "|---:|---:|---:|---:|---|")
        rows = memory_rows(sizes, tmp)
        tmp = Path(tmp)
        table = quality(tmp, 20 if args.quick else 120, 200 if args.quick else 1200)
        images = sorted((tmp / "data" / "imagenet-sample-1000").iterdir())[:n_images]
        print("\n| one core, ImageNet sample JPEGs | img/s |\n|---|---:|")
        rates = throughput(images, tmp / "tp")
    growth = rows[-1]["peak_mb"] / rows[0]["peak_mb"]
    worst = min(table[t]["recall"] for t in ("jpeg-q50", "jpeg-q95", "half", "up"))
    print(f"RESULT: hashing {rates['hash']:.0f} img/s/core = {rates['hash'] / rates['pack']:.2f}x pack's "
          f"per-input work; make_shards exact {rates['build_exact'] / rates['build_none']:.2f}x, near "
          f"{rates['build_near'] / rates['build_none']:.2f}x of --dedup none; removal peak RSS "
          f"{rows[0]['peak_mb']:.0f} -> {rows[-1]['peak_mb']:.0f} MB ({growth:.2f}x) from N = {sizes[0]:.0e} to "
          f"{sizes[-1]:.0e}; re-encode/resize recall >= {worst:.3f}")


if __name__ == "__main__":
    main()
