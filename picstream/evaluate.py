"""Frozen-backbone evaluation: weighted k-NN (InstDisc/MoCo protocol) and a linear probe."""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
import torch.nn.functional as F
from torch import nn

from .backbones import check_backbone
from .checkpoint import load_checkpoint
from .config import ConfigError, ModelConfig, config_from_dict
from .device import resolve_device
from .export import backbone_state_dict
from .loader import EvalLoader, normalize
from .model import build_backbone
from .shards import ShardSet, ShardsError


@dataclass
class Features:
    features: torch.Tensor  # (n, d) float32, on CPU
    labels: torch.Tensor  # (n,) int64


@torch.no_grad()
def extract_features(backbone: nn.Module, shards: ShardSet, *, image_size: int, batch_size: int = 256,
                     workers: int = 2, device: torch.device | str = "cpu") -> Features:
    """Pooled backbone features of every sample (center crop, no augmentation), in ID order."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for batch in EvalLoader(shards, batch_size=batch_size, image_size=image_size, workers=workers):
        images = normalize(batch.images.to(device, non_blocking=True))
        feats.append(backbone(images).float().cpu())
        labels.append(torch.as_tensor(batch.labels))
    backbone.train(was_training)
    return Features(torch.cat(feats), torch.cat(labels))


def extract_splits(backbone: nn.Module, train: str, val: str, **kwargs) -> tuple[Features, Features]:
    """Features of a train and a val shard set (paths or URLs); kwargs go to `extract_features`."""
    return (extract_features(backbone, ShardSet.open(str(train)), **kwargs),
            extract_features(backbone, ShardSet.open(str(val)), **kwargs))


def _topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many rows have their label first (top-1) and among the first five (top-5)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def knn_classify(train: Features, val: Features, *, k: int = 200, temperature: float = 0.07,
                 chunk: int = 1024) -> dict[str, float]:
    """Weighted k-NN on L2-normalised features: votes `exp(sim / τ)` of the k nearest train samples."""
    if (train.labels < 0).any() or (val.labels < 0).any():
        raise ValueError("k-NN evaluation needs labeled shard sets")
    bank = F.normalize(train.features, dim=1)
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    k = min(k, bank.shape[0])
    top1 = top5 = 0
    for start in range(0, val.features.shape[0], chunk):
        query = F.normalize(val.features[start:start + chunk], dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes)
        votes.scatter_add_(1, train.labels[idx], (sim / temperature).exp())
        t1, t5 = _topk_hits(votes, val.labels[start:start + chunk])
        top1, top5 = top1 + t1, top5 + t5
    n = val.features.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "k": k, "temperature": temperature}


def linear_probe(train: Features, val: Features, *, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """A linear classifier on frozen, standardised pooled features (SGD, momentum 0.9, cosine, wd 0)."""
    if (train.labels < 0).any() or (val.labels < 0).any():
        raise ValueError("linear evaluation needs labeled shard sets")
    mean, std = train.features.mean(0), train.features.std(0) + 1e-6
    x_train, x_val = (train.features - mean) / std, (val.features - mean) / std
    num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(x_train[idx]), train.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    with torch.no_grad():
        top1, top5 = _topk_hits(probe(x_val), val.labels)
    n = x_val.shape[0]
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "epochs": epochs, "lr": lr}


def backbone_from_checkpoint(path: Path) -> tuple[nn.Module, int]:
    """The trained backbone of a checkpoint and the image size it was trained at."""
    checkpoint = load_checkpoint(path)
    config = config_from_dict(yaml.safe_load(checkpoint["config"]))
    backbone, _ = build_backbone(config.model)
    backbone.load_state_dict(backbone_state_dict(checkpoint))
    return backbone, config.data.image_size


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="picstream-eval", description=__doc__)
    parser.add_argument("protocol", choices=("knn", "linear"))
    parser.add_argument("--checkpoint", type=Path, help="training checkpoint (omit with --random-init)")
    parser.add_argument("--random-init", metavar="ARCH",
                        help="evaluate a randomly initialised ARCH instead (the baseline)")
    parser.add_argument("--cifar-stem", action="store_true", help="with --random-init")
    parser.add_argument("--train", required=True, help="labeled shard manifest (path or URL)")
    parser.add_argument("--val", required=True, help="labeled shard manifest (path or URL)")
    parser.add_argument("--image-size", type=int, help="default: the training image size")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    parser.add_argument("--lr", type=float, default=0.1, help="linear probe learning rate")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("-o", "--output", type=Path, help="write the result as JSON")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.random_init is None):
        parser.error("give exactly one of --checkpoint and --random-init")
    try:
        if args.checkpoint is not None:
            backbone, image_size = backbone_from_checkpoint(args.checkpoint)
        else:
            torch.manual_seed(args.seed)
            model = ModelConfig(arch=args.random_init, cifar_stem=args.cifar_stem)
            check_backbone(model, [args.image_size or 224])
            (backbone, _), image_size = build_backbone(model), 224
        device = resolve_device(args.device)
        backbone.to(device)
        kwargs = dict(image_size=args.image_size or image_size, batch_size=args.batch_size,
                      workers=args.workers, device=device)
        train, val = extract_splits(backbone, args.train, args.val, **kwargs)
        if args.protocol == "knn":
            result = knn_classify(train, val, k=args.k, temperature=args.temperature)
        else:
            result = linear_probe(train, val, epochs=args.epochs, lr=args.lr, seed=args.seed)
    except (ValueError, FileNotFoundError, ConfigError, ShardsError) as err:
        print(f"picstream-eval: error: {err}", file=sys.stderr)
        return 2
    result = {"protocol": args.protocol, **result}
    print(json.dumps(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
