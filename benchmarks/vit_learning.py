"""A small timm ViT learns with PIC on CPU: k-NN top-1 after pre-training vs its random init.

The learning test's CIFAR-10 subset sizes (the `cpu` scale of tools/reproduce.py: 250 images
pre-trained, k-NN with a 3000-image bank on 1000 test images, the first of each class in the archive), the backbone a 4-block ViT (timm's
vit_tiny_patch16_224 with img_size 32, patch 4, width 128, 4 heads: 64 tokens) trained with AdamW
(DINO's rule: biases and norms undecayed, weight decay 0.04 -> 0.4, per-tensor clipping at 3.0), the
rows with the scale's SGD. ``--quick`` trains 2 epochs (a pipeline check; its numbers mean nothing).

    python benchmarks/vit_learning.py [--quick] [--epochs 100] [--data DIR_OR_ARCHIVE]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_check import extract_cifar  # noqa: E402  (benchmarks/gpu_check.py: a per-class extract)
from picstream.config import load_config  # noqa: E402
from picstream.evaluate import extract_splits, knn_classify  # noqa: E402
from picstream.model import PICNet  # noqa: E402
from picstream.reproduce.cli import default_cifar10  # noqa: E402
from picstream.reproduce.grids import SCALES  # noqa: E402
from picstream.reproduce.runner import base_config, prepare_cifar10  # noqa: E402
from picstream.train import Trainer  # noqa: E402

VIT = ["model.arch=timm/vit_tiny_patch16_224",
       "model.arch_kwargs={img_size: 32, patch_size: 4, embed_dim: 128, depth: 4, num_heads: 4}",
       "optim.name=adamw", "optim.backbone_lr=0.0005", "optim.base_batch_size=125",
       "optim.backbone_weight_decay=0.04", "optim.backbone_weight_decay_end=0.4", "optim.clip_grad=3.0",
       "optim.clip_mode=per_tensor", "optim.warmup_epochs=10"]


def knn_top1(backbone, data) -> float:
    bank, test = extract_splits(backbone, data.bank, data.test, image_size=32, workers=0)
    return knn_classify(bank, test, k=200, temperature=0.07)["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=float, default=100)
    parser.add_argument("--data", type=Path, default=default_cifar10())
    args = parser.parse_args()
    scale = SCALES["cpu"]
    work = Path(tempfile.mkdtemp(prefix="picstream-vit-learning-"))
    source = args.data
    if source.is_file():  # extract only the bank's and the test set's images per class
        source = extract_cifar(source, work / "extracted", scale.per_class[1:])
    data = prepare_cifar10(source, work, scale)
    epochs = 2 if args.quick else args.epochs
    config = load_config(base_config(scale, work), [f"run.output_dir={work / 'run'}", f"data.train={data.pretrain}",
                                                    f"optim.epochs={epochs}", *VIT])
    torch.manual_seed(config.run.seed)  # the initialisation the run starts from
    random_init = knn_top1(PICNet(config.model).backbone, data)
    started = time.perf_counter()
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    trainer.close()
    minutes = (time.perf_counter() - started) / 60
    trained = knn_top1(trainer.model.backbone, data)
    shutil.rmtree(work, ignore_errors=True)
    print("| backbone | epochs | k-NN top-1 random init | k-NN top-1 after PIC | minutes |")
    print("|---|---|---|---|---|")
    print(f"| ViT (4 blocks, width 128, patch 4) | {epochs:g} | {random_init:.1f} | {trained:.1f} | {minutes:.1f} |")
    print(f"RESULT: ViT k-NN top-1 {trained:.1f} after PIC vs {random_init:.1f} at random init "
          f"({trained - random_init:+.1f} points, {trained / random_init:.2f}x)")


if __name__ == "__main__":
    main()
