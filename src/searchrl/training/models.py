"""Build the models a run trains: the policy (optionally LoRA), its frozen reference, the critic.

With LoRA the reference is the same network with its adapters disabled (no second copy in
memory); without LoRA it is a frozen deep copy, made only when a KL term is used. Either way the
reference is the model RL starts from: after a LoRA warm-start, :meth:`ModelBundle.restart_adapter`
merges the warm-start adapter into the base weights and starts a fresh one. The critic is built by
:mod:`searchrl.training.critic`. RL forward passes run without dropout (:func:`disable_dropout`),
so the PPO ratio is exactly 1 before the first update.

Under several processes (`parallel.strategy=fsdp`) the policy, reference and critic are sharded
with FSDP2 after an unsharded generation copy is taken (:mod:`searchrl.training.distributed`).
Left out: DeepSpeed and 8-bit optimisers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from searchrl.models import amp_context, amp_dtype, load_model, resolve_device
from searchrl.training.config import ModelConfig
from searchrl.training.critic import ValueModel, make_critic
from searchrl.training.distributed import Dist, full_parameters, is_sharded, shard

log = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    policy: torch.nn.Module
    tokenizer: Any
    reference: torch.nn.Module | None  # None with LoRA (adapters disabled) or without KL
    critic: ValueModel | None
    uses_lora: bool
    device: torch.device
    amp: torch.dtype | None = None  # half-precision compute (training: autocast; generation: HFGenerator)
    amp_copy: bool = True  # generation in ``amp`` on a copy of the weights (HFGenerator's amp_copy)
    dist: Dist = field(default_factory=Dist)
    gen_model: torch.nn.Module | None = None  # FSDP: an unsharded local copy that generates

    def generator(self, cfg: ModelConfig | None = None, temperature: float = 1.0) -> Any:
        """An :class:`~searchrl.rollout.engine.hf.HFGenerator` over the policy (under FSDP, over its
        local unsharded copy), with these precision settings; with ``cfg.backend == "vllm"`` a
        vLLM engine over ``cfg.name`` instead (its weights follow the policy through
        :meth:`weight_sync`), reporting log-probs at the rollouts' ``temperature``."""
        from searchrl.rollout.engine.hf import HFGenerator

        if cfg is not None and cfg.backend == "vllm":
            return vllm_generator(cfg, self.amp, temperature)
        model = self.gen_model if self.gen_model is not None else self.policy
        return HFGenerator(model, self.tokenizer, amp=self.amp, amp_copy=self.amp_copy)

    def weight_sync(self, generator: Any) -> Callable[[torch.nn.Module], None] | None:
        """The trainer's ``sync_weights`` for a generator holding its own copy of the weights (one
        with ``load_weights``: vLLM): the policy's full parameters go to it (under FSDP gathered
        one at a time: a collective). ``None`` when the generator runs the policy itself."""
        load = getattr(generator, "load_weights", None)
        if load is None:
            return None
        return lambda policy: load(full_parameters(policy))

    def export_state(self) -> dict[str, torch.Tensor] | None:
        """FSDP: the policy's full parameters in their training precision, on the CPU of rank 0
        (``{}`` on the others; a collective: every rank calls it). ``None`` when the policy is not
        sharded (it is exported as it is)."""
        if not is_sharded(self.policy):
            return None
        state: dict[str, torch.Tensor] = {}
        for name, full in full_parameters(self.policy):  # every rank takes part in each gather
            if self.dist.main:
                state[name] = full.cpu().clone()
        return state

    def sync_generation_copy(self) -> None:
        """FSDP: refresh the generation copy from the policy's shards (a collective: every rank
        calls it at the same point). A no-op when the policy itself generates."""
        if self.gen_model is None:
            return
        params = dict(self.gen_model.named_parameters())
        with torch.no_grad():
            for name, full in full_parameters(self.policy):
                params[name].copy_(full)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes (see :func:`searchrl.models.amp_dtype`)."""
        return amp_context(self.amp, self.device)

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[torch.nn.Module]:
        """The reference policy: the frozen copy, or the policy with LoRA adapters disabled."""
        if self.reference is not None:
            yield self.reference
        elif self.uses_lora:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            raise RuntimeError("no reference model: set algo.kl_coef > 0 to build one")

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or self.uses_lora

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def restart_adapter(self) -> dict[str, torch.Tensor]:
        """LoRA: fold the adapter into the base weights and start a fresh (zero) adapter.

        After a LoRA warm-start the adapter-disabled base would be the model *before* the
        warm-start; folding it in makes the reference (adapters disabled) the model RL starts
        from. Parameters keep their identity (optimisers and generators stay valid). Returns the
        merged base weights of the adapted layers, to save beside the run (LoRA checkpoints hold
        adapters only). Without LoRA: nothing to do, returns ``{}``.
        """
        if not self.uses_lora:
            return {}
        self.policy.merge_adapter()
        with torch.no_grad():
            for name, p in self.policy.named_parameters():
                if "lora_B" in name:
                    p.zero_()  # the adapter's delta is now 0 ...
        self.policy.unmerge_adapter()  # ... so unmerging subtracts nothing: the base keeps the merge
        return {n: p.detach().cpu().contiguous() for n, p in self.policy.named_parameters()
                if "base_layer" in n}


def generation_copy(model: torch.nn.Module, amp: torch.dtype | None) -> torch.nn.Module:
    """FSDP: the unsharded local copy of the policy that generates, frozen; its float parameters
    in ``amp`` when given (the HF engine would otherwise keep this copy in fp32 *and* a bf16 copy of
    it: the copy in ``amp`` is all generation needs, a third of the two). Buffers (rotary
    frequencies) keep their dtype. Exports are taken from the policy's shards, not from it."""
    gen = copy.deepcopy(model).eval()
    for p in gen.parameters():
        p.requires_grad_(False)
        if amp is not None and p.dtype == torch.float32:
            p.data = p.data.to(amp)
    return gen


