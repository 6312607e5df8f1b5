"""Turn trajectories into padded training tensors, and run the policy over them for log-probs.

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


# Causal LMs whose logits are exactly ``lm_head(final hidden state)``: for these the head can run on
# the few positions a loss needs. Others (logit soft-capping, logit scales) take the full forward.
_HEAD_ONLY_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                     "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def _split_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, lm_head) of ``model`` (through a PEFT wrapper) when logits are just the head's output."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base).__name__ not in _HEAD_ONLY_MODELS or not hasattr(base, "get_decoder"):
        return None
    return base.get_decoder(), base.get_output_embeddings()


def _full_logits(model, batch: TokenBatch) -> Tensor:
    """Logits predicting each response token: ``[B, R, V]`` (the whole model's forward)."""
    R = batch.response_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=R + 1,
    )
    return out.logits[:, :-1, :]  # [B, R, V]: column P-1+t predicts response token t


def _selected_logits(model, batch: TokenBatch, sel: Tensor, head_only: bool = True) -> Tensor:
    """Logits ``[n, V]`` predicting the response tokens where ``sel`` ``[B, R]`` is True."""
    parts = _split_head(model) if head_only else None
    if parts is None:
        return _full_logits(model, batch)[sel]
    decoder, head = parts
    P, R = batch.prompt_len, batch.response_ids.shape[1]
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False).last_hidden_state  # [B, P + R, H]
    return head(hidden[:, P - 1 : P - 1 + R][sel])  # [n, V]


def response_logprobs(
    model, batch: TokenBatch, temperature: float = 1.0, with_entropy: bool = False,
    entropy_grad: bool = False, mask: Tensor | None = None, chunk_size: int = 1024,
    head_only: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response tokens under ``model`` at ``temperature``, ``[B, R]`` (and
    entropies ``[B, R]``, detached unless ``entropy_grad``, so an entropy used only as a metric
    costs no graph).

    With ``mask`` ``[B, R]``, only the positions where it is 1 are computed (0.0 elsewhere). For
    the models in ``_HEAD_ONLY_MODELS`` the LM head then runs on those positions alone (inserted
    observation tokens and padding skip the vocabulary projection); ``head_only=False`` forces the
    full forward (for comparisons). Logits are cast to float32 ``chunk_size`` positions at a time,
    never as one ``[B, R, V]`` float32 tensor.
    """
    sel = batch.response_mask.bool() if mask is None else mask.bool() & batch.response_mask.bool()  # [B, R]
    logits = _selected_logits(model, batch, sel, head_only)  # [n, V]
    labels = batch.response_ids[sel]  # [n]
    lp_parts, ent_parts = [], []
    for s in range(0, labels.shape[0], chunk_size):
        lf = logits[s : s + chunk_size].float()  # [c, V]
        if temperature != 1.0:
            lf = lf / temperature
        lp_parts.append(logprobs_from_logits(lf, labels[s : s + chunk_size]))
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent_parts.append(entropy_from_logits(lf if entropy_grad else lf.detach()))
    logp = _scatter(sel, lp_parts, logits.device)  # [B, R]
    return logp, (_scatter(sel, ent_parts, logits.device) if with_entropy else None)


def _scatter(sel: Tensor, parts: list[Tensor], device: torch.device) -> Tensor:
    """Values ``[n]`` (concatenated ``parts``) put back at ``sel``'s True positions of a zero ``[B, R]``."""
    out = torch.zeros(sel.shape, dtype=torch.float32, device=device)
    return out.masked_scatter(sel, torch.cat(parts)) if parts else out


def micro_batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
