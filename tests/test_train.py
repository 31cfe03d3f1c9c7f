"""End-to-end training: CLI errors, export/eval of a run (kills and resumes: test_train_crash.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picstream.checkpoint import list_checkpoints, load_checkpoint
from picstream.config import load_config
from picstream.distributed import World
from picstream.evaluate import main as eval_main
from picstream.train import build_scheduler
from picstream.train_data import open_train_set, train_loader_from_config

TINY = [
    "model.arch=resnet18", "model.head_hidden=64", "model.feature_dim=16", "data.image_size=32",
    "data.workers=1", "optim.batch_size=32", "optim.epochs=3", "optim.warmup_epochs=1",
    "optim.base_lr=0.1", "optim.base_batch_size=32", "classifier.recent_k=128", "classifier.chunk_rows=32",
    "schedule.window=128", "schedule.stride=32", "train.log_every=1", "train.checkpoint_every=5",
    "train.keep_checkpoints=10",
]


def train_cmd(run_dir: Path, train_manifest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "picstream.train", "--config", str(Path(__file__).parents[1] / "configs/demo.yaml"),
            f"run.output_dir={run_dir}", f"data.train={train_manifest}", *TINY, *extra]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_loader_pins_batches_only_for_cuda(shapes_shards, device, pinned):
    """Training on CUDA gets the loader's batches pinned (host-to-device copies that do not block);
    on the CPU they are not. Building the loader touches no device, so both are checked here."""
    train, _ = shapes_shards
    config = load_config(Path(__file__).parents[1] / "configs/demo.yaml", [f"data.train={train}", *TINY])
    shards = open_train_set(str(train))
    loader = train_loader_from_config(config, shards, build_scheduler(config, len(shards)), World(),
                                      torch.device(device), start_step=0, num_steps=1)
    try:
        assert loader.pin_memory is pinned
    finally:
        loader.close()


def test_bad_config_is_one_clear_error(tmp_path, shapes_shards):
    train, _ = shapes_shards
    result = subprocess.run(train_cmd(tmp_path / "r", train, "optim.batchsize=3"), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "picstream-train: error: unknown config key 'optim.batchsize'; allowed here: batch_size, base_lr, "
        "base_batch_size, momentum, weight_decay, epochs, warmup_epochs, name, backbone_lr, "
        "backbone_weight_decay, backbone_weight_decay_end, betas, lars_trust, clip_grad, clip_mode"]


def test_run_exports_and_evaluates(tmp_path, shapes_shards):
    train, val = shapes_shards
    run_dir = tmp_path / "run"
    subprocess.run(train_cmd(run_dir, train, "train.max_steps=6", "classifier.sampling=full"), check=True,
                   capture_output=True, timeout=600)
    config_saved = (run_dir / "config.yaml").read_text()
    assert "sampling: full" in config_saved
    ckpt = list_checkpoints(run_dir / "checkpoints")[-1]
    out = tmp_path / "knn.json"
    assert eval_main(["knn", "--checkpoint", str(ckpt), "--train", str(train), "--val", str(val),
                      "--workers", "0", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "knn" and 0 <= result["top1"] <= 100 and result["top5"] >= result["top1"]
