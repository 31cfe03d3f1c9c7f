"""The run's lifecycle: which checkpoint a start continues from, and how the run's state is saved,
loaded, re-partitioned, pruned and retired.

A run is its directory: ``run.json`` (the run id), ``checkpoints/`` and, by default, the row store.
:class:`RunLifecycle` owns all of it for one process of the job. Stateful parts register with it by
name; a *replicated* part (the same on every rank: the model, the optimiser, the RNG, anything added
later) is saved by rank 0 in the checkpoint's main file; the *partitioned* part (the classifier
rows: :class:`PartitionedState`) is saved by every rank in its part file
(in the main file itself in a 1-process run), after its row store is committed. Decisions about the
directory are taken on rank 0 and handed to every rank (:meth:`World.on_main`). The states and
transitions are drawn in docs/design.md ("The run's lifecycle").
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import fsspec
import torch
import yaml

from .checkpoint import (classifier_states, latest_valid_checkpoint, list_checkpoints, load_checkpoint,
                         prune_checkpoints, remove_stale_temporaries, retire_newer, save_checkpoint,
                         saved_world)
from .config import Config, ConfigError, config_changes, config_from_dict
from .distributed import World
from .iopoints import replace_file
from .rowstore import store_url_of_rank
from .runlock import RunLock

__all__ = ["RunLifecycle", "Stateful", "PartitionedState", "TorchRNG", "load_resume_checkpoint"]


@runtime_checkable
class Stateful(Protocol):
    """A replicated part of the run's state (``torch.nn.Module`` and ``torch.optim.Optimizer`` are)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@runtime_checkable
class PartitionedState(Protocol):
    """A part of the run's state that every rank holds its own share of, over a committed store."""

    def commit_state(self) -> dict: ...

    def load_state(self, state: dict) -> None: ...

    def load_resized(self, states: list[dict]) -> None: ...

    def retire_other_parts(self) -> None: ...

    def forget_before(self, state: dict) -> None: ...


class TorchRNG:
    """The process's torch CPU random generator as a stateful part."""

    def state_dict(self) -> torch.Tensor:
        return torch.get_rng_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)


def load_resume_checkpoint(resume: str, mmap: bool = False) -> dict:
    """The checkpoint file that ``--resume`` names, or one `ConfigError` line."""
    if not Path(resume).is_file():
        raise ConfigError(f"--resume: no checkpoint file at {resume} (use 'auto', 'none' or a "
                          "ckpt-*.pt path)")
    try:
        return load_checkpoint(Path(resume), mmap=mmap)
    except ValueError as err:
        raise ConfigError(f"--resume: {err}") from None


