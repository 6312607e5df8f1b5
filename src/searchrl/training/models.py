"""Build the models a run trains: the policy (optionally LoRA), its frozen reference, the critic.

With LoRA the reference is the same network with its adapters disabled (no second copy in
memory); without LoRA it is a frozen deep copy, made only when a KL term is used. The critic is a
copy of the policy's backbone (or of ``model.critic_name``) with a zero-initialised value head.

Left out: FSDP/DeepSpeed sharding (see the README's scaling notes) and 8-bit optimisers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from searchrl.models import amp_context, amp_dtype, load_model, resolve_device
from searchrl.training.batch import ValueModel
from searchrl.training.config import ModelConfig

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

    def generator(self) -> Any:
        """An :class:`~searchrl.rollout.engine.hf.HFGenerator` over the policy, with these precision settings."""
        from searchrl.rollout.engine.hf import HFGenerator

        return HFGenerator(self.policy, self.tokenizer, amp=self.amp, amp_copy=self.amp_copy)

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


def make_critic(policy_base: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> ValueModel:
    if cfg.critic_name:
        base, _ = load_model(cfg.critic_name, dtype=cfg.dtype, device=str(device))
    else:
        base = copy.deepcopy(policy_base)
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    critic = ValueModel(backbone, base.config.hidden_size).to(device)
    for p in critic.parameters():
        p.requires_grad_(True)
    return critic


def build_models(cfg: ModelConfig, need_reference: bool, need_critic: bool,
                 model: torch.nn.Module | None = None, tokenizer: Any = None) -> ModelBundle:
    """Load (or take) the policy and build what the algorithm needs around it."""
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
    return ModelBundle(model, tokenizer, reference, critic, uses_lora, device, amp, cfg.amp_copy)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying transformers model (under a PEFT wrapper, the base model with adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
