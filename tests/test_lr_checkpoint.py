import math

import pytest
import torch

from picstream.checkpoint import (latest_valid_checkpoint, list_checkpoints, load_checkpoint,
                                  prune_checkpoints, save_checkpoint)
from picstream.lr_schedule import warmup_cosine_lr


def test_warmup_then_cosine():
    lrs = [warmup_cosine_lr(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert warmup_cosine_lr(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)


def test_checkpoints_atomic_prune_and_corrupt_fallback(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step))})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000010.pt", "ckpt-000000020.pt",
                                                            "ckpt-000000030.pt"]
    prune_checkpoints(tmp_path, keep=2)
    assert len(list_checkpoints(tmp_path)) == 2
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # a torn write
    messages = []
    path, state = latest_valid_checkpoint(tmp_path, log=messages.append)
    assert state["step"] == 20 and torch.equal(state["w"], torch.full((3,), 20.0))
    assert "unreadable" in messages[0]
    with pytest.raises(ValueError):
        load_checkpoint(newest)


def test_checkpoint_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "ckpt-000000001.pt"
    torch.save({"format": "picstream-checkpoint-1", "x": Evil()}, path)
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(path)
