"""Generation with any Hugging Face causal LM: our own sampling loop over a KV cache.

:class:`HFGenerator` implements :class:`~searchrl.rollout.generator.Generator`:

* prompts are left-padded into one batch (or chunks of ``batch_size``, longest first) with an
  attention mask and position ids that count real tokens only, so a padded row computes what it
  would alone; the prompt is run once, then one token per step through a ``DynamicCache``;
* greedy (``temperature == 0``) takes the argmax; otherwise tokens are drawn from
  ``softmax(logits / temperature)``, restricted to the top-p nucleus when ``top_p < 1``, with a
  ``torch.Generator`` seeded from ``SamplingParams.seed`` (same seed, same inputs: same tokens);
* **log-probs** are ``log_softmax(logits / temperature)`` of the raw model at the sampled token
  (temperature 1 when greedy), *before* top-p truncation: at the RL setting (temperature 1, top-p 1)
  this is exactly the policy's log-probability, the quantity PPO/GRPO ratios need;
* a row ends on an EOS id (the tokenizer's EOS and chat end tokens such as ``<|im_end|>``, see
  :func:`searchrl.models.eos_token_ids`), on a stop string, or at ``max_new_tokens``. Stop strings
  are checked while sampling by decoding only the tail of the row; a stop string completed inside
  a token ends the row after that token. Tokens are returned exactly as sampled (EOS included);
  ``Completion.text`` is their decoding with special tokens skipped (as vLLM does);
* finished rows leave the batch at once (the KV cache rows are index-selected), so the work per
  step shrinks as rows finish.

Left out: beam search, repetition penalties, speculative decoding, trimming pad columns of the
cache once the longest rows have finished, CUDA graphs (use the vLLM backend for speed).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from searchrl.errors import SearchRLError
from searchrl.rollout.generator import Completion, SamplingParams

log = logging.getLogger(__name__)

_STOP_WINDOW_EXTRA = 16  # tokens decoded for stop checks beyond the longest stop string's length


@dataclass
class _Row:
    """Output state of one prompt while it is being generated."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    stop_string: str | None = None


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` (or the base model's under PEFT) accepts ``logits_to_keep``."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        if m is not None and "logits_to_keep" in inspect.signature(m.forward).parameters:
            return True
    return False


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def sample_next(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from ``logits`` (b, V); return ``(token_ids (b,), logprobs (b,))``.

    Log-probs are ``log_softmax(logits / T)`` at the chosen token (``T = 1`` when greedy), taken
    before top-p truncation (see the module docstring).
    """
    logits = logits.float()  # (b, V)
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)  # (b,)
        logp = torch.log_softmax(logits, dim=-1)  # (b, V)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / sampling.temperature, dim=-1)  # (b, V)
    probs = logp.exp()  # (b, V)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (b, V), (b, V)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= sampling.top_p, 0.0)  # the first token stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (b,)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class HFGenerator:
    """Generator over a transformers causal LM (see the module docstring for the exact semantics).

    ``device``: move the model there (default: where its parameters are). ``batch_size``: at most
    this many prompts per forward batch (default: all at once). ``eos_token_ids``: ids that end a
    row (default: :func:`searchrl.models.eos_token_ids`). The model is put in eval mode during
    ``generate`` and its previous mode restored afterwards, so a policy being trained can be shared.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ):
        from searchrl.models import eos_token_ids as default_eos_ids

        if batch_size is not None and batch_size < 1:
            raise SearchRLError(f"batch_size must be >= 1 (got {batch_size})")
        if device is not None:
            model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.device = _model_device(model)
        self.batch_size = batch_size
        ids = default_eos_ids(tokenizer, model) if eos_token_ids is None else eos_token_ids
        self.eos_token_ids = frozenset(int(i) for i in ids)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else min(self.eos_token_ids, default=0))
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._logits_to_keep = _accepts_logits_to_keep(model)

    # ------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        stop: list[str] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order."""
        self._check(prompts, sampling)
        stops = [s for s in (stop or []) if s]
        if not prompts:
            return []
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(sampling.seed))
        order = list(range(len(prompts)))
        size = self.batch_size or len(prompts)
        if size < len(prompts):  # chunks of similar lengths waste less on padding
            order.sort(key=lambda i: -len(prompts[i]))
        rows: list[_Row | None] = [None] * len(prompts)
        with torch.inference_mode(), _eval_mode(self.model):
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                done = self._generate_batch([prompts[i] for i in chunk], sampling, stops, generator)
                for i, row in zip(chunk, done):
                    rows[i] = row
        return [self._completion(r) for r in rows if r is not None]

    def _check(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        if sampling.max_new_tokens < 0:
            raise SearchRLError(f"max_new_tokens must be >= 0 (got {sampling.max_new_tokens})")
        if not sampling.greedy and not 0.0 < sampling.top_p <= 1.0:
            raise SearchRLError(f"top_p must be in (0, 1] (got {sampling.top_p})")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise SearchRLError(f"prompt {i} is empty: generation needs at least one token")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                raise SearchRLError(
                    f"prompt {i} has token id {hi if hi >= self.vocab_size else lo} outside the "
                    f"model's vocabulary [0, {self.vocab_size})"
                )

    def _completion(self, row: _Row) -> Completion:
        text = self.tokenizer.decode(
            row.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return Completion(row.token_ids, row.logprobs, row.finish_reason, row.stop_string, text)

    # ------------------------------------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Run the model on new tokens; return the last position's logits (b, V)."""
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(
            input_ids=input_ids,  # (b, t)
            attention_mask=attention_mask,  # (b, past + t)
            position_ids=position_ids,  # (b, t)
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1, :]  # (b, V)

    def _generate_batch(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        stops: list[str],
        generator: torch.Generator | None,
    ) -> list[_Row]:
        from transformers import DynamicCache

        rows = [_Row() for _ in prompts]
        if sampling.max_new_tokens == 0:
            for r in rows:
                r.finish_reason = "length"
            return rows
        b, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)  # (b, L)
        attention = torch.zeros((b, width), dtype=torch.long)  # (b, L)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(dim=-1) - 1).clamp_(min=0)  # (b, L): pads at 0
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, attention, positions, cache)  # (b, V)
        next_pos = positions[:, -1:] + 1  # (b, 1)
        active = list(range(b))  # batch position -> row index
        window = max((len(s) for s in stops), default=0) + _STOP_WINDOW_EXTRA
        while True:
            tokens, logps = sample_next(logits, sampling, generator)  # (b',), (b',)
            keep = [
                j
                for j, (t, lp) in enumerate(zip(tokens.tolist(), logps.tolist()))
                if not self._append(rows[active[j]], t, lp, sampling, stops, window)
            ]
            if not keep:
                return rows
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                attention, tokens, next_pos = attention[idx], tokens[idx], next_pos[idx]
                active = [active[j] for j in keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
            logits = self._forward(tokens[:, None], attention, next_pos, cache)  # (b', V)
            next_pos = next_pos + 1

    def _append(
        self, row: _Row, token: int, logprob: float, sampling: SamplingParams, stops: list[str],
        window: int,
    ) -> bool:
        """Record one sampled token; return whether the row is finished."""
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        if token in self.eos_token_ids:
            row.finish_reason = "eos"
        elif stops and (hit := self._stop_hit(row.token_ids, stops, window)) is not None:
            row.finish_reason, row.stop_string = "stop", hit
        elif len(row.token_ids) >= sampling.max_new_tokens:
            row.finish_reason = "length"
        return bool(row.finish_reason)

    def _stop_hit(self, token_ids: list[int], stops: list[str], window: int) -> str | None:
        """The stop string that the tail of ``token_ids`` now contains (earliest first), if any."""
        tail = self.tokenizer.decode(
            token_ids[-window:], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        found = [(pos, s) for s in stops if (pos := tail.find(s)) >= 0]
        return min(found)[1] if found else None
