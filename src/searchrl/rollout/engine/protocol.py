"""The generation interface: token ids in, sampled token ids + log-probs + finish reason out.

Backends (``hf`` for any transformers causal LM, ``vllm`` when installed) implement
:class:`Generator`. Stop strings are honoured *during* sampling: a row stops as soon as its decoded
text contains one of them (the stop string is kept, the tokens are exactly as sampled; a stop string
that ends in the middle of a token keeps that whole token).

Log-probs are the sampled tokens' log-probabilities under the raw model's
``softmax(logits / temperature)`` (temperature 1 when greedy), before any top-p truncation: at
temperature 1 (the RL setting) every backend returns the policy's own log-probabilities. (vLLM's
engine has one log-prob mode, chosen for the temperature it is built for; at another temperature
with top-p < 1 its values are those of the truncated distribution, with a warning.)

A backend may keep state across calls that depends on the weights (the ``hf`` backend keeps KV
caches): it then also implements :class:`ResettableGenerator` (``reset_cache()``), and callers
that change the weights or start an independent batch of work call :func:`reset_cache`, which is
a no-op for backends without such state. It is optional: the :class:`Generator` protocol does not
require it.

A backend that can run a *continuous batch* also implements :class:`StreamingGenerator`
(``stream()`` returns a :class:`GenerationStream`: rows are added under a key, each ``step()``
advances every running row by one token and returns the rows that finished), so the multi-turn
loop can put a trajectory's next turn back into the batch as soon as its observation is ready.
The loop drives every backend through a stream: a batch-only one through
:class:`~searchrl.rollout.engine.batch_stream.BatchStream` (rounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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
    """One row's output. ``finish_reason`` is ``"stop"`` (a stop string), ``"eos"`` or ``"length"``.

    ``token_ids`` are exactly the sampled tokens (an EOS token included); ``logprobs`` has one entry
    per token (see the module docstring for which distribution); ``text`` decodes ``token_ids``
    with special tokens skipped.
    """

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


@runtime_checkable
class ResettableGenerator(Generator, Protocol):
    def reset_cache(self) -> None:
        """Forget all state kept from earlier calls (e.g. KV caches of the previous weights)."""
        ...


@runtime_checkable
class GenerationStream(Protocol):
    """A continuous batch: rows join and leave between steps (see
    :class:`~searchrl.rollout.engine.hf.HFStream`; any batch :class:`Generator` becomes one, run
    as rounds, through :class:`~searchrl.rollout.engine.batch_stream.BatchStream`). Opened as a
    context manager. ``calls`` counts the backend's invocations so far (``step`` calls of a
    continuous batch, ``generate`` calls of a batch adapter)."""

    calls: int

    def add(self, key: Any, prompt: list[int], max_new_tokens: int, seed: int | None = None) -> None:
        """Queue one row under ``key``; it joins the batch at the next step."""
        ...

    def step(self) -> list[tuple[Any, Completion]]:
        """Advance the rows (one token each, or a batch backend: to their end); return the rows
        that finished, as ``(key, Completion)``."""
        ...

    def release(self, key: Any) -> None:
        """Forget what is kept for ``key`` (its work is over)."""
        ...

    @property
    def busy(self) -> bool:
        """Whether a row is queued or running."""
        ...

    def __enter__(self) -> GenerationStream: ...

    def __exit__(self, *exc: Any) -> None: ...


@runtime_checkable
class StreamingGenerator(Generator, Protocol):
    """A generator that can also run a continuous batch (``can_stream`` says whether it can for
    the model it holds, ``prefers_stream`` whether it is the faster schedule there)."""

    can_stream: bool
    prefers_stream: bool

    def stream(self, sampling: SamplingParams, stop: list[str] | None = None) -> GenerationStream:
        """A stream sampling with ``sampling``'s temperature and top-p (budgets and seeds are
        per row)."""
        ...


def reset_cache(generator: Any) -> None:
    """Call ``generator.reset_cache()`` when it has one; do nothing otherwise."""
    reset = getattr(generator, "reset_cache", None)
    if callable(reset):
        reset()
