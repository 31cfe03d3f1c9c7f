"""picstream's WindowLoader beside the streaming loaders people use, on the same bytes and the same cores.

The ImageNet sample photos repeated to 8,000 JPEGs (1,000 with --quick; every copy packed: repetition is
the design, so make_shards runs with `--dedup none`), each loader packing them with its own writer:

  picstream  make_shards → WindowLoader (sliding-window order); picstream-roi: the same with decoder="roi"
             (only each crop's window decoded, through nvImageCodec's CPU back end)
  litdata    `optimize` → StreamingDataset + StreamingDataLoader (JPEG serializer: the file's bytes)
  mosaic     MDSWriter ('jpeg' column: the file's bytes) → StreamingDataset + StreamingDataLoader
  webdataset ShardWriter → WebDataset pipeline (shard shuffle, sample shuffle buffer, batched in the
             workers) + WebLoader
  ffcv       DatasetWriter (RGBImageField, the JPEG bytes as they are) → Loader with its own
             RandomResizedCrop decoder (numba; its first batch includes the compile)
  dali       no writer: fn.readers.file on the JPEG files → fn.decoders.image_random_crop on the CPU
  picstream-http, webdataset-http: the same packed files served by a plain HTTP server on 127.0.0.1 (python's
             http.server, a thread of the parent process: its CPU is not counted, like a remote store's);
             picstream opens the shard set's URL (shards fetched whole into a local cache), webdataset
             reads http:// shard URLs (through `curl`, its default). LitData and Mosaic have no plain-HTTP
             back end (object stores, Hugging Face, SFTP, local only), so they have no HTTP row.
  <loader>-multicrop: the multi-crop recipe, 1×160 + 3×96 (each RandomResizedCrop(scale (0.2, 1)) + flip)
             from one read of each sample, for every peer: picstream's multi_crop spec (one decode);
             LitData, Mosaic, webdataset: a transform returning the 4 views (one decode); FFCV: 4
             pipelines on the image field (PipelineSpec; each one decodes); DALI: one decode, 4
             fn.random_resized_crop. img/s counts samples (4 crops each).

Same work for all: decode, RandomResizedCrop(224, scale (0.2, 1)), horizontal flip, uint8 batches of 64,
`--workers` worker processes (threads for FFCV and DALI). Each load runs in a fresh process; timed: the
images after the first batch. Reported: img/s; img/s per core (the CPU time of the process and all its
descendants over the timed part); peak memory (the largest sum of PSS over the process tree, sampled at
every batch: shared pages counted once); time to first batch (from building the loader, imports done);
picstream ÷ each peer; cores per GPU at 3,000 and 7,000 img/s. A peer that is not installed is skipped
with a reason; with `CI` set that is an error.

    python benchmarks/loaders.py [--quick] [--data DIR] [--workers 2] [--rounds 2] [--only a,b] [--json F]
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loader import BATCH, prepare, window_loader  # noqa: E402  (benchmarks/loader.py)

from picstream.shards import ShardSet  # noqa: E402

SIZE, SCALE = 224, (0.2, 1.0)
MULTI_CROP = (160, 96, 96, 96)   # the multi-crop recipe: 1×160 + 3×96, each RandomResizedCrop(scale SCALE) + flip
GPU_RATES = (3000, 7000)
# loader -> (module that must import, distribution whose version is reported)
LOADERS = {"picstream": ("picstream", "picstream"),
           "picstream-roi": ("nvidia.nvimgcodec", "nvidia-nvimgcodec-cu13"), "litdata": ("litdata", "litdata"),
           "mosaic": ("streaming", "mosaicml-streaming"), "webdataset": ("webdataset", "webdataset"),
           "ffcv": ("ffcv", "ffcv"), "dali": ("nvidia.dali", "nvidia-dali-cuda130")}
HTTP = ("picstream", "webdataset")                                         # the loaders with a -http row
MULTI = ("picstream", "litdata", "mosaic", "webdataset", "ffcv", "dali")   # ... with a -multicrop row
LOADERS |= {f"{n}-http": LOADERS[n] for n in HTTP} | {f"{n}-multicrop": LOADERS[n] for n in MULTI}


class PeerViews:
    """torchvision's RandomResizedCrop + flip at each of `sizes` (on a PIL image or a uint8 tensor) → a tuple
    of uint8 CHW tensors, one per view (the DataLoader's collate makes them a list of batches)."""

    def __init__(self, sizes: tuple[int, ...]):
        import torchvision.transforms.v2 as T
        self.to_image = T.ToImage()
        self.views = [T.Compose([T.RandomResizedCrop(s, scale=SCALE, antialias=True), T.RandomHorizontalFlip(),
                                 T.ToPureTensor()]) for s in sizes]

    def __call__(self, image) -> tuple:
        x = self.to_image(image)
        return tuple(view(x) for view in self.views)


def jpeg_files(work: Path) -> list[Path]:
    return sorted((work / "corpus" / "all").iterdir())


def open_jpeg(path):
    """A sample for LitData's `optimize` and Mosaic's 'jpeg' column: their JPEG encoders store the bytes of
    the file a JpegImageFile was opened from, unchanged."""
    from PIL import Image
    return Image.open(path)


def litdata_sample(path) -> dict:
    return {"image": open_jpeg(path)}


# ---- writers: pack(work, workers) writes <work>/<loader> ------------------------------------------------

def pack_litdata(work: Path, workers: int) -> None:
    import litdata
    litdata.optimize(fn=litdata_sample, inputs=[str(f) for f in jpeg_files(work)],
                     output_dir=str(work / "litdata"), chunk_bytes="64MB", num_workers=workers)


def pack_mosaic(work: Path, workers: int) -> None:
    from streaming import MDSWriter
    with MDSWriter(out=str(work / "mosaic"), columns={"image": "jpeg"}, size_limit="64mb") as out:
        for f in jpeg_files(work):
            out.write({"image": open_jpeg(f)})


def pack_webdataset(work: Path, workers: int) -> None:
    import webdataset as wds
    (work / "webdataset").mkdir()
    with wds.ShardWriter(str(work / "webdataset" / "shard-%06d.tar"), maxcount=1024, verbose=0) as sink:
        for i, f in enumerate(jpeg_files(work)):
            sink.write({"__key__": f"{i:08d}", "jpg": f.read_bytes()})


def pack_ffcv(work: Path, workers: int) -> None:
    from picstream.beton.writer import write_beton   # FFCV's DatasetWriter, JPEG bytes kept as they are
    write_beton(ShardSet.open(work / "picstream"), str(work / "ffcv.beton"), workers=workers)


WRITERS = {"litdata": pack_litdata, "mosaic": pack_mosaic, "webdataset": pack_webdataset, "ffcv": pack_ffcv}


# ---- loaders: batches(work, workers, steps, sizes) yields a list of uint8 image batches, one per crop size --

def served_url(work: Path) -> str:
    """The base URL under which the parent's HTTP server serves `work`."""
    return (work / "http.url").read_text()


def batches_picstream(work: Path, workers: int, steps: int, sizes=(SIZE,), decoder: str = "auto",
                      root: str | None = None):
    shards = ShardSet.open(root or work / "picstream")
    with window_loader(shards, steps, workers, decoder=decoder, image_size=sizes[0],
                       multi_crop=[(s, 1, SCALE) for s in sizes[1:]]) as loader:
        for b in loader:
            yield [b.images, *b.extra_crops]


def batches_picstream_roi(work: Path, workers: int, steps: int, sizes=(SIZE,)):
    """The same loader decoding only each crop's window (decoder="roi", nvImageCodec's CPU back end)."""
    return batches_picstream(work, workers, steps, sizes, decoder="roi")


def batches_picstream_http(work: Path, workers: int, steps: int, sizes=(SIZE,)):
    """The same loader on the shard set's URL: shards fetched whole over HTTP into a temporary cache."""
    return batches_picstream(work, workers, steps, sizes, root=f"{served_url(work)}/picstream")


def batches_litdata(work: Path, workers: int, steps: int, sizes=(SIZE,)):
    import litdata

    class Images(litdata.StreamingDataset):
        def __getitem__(self, index):
            return views(super().__getitem__(index)["image"])
    views = PeerViews(sizes)
    ds = Images(str(work / "litdata"), shuffle=True, seed=0)
    yield from litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, drop_last=True)


