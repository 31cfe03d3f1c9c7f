"""No host sync in a steady-state step: a sync counter (tests/sync_counter.py) around ``train_step``
for recent and full sampling and multi-crop, on uint8 batches (the accelerator path: colour
augmentation in the step), every step after the first ones evicting rows, each naming the next
step's IDs as the training loop does (with overlap on, the rows are read ahead)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from picstream.config import load_config
from picstream.train import Trainer
from sync_counter import SyncCounter

N, B, K = 96, 16, 32
CONFIG = ["data.train=unused", "run.device=cpu", "data.workers=0", "model.arch=resnet18",
          "model.head_hidden=32", "model.feature_dim=16", "data.image_size=16", f"optim.batch_size={B}",
          f"optim.base_batch_size={B}", "optim.epochs=100", "optim.warmup_epochs=0",
          f"classifier.recent_k={K}", "classifier.chunk_rows=16", f"schedule.window={N}",
          f"schedule.stride={B}", "augment.blur_p=0.5", "augment.solarize_p=0.5"]
WARMUP, STEPS = 4, 3   # the first steps fill the recent set; every step after evicts B rows


def device_tensors(trainer: Trainer):
    """What lives on the device between steps: the model, its optimiser's state, the classifier's rows."""
    yield from trainer.model.parameters()
    yield from trainer.model.buffers()
    for state in (trainer.optimizer.state, getattr(trainer.classifier, "optimizer", None)):
        for values in (state.state if hasattr(state, "state") else state or {}).values():
            yield from (v for v in values.values() if isinstance(v, torch.Tensor))
    clf = trainer.classifier
    if hasattr(clf, "rows"):
        yield from (clf.rows.weight, clf.rows.momentum, clf.rows.valid)
    else:
        yield clf.weight


def syncs_per_step(tmp_path, *extra) -> list[Counter]:
    """The syncs of each steady-state step (this rank's block of each global batch under torchrun);
    with overlap on, every admission after the first must have used the rows read ahead."""
    config = load_config(None, CONFIG + [f"run.output_dir={tmp_path}", *extra])
    trainer = Trainer(config, show_progress=False, num_instances=N)
    block = slice(trainer.world.rank * B // trainer.world.size, (trainer.world.rank + 1) * B // trainer.world.size)
    crops = config.data.multi_crop
    gen = torch.Generator().manual_seed(0)
    order = np.random.default_rng(0).permutation(N)
    counts = []
    batch = lambda step: order[(step * B) % N:(step * B) % N + B]  # noqa: E731
    for step in range(WARMUP + STEPS):
        ids = torch.from_numpy(batch(step))
        trainer.classifier.read_ahead(batch(step + 1))   # the loop's prefetch_rows
        images = torch.randint(0, 256, (B, 3, 16, 16), dtype=torch.uint8, generator=gen)
        extra_crops = [torch.randint(0, 256, (B, 3, int(c[0]), int(c[0])), dtype=torch.uint8, generator=gen)
                       for c in crops for _ in range(int(c[1]))]
        with SyncCounter(device_tensors(trainer), host_generators=[trainer._augment_rng]) as n:
            trainer.train_step(step, images[block], ids[block], [x[block] for x in extra_crops])
        counts.append(n)
    rows = getattr(trainer.classifier, "rows", None)
    assert rows is None or not rows.overlap or rows.reads["here"] <= 1, rows.reads
    trainer.close()
    return counts[WARMUP:]


def test_counter_counts_each_kind_of_sync_on_device_tensors_only():
    w, host = torch.arange(4.0) - 1, torch.arange(4.0)
    with SyncCounter([w]) as n:
        w.sum().item(), bool(w[0]), w.tolist(), w.numpy(), w.cpu()
        w.nonzero(), w.unique(), w[w > 0], torch.masked_select(w, w > 0)
        # (on the CPU an upload returns its source: the copies uploaded are host's, not host)
        (host * 1).to(w.device), torch.tensor([1.0], device=w.device), (host * 1).to(w.device, non_blocking=True)
        down = torch.empty(4)
        down.copy_(w * 2, non_blocking=True)
        down.numpy()
        host.tolist(), host.nonzero(), host.to("cpu"), (host + 1).numpy()   # host work: not counted
    assert n == Counter({"item": 2, "tolist": 1, "numpy": 1, "cpu": 1, "nonzero": 1, "unique": 1,
                         "bool_index": 1, "masked_select": 1, "upload": 2, "wait": 1}), n.sites


@pytest.mark.parametrize("extra", [["classifier.sampling=recent"], ["classifier.sampling=full"],
                                   ["classifier.sampling=recent", "data.multi_crop=[[8, 2]]"]],
                         ids=["recent", "full", "multi-crop"])
def test_steady_state_step_never_waits_for_the_host(tmp_path, extra):
    """classifier.overlap = auto (on, after its self-check on the CPU): no sync at all."""
    counts = syncs_per_step(tmp_path, *extra)
    assert counts == [Counter()] * STEPS, [dict(c.sites) for c in counts]


@pytest.mark.parametrize("sampling", ["recent", "full"])
def test_feature_init_of_first_visits_never_waits_for_the_host(tmp_path, sampling):
    """classifier.row_init = feature: the steady-state steps start new rows (every ID is new until
    step N / B) from their features, and read nothing back either."""
    counts = syncs_per_step(tmp_path, f"classifier.sampling={sampling}", "classifier.row_init=feature")
    assert counts == [Counter()] * STEPS, [dict(c.sites) for c in counts]


def test_synchronous_write_back_waits_for_its_two_downloads(tmp_path):
    """classifier.overlap = off (the oracle): the one sync left is the evicted rows' store write,
    which waits in the step for the copies of their weights and momenta."""
    counts = syncs_per_step(tmp_path, "classifier.overlap=off")
    assert counts == [Counter({"wait": 2})] * STEPS, [dict(c.sites) for c in counts]


@pytest.mark.slow
def test_two_processes_never_wait_for_the_host(tmp_path):
    """2 processes under torchrun (gloo): each rank's steps read 0 too (the sharded softmax included)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).with_name("sync_runner.py")), str(tmp_path / "run"), str(tmp_path / "counts")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        sites = json.loads((tmp_path / f"counts.rank{rank}.json").read_text())
        assert sites == [[]] * STEPS, sites
