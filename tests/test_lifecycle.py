"""The run's lifecycle in isolation: registered states saved and restored, the classifier contract,
the recent-K note, and no file of the repository shadowing an installed package."""
from __future__ import annotations

import importlib.metadata
import inspect
import sys
from pathlib import Path

import pytest
import torch

from picstream.classifier import FullClassifier, InstanceClassifier, RecentClassifier, classifier_from_config
from picstream.config import ConfigError, load_config
from picstream.distributed import World
from picstream.lifecycle import PartitionedState, RunLifecycle, TorchRNG
from picstream.train import recent_k_note

ROOT = Path(__file__).parents[1]


class Counter:
    """A toy stateful part, as anything added to the run later would be."""

    def __init__(self):
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def config_for(run_dir: Path, *extra: str):
    return load_config(None, [f"run.output_dir={run_dir}", "data.train=unused", "optim.batch_size=4",
                              "classifier.recent_k=16", "classifier.chunk_rows=8",
                              "model.feature_dim=8", *extra])


def start(config, resume="auto"):
    """What a trainer does at its start: a lifecycle, its parts registered, then resume."""
    life = RunLifecycle(config, World(), resume=resume, info={"num_instances": 64})
    torch.manual_seed(0)
    parts = {"model": torch.nn.Linear(3, 2), "torch_rng": TorchRNG(), "counter": Counter(),
             "classifier": classifier_from_config(config, 64, World(), store_url=life.store_url,
                                                  fresh=life.fresh, run_id=life.run_id, cache_rows=64,
                                                  dtype=torch.float64, device="cpu")}
    parts["optimizer"] = torch.optim.SGD(parts["model"].parameters(), lr=0.1, momentum=0.9)
    for name, part in parts.items():
        life.register(name, part)
    return life, parts, life.resume()


def test_a_registered_part_is_saved_and_restored(tmp_path):
    config = config_for(tmp_path / "run")
    life, parts, step = start(config)
    assert step == 0 and life.fresh
    parts["counter"].value = 41
    with torch.no_grad():
        parts["model"].weight.add_(1.0)
    parts["classifier"].loss([torch.randn(4, 8, dtype=torch.float64)], [1, 2, 3, 4]).backward()
    parts["classifier"].step(0.1)
    path = life.save(7)
    assert life.last_saved == path and path.name == "ckpt-000000007.pt"
    expected_rng = torch.get_rng_state()
    torch.rand(5)
    parts["classifier"].close(flush=False)
    life.close()

    again, restored, step = start(config)
    assert step == 7 and not again.fresh
    assert restored["counter"].value == 41
    assert torch.equal(restored["model"].weight, parts["model"].weight)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert restored["classifier"].rows.peek([1, 2, 3, 4])[0].tolist() == \
        parts["classifier"].rows.peek([1, 2, 3, 4])[0].tolist()
    restored["classifier"].close(flush=False)
    again.close()


def test_registering_twice_or_a_second_partitioned_state_is_refused(tmp_path):
    config = config_for(tmp_path / "run", "classifier.sampling=full")
    life = RunLifecycle(config, World())
    life.register("counter", Counter())
    with pytest.raises(ValueError, match="registered already"):
        life.register("counter", Counter())
    clf = classifier_from_config(config, 64, World(), store_url=life.store_url, fresh=True,
                                 run_id=life.run_id, cache_rows=64, dtype=torch.float32, device="cpu")
    life.register("classifier", clf)
    with pytest.raises(ValueError, match="partitioned state already"):
        life.register("rows", clf)
    with pytest.raises(TypeError):
        life.register("nothing", object())
    life.close()


@pytest.mark.parametrize("cls", [RecentClassifier, FullClassifier])
def test_both_classifiers_implement_the_whole_contract(cls):
    """Every method of the Protocol (the lifecycle's part included), with the same parameters."""
    names = [n for n in dir(InstanceClassifier) if not n.startswith("_") and callable(getattr(InstanceClassifier, n))]
    assert set(n for n in dir(PartitionedState) if not n.startswith("_")) <= set(names)
    for name in names:
        want = list(inspect.signature(getattr(InstanceClassifier, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters) == want, name


def test_full_classifier_refuses_another_world_in_one_line():
    clf = FullClassifier(8, 4, loss="cosine", temperature=0.2, momentum=0.9, weight_decay=0.0, seed=0,
                         device="cpu", dtype=torch.float32)
    with pytest.raises(ConfigError, match="cannot continue a checkpoint of 2 processes"):
        clf.load_resized([{}, {}])
    clf.retire_other_parts()  # nothing to retire, and no error


@pytest.mark.parametrize("extra, num_instances, advised", [
    (("optim.batch_size=32", "classifier.recent_k=128"), 480, 480),        # the demo: never more rows than N
    (("optim.batch_size=32", "classifier.recent_k=512"), 480, None),       # K covers the corpus
    (("optim.batch_size=32", "classifier.recent_k=128"), 10**6, 4096),
    (("optim.batch_size=32", "classifier.recent_k=4096"), 10**6, None),    # the paper's K/B
    (("optim.batch_size=32", "classifier.sampling=full"), 10**6, None),
])
def test_recent_k_note_respects_the_corpus(tmp_path, extra, num_instances, advised):
    note = recent_k_note(config_for(tmp_path, *extra), num_instances)
    if advised is None:
        assert note is None
    else:
        assert note.endswith(f"consider recent_k = {advised}"
                             + (" (every instance of the corpus)" if advised == num_instances else ""))


def test_no_file_of_the_repository_shadows_an_installed_package():
    """A script's folder is first on sys.path: a `benchmarks/distributed.py` would hide Dask's
    `distributed` from every script beside it (modules inside `picstream/` are imported by their
    package's name, so they cannot)."""
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    installed -= {"picstream", "tests", "benchmarks", "tools", "docs", "configs", "shards"}
    folders = [ROOT, ROOT / "benchmarks", ROOT / "tools", ROOT / "tests"]  # the folders scripts run from
    shadows = sorted(str(p.relative_to(ROOT)) for folder in folders for p in folder.iterdir()
                     if (p.suffix == ".py" and p.stem in installed) or
                     (p.is_dir() and (p / "__init__.py").exists() and p.name in installed))
    assert shadows == []
