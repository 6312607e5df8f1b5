"""The multi-turn search rollout loop: questions in, token-level trajectories out.

Token in, token out: the model's tokens are kept exactly as sampled (EOS included, trained);
only inserted text (information blocks, corrective feedback) is encoded, with
``add_special_tokens=False``. ``loss_mask`` is 1 on sampled tokens and 0 on inserted ones, and
``sampler_logprobs`` is 0.0 on inserted tokens, so ``response_ids``, ``loss_mask`` and
``sampler_logprobs`` always have one entry per response token (``Trajectory.add_sampled`` /
``add_inserted``).

Two schedules (``RolloutConfig.schedule``; ``auto`` picks ``continuous`` when the generator
can stream and prefers it, see :class:`~searchrl.rollout.engine.protocol.StreamingGenerator`: the HF
backend on a GPU, the vLLM backend anywhere; else ``rounds``):

- ``continuous``: the generator's own stream, one decode step per ``step`` (it joins queued rows
  in small groups within a few steps, and prefills only the new tokens when it keeps their KV).
  Nobody waits for the slowest row of a turn. Each turn
  samples from its own random stream, seeded from ``(seed, example index, sample index, turn)``,
  so a trajectory does not depend on the batch size or on which trajectories share its steps (up
  to float rounding).
- ``rounds``: one round = one ``generate`` call for every active trajectory, whatever turn it is
  at, then ONE batched ``retriever.search`` call holding every query of the round; finished
  trajectories free their slot for the next round (refill). The generator takes one
  ``max_new_tokens`` per call, so rows whose budget is cut by the context limit are generated in
  a separate call of the same round. Call ``i`` of a run samples with ``seed + i``. Any
  :class:`~searchrl.rollout.engine.protocol.Generator` works.

Turns and their budget (a trajectory has at most ``max_turns + 1`` model turns):

- turns 1..``max_turns`` may search (Search-R1's ``max_turns``); turn ``max_turns + 1`` is the
  final answer-only turn. The observation that precedes it carries ``last_turn_notice`` (inside
  the information block, so a well-formed trajectory stays well-formed). A ``<search>`` on the
  final turn ends the episode unanswered (finish reason ``search_on_last_turn``; the turn is
  recorded as ``invalid`` since no search was run).
- answer: finish reason ``answer``. Invalid action (no complete block, empty query, length cut):
  ``feedback`` is inserted and the next turn starts; on the final turn: ``max_turns``. EOS without
  an action ends the episode (``eos``) by default, so no EOS sits inside a trained sequence;
  ``on_eos="feedback"`` treats it as an invalid action instead.
- per turn at most ``max_new_tokens_per_turn`` tokens, fewer when the context is nearly full;
  observations at most ``max_obs_tokens`` (whole trailing passages dropped first, then the first
  passage's text cut at a token boundary; the closing ``</information>`` is always kept).
- the context (prompt + response) never exceeds ``max_context_tokens``: when an insertion plus
  ``min_turn_tokens`` for the next turn cannot fit, the episode ends with ``context``; the prompt
  is never truncated (a prompt that leaves no room ends at once with ``context``, no turn).

``method`` ``direct`` | ``cot`` | ``rag`` run one answer-only turn with the matching prompt
(``rag`` retrieves top-k for every question in one batched call first), same records.

Left out: retrieval running concurrently with decoding (it runs between steps; in-process BM25
is much faster than a decode step), reward computation (:mod:`searchrl.rewards`) and tensor
padding (the trainer). Budgets: :mod:`searchrl.rollout.config`; observation fitting:
:mod:`searchrl.rollout.observation`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from searchrl.errors import ConfigError, SearchRLError
from searchrl.rollout.config import FINISH_REASONS, SCHEDULES, RolloutConfig
from searchrl.rollout.engine.batch_stream import BatchStream
from searchrl.rollout.engine.protocol import (
    Completion,
    GenerationStream,
    Generator,
    SamplingParams,
    reset_cache,
)
from searchrl.rollout.observation import fit_information
from searchrl.rollout.parser import parse_action
from searchrl.rollout.prompts import PROMPT_METHODS, build_prompt
from searchrl.types import Passage, QAExample, Trajectory, Turn

__all__ = ["FINISH_REASONS", "SCHEDULES", "RolloutConfig", "RolloutStats", "fit_information",
           "run_rollouts"]  # fmt: skip

log = logging.getLogger(__name__)

@dataclass
class RolloutStats:
    """Where a run's time went (filled in place when passed to :func:`run_rollouts`).

    ``generator_calls``: ``generate`` calls (rounds) or decode steps (continuous); ``rounds``:
    the stream steps at which some turn ended (every step of the rounds schedule).
    """

    generation_seconds: float = 0.0
    retrieval_seconds: float = 0.0
    generated_tokens: int = 0
    inserted_tokens: int = 0
    generator_calls: int = 0
    retriever_calls: int = 0
    rounds: int = 0
    trajectories: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class _Active:
    """A trajectory in flight."""

    traj: Trajectory
    key: tuple[int, int]  # (example index, sample index): the output order
    turns_done: int = 0

    @property
    def length(self) -> int:
        return len(self.traj.prompt_ids) + len(self.traj.response_ids)


class _Rollout:
    """One run of the loop: holds the collaborators, the config and the counters."""

    def __init__(
        self, generator: Generator, retriever: Any, tokenizer: Any, cfg: RolloutConfig,
        stats: RolloutStats, method: str,
    ):  # fmt: skip
        self.generator, self.retriever, self.tokenizer = generator, retriever, tokenizer
        self.cfg, self.stats, self.method = cfg, stats, method
        self.single_turn = method != "search"
        # single-turn methods cannot search: their rows stop only at the answer's closing tag
        self.stop = [s for s in cfg.stop if not (self.single_turn and "search" in s)]
        self._rag_passages: list[list[Passage] | None] = []
        # the run's state (set by run)
        self._examples: Sequence[QAExample] = []
        self._prompts: list[list[int]] = []
        self._pending: deque[tuple[int, int]] = deque()
        self._active: dict[tuple[int, int], _Active] = {}
        self._done: dict[tuple[int, int], Trajectory] = {}
        self._bar: Any = None

    # ---- generation -------------------------------------------------------------------------
    def _budget(self, a: _Active) -> int:
        return min(self.cfg.max_new_tokens_per_turn, self.cfg.max_context_tokens - a.length)

    @staticmethod
    def _check_completion(c: Completion) -> None:
        if len(c.logprobs) != len(c.token_ids):
            raise SearchRLError("generator returned a completion whose log-probs and "
                                "token ids differ in length")  # fmt: skip

    # ---- appending to a trajectory ----------------------------------------------------------
    def _insert(self, a: _Active, text: str, ids: list[int] | None = None) -> bool:
        """Append inserted text (mask 0) if it and the next turn fit; else end with 'context'."""
        if ids is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if a.length + len(ids) + self.cfg.min_turn_tokens > self.cfg.max_context_tokens:
            a.traj.finish_reason = "context"
            return False
        a.traj.add_inserted(ids, text)
        self.stats.inserted_tokens += len(ids)
        return True

    def _notice_due(self, a: _Active) -> bool:
        return a.turns_done == self.cfg.max_turns and bool(self.cfg.last_turn_notice)

    def apply(self, a: _Active, c: Completion) -> str | None:
        """Record one completion; returns the query when the turn searches, else ``None``."""
        t, cfg = a.traj, self.cfg
        text = c.text or self.tokenizer.decode(c.token_ids, skip_special_tokens=False)
        t.add_sampled(list(c.token_ids), list(c.logprobs))
        final = self.single_turn or a.turns_done == cfg.max_turns
        action = parse_action(text, ("answer",) if self.single_turn else ("search", "answer"))
        turn = Turn(text=text, action=action.kind, finish_reason=c.finish_reason)
        t.turns.append(turn)
        a.turns_done += 1
        if action.kind == "answer":
            t.finish_reason = "answer"
        elif action.kind == "search" and final:
            turn.action, turn.query = "invalid", action.content
            t.finish_reason = "search_on_last_turn"
        elif action.kind == "search":
            turn.query = action.content
            return action.content
        elif c.finish_reason == "eos" and cfg.on_eos == "end":
            t.finish_reason = "eos"
        elif final:
            t.finish_reason = "max_turns"
        else:
            feedback = cfg.feedback
            if self._notice_due(a):
                body = feedback.rstrip()
                feedback = f"{body} {cfg.last_turn_notice}{feedback[len(body):]}"
            self._insert(a, feedback)
        return None

    # ---- retrieval ----------------------------------------------------------------------------
    def retrieve(self, queries: list[str]) -> list[list[Passage]]:
        """One batched retriever call."""
        t0 = time.perf_counter()
        results = self.retriever.search(queries, self.cfg.topk)
        self.stats.retrieval_seconds += time.perf_counter() - t0
        self.stats.retriever_calls += 1
        if len(results) != len(queries):
            raise SearchRLError(
                f"retriever returned {len(results)} result lists for {len(queries)} queries"
            )
        return [list(r)[: self.cfg.topk] for r in results]

    def observe(self, searches: list[tuple[_Active, str]]) -> None:
        """Run all searches of a round in one call and insert each observation."""
        if not searches:
            return
        results = self.retrieve([q for _, q in searches])
        for (a, _), passages in zip(searches, results):
            a.traj.turns[-1].passages = passages
            room = self.cfg.max_context_tokens - a.length - self.cfg.min_turn_tokens
            budget = min(self.cfg.max_obs_tokens, room)
            note = self.cfg.last_turn_notice if self._notice_due(a) else ""
            fitted = fit_information(self.tokenizer, passages, budget, note)
            if fitted is None and budget == self.cfg.max_obs_tokens:
                raise ConfigError(
                    f"rollout.max_obs_tokens={self.cfg.max_obs_tokens} cannot hold even an "
                    "empty information block (with the last-turn notice, if due); raise it"
                )
            if fitted is None:
                a.traj.finish_reason = "context"
            else:
                self._insert(a, *fitted)

    # ---- scheduling -------------------------------------------------------------------------
    def prompts(self, examples: Sequence[QAExample]) -> list[list[int]]:
        passages: list[list[Passage] | None] = [None] * len(examples)
        if self.method == "rag" and examples:
            passages = self.retrieve([ex.question for ex in examples])  # type: ignore[assignment]
        self._rag_passages = passages
        return [
            build_prompt(self.tokenizer, ex.question, self.method, p)
            for ex, p in zip(examples, passages)
        ]

    def admit(self, example: QAExample, prompt: list[int], key: tuple[int, int]) -> _Active:
        traj = Trajectory(example=example, prompt_ids=list(prompt), sample_index=key[1])
        a = _Active(traj, key)
        if a.length + self.cfg.min_turn_tokens > self.cfg.max_context_tokens:
            log.warning("prompt of example %r (%d tokens) leaves no room to generate within "
                        "max_context_tokens=%d", example.id, a.length,
                        self.cfg.max_context_tokens)  # fmt: skip
            traj.finish_reason = "context"
        return a

    def finish(self, a: _Active) -> Trajectory:
        t = a.traj
        t.response_text = self.tokenizer.decode(t.response_ids, skip_special_tokens=False)
        if self.method == "rag" and t.turns:
            t.turns[0].query = t.example.question
            t.turns[0].passages = list(self._rag_passages[a.key[0]] or [])
        return t

    def turn_seed(self, a: _Active) -> int | None:
        """The seed of trajectory ``a``'s next turn (a continuous stream seeds each row with it; a
        batch stream takes one seed per call instead)."""
        if self.cfg.seed is None:
            return None
        entropy = [self.cfg.seed % 2**63, a.key[0], a.key[1], a.turns_done]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)

    def run(
        self, stream: GenerationStream, examples: Sequence[QAExample], n_samples: int,
        batch_size: int, progress: bool,
    ) -> list[Trajectory]:  # fmt: skip
        """The one scheduler (module doc): keep ``batch_size`` trajectories in ``stream``, step it,
        act on the turns that ended, queue the next turns, refill free slots."""
        self._examples, self._prompts = examples, self.prompts(examples)
        self._pending = deque((i, s) for i in range(len(examples)) for s in range(n_samples))
        self._done, self._active = {}, {}
        self._bar = tqdm(total=len(self._pending), desc=f"rollouts ({self.method})", unit="traj",
                         disable=not progress, leave=False)  # fmt: skip
        with stream:
            self._refill(stream, batch_size)
            while self._active:
                if not stream.busy:
                    raise SearchRLError("rollout: trajectories in flight but the stream is idle")
                calls, t0 = stream.calls, time.perf_counter()
                finished = stream.step()
                self.stats.generation_seconds += time.perf_counter() - t0
                self.stats.generator_calls += stream.calls - calls
                if finished:
                    self._turns_ended(stream, finished)
                    self._refill(stream, batch_size)
        self._bar.close()
        self.stats.trajectories += len(self._done)
        log.debug("rollouts done: %s", self.stats.as_dict())
        return [self._done[k] for k in sorted(self._done)]

    def _turns_ended(self, stream: GenerationStream, finished: list[tuple[Any, Completion]]) -> None:
        """Apply each finished turn, run the step's searches in one call, queue the next turns."""
        self.stats.rounds += 1
        searches = []
        for key, c in finished:
            self._check_completion(c)
            self.stats.generated_tokens += len(c.token_ids)
            query = self.apply(self._active[key], c)
            if query is not None:
                searches.append((self._active[key], query))
        self.observe(searches)
        for key, _ in finished:
            a = self._active[key]
            if a.traj.finish_reason:
                self._end(stream, a)
            else:
                self._launch(stream, a)

    def _refill(self, stream: GenerationStream, batch_size: int) -> None:
        """Admit pending (example, sample) pairs while fewer than ``batch_size`` are in flight."""
        while self._pending and len(self._active) < batch_size:
            key = self._pending.popleft()
            a = self.admit(self._examples[key[0]], self._prompts[key[0]], key)
            self._active[key] = a
            if a.traj.finish_reason:  # the prompt leaves no room
                self._end(stream, a)
            else:
                self._launch(stream, a)

    def _launch(self, stream: GenerationStream, a: _Active) -> None:
        context = a.traj.prompt_ids + a.traj.response_ids
        stream.add(a.key, context, self._budget(a), self.turn_seed(a))

    def _end(self, stream: GenerationStream, a: _Active) -> None:
        stream.release(a.key)
        self._done[a.key] = self.finish(a)
        del self._active[a.key]
        self._bar.update(1)


