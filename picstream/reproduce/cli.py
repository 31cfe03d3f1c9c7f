"""Command line: `python tools/reproduce.py --grid NAME|all --scale cpu|gpu [--seeds 0,1] ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..shards import ShardSet
from .grids import GRID_NAMES, SCALES, build_grids
from .records import restore_records
from .report import write_page
from .runner import DataSplits, prepare_cifar10, random_init_knn, read_curves, run_variant, slug


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce", description=__doc__)
    p.add_argument("--grid", default="all", choices=(*GRID_NAMES, "all"), help="which grid (default all)")
    p.add_argument("--scale", default="cpu", choices=tuple(SCALES),
                   help="cpu: CIFAR-10 subset, <= 1 h a grid on 2 cores; gpu: all of CIFAR-10 on one GPU; "
                        "smoke: a seconds-long pipeline check")
    p.add_argument("--seeds", default="0,1", help="comma-separated run seeds (default 0,1)")
    p.add_argument("--cifar10", type=Path, default=default_cifar10(),
                   help="CIFAR-10 as train/<class>/, test/<class>/ images, or the .tar.gz holding them "
                        "(default: cifar10-jpeg.tar.gz in $PICSTREAM_SHARED_DATA or ../shared/data)")
    p.add_argument("--train", type=Path, help="instead of --cifar10: pre-training shard manifest")
    p.add_argument("--bank", type=Path, help="with --train: labeled k-NN bank manifest")
    p.add_argument("--val", type=Path, help="with --train: labeled k-NN test manifest")
    p.add_argument("--variants", help="comma-separated variant names to train, in this order (default: all "
                                      "of the grid); the page shows every finished run")
    p.add_argument("--report-only", action="store_true", help="train nothing: write the page from the finished runs")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="runs and shards (default "
                                                                             "runs/reproduce)")
    p.add_argument("--page", type=Path, help="default docs/results.md (docs/results-<scale>.md for other "
                                             "scales)")
    return p


def default_cifar10() -> Path:
    """The shared data folder beside the repository, as the tests find it."""
    shared = os.environ.get("PICSTREAM_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
    return Path(shared) / "cifar10-jpeg.tar.gz"


def default_page(scale: str) -> Path:
    """The results page of a scale."""
    return Path("docs/results.md" if scale == "cpu" else f"docs/results-{scale}.md")


def records_of(page: Path) -> Path:
    """Where the finished runs shown on ``page`` are recorded (:mod:`.records`): beside its plots."""
    return page.parent / page.stem / "runs"


def _data(args, scale) -> DataSplits:
    given = [args.train, args.bank, args.val]
    if any(given):
        if None in given:
            raise ValueError("give all of --train, --bank and --val (or none, for --cifar10)")
        return DataSplits(*given)
    if not args.cifar10.exists():
        raise FileNotFoundError(f"CIFAR-10 not found at {args.cifar10}: give --cifar10")
    return prepare_cifar10(args.cifar10, args.out / "data", scale)


def _variant_data(args, scale, data: DataSplits, variant) -> tuple[DataSplits, int]:
    """The splits a variant trains on (its own pre-training subset in the N grid) and their size."""
    if variant.per_class is not None:
        if args.train:
            raise ValueError("the scaling grid takes CIFAR-10 subsets: give --cifar10, not --train")
        data = prepare_cifar10(args.cifar10, args.out / "data", scale, variant.per_class)
    return data, len(ShardSet.open(str(data.pretrain)))


def _collect(grid, scale, out: Path, batch: int, num_instances: int):
    """Every finished run of ``grid`` under ``out`` (any seed): results and curves per variant."""
    results, curves = {}, {}
    for v in grid.variants:
        found = sorted(out.glob(f"{scale.name}/{grid.name}/{slug(v.name)}-s*/result.json"))
        pairs = sorted(((json.loads(p.read_text()), p.parent) for p in found), key=lambda rp: rp[0]["seed"])
        results[v.name] = [{**r, "config": str(out / r["config"])} for r, _ in pairs]
        curves[v.name] = [read_curves(out / r["same_as"] if "same_as" in r else d, batch,
                                      r.get("instances", num_instances))
                          for r, d in pairs]   # a reused run's curves are in the run it reuses
    return results, curves


def _in_progress(grid, scale, out: Path, batch: int, num_instances: int) -> dict[str, list[dict]]:
    """Runs of ``grid`` still training (no ``result.json``): seed and k-NN monitor curve per variant."""
    progress = {}
    for v in grid.variants:
        dirs = [d for d in sorted(out.glob(f"{scale.name}/{grid.name}/{slug(v.name)}-s*"))
                if (d / "metrics.jsonl").exists() and not (d / "result.json").exists()]
        progress[v.name] = [{"seed": int(d.name.rsplit("-s", 1)[1]), **read_curves(d, batch, num_instances)}
                            for d in dirs]
    return progress


def _chosen(grid, names: str | None):
    """The grid's variants named in ``names`` (comma-separated, in that order), or all of them."""
    if names is None:
        return grid.variants
    by_name = {v.name: v for v in grid.variants}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise ValueError(f"{grid.name} has no variant {unknown[0]!r}; it has: {', '.join(by_name)}")
    return [by_name[n] for n in names.split(",")]


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    scale = SCALES[args.scale]
    page = args.page or default_page(scale.name)
    records = records_of(page)
    try:
        restored = restore_records(records, args.out)
        if restored:
            print(f"reproduce: {restored} files of finished runs taken from {records}")
        seeds = [int(s) for s in args.seeds.split(",")]
        data = _data(args, scale)
        grids = build_grids(scale)
        chosen = GRID_NAMES if args.grid == "all" else (args.grid,)
        base = dict(o.split("=", 1) for o in scale.base)
        runs = [(grids[name], variant, seed) for name in chosen for variant in _chosen(grids[name], args.variants)
                for seed in seeds]
        splits = {v.name: _variant_data(args, scale, data, v) for _, v, _ in runs}
        num_instances = len(ShardSet.open(str(data.pretrain)))
        random_init = random_init_knn(scale, data, args.out, records)
        if args.report_only:
            runs = []
        failed = []

        def train(grid, variant, seed):   # a failed run is reported; the other runs go on
            data_of, size = splits[variant.name]
            try:
                run_variant(grid, variant, seed, scale, data_of, args.out, size, print, records)
            except RuntimeError as err:
                failed.append(f"{grid.name} / {variant.name} seed {seed}: {err}")
                print(f"reproduce: error: {failed[-1]}", file=sys.stderr)

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:   # each run is its own process
            for _ in pool.map(lambda run: train(*run), runs):
                pass
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 2
    batch = int(base["optim.batch_size"])   # no variant changes the batch
    results, curves = {}, {}
    for name in GRID_NAMES:
        results[name], curves[name] = _collect(grids[name], scale, args.out, batch, num_instances)
    progress = {name: _in_progress(grids[name], scale, args.out, batch, num_instances) for name in GRID_NAMES}
    shown = [grids[n] for n in GRID_NAMES if any(results[n].values()) or any(progress[n].values())]
    found_seeds = sorted({r["seed"] for g in results.values() for runs in g.values() for r in runs})
    not_run = [n for n in GRID_NAMES if grids[n] not in shown]
    peer_dir = args.out / scale.name / "peers"
    peers = [json.loads(p.read_text()) for p in sorted(peer_dir.glob("*-s*.json"))]
    pic = sorted((json.loads(p.read_text()) for p in peer_dir.glob("pic-s*/result.json")), key=lambda r: r["seed"])
    write_page(page, scale, shown, results, curves, random_init, found_seeds, not_run, peers, pic, progress)
    print(f"reproduce: wrote {page}")
    if failed:
        print(f"reproduce: {len(failed)} run(s) failed (rerun the command to retry them):\n  " + "\n  ".join(failed),
              file=sys.stderr)
    return 1 if failed else 0
