"""Atomic checkpoints of a training run, and exact resumption.

A checkpoint is a directory ``RUN/checkpoints/step-000010`` holding the trainable weights
(``policy.safetensors``; LoRA adapters only under LoRA), the critic, optimiser and scheduler
states, every RNG state, the data sampler position and the step (``state.pt``). It is written into
a ``.tmp`` sibling and renamed into place, so a crash never leaves a half-written checkpoint that
looks complete; ``COMPLETE`` marks a finished one. Only the newest ``keep`` are kept, plus
``step-000000`` (the model RL started from, which a resumed run reloads as its reference).

Left out: sharded (FSDP) checkpoints; exporting a merged model is ``export_model``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from searchrl.errors import SearchRLError


def _trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.name.startswith("step-") and (p / "COMPLETE").exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: str | Path, step: int, policy: torch.nn.Module,
                    critic: torch.nn.Module | None, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; ``state`` holds optimiser/scheduler/sampler states."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable_state(policy), str(tmp / "policy.safetensors"))
    if critic is not None:
        save_file(_trainable_state(critic), str(tmp / "critic.safetensors"))
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
    (tmp / "COMPLETE").write_text(str(step))
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.name != "step-000000":  # the model RL started from: the reference on resume
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, policy: torch.nn.Module, critic: torch.nn.Module | None) -> dict[str, Any]:
    """Load weights into ``policy`` / ``critic`` and return the saved state (RNG not yet applied)."""
    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise SearchRLError(f"{path}: not a complete checkpoint")
    weights = load_file(str(path / "policy.safetensors"))
    params = dict(policy.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise SearchRLError(f"{path}: checkpoint does not match the model (e.g. {missing[0]}); "
                            "was it written with another model or LoRA setting?")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    if critic is not None:
        cw = load_file(str(path / "critic.safetensors"))
        cparams = dict(critic.named_parameters())
        with torch.no_grad():
            for n, t in cw.items():
                cparams[n].copy_(t.to(cparams[n].device, cparams[n].dtype))
    return torch.load(path / "state.pt", weights_only=False)
