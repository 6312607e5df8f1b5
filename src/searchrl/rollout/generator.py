"""The generation interface: token ids in, sampled token ids + log-probs + finish reason out.

Backends (``hf`` for any transformers causal LM, ``vllm`` when installed) implement
:class:`Generator`. Stop strings are honoured *during* sampling: a row stops as soon as its decoded
text contains one of them (the stop string is kept, the tokens are exactly as sampled; a stop string
that ends in the middle of a token keeps that whole token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 500
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    """One row's output. ``finish_reason`` is ``"stop"`` (a stop string), ``"eos"`` or ``"length"``."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_string: str | None = None  # which stop string ended it, when finish_reason == "stop"
    text: str = field(default="", repr=False)  # decoded token_ids (for convenience, never re-encoded)


@runtime_checkable
class Generator(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        stop: list[str] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order."""
        ...
