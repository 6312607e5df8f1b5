"""BM25: equality with a bm25s reference, edge cases, save/load, and recall on miniwiki (shared)."""

from __future__ import annotations

import json
import re
import string

import bm25s
import numpy as np
import pytest
import Stemmer

from searchrl.errors import IndexFormatError
from searchrl.retrieval.base import Retriever
from searchrl.retrieval.bm25 import BM25Retriever, top_k_desc
from searchrl.types import Passage

TINY = [
    ("Paris", "Paris is the capital and most populous city of France."),
    ("Lyon", "Lyon is the third-largest city of France, on the Rhone and the Saone."),
    ("Berlin", "Berlin is the capital of Germany and its largest city."),
    ("Running", "Running is a method of terrestrial locomotion allowing humans to move rapidly on foot."),
    ("Marathon", "The marathon is a long-distance foot race; runners run 42.195 kilometres."),
    ("Rhone", "The Rhone is a major river of Europe, rising in the Swiss Alps and flowing through France."),
    ("Python", "Python is a programming language; pythons are also large snakes."),
    ("Capital", "A capital city is the seat of government of a country."),
    ("Duplicate A", "Identical twin passage about quokkas."),
    ("Duplicate B", "Identical twin passage about quokkas."),
]
QUERIES = [
    "capital of France",
    "which river flows through France",
    "runners running a race",
    "largest city in Germany",
    "quokkas",
    "snakes and programming languages",
    "Paris Paris Paris city",
]


@pytest.fixture(scope="module")
def tiny():
    passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(TINY)]
    return passages, BM25Retriever.build(passages, show_progress=False)


def reference(passages, queries, stemmer=True):
    """bm25s used directly, the documented way, on the same texts."""
    st = Stemmer.Stemmer("english") if stemmer else None
    model = bm25s.BM25()
    model.index(bm25s.tokenize([p.contents for p in passages], stopwords="en", stemmer=st, show_progress=False),
                show_progress=False)
    q_tokens = bm25s.tokenize(queries, stopwords="en", stemmer=st, return_ids=False, show_progress=False)
    return model, q_tokens


def expected_ranking(model, tokens):
    """Positive-score documents sorted by (score desc, index asc) from the reference's full scores."""
    known = [t for t in tokens if t in model.vocab_dict]
    if not known:
        return [], np.zeros(0)
    scores = model.get_scores(known)
    idx = np.flatnonzero(scores > 0)
    order = idx[np.lexsort((idx, -scores[idx]))]
    return order.tolist(), scores[order]


def test_scores_and_ids_equal_bm25s_reference(tiny):
    passages, ours = tiny
    model, q_tokens = reference(passages, QUERIES)
    results = ours.search(QUERIES, k=4)
    assert isinstance(ours, Retriever)
    ref_docs, ref_scores = model.retrieve(q_tokens, k=4, show_progress=False)
    for q, tokens, got, rd, rs in zip(QUERIES, q_tokens, results, ref_docs, ref_scores):
        ids, scores = expected_ranking(model, tokens)
        assert [p.id for p in got] == [str(i) for i in ids[:4]], q
        np.testing.assert_allclose([p.score for p in got], scores[:4], rtol=1e-6)
        # the reference's own top-k agrees on the scores (its tie order is arbitrary)
        np.testing.assert_allclose([p.score for p in got], rs[: len(got)], rtol=1e-6)
        assert all(a.score >= b.score for a, b in zip(got, got[1:]))
        assert got and got[0].score > 0


def test_passages_are_full_records_and_repeated_terms_count(tiny):
    passages, ours = tiny
    top = ours.search(["capital of France"], k=1)[0][0]
    assert (top.id, top.title, top.text) == ("0", "Paris", TINY[0][1])
    once, thrice = ours.search(["Paris city", "Paris Paris Paris city"], k=1)
    assert thrice[0].score > once[0].score  # bm25s counts repeated query terms, so do we


def test_ties_break_by_corpus_order(tiny):
    _, ours = tiny
    hits = ours.search(["quokkas"], k=5)[0]
    assert [p.id for p in hits] == ["8", "9"] and hits[0].score == hits[1].score
    assert top_k_desc(np.array([1.0, 3.0, 3.0, 2.0]), 2).tolist() == [1, 2]


def test_no_known_tokens_gives_empty_lists_in_place(tiny):
    _, ours = tiny
    queries = ["zzyzx qwerty", "the of and", "", "   ", "!!!", "capital of France"]
    results = ours.search(queries, k=3)
    assert [len(r) for r in results[:5]] == [0, 0, 0, 0, 0]
    assert results[5][0].title == "Paris"
    assert ours.search([], k=3) == []
    with pytest.raises(ValueError):
        ours.search(["x"], k=0)