def batches_mosaic(work: Path, workers: int, steps: int, sizes=(SIZE,)):
    from streaming import StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    class Images(StreamingDataset):
        def __getitem__(self, index):   # its 'jpeg' decoder returns the PIL image in the file's mode
            return views(super().__getitem__(index)["image"].convert("RGB"))
    clean_stale_shared_memory()
    views = PeerViews(sizes)
    ds = Images(local=str(work / "mosaic"), shuffle=True, shuffle_seed=0, batch_size=BATCH)
    yield from StreamingDataLoader(ds, batch_size=BATCH, num_workers=workers, drop_last=True)


def webdataset_shards(work: Path) -> list[Path]:
    return sorted((work / "webdataset").glob("shard-*.tar"))


def batches_webdataset(work: Path, workers: int, steps: int, sizes=(SIZE,), urls: list[str] | None = None):
    import webdataset as wds
    urls = urls or [str(p) for p in webdataset_shards(work)]
    views = PeerViews(sizes)
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False).shuffle(1000)
          .decode("pil").to_tuple("jpg").map(lambda sample: views(*sample)).batched(BATCH, partial=False))
    yield from wds.WebLoader(ds, batch_size=None, num_workers=workers)


def batches_webdataset_http(work: Path, workers: int, steps: int, sizes=(SIZE,)):
    """The same pipeline on http:// shard URLs (webdataset streams them through `curl`)."""
    base = served_url(work)
    return batches_webdataset(work, workers, steps, sizes, [f"{base}/webdataset/{p.name}"
                                                            for p in webdataset_shards(work)])


