"""1-, 2- and 3-hop questions over the synthetic world, each with its exact hop chain.

A question is a walk through the entity graph: start at an entity, follow entity-valued relations
(``author`` of a book, then ``born_in`` of that person, ...) and ask for the last relation's value
(an entity name or a year). The text nests one noun phrase per intermediate hop ("Where was the
author of Stormy Tides born?"), drawn from several templates per relation. Each hop is recorded as
``{"entity", "relation", "answer", "query", "passage_id"}``: ``query`` is a short search query for
that hop ("Velmora Tarkin birthplace") and ``passage_id`` the passage that states the answer. Walks
never revisit an entity and the answer never appears in the question text. Each question has its
own generator (``(seed, index)``), plus the set of walks already asked, so the output is
deterministic.

Comparisons of two entities ("Which came out first, A or B?", "Were A and B born in the same
city?") are built from these hop records by :mod:`searchrl.data.world_comparisons` (for warm-start
demonstrations, not part of the world's question file).

Left out: intersection questions, and paraphrase variants of one question.
"""

from __future__ import annotations

import string
from collections.abc import Iterator

from searchrl.data.world_graph import (
    BOOK, CITY, STREAM_QUESTIONS, WORK, YEAR_RELATIONS, Graph,
)  # fmt: skip
from searchrl.data.world_names import stream_rng
from searchrl.data.world_text import layout
from searchrl.types import QAExample

# noun phrase for the object of a relation, given a description {d} of the subject
NOUN_PHRASES: dict[str, tuple[str, ...]] = {
    "born_in": ("the birthplace of {d}", "the city where {d} was born", "the home town of {d}"),
    "spouse": ("the spouse of {d}", "the person married to {d}"),
    "employer": ("the employer of {d}", "the organisation that employs {d}"),
    "founded_by": ("the founder of {d}", "the person who founded {d}"),
    "headquartered_in": ("the city where {d} is headquartered", "the headquarters city of {d}"),
    "located_in": ("the country where {d} lies", "the country that {d} is in"),
    "capital": ("the capital of {d}", "the capital city of {d}"),
    "author": ("the author of {d}", "the writer of {d}", "the person who wrote {d}"),
    "director": ("the director of {d}", "the person who directed {d}"),
    "performer": ("the artist who recorded {d}", "the performer of {d}"),
    "publisher": ("the publisher of {d}", "the company that published {d}"),
    "studio": ("the studio that produced {d}", "the film studio behind {d}"),
    "label": ("the record label of {d}", "the label that released {d}"),
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "born_in": ("Where was {d} born?", "In which city was {d} born?",
                "What is the birthplace of {d}?", "Which city is the birthplace of {d}?"),
    "birth_year": ("In what year was {d} born?", "When was {d} born?",
                   "What is the birth year of {d}?"),
    "spouse": ("Who is {d} married to?", "Who is the spouse of {d}?", "Whom did {d} marry?"),
    "employer": ("Who employs {d}?", "Which organisation does {d} work for?",
                 "Who is the employer of {d}?"),
    "founded_by": ("Who founded {d}?", "Who is the founder of {d}?", "By whom was {d} founded?"),
    "founded_year": ("In what year was {d} founded?", "When was {d} founded?",
                     "What year was {d} established?"),
    "headquartered_in": ("Where is {d} headquartered?", "In which city is {d} based?",
                         "Which city hosts the headquarters of {d}?"),
    "located_in": ("In which country is {d}?", "Which country is {d} located in?",
                   "What country does {d} belong to?"),
    "capital": ("What is the capital of {d}?", "Which city is the capital of {d}?"),
    "author": ("Who wrote {d}?", "Who is the author of {d}?", "By whom was {d} written?"),
    "director": ("Who directed {d}?", "Who is the director of {d}?"),
    "performer": ("Who recorded {d}?", "Which artist recorded {d}?",
                  "Who is the artist behind {d}?"),
    "publisher": ("Who published {d}?", "Which company published {d}?",
                  "Who is the publisher of {d}?"),
    "studio": ("Which studio produced {d}?", "Who produced {d}?"),
    "label": ("Which record label released {d}?", "On which label was {d} released?"),
    "release_year": ("In what year was {d} released?", "When did {d} come out?",
                     "What is the release year of {d}?"),
}  # fmt: skip
BOOK_YEAR_QUESTIONS = ("In what year was {d} published?", "When was {d} first published?")
QUERY_WORDS = {
    "born_in": ("birthplace", "born"), "birth_year": ("birth year", "born"),
    "spouse": ("spouse", "married"), "employer": ("employer", "works for"),
    "founded_by": ("founder", "founded by"), "founded_year": ("founded", "founding year"),
    "headquartered_in": ("headquarters", "headquartered"), "located_in": ("country", "located in"),
    "capital": ("capital",), "author": ("author", "written by"), "director": ("director",),
    "performer": ("artist", "recorded by"), "publisher": ("publisher", "published by"),
    "studio": ("studio", "produced by"), "label": ("record label", "label"),
    "release_year": ("release year", "released"),
}  # fmt: skip
MENTIONS = {CITY: ("{n}", "{n}", "the city of {n}"), WORK: ("{n}", "{n}", "the {kind} {n}")}
WORK_KIND_WORD = ("novel", "film", "album")
_DROP_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = frozenset({"a", "an", "the"})
START_WEIGHTS = (0.06, 0.14, 0.35, 0.2, 0.25)  # start entity type: country, city, person, org, work
YEAR_WEIGHT = 0.35  # a year relation is this much less likely than an entity one at the last hop