def test_k_larger_than_corpus(tiny):
    passages, ours = tiny
    hits = ours.search(["city"], k=1000)[0]
    assert 0 < len(hits) <= len(passages)
    assert {p.title for p in hits} == {"Paris", "Lyon", "Berlin", "Capital"}


def test_stemming_matches_inflections_only_when_on():
    passages = [Passage("a", "", "The runners were running."), Passage("b", "", "A quiet afternoon.")]
    stemmed = BM25Retriever.build(passages, show_progress=False)
    plain = BM25Retriever.build(passages, stemmer=None, show_progress=False)
    assert [p.id for p in stemmed.search(["run"], k=2)[0]] == ["a"]
    assert plain.search(["run"], k=2)[0] == []
    model, q_tokens = reference(passages, ["runner runs"], stemmer=False)
    assert plain.search(["runner runs"], k=2)[0] == [] and expected_ranking(model, q_tokens[0])[0] == []


def test_save_load_round_trip(tiny, tmp_path):
    passages, ours = tiny
    ours.save(tmp_path / "bm25")
    loaded = BM25Retriever.load(tmp_path / "bm25", passages)
    assert loaded.search(QUERIES, k=5) == ours.search(QUERIES, k=5)
    assert loaded.describe() == ours.describe()
    mm = BM25Retriever.load(tmp_path / "bm25", passages, mmap=True)
    assert mm.search(QUERIES, k=5) == ours.search(QUERIES, k=5)
    assert all(isinstance(mm.model.scores[a], np.memmap) for a in ("data", "indices", "indptr"))
    assert not isinstance(loaded.model.scores["data"], np.memmap)
    with pytest.raises(IndexFormatError, match="passages"):
        BM25Retriever.load(tmp_path / "bm25", passages[:5])


class LazyPassages:
    """A read-only Sequence that makes each passage when asked (like the index's PassageStore)."""

    def __init__(self, n, size):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return Passage(str(i), f"T{i % 7}", "x" * self.size + f" word{i % 13} common")  # 1 long token


def test_build_streams_texts_instead_of_copying_them():
    import tracemalloc

    passages = LazyPassages(3000, 4000)  # 12 MB of text in all, a few tokens each
    tracemalloc.start()
    try:
        model = BM25Retriever.build(passages, show_progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20  # a list of every text would hold all 12 MB at once
    ref = BM25Retriever.build([passages[i] for i in range(len(passages))], show_progress=False)
    assert model.search(["word3 common", "word5"], k=4) == ref.search(["word3 common", "word5"], k=4)


def test_threads_give_identical_results(tiny):
    passages, ours = tiny
    threaded = BM25Retriever(ours.model, passages, n_threads=2)
    assert threaded.search(QUERIES * 3, k=3) == ours.search(QUERIES * 3, k=3)


# ------------------------------------------------------------------ real data (../shared/data)
EXPECTED_RECALL = {  # plain bm25s (English stemmer + stop words) over `contents`, question as query
    "nq": 0.578, "triviaqa": 0.715, "popqa": 0.441, "hotpotqa": 0.577, "2wikimultihopqa": 0.518, "musique": 0.287,
}


def _norm(s: str) -> str:
    s = "".join(c for c in s.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


@pytest.fixture(scope="module")
def miniwiki(shared_data_session):
    from searchrl.data.corpus import load_corpus

    root = shared_data_session

    passages = load_corpus(root / "miniwiki" / "corpus.jsonl", progress=False)
    return root, passages, BM25Retriever.build(passages, show_progress=False)


def _test_questions(root, name):
    with open(root / "miniwiki" / "questions" / f"{name}.jsonl") as f:
        return [q for q in map(json.loads, f) if q["split"] == "test"]


@pytest.mark.shared
def test_miniwiki_equals_bm25s(miniwiki):
    root, passages, ours = miniwiki
    questions = [q["question"] for q in _test_questions(root, "nq")[:150]]
    model, q_tokens = reference(passages, questions)
    for q, tokens, got in zip(questions, q_tokens, ours.search(questions, k=5)):
        ids, scores = expected_ranking(model, tokens)
        assert [p.id for p in got] == [passages[i].id for i in ids[:5]], q
        np.testing.assert_allclose([p.score for p in got], scores[:5], rtol=1e-6)


@pytest.mark.shared
def test_miniwiki_recall_at_3(miniwiki):
    root, _, ours = miniwiki
    got = {}
    for name, expected in EXPECTED_RECALL.items():
        qs = _test_questions(root, name)
        results = ours.search([q["question"] for q in qs], k=3)
        hits = 0
        for q, ps in zip(qs, results):
            text = " ".join(_norm(p.contents) for p in ps)
            hits += any(_norm(a) and _norm(a) in text for a in q["golden_answers"])
        got[name] = round(hits / len(qs), 3)
    assert got == pytest.approx(EXPECTED_RECALL, abs=0.005), got
