"""The multi-turn search rollout loop: questions in, token-level trajectories out.

Token in, token out: the model's tokens are kept exactly as sampled (EOS included, trained);
only inserted text (information blocks, corrective feedback) is encoded, with
``add_special_tokens=False``. ``loss_mask`` is 1 on sampled tokens and 0 on inserted ones, and
``sampler_logprobs`` is 0.0 on inserted tokens, so ``response_ids``, ``loss_mask`` and
``sampler_logprobs`` always have one entry per response token (``Trajectory.add_sampled`` /
``add_inserted``).

Two schedules (``RolloutConfig.schedule``; ``auto`` picks ``continuous`` when the generator
can stream and prefers it, see :class:`~searchrl.rollout.engine.protocol.StreamingGenerator`: the HF
backend on a GPU; else ``rounds``):

- ``continuous``: up to ``batch_size`` trajectories run in one continuous batch. After every
  decode step, the turns that ended are parsed, ALL queries of that step go to the retriever in one
  batched call, and each searching trajectory is queued to rejoin the running batch with its
  observation (the generator joins queued rows in small groups within a few steps, and prefills
  only the new tokens when it keeps their KV); a finished trajectory frees its slot for the next
  pending (example, sample) pair at once. Nobody waits for the slowest row of a turn. Each turn
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
takes milliseconds against a decode step's ~0.1 s on CPU), reward computation
(:mod:`searchrl.rewards`) and tensor padding (the trainer).
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
from searchrl.rollout.engine.protocol import Completion, Generator, SamplingParams, reset_cache
from searchrl.rollout.parser import parse_action
from searchrl.rollout.prompts import (
    INVALID_ACTION_FEEDBACK,
    LAST_TURN_NOTICE,
    PROMPT_METHODS,
    build_prompt,
    format_information,
)
from searchrl.tags import extract_answer
from searchrl.types import Passage, QAExample, Trajectory, Turn

log = logging.getLogger(__name__)

FINISH_REASONS = ("answer", "search_on_last_turn", "max_turns", "eos", "context")
SCHEDULES = ("auto", "continuous", "rounds")


@dataclass
class RolloutConfig:
    """Budgets and sampling of the rollout loop (see the module doc for the exact rules)."""

    max_turns: int = 4  # turns that may search; one final answer-only turn follows
    topk: int = 3  # passages per search
    max_new_tokens_per_turn: int = 500
    max_obs_tokens: int = 500  # tokens of one inserted information block
    max_context_tokens: int = 4096  # prompt + response, never exceeded
    min_turn_tokens: int = 16  # a turn needs at least this many free tokens, else "context"
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # see the module doc for how it seeds each schedule
    schedule: str = "auto"  # "auto" | "continuous" | "rounds" (module doc)
    stop: tuple[str, ...] = ("</search>", "</answer>")
    feedback: str = INVALID_ACTION_FEEDBACK  # inserted after an invalid action
    last_turn_notice: str = LAST_TURN_NOTICE  # shown before the final turn ("" = none)
    on_eos: str = "end"  # "end" | "feedback": what EOS without an action does

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        ints = ("max_turns", "topk", "max_new_tokens_per_turn", "max_obs_tokens",
                "max_context_tokens", "min_turn_tokens")  # fmt: skip
        for name in ints:
            value = getattr(self, name)
            low = 0 if name == "max_turns" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"rollout.{name}: must be an integer >= {low}, got {value!r}")
        if self.min_turn_tokens > self.max_new_tokens_per_turn:
            raise ConfigError(
                f"rollout.min_turn_tokens ({self.min_turn_tokens}) must be <= "
                f"rollout.max_new_tokens_per_turn ({self.max_new_tokens_per_turn})"
            )
        if self.max_context_tokens <= self.min_turn_tokens:
            raise ConfigError("rollout.max_context_tokens must exceed rollout.min_turn_tokens")
        if not self.temperature >= 0:
            raise ConfigError(f"rollout.temperature: must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p: must be in (0, 1], got {self.top_p!r}")
        if not self.stop or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"rollout.stop: need non-empty strings, got {self.stop!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"rollout.schedule: one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.on_eos not in ("end", "feedback"):
            raise ConfigError(f"rollout.on_eos: 'end' or 'feedback', got {self.on_eos!r}")
        for name in ("feedback", "last_turn_notice"):
            if extract_answer(getattr(self, name)) is not None:
                raise ConfigError(
                    f"rollout.{name}: contains a complete <answer> block, which would be "
                    "graded as the model's answer"
                )


@dataclass
class RolloutStats:
    """Where a run's time went (filled in place when passed to :func:`run_rollouts`).

    ``generator_calls``: ``generate`` calls (rounds) or decode steps (continuous); ``rounds``:
    rounds, or the steps at which some turn ended (continuous).
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