def batches_ffcv(work: Path, workers: int, steps: int, sizes=(SIZE,)):
    """One pipeline per crop size, every one reading the image field (FFCV's PipelineSpec): each decodes."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, ToTensor
    views = {"image" if i == 0 else f"view{i}": PipelineSpec(
        "image", RandomResizedCropRGBImageDecoder((s, s), scale=SCALE), [RandomHorizontalFlip(), ToTensor()])
        for i, s in enumerate(sizes)}
    loader = Loader(str(work / "ffcv.beton"), BATCH, num_workers=workers, order=OrderOption.RANDOM, seed=0,
                    drop_last=True, os_cache=True, pipelines={**views, "id": None, "label": None})
    for out in loader:
        yield list(out)


def batches_dali(work: Path, workers: int, steps: int, sizes=(SIZE,)):
    """One crop: DALI's fused decode + random crop (only the window decoded); several: one decode, then a
    random_resized_crop per view."""
    from nvidia.dali import fn, pipeline_def, types

    def flip(images):
        return fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))

    @pipeline_def(batch_size=BATCH, num_threads=workers, device_id=None, seed=0)
    def pipeline():
        jpegs, _ = fn.readers.file(file_root=str(work / "corpus"), random_shuffle=True, name="reader")
        if len(sizes) == 1:
            images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                                   random_area=list(SCALE))
            return flip(fn.resize(images, resize_x=sizes[0], resize_y=sizes[0], antialias=True))
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return tuple(flip(fn.random_resized_crop(images, size=[s, s], random_area=list(SCALE), antialias=True))
                     for s in sizes)
    pipe = pipeline()
    pipe.build()
    for _ in range(steps):
        yield [views.as_array() for views in pipe.run()]


LOAD = {"picstream": batches_picstream, "picstream-roi": batches_picstream_roi, "litdata": batches_litdata,
        "mosaic": batches_mosaic, "webdataset": batches_webdataset, "ffcv": batches_ffcv, "dali": batches_dali,
        "picstream-http": batches_picstream_http, "webdataset-http": batches_webdataset_http}
LOAD |= {f"{n}-multicrop": functools.partial(LOAD[n], sizes=MULTI_CROP) for n in MULTI}
# whose packed files a loader reads, when not its own name's
PACKED_BY = {name: name.split("-")[0] for name in LOADERS if "-" in name}
# the picstream row each row is compared with (the same setting: local, -http or -multicrop); default picstream
REFERENCE = {name: f"picstream-{name.split('-')[1]}" for name in LOADERS if name.endswith(("-http", "-multicrop"))}


# ---- what the process tree costs ------------------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` (all their threads)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def load_child(name: str, work: Path, workers: int, count: int) -> dict:
    """Time one loader: the first batch, then `count` more images; the shape and dtype of every batch."""
    steps = count // BATCH + 1
    me = os.getpid()
    shapes, peak, taken = set(), 0.0, 0
    t_build = time.perf_counter()
    it = iter(LOAD[name](work, workers, steps + 1))

    def take():
        nonlocal peak, taken
        views = next(it)
        taken += 1
        shapes.add(" + ".join(f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for v in views))
        peak = max(peak, pss_mb(process_tree(me)))
        return views[0]
    take()
    first = time.perf_counter() - t_build
    t0, cpu0 = time.perf_counter(), cpu_seconds(process_tree(me))
    done = 0
    while done < count:
        done += len(take())
    seconds, cpu = time.perf_counter() - t0, cpu_seconds(process_tree(me)) - cpu0
    it.close()
    return {"img_s": done / seconds, "img_s_core": done / cpu, "cpu_s": cpu, "first_batch_s": first,
            "peak_pss_mb": peak, "batches": taken, "shapes": sorted(shapes)}


# ---- the run --------------------------------------------------------------------------------------------

def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The loaders that import here, and why each other one does not."""
    present, missing = [], {}
    for name in names:
        module, _ = LOADERS[name]
        try:
            importlib.import_module(module)
            present.append(name)
        except ImportError as exc:   # any import failure: not installed, or broken against this env
            missing[name] = f"{type(exc).__name__}: {exc}"
    return present, missing


