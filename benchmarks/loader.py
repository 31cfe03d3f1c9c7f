"""Loader benchmark: picstream's streaming loader against the usual pipelines, side by side.

Rows (ImageNet sample photos repeated to >= 8k images, 1k with --quick, packed by make_shards):
  1. full SimCLR augmentation, images/s with the same CPU workers: WindowLoader + batched
     PhotometricAugment (in the CPU workers) vs torchvision ImageFolder + transforms; and the
     loader alone (decode + crop + flip: the CPU's share when the photometric part runs on a GPU);
  2. decode + RandomResizedCrop + flip vs decode only of the same bytes (one core); every JPEG
     decoder on the same bytes (one core: simplejpeg, TorchCodec, Pillow or pillow-simd, torchvision.io);
     the batched photometric part alone vs kornia's (one core);
  3. decode + RandomResizedCrop + flip with the same workers: FFCV's Loader on a .beton of the same
     bytes (BetonLoader) vs WindowLoader vs ImageFolder (skipped without the ffcv extra);
     remote shards (HTTP on 127.0.0.1) vs local shards, same pipeline;
  4. peak RSS with W = 131072 on a ~1M-ID manifest vs the real small manifest.

    python benchmarks/loader.py [--quick] [--data DIR] [--workers 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from picstream.loader import PhotometricAugment, WindowLoader  # noqa: E402
from picstream.loader.decode import (DECODERS, DEFAULT_FULL, crop_boxes, cut_windowed_crops, decode,  # noqa: E402
                                     decode_crops, jpeg_frame)
from picstream.loader.geometry import DRAWS_PER_CROP, CropSpec, sample_uniforms  # noqa: E402
from picstream.scheduler import SlidingWindowScheduler  # noqa: E402
from picstream.shards import ShardSet, make_shards  # noqa: E402
from picstream.shards.format import manifest_bytes  # noqa: E402
from picstream.shards.hygiene import Hygiene  # noqa: E402

BATCH = 64


def prepare(data: Path, work: Path, copies: int, shard_size: int, *, workers: int = 2,
            limit: int | None = None) -> tuple[Path, Path]:
    """Extract the sample photos, repeat (the first `limit` of) them `copies` times (symlinks) and
    shard them with `workers` processes, every copy kept (`--dedup none`: the repetition is the design)."""
    with tarfile.open(data / "imagenet-sample-1000.tar") as tar:
        tar.extractall(work, filter="data")
    photos = sorted((work / "imagenet-sample-1000").iterdir())[:limit]
    corpus = work / "corpus" / "all"          # one class folder, for torchvision's ImageFolder
    corpus.mkdir(parents=True)
    for c in range(copies):
        for f in photos:
            (corpus / f"{c}_{f.name}").symlink_to(f)
    shards = work / "shards"
    make_shards(corpus.parent, shards, shard_size=shard_size, seed=0, labels=False, progress=False,
                workers=workers, hygiene=Hygiene("none"))
    return corpus.parent, shards


def throughput(batches, count: int, warm_up: bool = True) -> float:
    """Images/s over `count` images, after one warm-up batch (worker start-up excluded) or, with
    `warm_up=False`, from the start (shard fetches and start-up included)."""
    t0 = time.perf_counter()
    it = iter(batches)
    if warm_up:
        next(it)
        t0 = time.perf_counter()
    done = 0
    for b in it:
        done += len(b[0]) if isinstance(b, (list, tuple)) else len(b)
        if done >= count:
            break
    return done / (time.perf_counter() - t0)


def window_loader(ss, steps: int, workers: int, **kw) -> WindowLoader:
    sched = SlidingWindowScheduler(len(ss), min(len(ss), 4096), 512, seed=0)
    return WindowLoader(ss, sched, BATCH, workers=workers, num_steps=steps, **kw)


def best_of(rounds: int, **pipelines) -> dict[str, float]:
    """Best images/s of each pipeline over interleaved rounds (the machine is shared)."""
    best = dict.fromkeys(pipelines, 0.0)
    for _ in range(rounds):
        for name, run in pipelines.items():
            best[name] = max(best[name], run())
    return best


def row_simclr(corpus: Path, ss, count: int, workers: int, rounds: int) -> tuple[float, ...]:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    tf = T.Compose([
        T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=0.5), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def baseline() -> float:
        return throughput(torch.utils.data.DataLoader(
            ImageFolder(str(corpus), tf), batch_size=BATCH, shuffle=True, num_workers=workers,
            multiprocessing_context="fork"), count)

    def ours() -> float:
        # no accelerator here: the workers run the batched photometric part too (`augment=`)
        with window_loader(ss, count // BATCH + 3, workers, augment=PhotometricAugment()) as loader:
            return throughput(loader, count)

    def cpu_part() -> float:   # what the CPU does when the photometric part runs on a GPU
        with window_loader(ss, count // BATCH + 3, workers) as loader:
            return throughput(loader, count)
    best = best_of(rounds, ours=ours, cpu_part=cpu_part, baseline=baseline)
    return best["ours"], best["cpu_part"], best["baseline"]


def decoder_candidates() -> dict:
    """Full JPEG decoders to compare on the same bytes: picstream's (simplejpeg, TorchCodec, Pillow or
    pillow-simd, whichever PIL is installed) and torchvision.io's deprecated one, called directly."""
    import PIL
    from torchvision.io import ImageReadMode, decode_jpeg

    def torchvision_io(d: bytes):
        with warnings.catch_warnings():   # deprecated on every call; measured here for comparison
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)
    pil = "pillow-simd" if "post" in PIL.__version__ else "Pillow"
    out = {name: (lambda d, n=name: decode(d, n)) for name in DECODERS if name not in ("auto", "pil", "roi")}
    return {**out, f"{pil} {PIL.__version__}": lambda d: decode(d, "pil"), "torchvision.io": torchvision_io}


