"""The results page: one table per grid beside the paper's numbers, a verdict per claim, PNG plots."""
from __future__ import annotations

import os
import platform
import shutil
import statistics
from pathlib import Path

import torch

from .grids import Claim, Grid, Scale
from .runner import slug
from .stats import ALPHA, MIN_SEEDS, compare

__all__ = ["verdict", "write_page", "machine"]


def machine() -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()})"
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}{gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "–"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _tops(runs: list[dict]) -> list[float]:
    """The k-NN top-1 of the runs that finished training (a diverged run has none)."""
    return [r["top1"] for r in runs if r.get("top1") is not None]


def _diverged(runs: list[dict]) -> list[str]:
    return [f"s{r['seed']}" for r in runs if r.get("diverged")]


def verdict(claim: Claim, better: list[float], worse: list[float]) -> str:
    """The claim's verdict from Welch's t at 5% (two-sided): reproduced / reversed / no effect
    detectable at this power, with the bootstrap interval and the smallest detectable gap."""
    if not better or not worse:
        return "not run"
    gap = statistics.mean(better) - statistics.mean(worse)
    if min(len(better), len(worse)) < MIN_SEEDS:
        return (f"{gap:+.1f} points from {len(better)} vs {len(worse)} seeds: fewer than {MIN_SEEDS} seeds a "
                "side, no verdict")
    c = compare(better, worse)
    if claim.same:
        word = ("not reproduced: they differ" if c.p < ALPHA else
                f"reproduced: no difference detectable (a gap of {c.detectable:.1f} would have been)")
    elif c.p < ALPHA:
        word = "reproduced" if c.gap > 0 else "reversed"
    else:
        word = f"no effect detectable at this power (smallest detectable ≈ {c.detectable:.1f} points)"
    return (f"**{word}**: {c.gap:+.1f} points, bootstrap 95% CI [{c.ci[0]:+.1f}, {c.ci[1]:+.1f}], Welch's t "
            f"p = {c.p:.2g}, {len(better)} vs {len(worse)} seeds")


def _plots(grid: Grid, results: dict[str, list[dict]], curves: dict, folder: Path,
           floor: float | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.name for v in grid.variants if _tops(results.get(v.name, []))]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6))
    for i, name in enumerate(names):
        tops = _tops(results[name])
        ax.bar(i, statistics.mean(tops), color=f"C{i}", alpha=0.6)
        ax.scatter([i] * len(tops), tops, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    if floor is not None:
        ax.axhline(floor, color="gray", ls="--", lw=1, label="random init")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title(grid.title, fontsize=9)
    lo = min([t for n in names for t in _tops(results[n])] + ([floor] if floor is not None else []))
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


def _interim(grid: Grid, curves: dict, progress: dict[str, list[dict]]) -> list[str]:
    """Claims touching runs still training, tested on the k-NN monitor at the last epoch every run of
    both sides reached (labelled interim: not the final numbers)."""
    running = [f"{name} s{p['seed']} (epoch {p['knn'][-1][0]:.1f})" if p["knn"] else f"{name} s{p['seed']}"
               for name, runs in progress.items() for p in runs]
    if not running:
        return []
    lines = [f"Not finished yet (training, or interrupted: the grid's command resumes them): "
             f"{', '.join(running)}. Interim, from the k-NN monitor (same protocol, before the "
             "last step; not the final numbers):"]
    for claim in grid.claims:
        sides = [[c["knn"] for c in curves.get(n, [])] + [p["knn"] for p in progress.get(n, [])]
                 for n in (claim.better, claim.worse)]
        if not progress.get(claim.better) and not progress.get(claim.worse):
            continue
        if not all(sides) or not all(s for side in sides for s in side):
            continue
        epoch = min(s[-1][0] for side in sides for s in side)
        tops = [[max((e, t) for e, t in s if e <= epoch)[1] for s in side] for side in sides]
        relation = "=" if claim.same else ">"
        lines.append(f"- at epoch {epoch:.1f}: {claim.better} {relation} {claim.worse}: "
                     f"{', '.join(f'{t:.1f}' for t in tops[0])} vs {', '.join(f'{t:.1f}' for t in tops[1])}: "
                     f"{verdict(claim, *tops)}.")
    return lines + [""]


def _grid_section(grid: Grid, scale: Scale, results: dict[str, list[dict]], curves: dict, folder: Path,
                  rel: str, floor: float | None, progress: dict[str, list[dict]]) -> list[str]:
    seeds = sorted({r["seed"] for runs in results.values() for r in runs})
    lines = [f"## {grid.title}", "", grid.paper_note + ".", "", *(f"{n}\n" for n in grid.notes),
             f"`{_command(grid.name, scale, seeds)}`", "",
             "| variant | overrides | k-NN top-1 per seed | mean ± std | paper (ImageNet linear) | min per run | "
             "config |", "| --- | --- | --- | --- | --- | --- | --- |"]
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    wall = 0.0
    for v in grid.variants:
        runs = results.get(v.name, [])
        trained = [r for r in runs if "same_as" not in r]
        wall += sum(r["wall_s"] for r in trained)
        config = ""
        if runs and Path(runs[0]["config"]).exists():
            name = f"configs/{grid.name}-{slug(v.name)}.yaml"
            shutil.copyfile(runs[0]["config"], folder / name)
            config = f"[yaml]({rel}/{name})"
            if "same_as" in runs[0]:
                config += f" (the runs of {'/'.join(Path(runs[0]['same_as']).parts[-2:-1])})"
        seeds = _per_seed(runs)
        minutes = f"{statistics.mean(r['wall_s'] for r in runs) / 60:.1f}" if runs else "–"
        lines.append(f"| {v.name} | `{' '.join(v.overrides)}` | {seeds} | "
                     f"{_mean_std(_tops(runs))} | {v.paper or '–'} | {minutes} | {config} |")
    lines += ["", "Claims (Welch's t-test, two-sided, 5%; the bootstrap resamples the seeds of each side; "
                  "the smallest detectable gap is at 80% power with these seeds' spread):"]
    for claim in grid.claims:
        tops = [_tops(results.get(name, [])) for name in (claim.better, claim.worse)]
        relation = "=" if claim.same else ">"
        training = not all(tops) and any(progress.get(n) for n in (claim.better, claim.worse))
        lost = "; ".join(f"{name} diverged in {', '.join(seeds)} (not counted)" for name in (claim.better, claim.worse)
                         if (seeds := _diverged(results.get(name, []))))
        lines.append(f"- {claim.better} {relation} {claim.worse} ({claim.paper}): "
                     f"{'not finished yet (interim below)' if training else verdict(claim, *tops)}"
                     f"{f'; {lost}' if lost else ''}.")
    lines += ["", *_interim(grid, curves, progress)]
    count = sum(len(r) for r in results.values())
    lines += [f"Wall time: {wall / 60:.1f} min for the {sum(len([r for r in rs if 'same_as' not in r]) for rs in results.values())} "
                  f"runs trained for this grid of {count} (training + final k-NN).", ""]
    if count:
        lines += [f"![{png}]({rel}/{png})" for png in _plots(grid, results, curves, folder, floor)] + [""]
    return lines


PEER_NAMES = {"simclr": "SimCLR", "mocov2": "MoCo v2", "byol": "BYOL"}


def _peer_rows(peers: list[dict]) -> dict[tuple[str, str], list[dict]]:
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(peers, key=lambda r: (r["method"], r["budget"], r["seed"])):
        rows.setdefault((r["method"], r["budget"]), []).append(r)
    return rows


def _standing(peers: list[dict], pic: list[dict]) -> str:
    """The page's first paragraph: where PIC stands against the peers (only what was measured)."""
    if not peers or not pic:
        return ("Where PIC stands against SimCLR / MoCo v2 / BYOL at this scale: not measured yet "
                "(`python benchmarks/peers.py --scale cpu` runs them beside PIC).")
    pic_tops = _tops(pic)
    parts = []
    for (method, budget), runs in _peer_rows(peers).items():
        tops = _tops(runs)
        if min(len(tops), len(pic_tops)) >= MIN_SEEDS:
            c = compare(pic_tops, tops)
            word = ("above" if c.gap > 0 else "below") if c.p < ALPHA else "not separable from"
            parts.append(f"{word} {PEER_NAMES[method]} at equal {budget} ({statistics.mean(tops):.1f}, "
                         f"p = {c.p:.2g})")
        else:
            parts.append(f"not yet tested against {PEER_NAMES[method]} at equal {budget} ({statistics.mean(tops):.1f} "
                         f"from {len(tops)} seed{'s' if len(tops) > 1 else ''}, no verdict)")
    return (f"Where PIC stands at this scale: PIC's base run reaches k-NN top-1 {statistics.mean(pic_tops):.1f} "
            f"({len(pic_tops)} seeds); it is " + "; ".join(parts) + ". Peers are lightly's SimCLR, MoCo v2 and "
            "BYOL on the same backbone, data, image size and k-NN protocol (`benchmarks/peers.py`); " + (
            "at equal time: not measured yet (`benchmarks/peers.py` first calibrates each peer's cost per epoch "
            "against PIC's on an idle machine)." if not any(r["budget"] == "time" for r in peers) else
            "\"equal time\" is PIC's training compute: PIC's epochs x PIC's cost per epoch / the peer's, both "
            "measured back to back under the same load (CPU seconds measured at different loads are not "
            "comparable on this machine's shared cores)." + _costs(peers)))


def _costs(peers: list[dict]) -> str:
    """Why the equal-time budgets differ: each peer's measured cost per epoch relative to PIC's."""
    cost = {r["method"]: r["cost_vs_pic"] for r in peers if "cost_vs_pic" in r}
    if not cost:
        return ""
    return (" A PIC step passes one view through one network, a peer step two views (MoCo v2 and BYOL also "
            "through a momentum encoder): per epoch " + ", ".join(f"{PEER_NAMES[m]} costs {c:.1f}x PIC"
                                                               for m, c in sorted(cost.items())) +
            ", so at equal time a peer trains that many times fewer epochs.")


def _per_seed(runs: list[dict]) -> str:
    """Each seed's k-NN top-1, or where its loss became non-finite."""
    def one(r: dict) -> str:
        if r.get("diverged"):
            return f"diverged ({r['diverged'].removeprefix('the loss is ')}) (s{r['seed']})"
        return f"{r['top1']:.1f} (s{r['seed']})"
    return ", ".join(map(one, runs)) or "not run"


def _peers_section(peers: list[dict], pic: list[dict]) -> list[str]:
    if not peers:
        return []
    pic_tops = _tops(pic)
    pic_row = "| PIC | – | – | – | not run | – | – |"
    cost = {r["method"]: r["cost_vs_pic"] for r in peers if "cost_vs_pic" in r}
    if pic:
        pic_epochs = pic[0]["settings"]["optim"]["epochs"]
        pic_row = f"| PIC | – | {pic_epochs:g} | 1 | {_per_seed(pic)} | {_mean_std(pic_tops)} | – |"
    lines = ["## Peers: SimCLR, MoCo v2, BYOL (lightly) beside PIC", "",
             "`python benchmarks/peers.py --scale cpu --seeds 0,1,2` (lightly's CIFAR-10 benchmark settings: batch "
             "128, SGD lr 0.06, momentum 0.9, weight decay 5e-4, cosine; SimCLRTransform at 32 px without blur; "
             "two views per image per step). Last column: "
             "PIC's claimed lead, tested as the grids' claims.", "",
             "Training compute is relative to PIC's run, at the per-epoch costs measured back to back "
             "(`peers/calibration.json`).", "",
             "| method | budget | epochs | training compute (PIC = 1) | k-NN top-1 per seed | mean ± std | PIC > peer |",
             "| --- | --- | --- | --- | --- | --- | --- |", pic_row]
    for (method, budget), runs in _peer_rows(peers).items():
        tops = _tops(runs)
        against = verdict(Claim("PIC", method, ""), pic_tops, tops) if pic_tops else "–"
        epochs = statistics.mean(r["epochs"] for r in runs)
        compute = f"{epochs * cost[method] / pic_epochs:.2f}" if pic and method in cost else "–"
        lines.append(f"| {PEER_NAMES[method]} | equal {budget} | {epochs:.1f} | {compute} | {_per_seed(runs)} | "
                     f"{_mean_std(tops)} | {against} |")
    return lines + [""]


NOT_RUN_HERE = (
    "python tools/reproduce.py --grid all --scale gpu --seeds 0,1,2",
    "picstream-train --config configs/in1k.yaml",
    "picstream-train --config configs/in1k-multicrop.yaml",
    "picstream-train --config configs/in11k.yaml",
)


def write_page(page: Path, scale: Scale, grids: list[Grid], results: dict, curves: dict,
               random_init: dict | None, seeds: list[int], not_run: list[str] = (),
               peers: list[dict] = (), pic: list[dict] = (), progress: dict | None = None) -> None:
    """``page`` and its plots in ``<page stem>/`` beside it. ``results[grid][variant]`` = result
    dicts (one per seed); ``curves[grid][variant]`` = each seed's ``read_curves``; ``peers`` =
    `benchmarks/peers.py` results beside ``pic``, PIC's base runs; ``progress[grid][variant]`` = runs
    still training (seed and monitor curves)."""
    folder = page.parent / page.stem
    folder.mkdir(parents=True, exist_ok=True)
    planned = sorted(set(seeds) | set(range(MIN_SEEDS)))   # the commands name at least the seeds a verdict needs
    lines = [
        "# Reproducing the paper's ablations", "",
        _standing(list(peers), list(pic)), "",
        "Generated by `tools/reproduce.py` (do not edit by hand). Regenerate with:", "",
        f"```bash\n{_command('all', scale, planned)}\n```", "",
        "(add `--cifar10 PATH` when CIFAR-10 is not in the shared data folder; `--jobs 2` trains two runs at "
        "once; finished runs are skipped, also those recorded beside this page in "
        f"`{folder.name}/runs` wherever they were trained; interrupted ones resume).", "",
        f"- Scale `{scale.name}`: {scale.description}.",
        f"- Machine: {machine()}.",
        f"- Seeds: {', '.join(map(str, seeds))}. Every run is a `picstream-train` run with the overrides "
        "shown on top of the scale's base; its full config is linked. A variant whose settings equal "
        "another grid's (e.g. the base run) reuses that grid's runs.",
        "- Ours: k-NN top-1 (k = 200, τ = 0.07) on the test split after the last step; the curves come "
        "from the runs' k-NN monitor and loss log. Paper: ImageNet-1K linear-probe top-1 of ResNet-50 — "
        "compare the direction of each effect, not the values.",
    ]
    if random_init is not None:
        lines.append(f"- Randomly initialised backbone: k-NN top-1 {random_init['top1']:.1f}.")
    lines.append("- Wall times are this machine's, with whatever else ran on it at the time.")
    lines.append(f"- Verdicts: reproduced / reversed / no effect detectable at this power, from Welch's t-test "
                 f"(5%, two-sided) on at least {MIN_SEEDS} seeds a side; fewer seeds give no verdict.")
    if not_run:
        lines.append("- Not run yet at this scale: " + ", ".join(f"{n} (`{_command(n, scale, planned)}`)"
                                                               for n in not_run) + ".")
    lines.append("- Not run here (no GPU, no ImageNet on this machine): " +
                 ", ".join(f"`{c}`" for c in NOT_RUN_HERE) + ".")
    lines.append("")
    for grid in grids:
        lines += _grid_section(grid, scale, results.get(grid.name, {}), curves.get(grid.name, {}), folder,
                               folder.name, random_init["top1"] if random_init else None,
                               (progress or {}).get(grid.name, {}))
    lines += _peers_section(list(peers), list(pic))
    page.write_text("\n".join(lines))
