"""Training metrics: a live progress line, a JSONL file and TensorBoard scalars."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .iopoints import replace_file


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop records with `step >= after_step` (a resumed run rewrites them) and any torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", -1) < after_step:
            kept.append(line)
    replace_file(path, "".join(line + "\n" for line in kept).encode())  # a kill loses no record kept


class MetricsLogger:
    """Writes every logged record to `metrics.jsonl` and TensorBoard; shows a progress bar.
    ``enabled=False`` (the other ranks of a distributed run) writes and shows nothing."""

    def __init__(self, run_dir: Path, start_step: int, total_steps: int, *, tensorboard: bool = True,
                 show_progress: bool = True, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self._writer = None
        if enabled:
            truncate_jsonl(self.path, start_step)
            self._file = open(self.path, "a")
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step)
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         disable=not show_progress, file=sys.stderr, mininterval=1.0)
        self._last_time = time.perf_counter()
        self._last_step = start_step

    def log(self, step: int, record: dict[str, Any], *, images_per_step: int) -> dict[str, Any]:
        """Record metrics for a completed 0-based `step`; adds images/s since the previous call."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        record = {"step": step, **record,
                  "images_per_s": (step + 1 - self._last_step) * images_per_step / elapsed}
        self._last_time, self._last_step = now, step + 1
        self._write(record)
        self._bar.n = step + 1
        self._bar.set_postfix_str(_progress_text(record), refresh=True)
        return record

    def event(self, step: int, record: dict[str, Any]) -> None:
        """A record outside the regular cadence (e.g. a k-NN evaluation)."""
        record = {"step": step, **record}
        self._write(record)
        if not self._bar.disable:  # tqdm.write prints even for a disabled bar
            self._bar.write(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def _write(self, record: dict[str, Any]) -> None:
        """One JSONL line, and every numeric field as a TensorBoard scalar at the record's step."""
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _progress_text(record: dict[str, Any]) -> str:
    keys = ("epoch", "loss", "lr", "images_per_s", "min_row_norm", "device_mem_mb", "skipped", "retries")
    short = {"images_per_s": "img/s", "min_row_norm": "min|w|", "device_mem_mb": "mem_MB"}
    return " ".join(f"{short.get(k, k)}={_fmt(record[k])}" for k in keys if k in record)