def vllm_generator(cfg: ModelConfig, amp: torch.dtype | None, temperature: float = 1.0) -> Any:
    """A vLLM engine over ``cfg.name`` with the ``model.vllm_*`` settings, computing in bf16 when
    the policy's generation would (``amp``), else in ``cfg.dtype``, its log-probs at the rollouts'
    ``temperature``. Under torchrun each rank gets its own engine in its own process and device
    (``vllm_backend.parallel_kwargs``)."""
    from searchrl.rollout.engine.factory import make_generator

    kwargs: dict[str, Any] = dict(gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                  tensor_parallel_size=cfg.vllm_tensor_parallel_size, sleep=cfg.vllm_sleep,
                                  temperature=temperature)
    if cfg.vllm_max_model_len:
        kwargs["max_model_len"] = cfg.vllm_max_model_len
    dtype = "bfloat16" if amp == torch.bfloat16 else cfg.dtype
    return make_generator("vllm", model_path=cfg.name, dtype=dtype, **kwargs)


def save_base_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Write merged base weights (see :meth:`ModelBundle.restart_adapter`) atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(weights, str(tmp))
    tmp.replace(path)


def load_base_weights(policy: torch.nn.Module, path: Path) -> None:
    """Copy merged base weights saved by :func:`save_base_weights` into ``policy``."""
    from safetensors.torch import load_file

    params = dict(policy.named_parameters())
    with torch.no_grad():
        for n, t in load_file(str(path)).items():
            if n not in params:
                from searchrl.errors import SearchRLError

                raise SearchRLError(f"{path}: weight {n} is not in the model (another model or LoRA setting?)")
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def disable_dropout(module: torch.nn.Module | None) -> None:
    """Set every dropout of ``module`` to 0: ``nn.Dropout`` layers (LoRA dropout included) and the
    ``attention_dropout`` rates attention layers read in training mode. Train/eval mode then no
    longer changes the function the model computes, which RL log-probs rely on."""
    if module is None:
        return
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def apply_lora(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.lora_targets if t in names]
    if not targets:
        from searchrl.errors import ConfigError

        raise ConfigError(f"model.lora_targets: none of {cfg.lora_targets} are modules of this model")
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def build_models(cfg: ModelConfig, need_reference: bool, need_critic: bool,
                 model: torch.nn.Module | None = None, tokenizer: Any = None,
                 dist: Dist | None = None, parallel: Any = None) -> ModelBundle:
    """Load (or take) the policy and build what the algorithm needs around it.

    With several processes and ``parallel.strategy == "fsdp"`` the policy, reference and critic are
    sharded with FSDP2 after an unsharded generation copy of the policy is taken (HF engine).
    """
    dist = dist or Dist()
    if cfg.backend == "vllm":  # refused before anything is loaded: one vLLM engine per rank
        from searchrl.rollout.engine.vllm_backend import parallel_kwargs

        parallel_kwargs({"tensor_parallel_size": cfg.vllm_tensor_parallel_size}, dist.world)
    device = resolve_device(cfg.device)
    if model is None:
        model, tokenizer = load_model(cfg.name, dtype=cfg.dtype, device=str(device))
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    critic = make_critic(model, cfg, device) if need_critic else None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    uses_lora = cfg.lora_r > 0
    reference = None
    if uses_lora:
        model = apply_lora(model, cfg)
    elif need_reference:
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    amp = amp_dtype(cfg.amp, device, weights=cfg.dtype)
    compute = "bf16 (autocast in training, a bf16 weight copy in generation)" if amp is not None else cfg.dtype
    log.info("policy: %.1fM trainable parameters%s; compute: %s", n_train / 1e6, " (LoRA)" if uses_lora else "",
             compute)
    gen_model = None
    if dist.enabled and (parallel is None or parallel.strategy == "fsdp"):
        if cfg.backend == "hf":  # (a vLLM engine holds its own copy)
            gen_model = generation_copy(model, amp if cfg.amp_copy else None)
        offload = bool(parallel and parallel.cpu_offload)
        for m in (model, reference, critic):
            if m is not None:
                shard(m, amp, offload)
    return ModelBundle(model, tokenizer, reference, critic, uses_lora, device, amp, cfg.amp_copy, dist, gen_model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying transformers model (under a PEFT wrapper, the base model with adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
