#!/usr/bin/env python
"""SimCLR, MoCo v2 and BYOL from lightly beside picstream's PIC: same backbone, data, image size and k-NN.

Each peer is lightly's own model parts (losses, projection / prediction heads, momentum update,
augmentation) with the hyper-parameters of lightly's CIFAR-10 benchmark: batch 128, SGD lr 0.06,
momentum 0.9, weight decay 5e-4, cosine decay; SimCLRTransform at 32 px without blur for every
method; NT-Xent τ = 0.5 (SimCLR) / τ = 0.1 with a 4096-entry memory bank and encoder momentum 0.99
(MoCo v2, symmetric loss, shuffle-BN); negative cosine with momentum 0.99 (BYOL). The backbone is
the reproduction scale's (`model.arch` from `tools/reproduce.py --scale cpu`), trained with one thread.

Two budgets per peer and seed: the same number of epochs as PIC, and the same training compute as
PIC's run: epochs = PIC's epochs x PIC's cost per epoch / the peer's, both measured back to back
under the same load (`calibrate`; CPU seconds alone are not load-invariant here: a busy sibling
core inflates them up to 3x). PIC is the scale's base run (trained here through `tools/reproduce.py`'s runner,
or reused when a grid already trained it). k-NN: picstream's (k = 200, τ = 0.07, centre crop) on
the scale's bank and test split. Results go to `<out>/<scale>/peers/` where the results page reads
them, and are recorded beside the page (`--records`, picstream.reproduce.records). `--quick`: SimCLR and PIC for half an epoch at equal epochs only (CI).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from picstream.config import ModelConfig  # noqa: E402
from picstream.evaluate import extract_splits, knn_classify  # noqa: E402
from picstream.model import build_backbone  # noqa: E402
from picstream.reproduce.cli import default_cifar10, default_page, records_of  # noqa: E402
from picstream.reproduce.records import record_files, restore_records  # noqa: E402
from picstream.reproduce.grids import SCALES, Grid, Variant  # noqa: E402
from picstream.reproduce.runner import DataSplits, prepare_cifar10, run_variant  # noqa: E402
from picstream.shards import ShardSet  # noqa: E402

METHODS = ("simclr", "mocov2", "byol")
BATCH, LR, MOMENTUM, WEIGHT_DECAY, EMA = 128, 0.06, 0.9, 5e-4, 0.99


class Peer(nn.Module):
    """One lightly method around ``backbone``: ``loss(x0, x1)`` on two views, ``after_step()``."""

    def __init__(self, method: str, backbone: nn.Module, dim: int):
        super().__init__()
        from lightly.loss import NegativeCosineSimilarity, NTXentLoss
        from lightly.models.modules import (BYOLPredictionHead, BYOLProjectionHead, MoCoProjectionHead,
                                            SimCLRProjectionHead)
        from lightly.models.utils import deactivate_requires_grad

        self.method, self.backbone = method, backbone
        self.predictor = None
        if method == "simclr":
            self.head, self.criterion = SimCLRProjectionHead(dim, 512, 128), NTXentLoss(temperature=0.5)
        elif method == "mocov2":
            self.head = MoCoProjectionHead(dim, 512, 128)
            self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
        else:
            self.head, self.criterion = BYOLProjectionHead(dim, 1024, 256), NegativeCosineSimilarity()
            self.predictor = BYOLPredictionHead(256, 1024, 256)
        self.target = None
        if method != "simclr":
            self.target = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(self.head))
            deactivate_requires_grad(self.target)

    def online(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        from lightly.models.utils import batch_shuffle, batch_unshuffle

        if self.method == "simclr":
            return self.criterion(self.online(x0), self.online(x1))
        if self.method == "mocov2":
            def key(x):
                shuffled, order = batch_shuffle(x)
                return batch_unshuffle(self.target(shuffled), order).detach()
            return 0.5 * (self.criterion(self.online(x0), key(x1)) + self.criterion(self.online(x1), key(x0)))
        p0, p1 = self.predictor(self.online(x0)), self.predictor(self.online(x1))
        with torch.no_grad():
            z0, z1 = self.target(x0), self.target(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def after_step(self) -> None:
        from lightly.models.utils import update_momentum

        if self.target is not None:
            update_momentum(nn.Sequential(self.backbone, self.head), self.target, m=EMA)


class TwoViews(torch.utils.data.Dataset):
    """The pre-training shards' images (decoded once) through lightly's SimCLRTransform at ``size``."""

    def __init__(self, manifest: Path, size: int):
        from lightly.transforms import SimCLRTransform

        shards = ShardSet.open(str(manifest))
        self.images = [Image.open(io.BytesIO(shards.read(i))).convert("RGB") for i in range(len(shards))]
        self.transform = SimCLRTransform(input_size=size, gaussian_blur=0.0)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i])


def train_peer(method: str, arch: str, data: TwoViews, epochs: float, seed: int) -> tuple[nn.Module, float, int]:
    """Train one peer for ``epochs`` (a fraction is a number of steps); (backbone, CPU s, steps)."""
    torch.manual_seed(seed)
    model = Peer(method, *build_backbone(ModelConfig(arch=arch)))
    params = [p for p in model.parameters() if p.requires_grad]
    lr = LR * BATCH / 128
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    batch = min(BATCH, len(data))
    per_epoch = len(data) // batch
    total = max(1, round(epochs * per_epoch))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    model.train()
    started, step = time.process_time(), 0
    while step < total:
        for x0, x1 in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = model.loss(x0, x1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.after_step()
            step += 1
            if step == total:
                break
    return model.backbone, time.process_time() - started, total


def calibrate(methods: list[str], scale, splits: DataSplits, data: TwoViews, arch: str, out: Path,
              num_instances: int, path: Path) -> dict[str, float]:
    """Each peer's cost per epoch relative to PIC's (``path`` caches it). Measure on an otherwise idle
    machine: on shared cores a busy sibling inflates CPU seconds, and not by the same factor for
    every workload. Back to back: PIC for 1 epoch, each peer for 2 epochs in this process, PIC for 3
    epochs (the difference of PIC's training CPU seconds cancels start-up and the k-NN monitor)."""
    if path.exists():
        return json.loads(path.read_text())
    grid = Grid("peers-calibration", "", "", (), ())

    def pic_cpu_s(e: int) -> float:
        return run_variant(grid, Variant(f"pic {e}ep", (f"optim.epochs={e}",)), 0, scale, splits, out,
                           num_instances, print)["train_cpu_s"]

    one = pic_cpu_s(1)
    peer_s = {method: train_peer(method, arch, data, 2, 0)[1] / 2 for method in methods}
    pic_per_epoch = (pic_cpu_s(3) - one) / 2
    ratios = {method: s / pic_per_epoch for method, s in peer_s.items()}
    print("calibration: per epoch " + ", ".join(f"{m} costs {r:.2f}x PIC" for m, r in ratios.items()))
    path.write_text(json.dumps(ratios, indent=2) + "\n")
    return ratios


def knn_of(backbone: nn.Module, splits: DataSplits, size: int) -> float:
    with torch.no_grad():
        bank, test = extract_splits(backbone, splits.bank, splits.test, image_size=size, batch_size=256,
                                    workers=0)
    return knn_classify(bank, test)["top1"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--scale", default="cpu", choices=tuple(SCALES))
    p.add_argument("--cifar10", type=Path, default=default_cifar10())
    p.add_argument("--train", type=Path, help="pre-training shard manifest (with --bank and --val)")
    p.add_argument("--bank", type=Path)
    p.add_argument("--val", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    p.add_argument("--records", type=Path, help="where finished runs are recorded (default: beside the scale's "
                                                "results page, docs/results/runs for cpu)")
    p.add_argument("--quick", action="store_true", help="SimCLR and PIC for half an epoch, equal epochs only (CI)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    scale = SCALES["smoke" if args.quick else args.scale]
    records = args.records or records_of(default_page(scale.name))
    restore_records(records, args.out)
    base = dict(o.split("=", 1) for o in scale.base)
    arch, size = base["model.arch"], int(base["data.image_size"])
    if args.train:
        splits = DataSplits(args.train, args.bank or args.train, args.val or args.train)
    else:
        splits = prepare_cifar10(args.cifar10, args.out / "data", SCALES[args.scale] if args.quick else scale)
    methods = ["simclr"] if args.quick else args.methods.split(",")
    epochs = 0.5 if args.quick else scale.epochs
    pic_grid = Grid("peers", "PIC beside its peers", "", (Variant("pic", (f"optim.epochs={epochs:g}",)),), ())
    num_instances = len(ShardSet.open(str(splits.pretrain)))
    data = TwoViews(splits.pretrain, size)
    folder = args.out / scale.name / "peers"
    folder.mkdir(parents=True, exist_ok=True)
    summary: dict[str, list[float]] = {}
    cost = {} if args.quick else calibrate(methods, scale, splits, data, arch, args.out, num_instances,
                                           folder / "calibration.json")
    if cost:
        record_files(records, args.out, folder / "calibration.json")
    for seed in (int(s) for s in args.seeds.split(",")):
        pic = run_variant(pic_grid, pic_grid.variants[0], seed, scale, splits, args.out, num_instances, print,
                          records)
        pic_cpu = pic.get("train_cpu_s") or pic["wall_s"]
        summary.setdefault("pic", []).append(pic["top1"])
        for method in methods:
            for budget in ("epochs",) if args.quick else ("epochs", "time"):
                path = folder / f"{method}-{budget}-s{seed}.json"
                if path.exists():
                    result = json.loads(path.read_text())
                else:
                    run_epochs = epochs if budget == "epochs" else epochs / cost[method]
                    backbone, cpu_s, steps = train_peer(method, arch, data, run_epochs, seed)
                    result = {"method": method, "budget": budget, "seed": seed, "epochs": run_epochs,
                              "steps": steps, "batch": BATCH, "train_cpu_s": cpu_s,
                              "top1": knn_of(backbone, splits, size), "pic_top1": pic["top1"],
                              "pic_cpu_s": pic_cpu, **({"cost_vs_pic": cost[method]} if budget == "time" else {})}
                    path.write_text(json.dumps(result, indent=2) + "\n")
                    record_files(records, args.out, path)
                summary.setdefault(f"{method} ({budget})", []).append(result["top1"])
                print(f"{method} seed {seed}, equal {budget}: {result['epochs']:.2f} epochs, "
                      f"{result['train_cpu_s']:.0f} CPU s, k-NN {result['top1']:.1f} (PIC {pic['top1']:.1f}, "
                      f"{pic_cpu:.0f} CPU s)")
    pic_mean = statistics.mean(summary.pop("pic"))
    parts = [f"{name} {statistics.mean(v):.1f} ({statistics.mean(v) / pic_mean:.2f}x PIC)"
             for name, v in summary.items()]
    print(f"RESULT: k-NN top-1, PIC {pic_mean:.1f}; " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
