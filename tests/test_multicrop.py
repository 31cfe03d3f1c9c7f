"""Multi-crop training: one step against a hand-computed sum of per-view losses, config checks, and
a trainer run that resumes bit-identically with extra crops."""
from __future__ import annotations

import copy
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from picstream.checkpoint import list_checkpoints, load_checkpoint
from picstream.config import ConfigError, config_changes, load_config
from picstream.rowstore import init_rows
from picstream.train import Trainer, step_seed
from test_train import losses, train_cmd

N, B, TAU, SEED = 64, 16, 0.2, 3
CONFIG = ["data.train=unused", "run.device=cpu", "data.workers=0", "model.arch=resnet18",
          "model.head_hidden=32", "model.feature_dim=16", "data.image_size=32", "optim.batch_size=16",
          "optim.base_batch_size=16", "optim.epochs=4", "optim.warmup_epochs=0", "optim.weight_decay=0.01",
          "classifier.recent_k=64", "classifier.chunk_rows=16", "schedule.window=64",
          "schedule.stride=16", f"run.seed={SEED}", "classifier.temperature=0.2",
          "data.multi_crop=[[16, 2, 0.1, 0.3]]"]


def make_trainer(tmp_path, *extra):
    config = load_config(None, CONFIG + [f"run.output_dir={tmp_path}", *extra])
    return Trainer(config, show_progress=False, num_instances=N)


def hand_step(model, rows, views, targets, rows_from):
    """The multi-crop loss written out: mean over views of CE(cos(z_v, w)/τ) → (model grads, row grad)."""
    w = rows.clone().requires_grad_(True)
    per_view = []
    for v, x in enumerate(views):
        z = F.normalize(model(x), dim=1)
        wv = w if v == 0 or rows_from == "all" else w.detach()
        per_view.append(F.cross_entropy(z @ F.normalize(wv, dim=1).t() / TAU, targets))
    loss = sum(per_view) / len(per_view)
    loss.backward()
    return loss, {k: p.grad for k, p in model.named_parameters()}, w.grad


@pytest.mark.parametrize("sampling", ["recent", "full"])
@pytest.mark.parametrize("rows_from", ["main", "all"])
def test_multi_crop_step_equals_hand_computed_sum_of_view_losses(tmp_path, sampling, rows_from):
    trainer = make_trainer(tmp_path, f"classifier.sampling={sampling}", f"classifier.multi_crop_rows={rows_from}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.from_numpy(np.random.default_rng(0).choice(N, B, replace=False))
    views = [torch.randn(B, 3, 32, 32, generator=gen)] + [torch.randn(B, 3, 16, 16, generator=gen)
                                                          for _ in range(2)]
    model = copy.deepcopy(trainer.model)
    w0 = torch.from_numpy(init_rows(SEED, np.arange(N), 16, np.float32))
    # the rows every view is scored against: the batch's (recent, fresh store) or all N (full)
    rows, targets = (w0[ids], torch.arange(B)) if sampling == "recent" else (w0, ids)
    loss, grads, row_grad = hand_step(model, rows, views, targets, rows_from)

    result = trainer.train_step(0, views[0], ids, views[1:])
    lr, wd = result["lr"], 0.01
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    got = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    want = torch.cat([grads[name].flatten() for name, _ in trainer.model.named_parameters()])
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()   # float32 sums in another order
    # first SGD step of a row: u = g + λw, w ← w − η·u
    if sampling == "recent":
        got = torch.from_numpy(trainer.classifier.rows.peek(ids.numpy())[0])
    else:
        got = trainer.classifier.weight.detach()[ids]
    want = rows - lr * (row_grad + wd * rows)
    torch.testing.assert_close(got, want[:B] if sampling == "recent" else want[ids], rtol=1e-5, atol=1e-6)
    # the extra views really reached the rows only with rows_from=all
    _, _, main_only = hand_step(copy.deepcopy(model), rows, views[:1], targets, "main")
    assert torch.allclose(row_grad * 3, main_only, atol=1e-7) == (rows_from == "main")
    trainer.close()


def test_extra_views_are_augmented_with_their_own_seed(tmp_path):
    """uint8 views (the accelerator path): view v is colour-augmented by Generator(seed, step, v)."""
    trainer = make_trainer(tmp_path, "augment.blur_p=0")
    images = torch.randint(0, 256, (B, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = [trainer._view_input(5, v, images) for v in range(3)]
    for v, x in enumerate(got):
        want = trainer.augment(images, torch.Generator().manual_seed(step_seed(SEED, 5, v)))
        assert torch.equal(x, want)
    assert not torch.equal(got[1], got[2])
    assert step_seed(SEED, 5) == step_seed(SEED, 5, 0)
    trainer.close()


def test_multi_crop_config_is_checked_and_changes_training(tmp_path):
    base = CONFIG[:-1] + [f"run.output_dir={tmp_path}"]
    for bad in ("[[96]]", "[[96, 0]]", "[[96, 1.5]]", "[[96, 3, 0.2, 0.1]]", "[[96, 3, 0.1]]"):
        with pytest.raises(ConfigError, match=r"data.multi_crop\[0\]"):
            load_config(None, base + [f"data.multi_crop={bad}"])
    with pytest.raises(ConfigError, match="multi_crop_rows"):
        load_config(None, base + ["classifier.multi_crop_rows=some"])
    plain = load_config(None, base)
    multi = load_config(None, base + ["data.multi_crop=[[16, 2]]", "classifier.multi_crop_rows=all"])
    refused, accepted = config_changes(plain, multi)
    assert len(refused) == 2 and not accepted


def test_trainer_loader_yields_the_configured_crops(tmp_path, shapes_shards):
    train, _ = shapes_shards
    config = load_config(None, CONFIG + [f"run.output_dir={tmp_path}", f"data.train={train}",
                                         "data.multi_crop=[[16, 2, 0.1, 0.3], [24, 1]]"])
    trainer = Trainer(config, show_progress=False)
    with trainer.make_loader() as loader:
        batch = next(iter(loader))
    assert [tuple(c.shape) for c in batch.extra_crops] == [(B, 3, 16, 16)] * 2 + [(B, 3, 24, 24)]
    assert [s.scale for s in loader.specs] == [(0.2, 1.0), (0.1, 0.3), (0.1, 0.3), (0.2, 1.0)]
    trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_multi_crop_run_resumes_bit_identical(tmp_path, shapes_shards, workers):
    """A run with extra crops, resumed from its first checkpoint, ends exactly like the uninterrupted
    run (workers=1: colour augmentation in the loader's workers; 0: in the trainer)."""
    train, _ = shapes_shards
    run_dir = tmp_path / "run"
    extra = ("data.multi_crop=[[16, 2, 0.1, 0.4]]", f"data.workers={workers}", "optim.epochs=2")
    for resume in ("auto", str(run_dir / "checkpoints" / "ckpt-000000005.pt")):
        done = subprocess.run(train_cmd(run_dir, train, *extra) + ["--resume", resume],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        if resume == "auto":
            first_losses = losses(run_dir)
            first = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert f"resumed from {resume}" in done.stderr
    assert losses(run_dir) == first_losses and len(first_losses) == 20
    again = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    for key, value in first["model"].items():
        assert torch.equal(value, again["model"][key]), key
    for name, value in first["classifier"]["rows"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again["classifier"]["rows"][name]), name