def row_decode(ss, count: int, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per core (CPU time of this process): decode + RRC(224) + flip with the default decoder and, when
    nvImageCodec is installed, with the region-of-interest decoder ("roi") one image per call and as the
    loader's workers run it (one call per batch of 64); and each full decoder alone."""
    datas = [ss.read(i) for i in range(min(count, len(ss)))]
    u = sample_uniforms(0, np.arange(len(datas)), DRAWS_PER_CROP)
    spec, out = [CropSpec(224)], [torch.empty(224, 224, 3, dtype=torch.uint8)]
    batch = [[torch.empty(224, 224, 3, dtype=torch.uint8)] for _ in range(64)]

    def roi_batches() -> None:
        for s in range(0, len(datas), 64):
            chunk = datas[s:s + 64]
            boxes = [crop_boxes(d, [u[s + i]], spec, jpeg_frame(d)) for i, d in enumerate(chunk)]
            assert not any(cut_windowed_crops(chunk, boxes, [224], batch[:len(chunk)]))

    def per_image(fn):
        return lambda: [fn(d, i) for i, d in enumerate(datas)]
    roi = importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.nvimgcodec")
    croppers = ("auto", "roi") if roi else ("auto",)
    fns = {f"crop {c}": per_image(lambda d, i, c=c: decode_crops(d, [u[i]], spec, out, c)) for c in croppers}
    if roi:
        fns["crop roi, per batch"] = roi_batches
    fns.update({name: per_image(lambda d, i, f=f: f(d)) for name, f in decoder_candidates().items()})
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):   # interleaved, best of each: the machine is shared
        for name, fn in fns.items():
            t0 = time.process_time()   # all of this process's threads
            fn()
            best[name] = max(best[name], len(datas) / (time.process_time() - t0))
    crops = {c.removeprefix("crop "): best.pop(c) for c in list(best) if c.startswith("crop ")}
    return crops, best


def row_kornia(rounds: int, batch: int = 32) -> tuple[float, float] | None:
    """Batched photometric part on one core: PhotometricAugment vs kornia's equivalent."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    kornia = torch.nn.Sequential(
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((23, 23), (0.1, 2.0), p=0.5),
        K.Normalize(torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))))
    ours, gen = PhotometricAugment(), torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)

    def timed(fn):
        def run() -> float:
            t0 = time.perf_counter()
            fn()
            return batch / (time.perf_counter() - t0)
        return run
    best = best_of(rounds, ours=timed(lambda: ours(x, gen)),
                   kornia=timed(lambda: kornia(x.float() / 255)))
    return best["ours"], best["kornia"]


def ffcv_child(shards: str, steps: int, workers: int) -> None:
    """Print BetonLoader img/s on a .beton of the shards (written on first use). In its own process:
    FFCV's threads must not be running when the other pipelines fork their workers."""
    from picstream.beton import BetonSet
    from picstream.beton.loader import BetonLoader
    from picstream.beton.writer import write_beton

    path = Path(shards).parent / "corpus.beton"
    if not path.exists():
        write_beton(ShardSet.open(shards), str(path), workers=workers)
    beton = BetonSet(path)
    sched = SlidingWindowScheduler(len(beton), min(len(beton), 4096), 512, seed=0)
    loader = BetonLoader(beton, sched, BATCH, image_size=224, workers=workers, num_steps=steps)
    ours = throughput(loader, (steps - 3) * BATCH)
    # stock FFCV on the same file: its own RandomResizedCrop + flip (numba RNG), its random order
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor
    stock = Loader(str(path), BATCH, num_workers=workers, order=OrderOption.RANDOM, seed=0, pipelines={
        "image": [RandomResizedCropRGBImageDecoder((224, 224), scale=(0.2, 1.0)), RandomHorizontalFlip(),
                  ToTensor()], "id": None, "label": None})
    print(json.dumps({"img_s": ours, "stock_img_s": throughput(stock, min(len(stock) - 1, steps - 3) * BATCH)}))


