"""Prompts for the search agent and the baselines, and the text the environment inserts.

``build_prompt`` turns a question into prompt token ids: the instruction of the chosen method
(``search``: the Search-R1 agent; ``direct``: answer at once; ``cot``: think, then answer; ``rag``:
passages given up front, then answer) followed by ``Question: …?``, wrapped in the tokenizer's
chat template when it has one (a single user message, generation prompt added), plain text
otherwise. ``format_information`` renders retrieved passages as the ``<information>`` block the
model reads; ``INVALID_ACTION_FEEDBACK`` and ``LAST_TURN_NOTICE`` are the other inserted texts.
Inserted texts never contain a complete ``<answer>…</answer>`` block, so they cannot be graded
as the model's answer.

Left out: few-shot prompting and system prompts (one user message keeps base and instruct models
on the same footing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from searchrl.errors import ConfigError
from searchrl.types import Passage

PROMPT_METHODS = ("search", "direct", "cot", "rag")

_ANSWER_RULE = (
    "give the final answer between <answer> and </answer>: only the short answer, without any "
    "explanation, for example <answer> Beijing </answer>."
)

INSTRUCTIONS = {
    "search": (
        "Answer the question below. Reason inside <think> and </think> first, and again each "
        "time you receive new information. If some knowledge is missing, call the search "
        "engine by writing <search> query </search>; its results will be returned between "
        "<information> and </information>. You may search as many times as you need. "
        "When nothing is missing any more, " + _ANSWER_RULE
    ),
    "direct": "Answer the question below; " + _ANSWER_RULE,
    "cot": (
        "Answer the question below. First reason step by step inside <think> and </think>; "
        "then " + _ANSWER_RULE
    ),
    "rag": (
        "Answer the question below with the help of the passages that follow (they may or may "
        "not be relevant): " + _ANSWER_RULE
    ),
}

INVALID_ACTION_FEEDBACK = (
    "\n\nThat was not a valid action. To search, put a query between the search tags; to "
    "finish, put the final answer between the answer tags. Try again.\n\n"
)
LAST_TURN_NOTICE = "No searches are left: give your final answer now."


def _doc_lines(passages: Sequence[Passage]) -> str:
    return "".join(f"Doc {i}(Title: {p.title}) {p.text}\n" for i, p in enumerate(passages, 1))


def format_information(passages: Sequence[Passage], note: str = "") -> str:
    """The information block inserted after a search (``note``: an extra last line inside it).

    >>> docs = [Passage("1", "Paris", "Capital."), Passage("2", "Lyon", "City.")]
    >>> print(format_information(docs))
    <BLANKLINE>
    <BLANKLINE>
    <information>Doc 1(Title: Paris) Capital.
    Doc 2(Title: Lyon) City.
    </information>
    <BLANKLINE>
    <BLANKLINE>
    >>> format_information([], note="Answer now.")
    '\\n\\n<information>No results.\\nAnswer now.\\n</information>\\n\\n'
    """
    body = _doc_lines(passages) if passages else "No results.\n"
    if note:
        body += note + "\n"
    return f"\n\n<information>{body}</information>\n\n"


def question_text(question: str) -> str:
    """The question, stripped, with ``?`` appended when missing.

    >>> question_text(" who wrote hamlet ")
    'who wrote hamlet?'
    """
    q = question.strip()
    return q if q.endswith("?") else q + "?"


def prompt_text(
    question: str, method: str = "search", passages: Sequence[Passage] | None = None
) -> str:
    """The user message for ``method`` (no chat template applied).

    >>> prompt_text("capital of France", "direct").endswith("Question: capital of France?\\n")
    True
    >>> "Doc 1(Title: P) t" in prompt_text("q", "rag", [Passage("1", "P", "t")])
    True
    """
    if method not in INSTRUCTIONS:
        raise ConfigError(f"method: unknown prompt method {method!r}; valid: {PROMPT_METHODS}")
    parts = [INSTRUCTIONS[method]]
    if method == "rag":
        if passages is None:
            raise ConfigError("method 'rag' needs retrieved passages (passages=None given)")
        parts.append("\n\nPassages:\n" + (_doc_lines(passages) or "No results.\n"))
    else:
        parts.append("\n")
    parts.append(f"Question: {question_text(question)}\n")
    return "".join(parts)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_template(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as one user message (chat template) or as plain text (base model)."""
    if has_chat_template(tokenizer):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        # the template already holds any BOS it wants; do not let the tokenizer add another
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    return list(tokenizer.encode(text, add_special_tokens=True))


def build_prompt(
    tokenizer: Any,
    question: str,
    method: str = "search",
    passages: Sequence[Passage] | None = None,
) -> list[int]:
    """Prompt token ids for one question (see module doc for the methods)."""
    return apply_template(tokenizer, prompt_text(question, method, passages))