class RunLifecycle:
    """One process's handle on the run directory: lock, run id, the chosen checkpoint, and the
    registered states.

    Constructing it takes the run's locks, reads (or creates) the run id and chooses the checkpoint
    to continue from (``resume``: ``'auto'``, ``'none'`` or a path); :attr:`fresh` then tells whether
    the row store must start from initial rows. The trainer registers its parts, calls
    :meth:`resume` once and :meth:`save` at every checkpoint step. ``info`` goes into every main file.
    """

    def __init__(self, config: Config, world: World, *, resume: str = "auto",
                 info: Optional[dict] = None, say: Callable[[str], None] = lambda message: None):
        self.config, self.world, self.say = config, world, say
        self.run_dir = Path(config.run.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.store_url = config.classifier.store or str(self.run_dir / "rowstore.zarr")
        self.info = dict(info or {})
        self._replicated: dict[str, Stateful] = {}
        self._partitioned: Optional[tuple[str, PartitionedState]] = None
        self._locks = self._take_locks()
        self.run_id: str = world.on_main(self._read_or_create_run_id)
        self._chosen = self._choose_checkpoint(resume)
        self.fresh = self._chosen is None  # no checkpoint to continue from: step 0, initial rows
        self.last_saved: Optional[Path] = None if self._chosen is None else self._chosen[0]

    def register(self, name: str, part) -> None:
        """Save and restore ``part`` under ``name`` (a :class:`PartitionedState`, of which a run
        has one, or any :class:`Stateful`)."""
        if name in self._replicated or (self._partitioned and self._partitioned[0] == name):
            raise ValueError(f"a state named {name!r} is registered already")
        if isinstance(part, PartitionedState):
            if self._partitioned is not None:
                raise ValueError(f"{name!r}: the run has a partitioned state already "
                                 f"({self._partitioned[0]!r})")
            self._partitioned = (name, part)
        elif isinstance(part, Stateful):
            self._replicated[name] = part
        else:
            raise TypeError(f"{name!r} has neither state_dict/load_state_dict nor commit_state/load_state")

    # ------------------------------------------------------------------ start
    def _take_locks(self) -> list[RunLock]:
        """One trainer per run directory, and per row store when the store lives elsewhere (rank 0
        holds them; each rank its own per-rank store)."""
        locks = []
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            locks.append(RunLock(self.run_dir / ".lock", f"run directory {self.run_dir}"))
        own_store = "{rank}" in self.store_url
        store = Path(store_url_of_rank(self.store_url, self.world.rank))
        if ((own_store or self.world.is_main) and "://" not in self.store_url
                and store.parent.resolve() != self.run_dir.resolve()):
            store.parent.mkdir(parents=True, exist_ok=True)
            locks.append(RunLock(store.with_name(store.name + ".lock"), f"row store {store}"))
        return locks

    def _read_or_create_run_id(self) -> str:
        """This run's identity (``run.json``), recorded in its row store and its checkpoints."""
        path = self.run_dir / "run.json"
        try:
            return json.loads(path.read_text())["run_id"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            run_id = uuid.uuid4().hex
            replace_file(path, (json.dumps({"run_id": run_id}) + "\n").encode())
            return run_id

    def _choose_checkpoint(self, resume: str) -> Optional[tuple[Path, dict]]:
        """``(path, state)`` to continue from, or None: chosen on rank 0, which keeps the state it
        loaded; the other ranks receive the path and load it."""
        chosen: list[tuple[Path, dict]] = []

        def choose() -> Optional[Path]:
            found = self._checkpoint_to_resume(resume)
            if found is not None:
                chosen.append(found)
            return None if found is None else found[0]

        path = self.world.on_main(choose)
        return None if path is None else (chosen[0] if chosen else (path, load_checkpoint(path)))

    def _checkpoint_to_resume(self, resume: str) -> Optional[tuple[Path, dict]]:
        """The checkpoint this start continues from (None: a fresh start at step 0). Rank 0 only;
        an explicit older checkpoint of this run moves the newer ones aside."""
        remove_stale_temporaries(self.ckpt_dir)
        store_fs, store_path = fsspec.core.url_to_fs(store_url_of_rank(self.store_url, 0))
        store_exists = store_fs.exists(store_path)
        if resume == "none":
            if list_checkpoints(self.ckpt_dir) or store_exists:
                raise ConfigError(f"{self.run_dir} already holds a run (checkpoints or a row store); "
                                  "continue it with --resume auto, or start a new run in another "
                                  "run.output_dir")
            return None
        if resume == "auto":
            found = latest_valid_checkpoint(self.ckpt_dir, log=self.say)
            if found is None:
                if store_exists:
                    self.say(f"no valid checkpoint in {self.ckpt_dir}: starting at step 0 with fresh rows")
                return None
            path, state = found
        else:
            path, state = Path(resume), load_resume_checkpoint(resume)
        self._check_config(path, state)
        if saved_world(state) != self.world.size and "{rank}" in self.store_url:
            raise ConfigError(f"cannot resume {path} (saved by {saved_world(state)} processes) with "
                              f"{self.world.size}: per-rank row stores ({self.store_url}) cannot be "
                              "re-partitioned; resume with the same number of processes")
        if resume != "auto" and path.parent.resolve() == self.ckpt_dir.resolve():
            moved = retire_newer(self.ckpt_dir, int(state["step"]))
            if moved:
                self.say(f"moved {len(moved)} newer checkpoint(s) aside to {moved[0].parent} "
                         "(kept, and never picked by --resume auto)")
        return path, state

    def _check_config(self, path: Path, state: dict) -> None:
        """Refuse a resume whose config changes the training trajectory; report harmless changes."""
        try:
            saved = config_from_dict(yaml.safe_load(state["config"]))
        except ConfigError as err:
            raise ConfigError(f"cannot resume {path}: its saved config is not valid here ({err})") from None
        refused, accepted = config_changes(saved, self.config)
        if refused:
            raise ConfigError(f"cannot resume {path} with a changed config ({'; '.join(refused)}): these "
                              "change the training trajectory; restore them, or start a new run in "
                              "another run.output_dir")
        if accepted:
            self.say(f"resuming with changed settings: {'; '.join(accepted)}")

    def resume(self) -> int:
        """Load every registered part from the chosen checkpoint; returns the step to continue from
        (0 on a fresh start). A checkpoint of another number of processes is re-partitioned onto
        this world and saved again at the same step; then the store's parts of other world sizes are
        retired, so no such checkpoint can be resumed onto rows this world changes."""
        if self._chosen is None:
            return 0
        (path, state), self._chosen = self._chosen, None
        for name, part in self._replicated.items():
            part.load_state_dict(state[name])
        step, saved = int(state["step"]), saved_world(state)
        if self._partitioned is not None:
            rows = self._partitioned[1]
            if saved == self.world.size:
                rows.load_state(classifier_states(path, state, [self.world.rank])[0])
            else:
                rows.load_resized(classifier_states(path, state))
                self.save(step)
                self.say(f"re-partitioned the classifier rows of {saved} processes onto {self.world.size}")
            rows.retire_other_parts()
        self.say(f"resumed from {path} at step {step}")
        return step

    # ------------------------------------------------------------------ during the run
    def save(self, step: int) -> Path:
        """Checkpoint after ``step`` completed steps: the partitioned part commits its store and every
        rank writes its part file, then rank 0 the main file (which completes the checkpoint) and
        prunes old checkpoints; the store then forgets the history no kept checkpoint needs."""
        world = self.world
        state: dict[str, Any] = {"config": self.config.to_yaml(), "run_id": self.run_id, **self.info}
        if self._partitioned is not None:
            name, rows = self._partitioned
            committed = rows.commit_state()
            if world.size > 1:
                save_checkpoint(self.ckpt_dir, step, committed, part=(world.rank, world.size))
                world.barrier()
                committed = {"parts": world.size}
            state[name] = committed
        state.update({name: part.state_dict() for name, part in self._replicated.items()})

        def write_main() -> tuple[Path, list[Path]]:
            path = save_checkpoint(self.ckpt_dir, step, state)
            return path, prune_checkpoints(self.ckpt_dir, self.config.train.keep_checkpoints)

        path, kept = world.on_main(write_main)
        self._forget_history(kept)
        self.last_saved = path
        return path

    def _forget_history(self, kept: list[Path]) -> None:
        """Tell the partitioned part that nothing older than the oldest kept checkpoint of this world
        size will be resumed (checkpoints of other world sizes cannot be resumed onto this store)."""
        if self._partitioned is None:
            return
        try:
            for oldest_kept in kept:
                oldest = load_checkpoint(oldest_kept, mmap=True)
                if saved_world(oldest) == self.world.size:
                    self._partitioned[1].forget_before(
                        classifier_states(oldest_kept, oldest, [self.world.rank])[0])
                    return
        except ValueError as err:  # unreadable: keep every undo log rather than lose a resume point
            self.say(f"not pruning row-store history: {err}")

    def close(self) -> None:
        """Release the locks."""
        for lock in self._locks:
            lock.release()
        self._locks = []
