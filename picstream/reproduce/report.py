"""The results page: one table per grid beside the paper's numbers, a verdict per claim, PNG plots."""
from __future__ import annotations

import os
import platform
import shutil
import statistics
from pathlib import Path

import torch

from .grids import Grid, Scale
from .runner import slug

__all__ = ["verdict", "write_page", "machine"]


def machine() -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()})"
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "–"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def verdict(better: list[float], worse: list[float]) -> str:
    """Plain words on one claim: clear only when every seed of one beats every seed of the other."""
    if not better or not worse:
        return "not run"
    gap = statistics.mean(better) - statistics.mean(worse)
    if min(len(better), len(worse)) < 2:
        return f"{gap:+.1f} points with one seed: no estimate of the seed noise, so no conclusion"
    if min(better) > max(worse):
        return (f"holds: {gap:+.1f} points, each of {len(better)} seeds above each of {len(worse)} "
                f"(weak evidence with so few seeds)" if min(len(better), len(worse)) < 3 else
                f"holds: {gap:+.1f} points, each of {len(better)} seeds above each of {len(worse)}")
    if max(better) < min(worse):
        return f"reversed at this scale: {gap:+.1f} points, every seed below"
    return f"{gap:+.1f} points, inside the seed noise (the seeds' ranges overlap): this scale shows no difference"


def _plots(grid: Grid, results: dict[str, list[dict]], curves: dict, folder: Path,
           floor: float | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.name for v in grid.variants if results.get(v.name)]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6))
    for i, name in enumerate(names):
        tops = [r["top1"] for r in results[name]]
        ax.bar(i, statistics.mean(tops), color=f"C{i}", alpha=0.6)
        ax.scatter([i] * len(tops), tops, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", lw=1, label="random init")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title(grid.title, fontsize=9)
    lo = min([r["top1"] for n in names for r in results[n]] + ([floor] if floor is not None else []))
    ax.set_ylim(max(0.0, lo - 10), None)
    fig.tight_layout()
    bar = f"{grid.name}-knn.png"
    fig.savefig(folder / bar, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, name in enumerate(names):
        for j, curve in enumerate(curves[name]):
            for ax, key in zip(axes, ("knn", "loss")):
                if curve[key]:
                    x, y = zip(*curve[key])
                    ax.plot(x, y, color=f"C{i}", lw=1.2, alpha=0.8, marker="o" if key == "knn" else None,
                            ms=3, label=name if j == 0 else None)
    axes[0].set_ylabel("k-NN top-1 (%)")
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.suptitle(grid.title, fontsize=9)
    fig.tight_layout()
    curve_png = f"{grid.name}-curves.png"
    fig.savefig(folder / curve_png, dpi=110)
    plt.close(fig)
    return [bar, curve_png]


def _command(grid: str, scale: Scale, seeds: list[int]) -> str:
    return f"python tools/reproduce.py --grid {grid} --scale {scale.name} --seeds {','.join(map(str, seeds))}"


def _grid_section(grid: Grid, scale: Scale, results: dict[str, list[dict]], curves: dict, folder: Path,
                  rel: str, floor: float | None) -> list[str]:
    seeds = sorted({r["seed"] for runs in results.values() for r in runs})
    lines = [f"## {grid.title}", "", grid.paper_note + ".", "", f"`{_command(grid.name, scale, seeds)}`", "",
             "| variant | overrides | k-NN top-1 per seed | mean ± std | paper (ImageNet linear) | config |",
             "| --- | --- | --- | --- | --- | --- |"]
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    wall = 0.0
    for v in grid.variants:
        runs = results.get(v.name, [])
        wall += sum(r["wall_s"] for r in runs)
        config = ""
        if runs and Path(runs[0]["config"]).exists():
            name = f"configs/{grid.name}-{slug(v.name)}.yaml"
            shutil.copyfile(runs[0]["config"], folder / name)
            config = f"[yaml]({rel}/{name})"
        seeds = ", ".join(f"{r['top1']:.1f} (s{r['seed']})" for r in runs) or "not run"
        lines.append(f"| {v.name} | `{' '.join(v.overrides)}` | {seeds} | "
                     f"{_mean_std([r['top1'] for r in runs])} | {v.paper or '–'} | {config} |")
    lines += ["", "Claims:"]
    for better, worse, claim in grid.claims:
        tops = [[r["top1"] for r in results.get(name, [])] for name in (better, worse)]
        lines.append(f"- {better} > {worse} ({claim}): {verdict(*tops)}.")
    count = sum(len(r) for r in results.values())
    lines += ["", f"Wall time: {wall / 60:.1f} min for {count} runs (training + final k-NN).", ""]
    if count:
        lines += [f"![{png}]({rel}/{png})" for png in _plots(grid, results, curves, folder, floor)] + [""]
    return lines


def write_page(page: Path, scale: Scale, grids: list[Grid], results: dict, curves: dict,
               random_init: dict | None, seeds: list[int], not_run: list[str] = ()) -> None:
    """``page`` and its plots in ``<page stem>/`` beside it. ``results[grid][variant]`` = result
    dicts (one per seed); ``curves[grid][variant]`` = each seed's ``read_curves``."""
    folder = page.parent / page.stem
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Reproducing the paper's ablations", "",
        "Generated by `tools/reproduce.py` (do not edit by hand). Regenerate with:", "",
        f"```bash\n{_command('all', scale, seeds)}\n```", "",
        "(add `--cifar10 PATH` when CIFAR-10 is not in the shared data folder; finished runs are "
        "skipped, interrupted ones resume).", "",
        f"- Scale `{scale.name}`: {scale.description}.",
        f"- Machine: {machine()}.",
        f"- Seeds: {', '.join(map(str, seeds))}. Every run is a `picstream-train` run with the overrides "
        "shown on top of the scale's base; its full config is linked.",
        "- Ours: k-NN top-1 (k = 200, τ = 0.07) on the test split after the last step; the curves come "
        "from the runs' k-NN monitor and loss log. Paper: ImageNet-1K linear-probe top-1 of ResNet-50 — "
        "compare the direction of each effect, not the values.",
    ]
    if random_init is not None:
        lines.append(f"- Randomly initialised backbone: k-NN top-1 {random_init['top1']:.1f}.")
    lines.append("- Wall times are this machine's, with whatever else ran on it at the time.")
    if not_run:
        lines.append(f"- Not run yet at this scale: {', '.join(not_run)} (`{_command(not_run[0], scale, seeds)}` "
                     "adds a grid to this page).")
    if scale.name != "gpu":
        lines.append("- At this small scale differences of a point or two are usually inside the seed "
                     "noise; each claim below says whether the seeds separate.")
    lines.append("")
    for grid in grids:
        lines += _grid_section(grid, scale, results.get(grid.name, {}), curves.get(grid.name, {}), folder,
                               folder.name, random_init["top1"] if random_init else None)
    page.write_text("\n".join(lines))
