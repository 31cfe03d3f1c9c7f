"""Cost of the per-sample checksum (shard format v2) on the loader's read path.

Real ImageNet JPEGs (~110 KB) are packed into shards; the same random IDs are then read through
`ShardReader` (local shards in the page cache) three ways, one core: `read` (the bytes only, no
check: the baseline), `read_sample` (bytes + xxh3-64 check against the index), and `read_sample` +
decode + RandomResizedCrop (what a loader worker does per sample). Also: sha256 of a whole shard
per sample, the alternative the per-sample checksum avoids.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from picstream.loader.cache import ShardReader  # noqa: E402
from picstream.loader.decode import DEFAULT_FULL, decode_crops  # noqa: E402
from picstream.loader.geometry import DRAWS_PER_CROP, CropSpec, sample_uniforms  # noqa: E402
from picstream.shards import ShardSet, make_shards  # noqa: E402


def interleaved_best(repeat: int, fns: dict) -> dict[str, float]:
    """The best time of each function over `repeat` rounds, the functions alternating in each round
    (after one warm-up round), so load changes on a shared machine hit them alike."""
    best = {name: float("inf") for name in fns}
    for round_ in range(repeat + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if round_:
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="200 images, 3 repeats")
    args = p.parse_args()
    if args.quick:
        args.images, args.repeat = 200, 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with tarfile.open(args.data / "imagenet-sample-1000.tar") as tar:
            tar.extractall(tmp / "orig", filter="data")
        src = tmp / "src"
        src.mkdir()
        for f in sorted((tmp / "orig" / "imagenet-sample-1000").iterdir())[:args.images]:
            (src / f.name).symlink_to(f)
        make_shards(src, tmp / "shards", shard_size=256, labels=False, progress=False)
        ss = ShardSet.open(tmp / "shards")
        reader = ShardReader(ss)
        ids = np.random.default_rng(0).permutation(len(ss)).tolist()
        rows = [(i // ss.shard_size, *(int(v) for v in ss.index(i // ss.shard_size)[i % ss.shard_size][:2]))
                for i in ids]
        mb = sum(r[2] for r in rows) / 2**20
        spec = CropSpec(224)
        u = sample_uniforms(0, np.arange(len(ids)), DRAWS_PER_CROP).reshape(len(ids), 1, DRAWS_PER_CROP)
        out = np.empty((224, 224, 3), dtype=np.uint8)

        import torch
        torch.set_num_threads(1)
        view = torch.from_numpy(out)
        shard_bytes = (tmp / "shards" / ss.shard_record(0)["name"]).read_bytes()
        timings = interleaved_best(args.repeat, {
            "read (no check)": lambda: [reader.read(*r) for r in rows],
            "read_sample (xxh3 check)": lambda: [reader.read_sample(i) for i in ids],
        })
        timings.update(interleaved_best(1, {
            "read_sample + decode + crop 224": lambda: [
                decode_crops(reader.read_sample(i)[0], u[n], [spec], [view], DEFAULT_FULL)
                for n, i in enumerate(ids)],
        }))
        per_shard = interleaved_best(args.repeat, {"sha": lambda: hashlib.sha256(shard_bytes).digest()})
        timings["sha256 of its whole shard, per sample"] = per_shard["sha"] * len(ids)
        reader.close()
    n = len(ids)
    print(f"{n} samples, {mb / n * 1024:.0f} KB each on average, shards of {ss.shard_size}, 1 core")
    print(f"{'path':<34} {'µs/sample':>10} {'MB/s':>8}")
    for name, t in timings.items():
        print(f"{name:<34} {t / n * 1e6:10.1f} {mb / t:8.0f}")
    check = timings["read_sample (xxh3 check)"] - timings["read (no check)"]
    share = check / timings["read_sample + decode + crop 224"]
    print(f"RESULT: the per-sample check adds {check / n * 1e6:.1f} µs per sample = {share:.1%} of "
          f"read + decode + crop ({timings['read_sample (xxh3 check)'] / timings['read (no check)']:.2f}x "
          "the bare read)")


if __name__ == "__main__":
    main()
