"""The rollout loop's budgets and sampling settings (:class:`RolloutConfig`), checked on creation.

What each field means for a trajectory is written out in :mod:`searchrl.rollout.loop`. Left out:
the trainer's and the evaluator's own settings (how many samples, batch sizes), which they pass to
:func:`~searchrl.rollout.loop.run_rollouts` directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from searchrl.errors import ConfigError
from searchrl.rollout.prompts import INVALID_ACTION_FEEDBACK, LAST_TURN_NOTICE
from searchrl.tags import extract_answer

FINISH_REASONS = ("answer", "search_on_last_turn", "max_turns", "eos", "context")
SCHEDULES = ("auto", "continuous", "rounds")


@dataclass
class RolloutConfig:
    """Budgets and sampling of the rollout loop (:mod:`searchrl.rollout.loop` has the exact rules)."""

    max_turns: int = 4  # turns that may search; one final answer-only turn follows
    topk: int = 3  # passages per search
    max_new_tokens_per_turn: int = 500
    max_obs_tokens: int = 500  # tokens of one inserted information block
    max_context_tokens: int = 4096  # prompt + response, never exceeded
    min_turn_tokens: int = 16  # a turn needs at least this many free tokens, else "context"
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # how it seeds each schedule: searchrl.rollout.loop
    schedule: str = "auto"  # "auto" | "continuous" | "rounds" (searchrl.rollout.loop)
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
