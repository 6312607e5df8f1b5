"""Multi-process training on torch.distributed: the process group, sharding, cross-rank sums.

Training is SPMD under ``torchrun`` (one process per device; several nodes through torchrun's own
``--nnodes`` / ``--rdzv-endpoint`` flags). Every rank runs the same step on its share of the
step's prompts (a GRPO group never leaves its rank) and the ranks meet only where the update needs
them:

- :meth:`Dist.sum`: token and row counts (the loss normalisers) and the sums behind batch
  whitening are summed over ranks, so the update equals one process's on the union of the rows;
- gradients are *summed* over ranks (FSDP2's divide factor 1, or an all-reduce under
  ``replicate``), each rank's loss already being its share of the global mean;
- ``strategy=fsdp``: policy, reference and critic are sharded with FSDP2 (``fully_shard`` per
  decoder layer, then the root), fp32 master weights with bf16 compute and fp32 gradient
  reduction when ``model.amp`` is on, optional CPU offload; generation runs on a local, unsharded
  copy refreshed after every update from the shards gathered one parameter at a time;
- ``strategy=replicate``: every rank holds the whole model (LoRA, small models); gradients are
  all-reduced after each mini-batch; generation uses the policy itself.

Rank 0 alone logs, evaluates, exports, writes checkpoints (consolidated: the same files as a
1-process run, so either can resume the other's weights) and the report. Left out: tensor and
pipeline parallelism inside the trainer (vLLM's tensor parallelism serves generation), and
hybrid sharding across nodes.
"""

from __future__ import annotations

import datetime
import math
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from searchrl.errors import ConfigError, SearchRLError

log = logging.getLogger(__name__)

STRATEGIES = ("fsdp", "replicate")


@dataclass
class Dist:
    """This process's place in the job; ``world == 1`` is the plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over ranks (a new tensor; the identity on one process)."""
        if not self.enabled:
            return t.clone()
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def sum_floats(self, *values: float) -> list[float]:
        """Floats summed over ranks, in one collective."""
        return self.sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def share(self, items: list[Any]) -> list[Any]:
        """This rank's contiguous share of ``items`` (whose length must divide evenly)."""
        if len(items) % self.world:
            raise ConfigError(f"prompts_per_step: {len(items)} prompts do not split evenly over {self.world} ranks")
        n = len(items) // self.world
        return items[self.rank * n : (self.rank + 1) * n]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), or run alone.

    Backend: NCCL on CUDA (each rank on GPU ``LOCAL_RANK``), gloo on CPU. A rank that dies makes
    the others' next collective fail after ``timeout_s`` (torchrun then stops the job) instead of
    hanging forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":  # one GPU per rank: "cuda" (no index) then means this rank's GPU
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    d = Dist(dist.get_rank(), dist.get_world_size(), local_rank)
    if d.main:
        log.info("distributed: %d ranks (%s)", d.world, dist.get_backend())
    return d


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a causal LM (what FSDP2 shards one by one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for owner in (getattr(base, "model", None), base):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    raise SearchRLError(f"{type(base).__name__}: no decoder layers found to shard (expected model.layers)")


def shard(model: torch.nn.Module, amp: torch.dtype | None, cpu_offload: bool = False) -> torch.nn.Module:
    """Apply FSDP2 to ``model`` in place: each decoder layer, then the root; gradients summed."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if amp is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model) if hasattr(model, "config") else _value_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():  # every sharded unit reduces its own gradients
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)  # sum, not mean: each rank's loss is its share of the total
            unit.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no pre-scaled sum)
    return model


def _value_layers(critic: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(critic.backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SearchRLError("critic backbone: no decoder layers found to shard")
    return list(layers)


def all_reduce_grads(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Sum the gradients of replicated parameters over ranks (``strategy=replicate``)."""
    if not d.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def full_parameters(model: torch.nn.Module, trainable_only: bool = False) -> Iterator[tuple[str, Tensor]]:
    """``(name, full tensor)`` for every parameter, gathering FSDP2 shards one at a time.

    Collective under FSDP2: every rank must iterate it to the end, in the same order."""
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        yield name, full.detach()


def is_sharded(model: torch.nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class GatheredWeights:
    """Full trainable weights of a sharded module, shaped like a module for the checkpoint writer
    (it reads ``named_parameters()`` and keeps those with ``requires_grad``)."""

    def __init__(self, module: torch.nn.Module, keep: bool = True):
        # Every rank takes part in each gather; only the writer (``keep``) holds the result.
        self._named = [(n, t.cpu()) for n, t in full_parameters(module, trainable_only=True) if keep]

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, t in self._named:
            yield name, torch.nn.Parameter(t, requires_grad=True)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter names, gathered from the shards (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`full_optimizer_state`, into a sharded or a plain model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_full_weights(model: torch.nn.Module, weights: dict[str, Tensor]) -> None:
    """Copy full tensors into a (possibly sharded) model's parameters of the same names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    names = {n for n, _ in model.named_parameters()}
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise SearchRLError(f"checkpoint does not match the model (e.g. {unknown[0]}); another model or LoRA setting?")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float, d: Dist) -> float:
    """Clip gradients to a total L2 norm of ``max_norm``; returns the norm before clipping.

    Sharded gradients (FSDP2 DTensors) count each element once: their local shards' squares are
    summed over ranks. Plain gradients (one process, or replicated and already all-reduced) are
    the same on every rank and count once. A non-finite norm leaves the gradients as they are.
    """
    local = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        if hasattr(g, "to_local"):
            local += g.to_local().double().square().sum()
        else:
            replicated += g.double().square().sum()
    total = (d.sum(local) if d.enabled else local) + replicated
    norm = float(total.sqrt())
    if math.isfinite(norm) and norm > max_norm > 0:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            (g.to_local() if hasattr(g, "to_local") else g).mul_(scale)
    return norm
