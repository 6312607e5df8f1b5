"""Turn trajectories into padded training tensors, and run the policy / critic over them.

Layout of a batch of ``B`` trajectories (prompt lengths ``P_i``, response lengths ``R_i``): prompts
are left-padded to ``P = max P_i`` and responses right-padded to ``R = max R_i``, so every row's
response starts at column ``P``::

    input_ids [B, P + R]:  pad pad p p p | r r r r pad
    response_mask [B, R]:                 1 1 1 1 0      (real response tokens)
    loss_mask     [B, R]:                 1 0 0 1 0      (sampled tokens; inserted tokens are 0)

Position ids count real tokens only, so left padding does not shift positions. The logits that
predict response token ``t`` sit at column ``P - 1 + t``.

Left out: sequence packing (rows are padded, not packed) and tensor parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from searchrl.algos.losses import entropy_from_logits, logprobs_from_logits
from searchrl.types import Trajectory


@dataclass
class TokenBatch:
    input_ids: Tensor  # [B, P + R]
    attention_mask: Tensor  # [B, P + R]
    position_ids: Tensor  # [B, P + R]
    response_ids: Tensor  # [B, R]
    response_mask: Tensor  # [B, R]
    loss_mask: Tensor  # [B, R]
    prompt_len: int  # P

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                     self.response_ids, self.response_mask, self.loss_mask)),
            prompt_len=self.prompt_len,
        )


def collate(trajectories: list[Trajectory], pad_id: int) -> TokenBatch:
    """Pad ``trajectories`` into a :class:`TokenBatch` (see the module doc for the layout)."""
    P = max(len(t.prompt_ids) for t in trajectories)
    R = max(max(len(t.response_ids) for t in trajectories), 1)
    B = len(trajectories)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    loss_mask = torch.zeros((B, R), dtype=torch.float32)
    for i, t in enumerate(trajectories):
        p, r = len(t.prompt_ids), len(t.response_ids)
        input_ids[i, P - p : P] = torch.tensor(t.prompt_ids, dtype=torch.long)
        attention[i, P - p : P + r] = 1
        if r:
            input_ids[i, P : P + r] = torch.tensor(t.response_ids, dtype=torch.long)
            response_mask[i, :r] = 1.0
            loss_mask[i, :r] = torch.tensor(t.loss_mask, dtype=torch.float32)
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)  # [B, P + R]
    return TokenBatch(input_ids, attention, position_ids, input_ids[:, P:], response_mask, loss_mask, P)


def _response_hidden_logits(model, batch: TokenBatch) -> Tensor:
    """Logits predicting each response token: ``[B, R, V]``."""
    R = batch.response_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=R + 1,
    )
    return out.logits[:, :-1, :]  # [B, R, V]: column P-1+t predicts response token t


def response_logprobs(
    model, batch: TokenBatch, temperature: float = 1.0, with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response tokens under ``model`` ``[B, R]`` (and entropies ``[B, R]``;
    detached unless ``entropy_grad``, so an entropy used only as a metric costs no graph)."""
    logits = _response_hidden_logits(model, batch).float()  # [B, R, V]
    if temperature != 1.0:
        logits = logits / temperature
    logp = logprobs_from_logits(logits, batch.response_ids)  # [B, R]
    ent = None
    if with_entropy:
        ent = entropy_from_logits(logits if entropy_grad else logits.detach())
    return logp, ent


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


def micro_batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
