"""Small typed records shared across the package: passages, QA examples, turns, trajectories.

Only plain data lives here (no I/O, no model code). Token-level tensors are kept as Python lists so
records stay serialisable; the trainer turns them into tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from searchrl.tags import first_block


@dataclass(frozen=True)
class Passage:
    """One retrievable passage. ``score`` is set by a retriever, ``None`` for corpus records."""

    id: str
    title: str
    text: str
    score: float | None = None

    @property
    def contents(self) -> str:
        """The Search-R1 / FlashRAG ``contents`` field: quoted title, newline, text.

        >>> Passage("1", "Paris", "Capital of France.").contents
        '"Paris"\\nCapital of France.'
        """
        return f'"{self.title}"\n{self.text}'

    @classmethod
    def from_contents(cls, id: str, contents: str, score: float | None = None) -> "Passage":
        """Parse a ``contents`` string back into title and text (inverse of :attr:`contents`).

        >>> p = Passage.from_contents("7", '"Paris"\\nCapital of France.')
        >>> (p.title, p.text)
        ('Paris', 'Capital of France.')
        >>> Passage.from_contents("8", "no title line").title
        ''
        """
        head, sep, rest = contents.partition("\n")
        if sep and len(head) >= 2 and head.startswith('"') and head.endswith('"'):
            return cls(str(id), head[1:-1], rest, score)
        if sep:
            return cls(str(id), head.strip('"'), rest, score)
        return cls(str(id), "", contents, score)

    def with_score(self, score: float) -> "Passage":
        return Passage(self.id, self.title, self.text, float(score))

    def to_document(self) -> dict[str, str]:
        """The ``document`` object of the ``/retrieve`` contract."""
        return {"id": self.id, "contents": self.contents}


@dataclass
class QAExample:
    """One question with its gold answers. ``source`` names the dataset (e.g. ``nq``)."""

    id: str
    question: str
    golden_answers: list[str]
    split: str = "test"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Turn:
    """One model turn of a trajectory: what it wrote, which action it took, what came back."""

    text: str  # the model's own text for this turn (decoded from its sampled tokens)
    action: str  # "search" | "answer" | "invalid" | "none"
    query: str | None = None
    passages: list[Passage] = field(default_factory=list)
    observation: str = ""  # inserted text after the turn (information block or feedback)
    finish_reason: str = ""  # the generator's reason: "stop" | "eos" | "length"

    @property
    def answer(self) -> str | None:
        """The content of this turn's answer block when the loop accepted it as an answer.

        >>> Turn("<answer> Paris </answer>", "answer").answer, Turn("<answer> x", "invalid").answer
        ('Paris', None)
        """
        if self.action != "answer":
            return None
        block = first_block(self.text, ("answer",))
        return None if block is None else block[1]


@dataclass
class Trajectory:
    """A whole multi-turn episode for one example, with token-level data for training.

    ``response_ids`` holds every token after the prompt: sampled tokens (``loss_mask`` 1) and
    inserted ones (``loss_mask`` 0). ``sampler_logprobs`` has one entry per response token: the
    log-prob the *sampler* gave each sampled token (0.0 on inserted tokens); the trainer's old
    log-probs are its own recomputation, not these. :meth:`add_sampled` and :meth:`add_inserted`
    keep ``len(response_ids) == len(loss_mask) == len(sampler_logprobs)``.
    """

    example: QAExample
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    sampler_logprobs: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    finish_reason: str = ""  # "answer" | "max_turns" | "context" | "search_on_last_turn" | ...
    response_text: str = ""  # decoded response, inserted text included
    reward: float = 0.0
    sample_index: int = 0  # which of the group's samples this is (GRPO groups by example id)

    @property
    def num_searches(self) -> int:
        return sum(t.action == "search" for t in self.turns)

    @property
    def num_valid_actions(self) -> int:
        return sum(t.action in ("search", "answer") for t in self.turns)

    @property
    def answer(self) -> str | None:
        """The answer the loop accepted: that of the last turn parsed as ``answer`` (text the
        loop did not accept, e.g. an answer block split across turns by feedback, never counts).
        """
        answers = [t.answer for t in self.turns if t.action == "answer"]
        return answers[-1] if answers else None

    def add_sampled(self, ids: list[int], logprobs: list[float]) -> None:
        """Append sampled tokens (trained: mask 1) with the sampler's log-probs."""
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled tokens but {len(logprobs)} log-probs")
        self.response_ids += ids
        self.loss_mask += [1] * len(ids)
        self.sampler_logprobs += [float(x) for x in logprobs]

    def add_inserted(self, ids: list[int], text: str) -> None:
        """Append inserted tokens (not trained: mask 0, log-prob 0.0); ``text`` is what they
        encode, recorded as the last turn's observation."""
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.sampler_logprobs += [0.0] * len(ids)
        if self.turns:
            self.turns[-1].observation = text

    def to_dict(self, with_tokens: bool = False) -> dict[str, Any]:
        d = {
            "id": self.example.id,
            "question": self.example.question,
            "golden_answers": self.example.golden_answers,
            "source": self.example.source,
            "sample_index": self.sample_index,
            "finish_reason": self.finish_reason,
            "reward": self.reward,
            "answer": self.answer,
            "num_searches": self.num_searches,
            "num_turns": len(self.turns),
            "response_tokens": len(self.response_ids),
            "response_text": self.response_text,
            "turns": [
                {
                    "text": t.text,
                    "action": t.action,
                    "query": t.query,
                    "passages": [
                        {"id": p.id, "title": p.title, "score": p.score} for p in t.passages
                    ],
                    "finish_reason": t.finish_reason,
                }
                for t in self.turns
            ],
        }
        if with_tokens:
            d.update(
                prompt_ids=self.prompt_ids,
                response_ids=self.response_ids,
                loss_mask=self.loss_mask,
                sampler_logprobs=self.sampler_logprobs,
            )
        return d
