"""Learning quality on real images: PIC through the row store beats random init; cosine beats plain.

CIFAR-10 from ../shared/data, ResNet-18 with the ImageNet stem at 32 px (the CIFAR stem is ~10x
slower on CPU). PIC needs many visits per instance, so the CI budget (25k samples, ~3 min a run
on 2 cores) pre-trains on 250 images for 100 epochs through the row store (K = 128 < N) and
evaluates k-NN with a 3000-image bank on 1000 test images. Measured on 2 cores: random init 28.3,
PIC cosine 35.5, PIC plain 19.4 (~8 min for the whole test).
"""

import pytest
import torch

from picstream.config import load_config
from picstream.evaluate import extract_splits, knn_classify
from picstream.model import PICNet
from picstream.reproduce.runner import class_subset
from picstream.shards import make_shards
from picstream.train import Trainer

PRETRAIN_PER_CLASS, BANK_PER_CLASS, TEST_PER_CLASS = 25, 300, 100
BUDGET = [
    "model.arch=resnet18", "model.head_hidden=512", "data.image_size=32", "data.workers=0",
    "augment.blur_p=0", "optim.batch_size=125", "optim.base_lr=0.24", "optim.base_batch_size=125",
    "optim.epochs=100", "optim.warmup_epochs=1", "classifier.recent_k=128", "classifier.chunk_rows=32",
    "schedule.window=128", "schedule.stride=32", "train.log_every=10", "train.checkpoint_every=100000",
]


@pytest.fixture(scope="module")
def cifar_shards(cifar10_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar-shards")
    out = {}
    for name, split, per_class in (("pretrain", "train", PRETRAIN_PER_CLASS), ("bank", "train", BANK_PER_CLASS),
                                   ("test", "test", TEST_PER_CLASS)):
        make_shards(str(class_subset(cifar10_dir / split, root / "src" / name, per_class)), str(root / name),
                    shard_size=512, seed=0, progress=False)
        out[name] = root / name / "manifest.json"
    return out


def knn_top1(backbone, shards):
    train, test = extract_splits(backbone, shards["bank"], shards["test"], image_size=32, workers=0)
    return knn_classify(train, test, k=200, temperature=0.07)["top1"]


def train_and_eval(tmp_path, shards, *extra):
    config = load_config(None, BUDGET + [f"data.train={shards['pretrain']}", f"run.output_dir={tmp_path}", *extra])
    trainer = Trainer(config, show_progress=False)
    trainer.run()
    trainer.close()
    return knn_top1(trainer.model.backbone, shards), config


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a hang guard only: ~8 min normally, 15+ on a loaded 2-core machine
def test_pic_learns_and_cosine_beats_plain(tmp_path, cifar_shards):
    cosine, config = train_and_eval(tmp_path / "cosine", cifar_shards)
    torch.manual_seed(config.run.seed)
    random_init = knn_top1(PICNet(config.model).backbone, cifar_shards)
    plain, _ = train_and_eval(tmp_path / "plain", cifar_shards, "classifier.loss=plain")
    print(f"kNN top-1: random init {random_init:.1f}, PIC cosine {cosine:.1f}, PIC plain {plain:.1f}")
    assert cosine >= random_init + 5.0, (random_init, cosine)
    assert cosine > plain, (cosine, plain)
