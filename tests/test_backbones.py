"""Backbones by name: torchvision and timm archs with their feature width, arch_kwargs, the input sizes a
model takes (multi-crop with ViTs), one-line refusals; and tiny timm ViT / ConvNeXt runs through
picstream-train with AdamW / LARS: a kill and resume bit-identical, 2 processes equal to 1."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from picstream.config import ConfigError, config_changes, load_config
from picstream.model import PICNet, build_backbone
from picstream.train import Trainer
from test_distributed import assert_same, final_state, launch, ok

BASE = ["data.train=unused", "data.image_size=32", "model.head_hidden=32", "model.feature_dim=16"]


def config(*overrides: str):
    return load_config(None, [*BASE, *overrides])


@pytest.mark.parametrize("arch, kwargs, width", [
    ("resnet18", {}, 512), ("regnet_y_400mf", {}, 440),
    ("timm/test_vit", {"img_size": 32}, 64), ("timm/test_convnext", {"drop_path_rate": 0.1}, 64),
    ("timm/test_vit", {"embed_dim": 48, "num_heads": 2}, 48),
])
def test_width_comes_from_the_model(arch, kwargs, width):
    model = config(f"model.arch={arch}").model
    model.arch_kwargs = kwargs
    backbone, got = build_backbone(model)
    assert got == width
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, width)
    assert PICNet(model)(torch.zeros(2, 3, 32, 32)).shape == (2, 16)


def test_arch_kwargs_reach_the_constructor():
    net = PICNet(config("model.arch=timm/test_convnext", "model.arch_kwargs={drop_path_rate: 0.3}").model)
    rates = [m.drop_prob for m in net.backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.3)


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=timm/no_such_model"], "config key 'model.arch': timm has no model 'no_such_model'"),
    (["model.arch=vgg16"], "config key 'model.arch': 'vgg16' is not a torchvision ResNet"),
    (["model.arch=timm/test_vit", "model.arch_kwargs={colour: 1}"],
     "config key 'model.arch_kwargs': timm/test_vit does not build with {\"colour\": 1}: "),
    (["model.arch=timm/test_vit", "model.arch_kwargs={global_pool: ''}"], "not pooled ones of width 64"),
    (["model.arch=timm/test_vit", "model.cifar_stem=true"], "'model.cifar_stem' applies to torchvision"),
    (["model.arch=timm/test_vit", "model.arch_kwargs={dynamic_img_size: false}"],
     "model.arch timm/test_vit does not take 32 px inputs (data.image_size): "),
    # a fixed-size ViT cannot take the 16 px views of multi-crop
    (["model.arch=timm/test_vit", "model.arch_kwargs={dynamic_img_size: false, img_size: 32}",
      "data.multi_crop=[[16, 2]]"],
     "model.arch timm/test_vit does not take 16 px inputs (data.multi_crop): Input height (16) doesn't match "
     "model (32); a timm ViT takes several sizes with model.arch_kwargs.dynamic_img_size=true"),
])
def test_bad_backbones_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_changed_arch_kwargs_change_the_trajectory():
    old, new = config("model.arch=timm/test_vit", "model.arch_kwargs={img_size: 32}"), config("model.arch=timm/test_vit")
    refused, _ = config_changes(old, new)
    assert refused == ["model.arch_kwargs.img_size: 32 -> None"]


def test_multi_crop_with_a_dynamic_size_vit(tmp_path):
    """timm's dynamic_img_size ViT takes the 32 px main view and the 16 px extra views in one step."""
    cfg = config("model.arch=timm/test_vit", "model.arch_kwargs={dynamic_img_size: true}", "data.multi_crop=[[16, 2]]",
                 "optim.batch_size=8", "optim.base_batch_size=8", "classifier.recent_k=32",
                 "classifier.chunk_rows=8", "schedule.window=32", "schedule.stride=8", "data.workers=0",
                 "optim.name=adamw", "optim.backbone_lr=1.0e-3", "optim.backbone_weight_decay=0.05",
                 "run.device=cpu", f"run.output_dir={tmp_path}")
    trainer = Trainer(cfg, show_progress=False, num_instances=32)
    gen = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    ids = torch.from_numpy(np.arange(8))
    result = trainer.train_step(0, torch.randn(8, 3, 32, 32, generator=gen), ids,
                                [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(2)])
    assert np.isfinite(float(result["loss"]))
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()) if a.ndim > 1)
    trainer.close()


# --------------------------------------------------------------------------- through picstream-train
# test_distributed's settings (float64, GroupNorm head), 6 steps. These tiny runs are chaotic: the
# summation-order difference between 1 and 2 processes (1e-16) grows ~10-30x a step (ConvNeXt: 1e-2 in
# the loss after 30 SGD or AdamW steps), and AdamW divides each coordinate by its own RMS, so a gradient
# coordinate near 0 amplifies it further (measured after 6 steps: 5.9e-7 in the ViT's cls_token, the
# losses within 1e-7). So the 2-process oracle is 6 steps at 1e-5; a gradient that is not summed over the
# ranks (AdamW on one half of the batch) puts every ViT tensor >= 7e-4 (median 0.23) away after 6 steps.
STEPS, SHORT, RTOL_2_VS_1 = 6, ["train.max_steps=6", "train.checkpoint_every=3"], 1e-5
ARCHS = {
    "vit": ["model.arch=timm/test_vit", "model.arch_kwargs={img_size: 32}", "optim.name=adamw",
            "optim.backbone_lr=2.0e-3", "optim.backbone_weight_decay=0.04", "optim.backbone_weight_decay_end=0.4",
            "optim.clip_grad=1.0"],
    "convnext": ["model.arch=timm/test_convnext", "optim.name=lars", "optim.backbone_lr=0.05",
                 "optim.backbone_weight_decay=1.0e-4", "optim.clip_grad=0.5", "optim.clip_mode=per_tensor"],
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch_runs(request, shapes_shards, tmp_path_factory):
    """The arch's overrides and its uninterrupted 30-step 1-process run (float64, GroupNorm head)."""
    run_dir = tmp_path_factory.mktemp(f"{request.param}-ref")
    extra = [*ARCHS[request.param], *SHORT]
    ok(launch(1, run_dir, shapes_shards[0], extra=extra))
    return extra, final_state(run_dir, STEPS)


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(arch_runs, shapes_shards, tmp_path):
    extra, reference = arch_runs
    run_dir, log = tmp_path / "run", tmp_path / "io.log"
    killed = launch(1, run_dir, shapes_shards[0], ("kill", "rename:*ckpt-000000003.pt:1:+1"), log, extra=extra)
    assert killed.returncode != 0
    resumed = launch(1, run_dir, shapes_shards[0], extra=extra)
    ok(resumed)
    assert "at step 3" in resumed.stderr
    assert_same(reference, final_state(run_dir, STEPS), rtol=0, steps=STEPS)


@pytest.mark.slow
def test_two_processes_equal_one(arch_runs, shapes_shards, tmp_path):
    extra, reference = arch_runs
    ok(launch(2, tmp_path, shapes_shards[0], extra=extra))
    two = final_state(tmp_path, STEPS)
    assert_same(reference, two, rtol=RTOL_2_VS_1, steps=STEPS)
