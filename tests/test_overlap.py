"""classifier.overlap: the deferred write-back of evicted rows is bit-identical to the synchronous
path (losses, model, every resident and stored row), and ``auto`` turns it on after its self-check."""
from __future__ import annotations

import numpy as np
import torch

from picstream.classifier import resolve_overlap
from picstream.config import load_config
from picstream.rowstore.overlap import overlap_matches_synchronous
from picstream.train import Trainer

N, B, K, STEPS = 96, 16, 32, 10
CONFIG = ["data.train=unused", "run.device=cpu", "data.workers=0", "model.arch=resnet18",
          "model.head_hidden=32", "model.feature_dim=16", "data.image_size=16", f"optim.batch_size={B}",
          f"optim.base_batch_size={B}", "optim.epochs=100", "optim.warmup_epochs=0",
          f"classifier.recent_k={K}", "classifier.chunk_rows=16", f"schedule.window={N}",
          f"schedule.stride={B}", "data.multi_crop=[[8, 1]]"]


def run(tmp_path, overlap: str):
    """A short run whose every step after the second evicts rows, re-admitting rows evicted the
    step before: (losses, model state, resident rows, every stored row after a commit, deferred?)."""
    config = load_config(None, CONFIG + [f"run.output_dir={tmp_path / overlap}", f"classifier.overlap={overlap}"])
    trainer = Trainer(config, show_progress=False, num_instances=N)
    gen = torch.Generator().manual_seed(0)
    stream = np.random.default_rng(0)
    losses, deferred = [], []
    for step in range(STEPS):
        ids = torch.from_numpy(stream.choice(N, B, replace=False))
        images = torch.randint(0, 256, (B, 3, 16, 16), dtype=torch.uint8, generator=gen)
        crop = torch.randint(0, 256, (B, 3, 8, 8), dtype=torch.uint8, generator=gen)
        losses.append(trainer.train_step(step, images, ids, [crop])["loss"])
        deferred.append(trainer.classifier.rows._pending is not None)
    state = trainer.classifier.commit_state()
    stored = trainer.classifier.store.read(np.arange(N))
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    return torch.stack(losses), model, state["rows"], state["log"], stored, deferred


def test_overlap_on_equals_off_bit_for_bit(tmp_path):
    on, off = run(tmp_path, "on"), run(tmp_path, "off")
    assert all(on[5][2:]) and not any(off[5])      # on: every evicting step left its write for later
    assert torch.equal(on[0], off[0])
    assert on[1].keys() == off[1].keys() and all(torch.equal(on[1][k], off[1][k]) for k in on[1])
    for part in (2, 3):                             # resident rows and slot table; transition log
        assert on[part].keys() == off[part].keys()
        for key in on[part]:
            a, b = on[part][key], off[part][key]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    assert all(np.array_equal(a, b) for a, b in zip(on[4], off[4]))
    assert (on[4][2] > 0).any()                     # some rows really went through the store


def test_overlap_setting_and_auto_self_check():
    assert resolve_overlap("on", "cpu", torch.float32) and not resolve_overlap("off", "cpu", torch.float32)
    assert overlap_matches_synchronous(torch.device("cpu"), torch.float32)
    assert resolve_overlap("auto", "cpu", torch.float32)
    said = []
    assert not resolve_overlap("auto", "cpu", torch.float32, said.append, check=lambda device, dtype: False)
    assert said == ["note: classifier.overlap = auto: deferred row write-back differs from the "
                    "synchronous path on cpu; training with classifier.overlap = off"]
    for raw, want in (("true", "on"), ("false", "off"), ("on", "on"), ("auto", "auto")):
        assert load_config(None, ["data.train=x", f"classifier.overlap={raw}"]).classifier.overlap == want
