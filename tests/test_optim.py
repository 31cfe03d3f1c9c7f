"""The backbone's optimizers against oracles: torch.optim.SGD / AdamW with hand-made parameter groups
and schedules, a reference LARS step written out per tensor in float64, the two clipping rules; and
the configs that would let the backbone's optimizer reach the classifier rows are refused."""
import math

import pytest
import torch
from torch import nn

from picstream.config import ConfigError, OptimConfig, load_config
from picstream.lr_schedule import cosine_ramp, warmup_cosine_lr
from picstream.optimizers import LARS, apply_schedule, build_optimizer

STEPS, WARMUP = 12, 3


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4, bias=False),
                         nn.BatchNorm1d(4)).double()


def gradients(model: nn.Module, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]


def run(model: nn.Module, optim: OptimConfig) -> None:
    """STEPS steps of picstream's optimizer on fixed random gradients."""
    optimizer = build_optimizer(model, optim)
    for step in range(STEPS):
        for p, g in zip(model.parameters(), gradients(model, step)):
            p.grad = g
        apply_schedule(optimizer, optim, step, STEPS, WARMUP)
        optimizer.step()


def split(model: nn.Module) -> tuple[list, list]:
    """(weights, biases and norms), by hand: the two Linear weights vs everything else."""
    weights = [model[0].weight, model[3].weight]
    return weights, [p for p in model.parameters() if all(p is not w for w in weights)]


def test_sgd_is_todays_single_group_sgd():
    optim = OptimConfig(batch_size=64, base_lr=0.1, base_batch_size=32, momentum=0.9, weight_decay=1e-3)
    ours, ref = toy_model(), toy_model()
    run(ours, optim)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    for step in range(STEPS):
        for p, g in zip(ref.parameters(), gradients(ref, step)):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, STEPS, 0.2, WARMUP)
        opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wd_end", [None, 0.4])
def test_adamw_equals_torch_adamw_with_exempt_norms_and_biases(wd_end):
    optim = OptimConfig(name="adamw", batch_size=512, base_batch_size=256, backbone_lr=5e-4,
                        backbone_weight_decay=0.04, backbone_weight_decay_end=wd_end, betas=[0.9, 0.95])
    ours, ref = toy_model(), toy_model()
    run(ours, optim)
    weights, exempt = split(ref)
    opt = torch.optim.AdamW([{"params": weights}, {"params": exempt, "weight_decay": 0.0}], lr=1e-3,
                            betas=(0.9, 0.95), weight_decay=0.04)
    for step in range(STEPS):
        for p, g in zip(ref.parameters(), gradients(ref, step)):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, STEPS, 1e-3, WARMUP)
        wd = 0.04 if wd_end is None else 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * step / STEPS))
        opt.param_groups[0]["weight_decay"] = wd
        opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)


def test_lars_equals_a_reference_step():
    """You et al.'s LARS as SimCLR / MoCo v3 apply it: weights decayed and scaled by their trust ratio,
    biases and norms plain momentum SGD; written out per tensor in float64."""
    optim = OptimConfig(name="lars", batch_size=256, base_batch_size=256, backbone_lr=0.3,
                        backbone_weight_decay=1e-2, momentum=0.9, lars_trust=0.02)
    ours, ref = toy_model(), toy_model()
    run(ours, optim)
    weights, _ = split(ref)
    momentum = [torch.zeros_like(p) for p in ref.parameters()]
    with torch.no_grad():
        for step in range(STEPS):
            lr = warmup_cosine_lr(step, STEPS, 0.3, WARMUP)
            for i, (p, g) in enumerate(zip(ref.parameters(), gradients(ref, step))):
                if any(p is w for w in weights):
                    g = g + 1e-2 * p
                    g = g * (0.02 * p.norm() / g.norm())
                momentum[i] = 0.9 * momentum[i] + g
                p -= lr * momentum[i]
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_lars_trust_ratio_is_one_for_a_zero_tensor():
    w = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    w.grad = torch.ones_like(w)
    LARS([w], lr=0.5, momentum=0.0, trust_coefficient=0.001).step()
    assert torch.equal(w.detach(), torch.full((3, 2), -0.5, dtype=torch.float64))


def test_lars_resumes_from_its_state_dict():
    optim = OptimConfig(name="lars", backbone_lr=0.1, backbone_weight_decay=1e-4)
    a, b = toy_model(), toy_model()
    opt_a, opt_b = build_optimizer(a, optim), build_optimizer(b, optim)
    for step in range(6):
        for model, opt in ((a, opt_a), (b, opt_b)):
            if step == 3 and model is b:  # b continues from a fresh optimizer loaded with its state
                state = opt_b.state_dict()
                opt_b = opt = build_optimizer(b, optim)
                opt.load_state_dict(state)
            for p, g in zip(model.parameters(), gradients(model, step)):
                p.grad = g
            apply_schedule(opt, optim, step, 6, 1)
            opt.step()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["norm", "per_tensor"])
def test_clipping(mode):
    model = toy_model()
    optimizer = build_optimizer(model, OptimConfig())
    grads = gradients(model, 0)
    for p, g in zip(model.parameters(), grads):
        p.grad = 10 * g
    apply_schedule(optimizer, OptimConfig(clip_grad=1.5, clip_mode=mode), 0, STEPS, WARMUP)
    got = [p.grad for p in model.parameters()]
    total = torch.cat([10 * g.flatten() for g in grads]).norm()
    for g, clipped in zip(grads, got):
        scale = 1.5 / (total + 1e-6) if mode == "norm" else min(1.0, 1.5 / (float((10 * g).norm()) + 1e-6))
        torch.testing.assert_close(clipped, 10 * g * scale, rtol=1e-12, atol=0)
    norms = [float(g.norm()) for g in got]
    assert (sum(n * n for n in norms) ** 0.5 if mode == "norm" else max(norms)) == pytest.approx(1.5, rel=1e-5)


def test_weight_decay_ramp_is_dinos_cosine():
    assert cosine_ramp(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_ramp(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_ramp(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine_ramp(37, 100, 1e-4, 1e-4) == 1e-4  # constant: exactly the value


@pytest.mark.parametrize("overrides, message", [
    (["optim.name=adamw"], "optim.name = adamw needs optim.backbone_lr and optim.backbone_weight_decay: "
                           "optim.base_lr, momentum and weight_decay are the classifier rows' SGD"),
    (["optim.name=lars", "optim.backbone_lr=0.3"], "optim.name = lars needs optim.backbone_lr and"),
    (["optim.clip_grad=0"], "config key 'optim.clip_grad' must be > 0, got 0"),
    (["optim.betas=[0.9, 1.0]"], "config key 'optim.betas' must be [beta1, beta2] in [0, 1)"),
    (["optim.backbone_weight_decay_end=-1"], "'optim.backbone_weight_decay_end' must be >= 0"),
])
def test_bad_optimizer_configs_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.train=x", "model.arch=resnet18", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)
