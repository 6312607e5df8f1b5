"""The PPO critic: a causal LM's backbone with a zero-initialised scalar head, one value per token.

``make_critic`` builds it from a copy of the policy's backbone (or from ``model.critic_name``),
with gradient checkpointing when the policy uses it, so the critic's activations shrink the same
way. Values are read at the state *before* each response token (the same columns that predict
the response tokens), so ``values[:, t]`` is the critic's estimate for sampling token ``t``.

Left out: a separate value-model checkpoint format (the critic is saved beside the policy in the
trainer's checkpoints) and shared policy/critic trunks.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from searchrl.models import load_model
from searchrl.training.batch import TokenBatch
from searchrl.training.config import ModelConfig


class ValueModel(torch.nn.Module):
    """A critic: a causal LM's backbone plus a scalar head, one value per token position."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: TokenBatch) -> Tensor:
        """Values ``[B, R]``: the value at the state *before* each response token."""
        R = batch.response_ids.shape[1]
        h = self.backbone(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state  # [B, P + R, H]
        h = h[:, -(R + 1) : -1, :]  # [B, R, H]
        return self.value_head(h.float()).squeeze(-1)  # [B, R]


def make_critic(policy_base: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> ValueModel:
    """A critic over ``cfg.critic_name`` (or a copy of ``policy_base``), trainable, on ``device``."""
    if cfg.critic_name:
        base, _ = load_model(cfg.critic_name, dtype=cfg.dtype, device=str(device))
    else:
        base = copy.deepcopy(policy_base)
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    if cfg.gradient_checkpointing and hasattr(backbone, "gradient_checkpointing_enable"):
        backbone.gradient_checkpointing_enable()
    critic = ValueModel(backbone, base.config.hidden_size).to(device)
    for p in critic.parameters():
        p.requires_grad_(True)
    return critic
