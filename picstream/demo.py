"""`picstream-demo`: generate a labeled corpus, shard it, pre-train with PIC, export, and evaluate.

Everything is made here (no downloads); on 2 CPU cores it takes a few minutes. It prints the k-NN
accuracy of the randomly initialised backbone next to the trained one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import latest_valid_checkpoint
from .config import ConfigError, load_config
from .evaluate import backbone_from_checkpoint, extract_splits, knn_classify
from .export import backbone_state_dict, write_export
from .model import PICNet
from .shards import ShardSet, make_shards
from .synthetic import write_corpus
from .train import Trainer


def prepare_shards(root: Path, *, train_per_class: int, val_per_class: int, seed: int,
                   workers: int) -> tuple[Path, Path]:
    """Generate the corpus and shard it (both steps are skipped when already done)."""
    manifests = []
    for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
        manifest = root / f"demo-{split}" / "manifest.json"
        if not manifest.exists():
            images = write_corpus(root / "images" / split, per_class, seed=split_seed)
            make_shards(str(images), str(manifest.parent), shard_size=256, seed=split_seed,
                        workers=workers, progress=False)
        manifests.append(manifest)
    return manifests[0], manifests[1]


def knn_top1(backbone: torch.nn.Module, train: Path, val: Path, image_size: int, workers: int) -> float:
    return knn_classify(*extract_splits(backbone, train, val, image_size=image_size, workers=workers))["top1"]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="picstream-demo", description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--shards", type=Path, default=Path("shards"), help="where the demo shards go")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"picstream-demo: error: {err}", file=sys.stderr)
        return 2
    print("[1/4] generating and sharding the demo corpus ...", flush=True)
    train, val = prepare_shards(args.shards, train_per_class=args.train_per_class,
                                val_per_class=args.val_per_class, seed=config.run.seed,
                                workers=max(1, config.data.workers))
    config.data.train = str(train)

    torch.manual_seed(config.run.seed)
    random_backbone = PICNet(config.model).backbone  # the same initialisation the run starts from
    print(f"[2/4] pre-training ({len(ShardSet.open(str(train)))} images) ...", flush=True)
    Trainer(config).run()

    run_dir = Path(config.run.output_dir)
    path, checkpoint = latest_valid_checkpoint(run_dir / "checkpoints")
    export = run_dir / "backbone-torchvision.pth"
    write_export(backbone_state_dict(checkpoint), "torchvision", export, safetensors=False)
    print(f"[3/4] exported the backbone of {path.name} to {export}", flush=True)

    print("[4/4] k-NN evaluation on the held-out split ...", flush=True)
    trained_backbone, _ = backbone_from_checkpoint(path)
    size, workers = config.data.image_size, config.data.workers
    result = {
        "knn_top1_random_init": knn_top1(random_backbone, train, val, size, workers),
        "knn_top1_trained": knn_top1(trained_backbone, train, val, size, workers),
        "minutes": (time.perf_counter() - started) / 60,
    }
    (run_dir / "demo-result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nk-NN top-1 on {len(ShardSet.open(str(val)))} held-out images:")
    print(f"  random initialisation : {result['knn_top1_random_init']:5.1f} %")
    print(f"  after PIC pre-training: {result['knn_top1_trained']:5.1f} %")
    print(f"done in {result['minutes']:.1f} min; backbone: {export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