def fit_information(
    tokenizer: Any, passages: Sequence[Passage], budget: int, note: str = ""
) -> tuple[str, list[int]] | None:
    """The largest information block of at most ``budget`` tokens, or ``None`` if none fits.

    Keeps the leading passages whole; when even the first one is too long, its text is cut at a
    token boundary; when not even its title fits, an empty block. The wrapper and closing tag are
    always complete.
    """

    def render(ps: Sequence[Passage]) -> tuple[str, list[int]]:
        text = format_information(ps, note)
        return text, list(tokenizer.encode(text, add_special_tokens=False))

    for n in range(len(passages), 0, -1):
        text, ids = render(passages[:n])
        if len(ids) <= budget:
            return text, ids
    if passages:
        first = passages[0]
        text_ids = tokenizer.encode(first.text, add_special_tokens=False)
        lo, hi, best = 0, len(text_ids) - 1, None
        while lo <= hi:  # largest prefix of the text that fits
            mid = (lo + hi) // 2
            cut = tokenizer.decode(text_ids[:mid], skip_special_tokens=False).rstrip("\ufffd")
            text, ids = render([Passage(first.id, first.title, cut, first.score)])
            if len(ids) <= budget:
                best, lo = (text, ids), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            return best
    text, ids = render([])
    return (text, ids) if len(ids) <= budget else None


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
        self._calls = 0

    # ---- generation -------------------------------------------------------------------------
    def _budget(self, a: _Active) -> int:
        return min(self.cfg.max_new_tokens_per_turn, self.cfg.max_context_tokens - a.length)

    def generate(self, rows: list[_Active]) -> list[Completion]:
        """One completion per row; one generator call per distinct token budget."""
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(rows):
            groups.setdefault(self._budget(a), []).append(i)
        out: list[Completion | None] = [None] * len(rows)
        for budget, idx in sorted(groups.items(), reverse=True):
            cfg = self.cfg
            seed = None if cfg.seed is None else cfg.seed + self._calls
            self._calls += 1
            sampling = SamplingParams(budget, cfg.temperature, cfg.top_p, seed)
            prompts = [rows[i].traj.prompt_ids + rows[i].traj.response_ids for i in idx]
            t0 = time.perf_counter()
            comps = self.generator.generate(prompts, sampling, stop=list(self.stop))
            self.stats.generation_seconds += time.perf_counter() - t0
            self.stats.generator_calls += 1
            if len(comps) != len(prompts):
                raise SearchRLError(
                    f"generator returned {len(comps)} completions for {len(prompts)} prompts"
                )
            for i, c in zip(idx, comps):
                self._check_completion(c)
                self.stats.generated_tokens += len(c.token_ids)
                out[i] = c
        return out  # type: ignore[return-value]

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
        """The seed of trajectory ``a``'s next turn under the continuous schedule."""
        if self.cfg.seed is None:
            return None
        entropy = [self.cfg.seed % 2**63, a.key[0], a.key[1], a.turns_done]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)

    def run_continuous(
        self, examples: Sequence[QAExample], n_samples: int, batch_size: int, progress: bool
    ) -> list[Trajectory]:
        """The continuous schedule (module doc) over a streaming generator."""
        prompts = self.prompts(examples)
        pending = deque((i, s) for i in range(len(examples)) for s in range(n_samples))
        done: dict[tuple[int, int], Trajectory] = {}
        active: dict[tuple[int, int], _Active] = {}
        bar = tqdm(total=len(pending), desc=f"rollouts ({self.method})", unit="traj",
                   disable=not progress, leave=False)  # fmt: skip
        cfg = self.cfg
        sampling = SamplingParams(cfg.max_new_tokens_per_turn, cfg.temperature, cfg.top_p)

        with self.generator.stream(sampling, stop=list(self.stop)) as stream:  # type: ignore[attr-defined]
            def end(a: _Active) -> None:
                stream.release(a.key)
                done[a.key] = self.finish(a)
                active.pop(a.key, None)
                bar.update(1)

            def launch(a: _Active) -> None:
                stream.add(a.key, a.traj.prompt_ids + a.traj.response_ids, self._budget(a), self.turn_seed(a))

            def refill() -> None:
                while pending and len(active) < batch_size:
                    key = pending.popleft()
                    a = self.admit(examples[key[0]], prompts[key[0]], key)
                    active[key] = a
                    if a.traj.finish_reason:  # the prompt leaves no room
                        end(a)
                    else:
                        launch(a)

            refill()
            while active:
                if not stream.busy:
                    raise SearchRLError("rollout: trajectories in flight but the stream is idle")
                t0 = time.perf_counter()
                finished = stream.step()
                self.stats.generation_seconds += time.perf_counter() - t0
                self.stats.generator_calls += 1
                if not finished:
                    continue
                self.stats.rounds += 1
                searches = []
                for key, c in finished:
                    self._check_completion(c)
                    self.stats.generated_tokens += len(c.token_ids)
                    query = self.apply(active[key], c)
                    if query is not None:
                        searches.append((active[key], query))
                self.observe(searches)
                for key, _ in finished:
                    a = active[key]
                    if a.traj.finish_reason:
                        end(a)
                    else:
                        launch(a)
                refill()
        bar.close()
        self.stats.trajectories += len(done)
        log.debug("rollouts done: %s", self.stats.as_dict())
        return [done[k] for k in sorted(done)]

    def run(self, examples: Sequence[QAExample], n_samples: int, batch_size: int, progress: bool):
        prompts = self.prompts(examples)
        pending = deque((i, s) for i in range(len(examples)) for s in range(n_samples))
        done: dict[tuple[int, int], Trajectory] = {}
        active: list[_Active] = []
        bar = tqdm(total=len(pending), desc=f"rollouts ({self.method})", unit="traj",
                   disable=not progress, leave=False)  # fmt: skip
        while active or pending:
            while pending and len(active) < batch_size:
                key = pending.popleft()
                active.append(self.admit(examples[key[0]], prompts[key[0]], key))
            runnable = [a for a in active if not a.traj.finish_reason]
            if runnable:
                self.stats.rounds += 1
                searches = []
                for a, c in zip(runnable, self.generate(runnable)):
                    query = self.apply(a, c)
                    if query is not None:
                        searches.append((a, query))
                self.observe(searches)
            still = []
            for a in active:
                if a.traj.finish_reason:
                    done[a.key] = self.finish(a)
                    bar.update(1)
                else:
                    still.append(a)
            active = still
        bar.close()
        self.stats.trajectories += len(done)
        log.debug("rollouts done: %s", self.stats.as_dict())
        return [done[k] for k in sorted(done)]


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
    reset_cache(generator)  # nothing kept from earlier weights is used, nothing outlives the run
    try:
        if continuous:
            return run.run_continuous(examples, n_samples, batch_size, progress)
        return run.run(examples, n_samples, batch_size, progress)
    finally:
        reset_cache(generator)