def row_ffcv(corpus: Path, shards: Path, ss, count: int, workers: int, rounds: int) -> dict | None:
    """decode + RRC(224) + flip, uint8, same images and cores: FFCV's Loader on a .beton of the same JPEG
    bytes (BetonLoader, `workers` threads) vs WindowLoader vs ImageFolder + RandomResizedCrop + flip."""
    import torchvision.transforms.v2 as T
    if importlib.util.find_spec("ffcv") is None:
        return None
    from torchvision.datasets import ImageFolder

    steps = count // BATCH + 3
    tf = T.Compose([T.PILToTensor(), T.RandomResizedCrop(224, scale=(0.2, 1.0), antialias=True),
                    T.RandomHorizontalFlip()])

    stock = []

    def beton() -> float:
        res = subprocess.run([sys.executable, __file__, "--ffcv-child", str(shards), "--steps", str(steps),
                              "--workers", str(workers)], check=True, capture_output=True, text=True)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        stock.append(out["stock_img_s"])
        return out["img_s"]

    def ours() -> float:
        with window_loader(ss, steps, workers) as loader:
            return throughput(loader, count)

    def folder() -> float:
        return throughput(torch.utils.data.DataLoader(
            ImageFolder(str(corpus), tf), batch_size=BATCH, shuffle=True, num_workers=workers,
            multiprocessing_context="fork"), count)
    return {**best_of(rounds, ffcv=beton, ours=ours, folder=folder), "stock": max(stock)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row_remote(shards: Path, ss, count: int, workers: int, rounds: int) -> tuple[float, ...]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1", "--directory", str(shards)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        remote = ShardSet.open(f"http://127.0.0.1:{port}/manifest.json")
        steps = count // BATCH + 3

        def run(shardset, warm_up: bool) -> float:   # a cold cache each time
            with tempfile.TemporaryDirectory() as cache, \
                    window_loader(shardset, steps, workers, cache_dir=cache) as loader:
                return throughput(loader, count, warm_up=warm_up)
        best = best_of(rounds, far=lambda: run(remote, True), local=lambda: run(ss, True),
                       far_cold=lambda: run(remote, False), local_cold=lambda: run(ss, False))
    finally:
        server.kill()
        server.wait()
    return best["far"], best["local"], best["far_cold"], best["local_cold"]


def synthetic_manifest(shards: Path, out: Path, num_ids: int) -> Path:
    """A manifest of ~num_ids IDs whose shards all point at the real (full) shard files."""
    m = json.loads((shards / "manifest.json").read_text())
    full = [s for s in m["shards"] if s["count"] == m["shard_size"]]
    n_shards = num_ids // m["shard_size"]
    rel = os.path.relpath(shards, out)
    m["shards"] = [dict(full[k % len(full)], first_id=k * m["shard_size"],
                        name=f"{rel}/{full[k % len(full)]['name']}",
                        index=f"{rel}/{full[k % len(full)]['index']}") for k in range(n_shards)]
    m["num_shards"], m["num_samples"] = n_shards, n_shards * m["shard_size"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_bytes(manifest_bytes(m))
    return out


def memory_child(manifest: str, steps: int, workers: int) -> None:
    """Run the loader with W = 2^17 and print peak RSS (MB) of this process and of its workers."""
    ss = ShardSet.open(manifest)
    sched = SlidingWindowScheduler(len(ss), 2**17, 2**14, seed=0)
    loader = WindowLoader(ss, sched, 256, image_size=64, workers=workers, num_steps=steps)
    with loader:
        for _ in loader:
            pass
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"ids": len(ss), "main_mb": main, "worker_mb": child}))


