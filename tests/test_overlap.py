"""classifier.overlap: the deferred write-back of evicted rows and the read-ahead of the next
admission's rows, corrected ahead, are bit-identical to the synchronous path (losses, model, every
resident and stored row, the log), a wrong read-ahead hint falls back to the synchronous read, a
wrong learning rate to the correction in the admission, a failed read-ahead is raised at the next
admission, and ``auto`` turns overlap on after its self-check."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from picstream.classifier import resolve_overlap
from picstream.config import load_config
from picstream.rowstore import RecentRows, RowStore, TransitionLog
from picstream.rowstore.overlap import _run, overlap_matches_synchronous
from picstream.train import Trainer

N, B, K, STEPS = 96, 16, 32, 10
CONFIG = ["data.train=unused", "run.device=cpu", "data.workers=0", "model.arch=resnet18",
          "model.head_hidden=32", "model.feature_dim=16", "data.image_size=16", f"optim.batch_size={B}",
          f"optim.base_batch_size={B}", "optim.epochs=100", "optim.warmup_epochs=0",
          f"classifier.recent_k={K}", "classifier.chunk_rows=16", f"schedule.window={N}",
          f"schedule.stride={B}", "data.multi_crop=[[8, 1]]"]


def run(tmp_path, overlap: str, stream: str = "random", fold_steps: int = 1024):
    """A short run whose every step after the second evicts rows, each step naming the next one's
    IDs and its learning rate for read-ahead: a ``random`` stream (re-admitting rows evicted the
    step before; hinted through the classifier) or the ``scheduler``'s (hinted by
    ``Trainer.prefetch_rows``, as in the training loop); the log folded every ``fold_steps`` steps.
    (losses, model state, resident rows, log, every stored row after a commit, whether each store
    write ran on the main thread, reads, steps whose read ahead brought back rows evicted the step
    before, corrections)."""
    config = load_config(None, CONFIG + [f"run.output_dir={tmp_path / overlap / stream}",
                                         f"classifier.overlap={overlap}"])
    trainer = Trainer(config, show_progress=False, num_instances=N)
    rows, store = trainer.classifier.rows, trainer.classifier.store
    rows.compact_min_steps = fold_steps
    on_main, write = [], store.write

    def recorded_write(*args):
        on_main.append(threading.current_thread() is threading.main_thread())
        write(*args)
    store.write = recorded_write
    gen = torch.Generator().manual_seed(0)
    random = np.random.default_rng(0)
    batches = ([random.choice(N, B, replace=False) for _ in range(STEPS + 1)] if stream == "random" else
               [trainer.scheduler.ids_at(step * B, (step + 1) * B) for step in range(STEPS + 1)])
    losses, returning, evicted = [], [], set()
    for step in range(STEPS):
        if stream == "random":
            trainer.classifier.read_ahead(batches[step + 1], trainer.lr_at(step))
        else:
            trainer.prefetch_rows(step)
        images = torch.randint(0, 256, (B, 3, 16, 16), dtype=torch.uint8, generator=gen)
        crop = torch.randint(0, 256, (B, 3, 8, 8), dtype=torch.uint8, generator=gen)
        before, ahead = set(rows._slot_of), rows.reads["ahead"]
        losses.append(trainer.train_step(step, images, torch.from_numpy(batches[step]), [crop])["loss"])
        if rows.reads["ahead"] > ahead and evicted & set(batches[step].tolist()):
            returning.append(step)
        evicted = before - set(rows._slot_of)       # by this step's admission
    state = trainer.classifier.commit_state()
    stored = trainer.classifier.store.read(np.arange(N))
    model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    return (torch.stack(losses), model, state["rows"], state["log"], stored, on_main, rows.reads,
            returning, rows.corrections)


@pytest.mark.parametrize("stream,fold_steps", [("random", 1024), ("scheduler", 1024), ("random", 2)],
                         ids=["random", "scheduler", "random-folded"])
def test_overlap_on_equals_off_bit_for_bit(tmp_path, stream, fold_steps):
    on, off = (run(tmp_path / f"{fold_steps}", o, stream, fold_steps) for o in ("on", "off"))
    assert on[5] and not any(on[5]) and all(off[5])  # on: every write left for the background thread
    assert on[6] == {"ahead": STEPS - 1, "here": 1}  # every admission after the first read ahead
    assert off[6]["here"] == STEPS and "ahead" not in off[6]
    assert on[8] == {"ahead": STEPS - 1, "here": 1}  # ... and brought its rows forward there too
    assert off[8] == {"here": STEPS}
    if fold_steps < STEPS:
        assert on[3]["offset"] > 0, "the log was never folded"
    if stream == "random":
        assert on[7], "no read ahead brought back a row evicted the step before"
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


def rows_of(tmp_path, name: str, overlap: bool) -> RecentRows:
    store = RowStore.create(str(tmp_path / f"{name}.zarr"), 64, 8, chunk_rows=16)
    return RecentRows(store, TransitionLog(0.9, 1e-4), 16, overlap=overlap)


@pytest.mark.parametrize("ahead,lr", [(1, "right"), (2, "right"), (1, "wrong"), (1, "none")],
                         ids=["right-hint", "wrong-hint", "wrong-lr", "no-lr"])
def test_read_ahead_is_used_only_for_the_rows_predicted(tmp_path, ahead, lr):
    """RecentRows alone: every admission names the next batch (1) or the one after it (2, a wrong
    hint: the read ahead is dropped and the store read in the admission), with the step's learning
    rate, twice it (a wrong one: the correction ahead is dropped and done in the admission) or none
    (no correction ahead); all equal overlap off, the log folded on the way."""
    on_rows, on_store, on_reads, on_corr, on_log = _run(True, tmp_path, torch.device("cpu"),
                                                        torch.float32, ahead, lr)
    off_rows, off_store, off_reads, off_corr, off_log = _run(False, tmp_path, torch.device("cpu"),
                                                             torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(on_rows, off_rows))
    assert all(np.array_equal(a, b) for a, b in zip(on_store, off_store)) and (on_store[2] > 0).any()
    assert on_reads == ({"ahead": 11, "here": 1} if ahead == 1 else {"here": 12})
    assert off_reads == {"here": 12}
    assert on_corr == ({"ahead": 11, "here": 1} if (ahead, lr) == (1, "right") else {"here": 12})
    assert off_corr == {"here": 12}
    assert on_log.keys() == off_log.keys() and on_log["offset"] > 0
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in ((on_log[k], off_log[k]) for k in on_log))


def test_log_copy_is_independent_and_equals_compares_bit_for_bit():
    """The correction ahead runs on a copy of the log; the admission compares it with its own."""
    log = TransitionLog(0.9, 1e-4)
    for lr in (0.1, 0.05, 0.0):
        log.append(lr)
    copy = log.copy()
    assert copy.equals(log)
    copy.append(0.01)
    assert log.num_steps == 3 and not copy.equals(log)
    log.append(0.01)
    assert copy.equals(log)
    copy.compact(2)
    assert not copy.equals(log)
    log.compact(2)
    assert copy.equals(log)
    zero, negative_zero = log.copy(), log.copy()
    zero.append(0.0)
    negative_zero.append(-0.0)                      # equal as numbers, not as bits
    assert not zero.equals(negative_zero)


def test_read_ahead_after_a_restore_is_dropped(tmp_path):
    """A read ahead that a state load overtook (the store and slot table may be others) is not used."""
    rows = rows_of(tmp_path, "restored", overlap=True)
    rows.admit(np.arange(8))
    state = rows.state_dict()
    rows.read_ahead(np.arange(8, 16))
    rows.load_state_dict(state)
    rows.admit(np.arange(8, 16))
    assert rows.reads == {"here": 2}
    rows.close()


def test_a_failed_read_ahead_is_raised_at_the_next_admission(tmp_path):
    rows = rows_of(tmp_path, "failing", overlap=True)
    rows.admit(np.arange(8))

    def broken(ids):
        raise OSError(28, "No space left on device")
    rows.store.read = broken
    rows.read_ahead(np.arange(8, 16))
    with pytest.raises(OSError, match="No space left"):
        rows.admit(np.arange(8, 16))
    rows.close()                                    # raised once: nothing left to raise