def run_rollouts(
    examples: Sequence[QAExample],
    generator: Generator,
    retriever: Any,
    tokenizer: Any,
    cfg: RolloutConfig | None = None,
    n_samples: int = 1,
    batch_size: int = 64,
    method: str = "search",
    stats: RolloutStats | None = None,
    progress: bool = True,
) -> list[Trajectory]:
    """Roll out ``n_samples`` trajectories per example; sorted by example, then sample index.

    ``batch_size`` is the number of trajectories in flight (one generator row each);
    ``retriever`` may be ``None`` for ``direct`` and ``cot``. ``cfg.schedule`` picks continuous
    batching or rounds (module doc). ``stats``, when given, is filled
    in place. A generator with ``reset_cache()`` (KV reuse) is reset at the start and the end of
    the run. See the module doc for the rules of the loop.
    """
    cfg = cfg or RolloutConfig()
    if method not in PROMPT_METHODS:
        raise ConfigError(f"method: unknown rollout method {method!r}; valid: {PROMPT_METHODS}")
    if retriever is None and method in ("search", "rag"):
        raise ConfigError(f"method {method!r} needs a retriever")
    if n_samples < 1 or batch_size < 1:
        raise ConfigError(f"n_samples and batch_size must be >= 1 (got {n_samples}, {batch_size})")
    run = _Rollout(generator, retriever, tokenizer, cfg, stats or RolloutStats(), method)
    can_stream = callable(getattr(generator, "stream", None)) and getattr(generator, "can_stream", False)
    if cfg.schedule == "continuous" and not can_stream:
        raise ConfigError(f"rollout.schedule=continuous: {type(generator).__name__} cannot stream "
                          "(use 'rounds' or 'auto')")  # fmt: skip
    prefers = can_stream and getattr(generator, "prefers_stream", False)
    continuous = cfg.schedule == "continuous" or (cfg.schedule == "auto" and prefers)
    sampling = SamplingParams(cfg.max_new_tokens_per_turn, cfg.temperature, cfg.top_p, cfg.seed)
    stop = list(run.stop)
    reset_cache(generator)  # nothing kept from earlier weights is used, nothing outlives the run
    try:
        if continuous:
            stream = generator.stream(sampling, stop=stop)  # type: ignore[attr-defined]
        else:
            stream = BatchStream(generator, sampling, stop)
        return run.run(stream, examples, n_samples, batch_size, progress)
    finally:
        reset_cache(generator)
