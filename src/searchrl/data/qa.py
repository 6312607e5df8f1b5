"""Load question-answering datasets in their standard formats as :class:`~searchrl.types.QAExample`.

The format is detected from the first record's fields (see :data:`QA_FORMATS`); the container may be
JSON lines, a JSON list or parquet, optionally gzipped:

- ``flashrag``: FlashRAG / Search-R1 / miniwiki ``{id, question, golden_answers[, split, answerable]}``;
- ``verl``: verl / Search-R1 RL data ``{prompt, reward_model.ground_truth, extra_info}``;
- ``hotpotqa``: original HotpotQA / 2WikiMultiHopQA with ``context`` as ``[[title, [sentences]]]``
  or Hugging Face style ``{"title": [...], "sentences": [[...]]}``;
- ``musique``: original MuSiQue ``{paragraphs, answer, answer_aliases, answerable}``;
- ``qa-pairs``: NQ-open JSON lines or a JSON list of ``{question, answer}`` (string or list).

Fields some exports store as Python text (``"[['Title', [...]]]"``, ``"True"``) are parsed back.
Contexts are kept in ``extra["context"]`` as ``(title, text)`` pairs; :func:`qa_contexts_as_passages`
turns them into a corpus. Other record fields go into ``extra`` unchanged. Malformed input raises
:class:`~searchrl.errors.DataFormatError` naming the file, the line or record, and the field.

Left out: downloading datasets, building prompts, answer normalisation (see ``searchrl.rewards``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchrl.data.corpus import PathLike, check_str, data_error, join_sentences, literal, read_records
from searchrl.errors import DataFormatError
from searchrl.types import Passage, QAExample

logger = logging.getLogger(__name__)

QA_FORMATS = {
    "flashrag": "FlashRAG / Search-R1 / miniwiki: id, question, golden_answers [list], split?, answerable?",
    "verl": "verl / Search-R1 RL data: prompt, reward_model.ground_truth, extra_info.question/answer",
    "hotpotqa": "HotpotQA / 2WikiMultiHopQA: _id, question, answer, context [[title, [sentences]]]",
    "musique": "MuSiQue: id, question, answer, answer_aliases, answerable, paragraphs",
    "qa-pairs": "NQ-open JSON lines or JSON list: question, answer (string or list)",
}

KNOWN_SOURCES = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
_SOURCE_ALIASES = {
    **{s: s for s in KNOWN_SOURCES},
    "naturalquestions": "nq",
    "tqa": "triviaqa",
    "hotpot": "hotpotqa",
    "2wiki": "2wikimultihopqa",
    "2wikimultihop": "2wikimultihopqa",
    "wikimultihopqa": "2wikimultihopqa",
}
_ID_KEYS = ("id", "_id", "qid", "question_id", "test_id")


def guess_source(path: PathLike) -> str:
    """The dataset name found in a file's name or its two parent folders, else the file stem.

    >>> guess_source("data/raw/nq/NQ-open.dev.jsonl"), guess_source("x/migres_2wiki_dev.jsonl")
    ('nq', '2wikimultihopqa')
    >>> guess_source("/tmp/my_questions.json")
    'my_questions'
    """
    path = Path(path)
    for part in (path.name, path.parent.name, path.parent.parent.name):
        for token in re.findall(r"[a-z0-9]+", part.lower()):
            if token in _SOURCE_ALIASES:
                return _SOURCE_ALIASES[token]
    return path.name.split(".")[0]


def guess_split(path: PathLike) -> str:
    """``"train"`` when the file name says so; dev, validation and test files are ``"test"``.

    >>> guess_split("musique_train19938.parquet"), guess_split("NQ-open.dev.jsonl")
    ('train', 'test')
    """
    tokens = re.findall(r"[a-z]+", Path(path).name.lower())
    return "train" if "train" in tokens else "test"


@dataclass
class _Rec:
    """Where a record sits, for located errors, and the file-level defaults."""

    path: Path
    unit: str
    n: int
    index: int
    source: str
    split: str

    def fail(self, reason: str) -> DataFormatError:
        return data_error(self.path, self.unit, self.n, reason)

    def need_str(self, row: dict, key: str) -> str:
        value = check_str(self.path, self.unit, self.n, row, key)
        if not value.strip():
            raise self.fail(f"field {key!r} is empty")
        return value


def _answer_list(rec: _Rec, value: Any, key: str, allow_str: bool = True) -> list[str]:
    """Gold answers as a non-empty list of strings (numbers are turned into strings)."""
    value = literal(value)
    if allow_str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, list) and all(
        isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in value
    )
    if not ok:
        kind = "a string or a list of strings" if allow_str else "a list of strings"
        raise rec.fail(f"{key!r} must be {kind}, got {type(value).__name__}")
    answers = list(dict.fromkeys(str(a) for a in value))
    if not answers:
        raise rec.fail(f"{key!r} is empty")
    return answers


def _example(rec: _Rec, row: dict, question: str, answers: list[str], used: Iterable[str], **extra) -> QAExample:
    ids = [k for k in _ID_KEYS if row.get(k) not in (None, "")]
    qid = check_str(rec.path, rec.unit, rec.n, row, ids[0], allow_int=True) if ids else f"{rec.source}-{rec.index}"
    split = row.get("split")
    split = split if isinstance(split, str) and split else rec.split
    skip = set(used) | {"split"} | set(ids[:1])
    rest = {k: v for k, v in row.items() if k not in skip}
    if "answerable" in rest:
        rest["answerable"] = literal(rest["answerable"])
    return QAExample(qid, question.strip(), answers, split, rec.source, {**rest, **extra})


# ----------------------------------------------------------------------------- one parser a format


def _parse_flashrag(rec: _Rec, row: dict) -> QAExample:
    if "golden_answers" not in row:
        raise rec.fail("field 'golden_answers' missing")
    answers = _answer_list(rec, row["golden_answers"], "golden_answers", allow_str=False)
    return _example(rec, row, rec.need_str(row, "question"), answers, ("question", "golden_answers"))


def _prompt_question(rec: _Rec, prompt: Any) -> str:
    """The question inside a verl prompt: the last user message, after its last ``Question:``."""
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"]
        prompt = users[-1] if users else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise rec.fail("no question: 'extra_info.question' missing and 'prompt' has no user message")
    if "Question:" in prompt:
        prompt = prompt.rsplit("Question:", 1)[1].strip().split("\n", 1)[0]
    return prompt


def _parse_verl(rec: _Rec, row: dict) -> QAExample:
    info = literal(row.get("extra_info")) or {}
    reward = literal(row.get("reward_model")) or {}
    if not isinstance(info, dict) or not isinstance(reward, dict):
        raise rec.fail("'extra_info' and 'reward_model' must be objects")
    question = info.get("question") or row.get("question")
    if question is None:
        question = _prompt_question(rec, literal(row.get("prompt")))
    elif not isinstance(question, str):
        raise rec.fail(f"'extra_info.question' must be a string, got {type(question).__name__}")
    if info.get("answer") is not None:
        answers = _answer_list(rec, info["answer"], "extra_info.answer")
    elif isinstance(reward.get("ground_truth"), dict):
        answers = _answer_list(rec, reward["ground_truth"].get("target"), "reward_model.ground_truth.target")
    elif reward.get("ground_truth") is not None:  # a comma-joined string stays whole: answers may hold commas
        answers = _answer_list(rec, reward["ground_truth"], "reward_model.ground_truth")
    else:
        raise rec.fail("no answer: 'extra_info.answer' and 'reward_model.ground_truth' missing")
    if isinstance(info.get("split"), str) and "split" not in row:
        row = {**row, "split": info["split"]}
    extra = {"index": info["index"]} if "index" in info else {}
    used = ("prompt", "reward_model", "extra_info", "question", "ability")
    return _example(rec, row, question, answers, used, **extra)


def _context_pairs(rec: _Rec, value: Any) -> list[tuple[str, str]]:
    """``[[title, [sentences]]]`` or ``{"title": [...], "sentences": [[...]]}`` as (title, text)."""
    value = literal(value)
    if value is None:
        return []
    if isinstance(value, dict) and isinstance(value.get("title"), list):
        titles, sentences = value["title"], value.get("sentences")
        if not isinstance(sentences, list) or len(sentences) != len(titles):
            raise rec.fail("'context.sentences' must be a list as long as 'context.title'")
        value = [[t, s] for t, s in zip(titles, sentences)]
    if not isinstance(value, list):
        raise rec.fail(f"'context' must be a list of [title, [sentences]], got {type(value).__name__}")
    pairs = []
    for i, item in enumerate(value, start=1):
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
        sents = item[1] if ok else None
        if isinstance(sents, str):
            sents = [sents]
        if not ok or not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise rec.fail(f"'context' item {i} must be [title, [sentences]]")
        pairs.append((item[0], join_sentences(sents)))
    return pairs


def _supporting_facts(value: Any) -> Any:
    """``[[title, sent_id]]`` or ``{"title": [...], "sent_id": [...]}`` as (title, sent_id) pairs."""
    value = literal(value)
    if isinstance(value, dict) and isinstance(value.get("title"), list):
        return list(zip(value["title"], value.get("sent_id") or []))
    if isinstance(value, list) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        return [tuple(v) for v in value]
    return value


def _parse_hotpotqa(rec: _Rec, row: dict) -> QAExample:
    if "answer" not in row:
        raise rec.fail("field 'answer' missing")
    answers = _answer_list(rec, row["answer"], "answer")
    extra: dict[str, Any] = {"context": _context_pairs(rec, row.get("context"))}
    if "supporting_facts" in row:
        extra["supporting_facts"] = _supporting_facts(row["supporting_facts"])
    used = ("question", "answer", "context", "supporting_facts")
    return _example(rec, row, rec.need_str(row, "question"), answers, used, **extra)


def _parse_musique(rec: _Rec, row: dict) -> QAExample:
    if "answer" not in row:
        raise rec.fail("field 'answer' missing")
    answers = _answer_list(rec, row["answer"], "answer")
    aliases = literal(row.get("answer_aliases")) or []
    answers = list(dict.fromkeys(answers + _answer_list(rec, aliases, "answer_aliases"))) if aliases else answers
    paragraphs = literal(row.get("paragraphs")) or []
    if not isinstance(paragraphs, list) or not all(
        isinstance(p, dict) and isinstance(p.get("paragraph_text"), str) for p in paragraphs
    ):
        raise rec.fail("'paragraphs' must be a list of {title, paragraph_text}")
    context = [(str(p.get("title") or ""), p["paragraph_text"]) for p in paragraphs]
    supporting = [i for i, p in enumerate(paragraphs) if literal(p.get("is_supporting")) is True]
    used = ("question", "answer", "answer_aliases", "paragraphs")
    return _example(rec, row, rec.need_str(row, "question"), answers, used, context=context, supporting=supporting)


def _parse_pairs(rec: _Rec, row: dict) -> QAExample:
    if "answer" not in row:
        raise rec.fail("field 'answer' missing")
    answers = _answer_list(rec, row["answer"], "answer")
    return _example(rec, row, rec.need_str(row, "question"), answers, ("question", "answer"))


_PARSERS: dict[str, Callable[[_Rec, dict], QAExample]] = {
    "flashrag": _parse_flashrag,
    "verl": _parse_verl,
    "hotpotqa": _parse_hotpotqa,
    "musique": _parse_musique,
    "qa-pairs": _parse_pairs,
}


def detect_format(row: Any) -> str | None:
    """The :data:`QA_FORMATS` key matching a record's fields, or ``None``.

    >>> detect_format({"question": "q", "answer": ["a"]}), detect_format({"title": "t", "text": "x"})
    ('qa-pairs', None)
    """
    if not isinstance(row, dict):
        return None
    if "golden_answers" in row:
        return "flashrag"
    if "reward_model" in row or "extra_info" in row:
        return "verl"
    if "paragraphs" in row:
        return "musique"
    if "context" in row and "question" in row:
        return "hotpotqa"
    if "question" in row and "answer" in row:
        return "qa-pairs"
    return None


def _unknown_format(path: Path, unit: str, n: int, row: Any) -> DataFormatError:
    got = sorted(row)[:12] if isinstance(row, dict) else type(row).__name__
    known = "; ".join(f"{k} ({v})" for k, v in QA_FORMATS.items())
    return data_error(path, unit, n, f"unknown QA format (fields {got}); recognised formats: {known}")


def load_qa(
    path: PathLike, split: str | None = None, source: str | None = None, format: str | None = None
) -> list[QAExample]:
    """Load one QA file; ``split`` keeps only that split, ``source`` overrides the guessed name.

    ``format`` forces one of :data:`QA_FORMATS` instead of detecting it. Examples without an id
    get ``f"{source}-{index}"`` (0-based record index); ids must be unique within the file.
    """
    path = Path(path)
    if format is not None and format not in _PARSERS:
        raise DataFormatError(str(path), None, f"unknown format {format!r}; choose from {sorted(_PARSERS)}")
    source = source or guess_source(path)
    unit, records = read_records(path)
    parse, examples, seen = None, [], {}
    for index, (n, row) in enumerate(records):
        rec = _Rec(path, unit, n, index, source, guess_split(path))
        if not isinstance(row, dict):
            raise rec.fail(f"expected a JSON object, got {type(row).__name__}")
        if parse is None:
            fmt = format or detect_format(row)
            if fmt is None:
                raise _unknown_format(path, unit, n, row)
            parse = _PARSERS[fmt]
            logger.debug("%s: %s format", path, fmt)
        ex = parse(rec, row)
        if ex.id in seen:
            raise rec.fail(f"duplicate id {ex.id!r} (first at {unit} {seen[ex.id]})")
        seen[ex.id] = n
        examples.append(ex)
    if not examples:
        raise DataFormatError(str(path), None, "no records")
    if split is not None:
        kept = [e for e in examples if e.split == split]
        if not kept:
            logger.warning("%s: no %r examples (splits: %s)", path, split, sorted({e.split for e in examples}))
        examples = kept
    return examples


def load_qa_many(
    paths: str | PathLike | Sequence[PathLike], split: str | None = None, prefix_ids: bool | None = None
) -> list[QAExample]:
    """Load several QA files (a list, or one comma-separated string) in order.

    Ids must be unique across the result: ``prefix_ids=None`` turns every id into
    ``"source:id"`` only when two files share an id (FlashRAG ids like ``test_123`` repeat across
    datasets), ``True`` always does, ``False`` raises instead.
    """
    if isinstance(paths, (str, Path)):
        paths = [p.strip() for p in str(paths).split(",") if p.strip()]
    per_file = [load_qa(p, split=split) for p in paths]
    ids = [e.id for examples in per_file for e in examples]
    clash = len(set(ids)) != len(ids)
    if clash and prefix_ids is False:
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataFormatError(", ".join(map(str, paths)), None, f"id {dup!r} occurs in more than one file")
    if clash or prefix_ids:
        logger.info("prefixing QA ids with their source to keep them unique")
        for examples in per_file:
            for e in examples:
                e.id = f"{e.source}:{e.id}"
        ids = [e.id for examples in per_file for e in examples]
        if len(set(ids)) != len(ids):
            raise DataFormatError(", ".join(map(str, paths)), None, "ids repeat even with the source prefix")
    return [e for examples in per_file for e in examples]


def qa_contexts_as_passages(examples: Iterable[QAExample], start_id: int = 0) -> list[Passage]:
    """The ``extra["context"]`` paragraphs of the examples as passages, de-duplicated by
    (title, text) in first-seen order, with ids ``start_id``, ``start_id + 1``, ...

    >>> ex = QAExample("1", "q", ["a"], extra={"context": [("T", "x."), ("U", "y."), ("T", "x.")]})
    >>> [(p.id, p.title) for p in qa_contexts_as_passages([ex])]
    [('0', 'T'), ('1', 'U')]
    """
    seen: dict[tuple[str, str], None] = {}
    for ex in examples:
        for title, text in ex.extra.get("context") or ():
            seen.setdefault((title, text), None)
    return [Passage(str(start_id + i), title, text) for i, (title, text) in enumerate(seen)]
