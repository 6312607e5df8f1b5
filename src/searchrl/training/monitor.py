"""Run logging: ``metrics.jsonl`` (one JSON object per step), TensorBoard or W&B when installed.

The JSONL file is the source of truth (the report reads it); each line is flushed as written so a
crash loses nothing. On resume, lines past the checkpointed step are dropped so the log matches
the resumed run exactly. TensorBoard is used when ``tensorboard`` is importable; W&B only when
``wandb`` is importable *and* ``WANDB_PROJECT`` is set (no telemetry otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB), or peak CUDA memory when on a GPU."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # pragma: no cover - torch always present here
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (none when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    def __init__(self, run_dir: str | Path, name: str = "metrics.jsonl"):
        self.path = Path(run_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = self._wandb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except Exception:  # tensorboard not installed
            self._tb = None
        if os.environ.get("WANDB_PROJECT"):
            try:
                import wandb

                self._wandb = wandb.init(project=os.environ["WANDB_PROJECT"], dir=str(run_dir))
            except Exception as e:  # pragma: no cover - optional
                log.warning("W&B requested but unavailable: %s", e)

    def log(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        step = int(metrics.get("step", 0))
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (they belong to work a crash threw away)."""
        rows = [r for r in self.read() if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)