def version(name: str) -> str:
    try:
        return importlib.metadata.version(LOADERS[name][1])
    except importlib.metadata.PackageNotFoundError:
        return "?"


def child(args: list[str]) -> dict:
    """Run this script with `args` in a fresh process; its last stdout line (JSON)."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"loaders.py {' '.join(args[:2])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class StaticServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):   # a loader closed after its last batch
            super().handle_error(request, client_address)


def start_http_server(root: Path) -> ThreadingHTTPServer:
    """A plain static file server for `root` on 127.0.0.1 (a free port), in a thread; its base URL is
    written to `root`/http.url for the loading processes."""
    server = StaticServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (root / "http.url").write_text(f"http://127.0.0.1:{server.server_address[1]}")
    return server


def run(args) -> tuple[dict[str, dict], dict[str, str]]:
    names = args.only.split(",") if args.only else list(LOADERS)
    present, missing = available(names)
    if missing and os.environ.get("CI"):
        raise SystemExit(f"loaders.py: with CI set every loader must run; missing: {missing}")
    copies, shard_size, count = (1, 128, 256) if args.quick else (8, 1024, 2560)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        prepare(args.data, work, copies, shard_size, workers=args.workers)
        os.rename(work / "shards", work / "picstream")
        packed = {"picstream": time.perf_counter() - t0}   # extract + symlinks + make_shards
        for writer in dict.fromkeys(PACKED_BY.get(name, name) for name in present):
            if writer in WRITERS:
                packed[writer] = child(["--pack", writer, "--work", tmp, "--workers", str(args.workers)])["s"]
        server = start_http_server(work)
        print(f"{len(ShardSet.open(work / 'picstream'))} images, {args.workers} workers, {os.cpu_count()} "
              f"CPUs, torch {torch.__version__}; pack s: " + ", ".join(f"{n} {s:.1f}" for n, s in packed.items()))
        results: dict[str, dict] = {}
        for _ in range(args.rounds):   # interleaved rounds, best of each: the machine is shared
            for name in present:
                r = child(["--load", name, "--work", tmp, "--workers", str(args.workers), "--count", str(count)])
                best = results.setdefault(name, r)
                for key in ("img_s", "img_s_core"):
                    best[key] = max(best[key], r[key])
                for key in ("first_batch_s", "peak_pss_mb"):
                    best[key] = min(best[key], r[key])
                best["shapes"] = sorted(set(best["shapes"]) | set(r["shapes"]))
        server.shutdown()
        for name, r in results.items():
            r["pack_s"], r["version"] = packed.get(PACKED_BY.get(name, name)), version(name)
            r["expected_batches"] = count // BATCH + 1
    return results, missing


def print_report(results: dict[str, dict], missing: dict[str, str], workers: int) -> None:
    def ours(name: str) -> dict:
        return results[REFERENCE.get(name, "picstream")]
    print(f"{'loader':<20} {'version':>8} {'img/s':>7} {'img/s/core':>10} {'first s':>7} {'PSS MB':>7} "
          + " ".join(f"{f'cores@{g}':>10}" for g in GPU_RATES) + f" {'ours/peer':>9} {'per core':>8}")
    for name, r in results.items():
        print(f"{name:<20} {r['version']:>8} {r['img_s']:>7.0f} {r['img_s_core']:>10.0f} {r['first_batch_s']:>7.2f} "
              f"{r['peak_pss_mb']:>7.0f} " + " ".join(f"{g / r['img_s_core']:>10.1f}" for g in GPU_RATES)
              + f" {ours(name)['img_s'] / r['img_s']:>9.2f} {ours(name)['img_s_core'] / r['img_s_core']:>8.2f}")
    for name, why in missing.items():
        print(f"({name} skipped: {why})")

    def ratios(key: str) -> str:
        peers = [n for n in results if not n.startswith("picstream") and REFERENCE.get(n, "picstream") in results]
        return ", ".join(f"{ours(n)[key] / results[n][key]:.2f}x {n}" for n in peers) or "(no peer installed)"
    local = [n for n in results if not n.startswith("picstream") and n not in REFERENCE]
    roi = "" if "picstream-roi" not in results or not local else "; with decoder roi, per core " + ", ".join(
        f"{results['picstream-roi']['img_s_core'] / results[n]['img_s_core']:.2f}x {n}" for n in local)
    print(f"RESULT: picstream WindowLoader img/s {ratios('img_s')}; per core {ratios('img_s_core')}{roi} (decode + "
          f"RRC 224 + flip, uint8 batches of {BATCH}, {workers} workers; a *-http or *-multicrop row: "
          "picstream's row of the same setting ÷ it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 1k images, 256 timed per loader, 1 round")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, help="interleaved repetitions, best kept (default 2, 1 with --quick)")
    ap.add_argument("--only", help="comma-separated loaders (the picstream rows they are compared with run too)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--pack", choices=sorted(WRITERS))
    ap.add_argument("--load", choices=sorted(LOAD))
    ap.add_argument("--work", type=Path)
    ap.add_argument("--count", type=int)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.pack:
        t0 = time.perf_counter()
        WRITERS[args.pack](args.work, args.workers)
        return print(json.dumps({"s": time.perf_counter() - t0}))
    if args.load:
        return print(json.dumps(load_child(args.load, args.work, args.workers, args.count)))
    if args.only:   # with the picstream rows they are compared with
        names = args.only.split(",")
        args.only = ",".join(dict.fromkeys(["picstream", *(REFERENCE[n] for n in names if n in REFERENCE), *names]))
    args.rounds = args.rounds or (1 if args.quick else 2)
    results, missing = run(args)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "missing": missing}, indent=1))
    print_report(results, missing, args.workers)


if __name__ == "__main__":
    main()