def row_memory(shards: Path, work: Path, steps: int, workers: int) -> tuple[dict, dict]:
    big = synthetic_manifest(shards, work / "million", 1_000_000)
    out = []
    for manifest in (shards, big):
        res = subprocess.run([sys.executable, __file__, "--memory-child", str(manifest),
                              "--steps", str(steps), "--workers", str(workers)],
                             check=True, capture_output=True, text=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 1k images, fewer batches")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (best kept)")
    ap.add_argument("--decoders-only", action="store_true",
                    help="only the decode rows (e.g. to rerun with pillow-simd installed)")
    ap.add_argument("--memory-child")
    ap.add_argument("--ffcv-child")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        return memory_child(args.memory_child, args.steps, args.workers)
    if args.ffcv_child:
        return ffcv_child(args.ffcv_child, args.steps, args.workers)

    copies, shard_size, count = (1, 128, 256) if args.quick else (8, 1024, 1024)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, shards = prepare(args.data, work, copies, shard_size)
        ss = ShardSet.open(shards)
        print(f"{len(ss)} images in {ss.num_shards} shards, {args.workers} workers, "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs")

        if not args.decoders_only:
            ours, cpu_part, base = row_simclr(corpus, ss, count, args.workers, args.rounds)
            rows.append(("SimCLR aug img/s, all on CPU: WindowLoader(augment=) vs ImageFolder",
                         f"{ours:.1f}", f"{base:.1f}", ours / base))
            rows.append(("img/s CPU part when photometric runs on a GPU vs ImageFolder",
                         f"{cpu_part:.1f}", f"{base:.1f}", cpu_part / base))
        crops, decoders = row_decode(ss, count // 2, args.rounds + 1)
        full = decoders[DEFAULT_FULL]
        for name, crop in crops.items():
            rows.append((f"img/s decode+RRC+flip ({name}) vs decode only ({DEFAULT_FULL}; per core)",
                         f"{crop:.0f}", f"{full:.0f}", crop / full))
        for name, rate in decoders.items():
            rows.append((f"img/s decode only (per core): {name} vs torchvision.io", f"{rate:.0f}",
                         f"{decoders['torchvision.io']:.0f}", rate / decoders["torchvision.io"]))
        if args.decoders_only:
            return print_table(rows, f"RESULT: decode only, {DEFAULT_FULL} (the default) "
                                     f"{full / decoders['torchvision.io']:.2f}x torchvision.io, one core")
        photometric = row_kornia(args.rounds + 1)
        if photometric:
            rows.append(("img/s batched photometric (1 core): PhotometricAugment vs kornia",
                         f"{photometric[0]:.1f}", f"{photometric[1]:.1f}",
                         photometric[0] / photometric[1]))
        crop_rows = row_ffcv(corpus, shards, ss, count, args.workers, args.rounds)
        if crop_rows is None:
            print("(FFCV rows skipped: ffcv is not installed; `make ffcv`)")
        else:
            for other, label in (("ours", "WindowLoader"), ("folder", "ImageFolder+RRC+flip"),
                                 ("stock", "stock FFCV Loader (own RRC+flip)")):
                rows.append((f"img/s decode+RRC+flip uint8: FFCV BetonLoader vs {label}",
                             f"{crop_rows['ffcv']:.1f}", f"{crop_rows[other]:.1f}",
                             crop_rows["ffcv"] / crop_rows[other]))
        far, local, far_cold, local_cold = row_remote(shards, ss, count, args.workers, args.rounds)
        rows.append(("img/s remote (HTTP, loopback) vs local shards, decode+crop",
                     f"{far:.1f}", f"{local:.1f}", far / local))
        rows.append(("  same, from a cold start (first whole-shard fetches timed)",
                     f"{far_cold:.1f}", f"{local_cold:.1f}", far_cold / local_cold))
        small, big = row_memory(shards, work, 6 if args.quick else 20, args.workers)
        peak = lambda r: max(r["main_mb"], r["worker_mb"])  # noqa: E731
        rows.append((f"peak RSS MB, W=2^17: {big['ids']} IDs vs {small['ids']} IDs",
                     f"{peak(big):.0f}", f"{peak(small):.0f}", peak(big) / peak(small)))

    print_table(rows, f"RESULT: SimCLR augmentation all on CPU {rows[0][3]:.2f}x torchvision "
                      f"ImageFolder+transforms ({rows[1][3]:.2f}x with the photometric part on an "
                      f"accelerator), {args.workers} CPU workers")


def print_table(rows: list, result: str) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{'row':<{width}}  {'ours':>8}  {'baseline':>8}  {'ratio':>6}")
    for name, a, b, ratio in rows:
        print(f"{name:<{width}}  {a:>8}  {b:>8}  {ratio:>6.2f}")
    print(result)


if __name__ == "__main__":
    main()
