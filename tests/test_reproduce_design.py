"""The CPU reproduction scale's design: its backbone, the missed steps it promises, the stated test."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from picstream.config import ConfigError, ModelConfig, load_config
from picstream.model import PICNet
from picstream.reproduce.grids import SCALES, missed_steps
from picstream.reproduce.stats import compare
from picstream.scheduler import EpochScheduler


def simulated_missed_steps(n: int, batch: int, k: int, epochs: int, seed: int = 0) -> float:
    """Mean steps between two visits of a row during which it is not among the last K admitted rows,
    counted on the real epoch scheduler's stream."""
    steps = epochs * n // batch
    ids = EpochScheduler(n, seed).ids_at(0, steps * batch).reshape(steps, batch)
    held = k // batch
    last = np.full(n, -1)
    missed = []
    for step, rows in enumerate(ids):
        seen = last[rows]
        for t in seen[seen >= 0]:
            # resident at steps t .. t + held - 1 (unless refreshed; a row appears once per epoch)
            missed.append(max(0, step - t - held))
        last[rows] = step
    return float(np.mean(missed))


@pytest.mark.parametrize("k", [100, 200, 400])
def test_missed_steps_match_the_epoch_scheduler_stream(k):
    assert missed_steps(5000, 100, k) == pytest.approx(simulated_missed_steps(5000, 100, k, epochs=30), abs=0.3)


def test_cpu_scale_revisits_a_row_after_50_steps_and_keeps_at_most_4_steps_of_negatives():
    cpu = SCALES["cpu"]
    base = dict(o.split("=", 1) for o in cpu.base)
    n, batch = 10 * cpu.per_class[0], int(base["optim.batch_size"])
    assert n >= 5000 and n // batch >= 50 and base["schedule.scheduler"] == "epoch"
    assert all(batch <= k <= 4 * batch for k in cpu.recent_k)


def test_quarter_resnet_gives_its_feature_width_and_linear_head():
    net = PICNet(ModelConfig(arch="resnet18_quarter", head_hidden=64, feature_dim=16))
    assert net.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    linear = PICNet(ModelConfig(arch="resnet18_quarter", head="linear", feature_dim=16))
    assert isinstance(linear.head, torch.nn.Linear) and linear.head.in_features == 128
    assert sum(p.numel() for p in net.backbone.parameters()) < 11_700_000 / 10


def test_quarter_resnet_refuses_group_norm_and_cifar_stem():
    for bad in ("model.norm=group", "model.cifar_stem=true"):
        with pytest.raises(ConfigError, match="resnet18_quarter"):
            load_config(None, ["data.train=x", "model.arch=resnet18_quarter", bad])
    with pytest.raises(ConfigError, match="model.head"):
        load_config(None, ["data.train=x", "model.head=deep"])


def test_welch_and_bootstrap_on_known_samples():
    c = compare([40.0, 41.0, 42.0], [30.0, 31.0, 32.0])
    assert c.gap == pytest.approx(10.0) and c.p < 1e-3            # t = 12.2 on 4 degrees of freedom
    assert 8.0 <= c.ci[0] < 10.0 < c.ci[1] <= 12.0
    # se = sqrt(2/3); t(0.975, 4) + t(0.8, 4) = 2.776 + 0.941
    assert c.detectable == pytest.approx((2.776 + 0.941) * (2 / 3) ** 0.5, rel=1e-3)
    assert compare([40.0, 35.0, 38.0], [38.0, 36.0, 37.0]).p > 0.5


def test_a_run_is_reused_only_with_the_same_settings_data_and_seed(tmp_path):
    from picstream.reproduce.runner import _same_run

    scale = SCALES["cpu"]
    run = tmp_path / "cpu" / "table1" / "cosine-s0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  train: data/cpu-pretrain/manifest.json\n")
    (run / "result.json").write_text(json.dumps({"settings": {"optim": {"epochs": 20}}, "top1": 35.0,
                                                 "config": "cpu/table1/cosine-s0/config.yaml"}))
    same = _same_run(tmp_path, scale, {"optim": {"epochs": 20}}, 0, Path("data/cpu-pretrain/manifest.json"))
    assert same["top1"] == 35.0 and same["same_as"] == "cpu/table1/cosine-s0"
    assert _same_run(tmp_path, scale, {"optim": {"epochs": 20}}, 0, Path("data/cpu-pretrain-100pc/manifest.json")) is None
    assert _same_run(tmp_path, scale, {"optim": {"epochs": 5}}, 0, Path("data/cpu-pretrain/manifest.json")) is None
    assert _same_run(tmp_path, scale, {"optim": {"epochs": 20}}, 1, Path("data/cpu-pretrain/manifest.json")) is None


def test_scaling_grid_keeps_k_and_epochs_and_multiplies_n():
    from picstream.reproduce.grids import build_grids

    grid = build_grids(SCALES["cpu"])["scaling"]
    assert [v.per_class for v in grid.variants] == [100, 400, 1600]
    assert len({v.overrides for v in grid.variants}) == 1 and "K = 400" in grid.title
    assert build_grids(SCALES["gpu"])["scaling"].variants == ()


def test_interim_claims_use_the_last_monitor_epoch_every_run_reached():
    from picstream.reproduce.grids import build_grids
    from picstream.reproduce.report import _interim

    def curve(*tops):
        return [(3.3 * (i + 1), t) for i, t in enumerate(tops)]

    grid = build_grids(SCALES["cpu"])["table2"]
    progress = {"K=100 exact": [{"seed": s, "knn": curve(20, 24 + s, 30)} for s in range(3)],
                "K=100 none": [{"seed": s, "knn": curve(19, 20 + s * 0.5)} for s in range(3)]}
    lines = _interim(grid, {}, progress)
    assert lines[0].startswith("Not finished yet (training, or interrupted: the grid's command resumes them): "
                               "K=100 exact s0 (epoch 9.9)")
    (claim,) = [line for line in lines if line.startswith("- ")]
    assert claim.startswith("- at epoch 6.6: K=100 exact > K=100 none: 24.0, 25.0, 26.0 vs 20.0, 20.5, 21.0: "
                            "**reproduced**")
    assert _interim(grid, {}, {}) == []