def normalize(text: str) -> str:
    """SQuAD answer normalisation: lowercase, drop punctuation and articles, squeeze spaces.

    >>> normalize("The  Marrow Lantern!")
    'marrow lantern'
    """
    words = text.lower().translate(_DROP_PUNCT).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def contains_answer(text: str, answer: str) -> bool:
    """Whether normalised ``answer`` occurs in normalised ``text`` as whole words."""
    return f" {normalize(answer)} " in f" {normalize(text)} "


def sample_walk(g: Graph, rng, n_hops: int) -> list[tuple[int, str, int]] | None:
    """A walk of ``n_hops`` facts ``(subject id, relation, value)``, or ``None`` (dead end)."""
    erange = g.ranges[rng.choices(range(len(START_WEIGHTS)), START_WEIGHTS)[0]]
    eid = erange[rng.randrange(len(erange))]
    seen, walk = {eid}, []
    for step in range(n_hops):
        last = step == n_hops - 1
        options = [
            (rel, v)
            for rel, v in g.facts(eid)
            if (last and rel in YEAR_RELATIONS) or (rel not in YEAR_RELATIONS and v not in seen)
        ]
        if not options:
            return None
        weights = [YEAR_WEIGHT if rel in YEAR_RELATIONS else 1.0 for rel, _ in options]
        rel, v = rng.choices(options, weights)[0]
        walk.append((eid, rel, v))
        if rel in YEAR_RELATIONS:
            break
        seen.add(v)
        eid = v
    return walk


def _mention(g: Graph, eid: int, rng) -> str:
    templates = MENTIONS.get(g.types[eid], ("{n}",))
    t = templates[rng.randrange(len(templates))]
    kind = WORK_KIND_WORD[g.subkinds[eid]] if g.types[eid] == WORK else ""
    return t.format(n=g.names[eid], kind=kind)


def question_text(g: Graph, walk: list[tuple[int, str, int]], rng) -> str:
    """Nest one noun phrase per intermediate hop inside a question about the last hop."""
    desc = _mention(g, walk[0][0], rng)
    for _, rel, _ in walk[:-1]:
        desc = rng.choice(NOUN_PHRASES[rel]).format(d=desc)
    subject, rel, _ = walk[-1]
    templates = QUESTIONS[rel]
    if rel == "release_year" and g.types[subject] == WORK and g.subkinds[subject] == BOOK:
        templates = templates + BOOK_YEAR_QUESTIONS
    q = rng.choice(templates).format(d=desc)
    return q[:1].upper() + q[1:]


def hop_records(g: Graph, walk: list[tuple[int, str, int]], rng) -> list[dict]:
    """The exact chain: entity, relation, answer, search query and the stating passage's id."""
    hops = []
    for eid, rel, v in walk:
        group = next(j for j, rels in enumerate(layout(g, eid)) if rel in rels)
        words = QUERY_WORDS[rel]
        if rel == "release_year" and g.subkinds[eid] == BOOK:
            words = ("publication year", "published")
        hops.append(
            {
                "entity": g.names[eid],
                "relation": rel,
                "answer": g.answer_text(rel, v),
                "query": f"{g.names[eid]} {words[rng.randrange(len(words))]}",
                "passage_id": str(g.offsets[eid] + group),
            }
        )
    return hops


def iter_questions(
    g: Graph,
    n_questions: int,
    hop_weights: tuple[float, ...] = (0.4, 0.4, 0.2),
    test_fraction: float = 0.2,
    max_tries: int = 200,
) -> Iterator[QAExample]:
    """Yield up to ``n_questions`` distinct questions (fewer only if the world runs out)."""
    asked: set[tuple] = set()
    hop_counts = list(range(1, len(hop_weights) + 1))
    for qi in range(n_questions):
        rng = stream_rng(g.seed, STREAM_QUESTIONS, qi)
        n_hops = rng.choices(hop_counts, hop_weights)[0]
        split = "test" if rng.random() < test_fraction else "train"
        for _ in range(max_tries):
            walk = sample_walk(g, rng, n_hops)
            if walk is None or len(walk) != n_hops:
                continue
            key = (walk[0][0],) + tuple(rel for _, rel, _ in walk)
            if key in asked:
                continue
            text = question_text(g, walk, rng)
            answer = g.answer_text(walk[-1][1], walk[-1][2])
            if contains_answer(text, answer):
                continue
            asked.add(key)
            hops = hop_records(g, walk, rng)
            extra = {"answerable": True, "num_hops": n_hops, "hops": hops}
            yield QAExample(f"world{g.seed}-{qi}", text, [answer], split, "world", extra)
            break
