"""Atomic checkpoints of a training run, and exact resumption.

A checkpoint is a directory ``RUN/checkpoints/step-000010`` holding the trainable weights
(``policy.safetensors``; LoRA adapters only under LoRA), the critic, optimiser and scheduler
states, every RNG state, the data sampler position and the step (``state.pt``). It is written into
a ``.tmp`` sibling and renamed into place, so a crash never leaves a half-written checkpoint that
looks complete; ``COMPLETE`` marks a finished one. Only the newest ``keep`` are kept, plus
``step-000000`` (the model RL started from, which a resumed run reloads as its reference).

A write that fails (disk full, quota, I/O error) removes its ``.tmp`` folder and raises
:class:`SearchRLError` saying the previous checkpoint is intact; nothing published is touched.
:func:`list_checkpoints` returns usable checkpoints only: one with ``COMPLETE`` but a truncated or
unreadable weights file, a truncated ``state.pt``, or weights of another model (names, shapes or
dtypes unlike ``step-000000``'s) is skipped with a warning, so resume falls back to the newest good
one. These checks read file headers only (cheap at every save).

Sharded (FSDP) runs write the same files, consolidated on rank 0 by the trainer. Left out:
checkpoints saved shard by shard (torch.distributed.checkpoint); checksums of the tensor bytes (a bit flip inside the
weights is not detected); exporting a merged model is ``export_model``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from searchrl.errors import SearchRLError

log = logging.getLogger(__name__)
_warned: set[str] = set()


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


def safetensors_signature(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of every tensor, from the header; raises ``ValueError`` when the
    file is shorter than its header says, or the header is not safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"header length {n} does not fit the {size}-byte file")
        header = json.loads(f.read(n))
    end, sig = 0, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = max(end, int(info["data_offsets"][1]))
        sig.append((name, str(info["dtype"]), tuple(int(d) for d in info["shape"])))
    if 8 + n + end != size:
        raise ValueError(f"truncated: {size} bytes, the header promises {8 + n + end}")
    return sorted(sig)


def checkpoint_problem(path: Path, reference: list | None = None) -> str | None:
    """Why ``path`` cannot be resumed from (``None`` when it looks usable); see module doc."""
    if not (path / "COMPLETE").exists():
        return "no COMPLETE marker"
    try:
        sig = safetensors_signature(path / "policy.safetensors")
        if (path / "critic.safetensors").exists():
            safetensors_signature(path / "critic.safetensors")
        with zipfile.ZipFile(path / "state.pt") as z:  # torch.save's zip: a cut file has no directory
            z.infolist()
    except FileNotFoundError as e:
        return f"missing {Path(e.filename).name}"
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if reference is not None and sig != reference:
        return "weights of another model (tensor names/shapes/dtypes differ from step-000000)"
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Usable checkpoints, oldest first; unusable ones are skipped with a warning (once each)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.name.startswith("step-") and (p / "COMPLETE").exists()]
    done.sort(key=lambda p: int(p.name.split("-")[1]))
    reference = None
    if done and done[0].name == "step-000000" and checkpoint_problem(done[0]) is None:
        reference = safetensors_signature(done[0] / "policy.safetensors")
    good = []
    for p in done:
        problem = checkpoint_problem(p, reference)
        if problem is None:
            good.append(p)
        elif str(p) not in _warned:
            _warned.add(str(p))
            log.warning("checkpoint %s is unusable (%s): skipped; resume falls back to the newest good one",
                        p, problem)
    return good


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_problem(error: BaseException, folder: Path) -> str:
    """What went wrong with a write into ``folder``, with the free space on its disk (torch reports
    a full disk as "unexpected pos N vs M", so the free space is what names it)."""
    return f"{getattr(error, 'strerror', None) or error}; {shutil.disk_usage(folder).free / 2**20:,.0f} MB free on its disk"


def save_checkpoint(run_dir: str | Path, step: int, policy: torch.nn.Module,
                    critic: torch.nn.Module | None, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; ``state`` holds optimiser/scheduler/sampler states."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, step, policy, critic, state)
    except Exception as e:  # noqa: BLE001 - disk full surfaces as OSError, RuntimeError or SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        prev = list_checkpoints(run_dir)
        kept = f"the previous checkpoint {prev[-1]} is intact" if prev else "no earlier checkpoint exists"
        raise SearchRLError(f"could not write checkpoint step {step} in {root} ({write_problem(e, root)}): {kept}") from e
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _warned.discard(str(final))
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.name != "step-000000":  # the model RL started from: the reference on resume
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, step: int, policy: torch.nn.Module, critic: torch.nn.Module | None,
                 state: dict[str, Any]) -> None:
    tmp.mkdir()
    save_file(_trainable_state(policy), str(tmp / "policy.safetensors"))
    if critic is not None:
        save_file(_trainable_state(critic), str(tmp / "critic.safetensors"))
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
    (tmp / "COMPLETE").write_text(str(step))
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def load_checkpoint(path: str | Path, policy: torch.nn.Module, critic: torch.nn.Module | None) -> dict[str, Any]:
    """Load weights into ``policy`` / ``critic`` and return the saved state (RNG not yet applied)."""
    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise SearchRLError(f"{path}: not a complete checkpoint")
    try:
        weights = load_file(str(path / "policy.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise SearchRLError(f"{path}: unreadable policy weights ({e})") from None
    params = dict(policy.named_parameters())
    missing = [n for n in weights if n not in params]
    wrong = [n for n in weights if n in params and weights[n].shape != params[n].shape]
    if missing or wrong:
        raise SearchRLError(f"{path}: checkpoint does not match the model (e.g. {(missing or wrong)[0]}); "
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
    try:
        return torch.load(path / "state.pt", weights_only=False)
    except Exception as e:  # noqa: BLE001 - zip, pickle and storage errors alike
        raise SearchRLError(f"{path}: unreadable state.pt ({type(e).__name__}: {e})") from None
