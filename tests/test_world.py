"""Tests of the synthetic world generator (searchrl.data.world*) and ``searchrl world``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from searchrl.cli import main
from searchrl.data.world import (
    FILES,
    WORLD_VERSION,
    default_world_dir,
    ensure_default_world,
    generate_world,
    generator_fingerprint,
    write_world,
)
from searchrl.data.world_graph import ORG_SUFFIXES, TYPES, WORK_NOUNS, YEAR_RELATIONS
from searchrl.data.world_questions import contains_answer, normalize
from searchrl.data.world_text import render_entity
from searchrl.errors import ConfigError
from searchrl.types import Passage

# Measured with `python benchmarks/world.py answerability` (seed 0, 3000 entities, bm25s): the
# 2-hop final answer is in the top-1 passage retrieved with the question text for 0.2% of the
# questions, in the top-3 for 2.7%; 3-hop 0.0% / 0.5%; each hop query finds its passage in the
# top-3 100% of the time (top-1 ~97%). The 1500- and 20000-entity worlds give the same picture;
# the thresholds leave room for other seeds and sizes.
MAX_2HOP_TOP1 = 0.05
MAX_2HOP_TOP3 = 0.10
MIN_HOP_QUERY_TOP3 = 0.95


@pytest.fixture(scope="module")
def world():
    return generate_world(seed=7, n_entities=600)


@pytest.fixture(scope="module")
def by_id(world):
    return {p.id: p for p in world.passages}


def _read(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_world(generate_world(3, 300), a)
    write_world(generate_world(3, 300), b)
    write_world(generate_world(4, 300), c)
    assert _read(a) == _read(b)
    other = _read(c)
    assert other["corpus.jsonl"] != _read(a)["corpus.jsonl"]
    assert other["questions.jsonl"] != _read(a)["questions.jsonl"]
    info = json.loads((a / "world.json").read_text())
    assert info["version"] == WORLD_VERSION and info["seed"] == 3


def test_output_independent_of_hash_seed(tmp_path):
    """No set or dict order leaks into the files: other PYTHONHASHSEEDs, same bytes."""
    code = (
        "import sys; from searchrl.data.world import generate_world, write_world; "
        "write_world(generate_world(9, 150), sys.argv[1])"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], env=env, check=True)
    assert _read(tmp_path / "1") == _read(tmp_path / "2")
    assert _read(tmp_path / "1") == _read(_written(tmp_path / "here", generate_world(9, 150)))


def _written(folder, world):
    write_world(world, folder)
    return folder


def test_lazy_rendering_matches_full_corpus(world):
    """An entity rendered alone equals its passages in the full corpus (order independence)."""
    g, passages = world.graph, world.passages
    for eid in (0, 5, 123, len(g) - 1):
        alone = [text for text, _ in render_entity(g, eid)]
        start = g.offsets[eid]
        assert [p.text for p in passages[start : start + len(alone)]] == alone
        assert {p.title for p in passages[start : start + len(alone)]} == {g.names[eid]}


def test_counts_splits_and_files(tmp_path, world):
    info = write_world(world, tmp_path)
    corpus = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    questions = [json.loads(x) for x in (tmp_path / "questions.jsonl").read_text().splitlines()]
    counts = info["counts"]
    assert counts["entities"] == 600 and sum(counts["types"].values()) == 600
    assert len(corpus) == counts["passages"] == len(world.passages) > 600
    assert len(questions) == counts["questions"] == 600  # one per entity by default
    assert Counter(q["split"] for q in questions) == Counter(counts["splits"])
    assert 0.13 < counts["splits"]["test"] / 600 < 0.27
    assert set(counts["hops"]) == {"1", "2", "3"}
    for rec in questions:  # the miniwiki question shape plus the hop chain
        assert set(rec) == {"id", "question", "golden_answers", "split", "answerable",
                            "num_hops", "hops"}  # fmt: skip
        assert rec["answerable"] is True and rec["split"] in ("train", "test")
    for rec in corpus:
        assert set(rec) == {"id", "contents"} and rec["contents"].startswith('"')
    custom = generate_world(7, 600, n_questions=200, test_fraction=0.5, hop_weights=(0, 1))
    qs = custom.questions
    assert len(qs) == 200 and {q.extra["num_hops"] for q in qs} == {2}
    assert 70 < sum(q.split == "test" for q in qs) < 130


def test_hop_chains_match_passages(world, by_id):
    g = world.graph
    names = set(g.names)
    for q in world.questions:
        hops = q.extra["hops"]
        assert q.extra["num_hops"] == len(hops) in (1, 2, 3)
        assert q.golden_answers == [hops[-1]["answer"]]
        assert hops[0]["entity"] in q.question
        assert not contains_answer(q.question, q.golden_answers[0])
        eid = g.names.index(hops[0]["entity"])
        for i, hop in enumerate(hops):
            passage = by_id[hop["passage_id"]]
            assert passage.title == hop["entity"]
            assert hop["answer"] in passage.text  # stated verbatim in the hop entity's passage
            assert hop["query"].startswith(hop["entity"] + " ") and len(hop["query"].split()) <= 8
            if i + 1 < len(hops):
                assert hops[i + 1]["entity"] == hop["answer"] and hop["answer"] in names
            # the chain agrees with the graph itself
            assert g.names[eid] == hop["entity"]
            assert g.answer_text(hop["relation"], g.value(eid, hop["relation"])) == hop["answer"]
            eid = g.value(eid, hop["relation"])
        if hops[-1]["relation"] in YEAR_RELATIONS:
            assert hops[-1]["answer"].isdigit() and len(hops[-1]["answer"]) == 4


def test_variety_relations_hops_templates(world):
    qs = world.questions
    relations = Counter(h["relation"] for q in qs for h in q.extra["hops"])
    assert len(relations) >= 12, relations
    assert {q.extra["num_hops"] for q in qs} == {1, 2, 3}
    openings = Counter(" ".join(q.question.split()[:2]) for q in qs)
    assert len(openings) >= 15  # several templates, not one
    types = Counter(world.graph.types[i] for i in range(len(world.graph)))
    assert len(types) == len(TYPES)
    asked = {q.extra["hops"][0]["entity"] for q in qs}
    texts = [p.text for p in world.passages if p.title in asked]
    assert len({t.split(". ")[1][:12] for t in texts if ". " in t}) > 50  # shuffled sentences


def test_unique_ids_names_and_lengths(world):
    passages, qs = world.passages, world.questions
    assert [p.id for p in passages] == [str(i) for i in range(len(passages))]
    assert len({q.id for q in qs}) == len(qs)
    assert len({q.question for q in qs}) == len(qs)
    assert len(set(world.graph.names)) == len(world.graph)
    lengths = [len(p.text.split()) + len(p.title.split()) for p in passages]
    assert min(lengths) >= 38 and max(lengths) <= 120, (min(lengths), max(lengths))
    assert any(world.graph.n_passages[e] == 2 for e in range(len(world.graph)))


def test_distractors_look_alike_and_differ(world):
    g = world.graph
    pairs = [(e, b) for e, b in enumerate(g.twin_of) if b >= 0]
    assert len(pairs) >= 0.05 * len(g)
    for e, b in pairs:
        assert g.types[e] == g.types[b] and g.names[e] != g.names[b]
        ne, nb = g.names[e].split(), g.names[b].split()
        shares_part = bool(set(ne) & set(nb) - {"The", "of"})
        one_off = len(g.names[e]) == len(g.names[b]) and sum(
            x != y for x, y in zip(g.names[e], g.names[b])
        ) == 1
        assert shares_part or one_off, (g.names[e], g.names[b])
        differing = [r for (r, v), (_, w) in zip(g.facts(e), g.facts(b)) if v != w]
        assert differing, (g.names[e], g.names[b])
    assert world.distractors()[0] == (g.names[pairs[0][0]], g.names[pairs[0][1]])


def test_names_survive_stemming(world):
    """Invented words stay distinct tokens for a stemming BM25 (no suffix gets stripped)."""
    import Stemmer

    stem = Stemmer.Stemmer("english").stemWord
    english = {w for group in ORG_SUFFIXES + WORK_NOUNS for s in group for w in s.split()}
    english |= {"The", "of"}
    invented = {w for name in world.graph.names for w in name.split()} - english
    assert len(invented) > 300
    assert [w for w in sorted(invented) if stem(w.lower()) != w.lower()] == []


def test_cli_writes_the_same_files(tmp_path):
    out = tmp_path / "w"
    assert main(["world", "--out", str(out), "--seed", "5", "--entities", "120"]) == 0
    write_world(generate_world(5, 120), tmp_path / "api")
    assert _read(out) == _read(tmp_path / "api")
    first = json.loads((out / "corpus.jsonl").read_text().splitlines()[0])
    assert Passage.from_contents(first["id"], first["contents"]).title
    assert main(["world", "--out", str(tmp_path / "bad"), "--entities", "3"]) == 2
    assert main(["world", "--entities", "100", "--questions", "5"]) == 2  # options need --out


def test_default_world_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHRL_CACHE", str(tmp_path / "cache"))
    folder = ensure_default_world(seed=2, n_entities=80)
    assert folder == default_world_dir(2, 80) == tmp_path / "cache" / "world-2-80"
    stamp = {n: os.stat(folder / n).st_mtime_ns for n in FILES}
    assert ensure_default_world(seed=2, n_entities=80) == folder
    assert {n: os.stat(folder / n).st_mtime_ns for n in FILES} == stamp  # reused, not rebuilt
    (folder / "world.json").unlink()  # incomplete -> rebuilt
    assert ensure_default_world(seed=2, n_entities=80) == folder
    assert set(FILES) <= {p.name for p in folder.iterdir()}
    info = json.loads((folder / "world.json").read_text())
    assert info["generator"] == generator_fingerprint() != "unknown"
    (folder / "world.json").write_text(json.dumps({**info, "generator": "older code"}))
    ensure_default_world(seed=2, n_entities=80)  # made by other code -> rebuilt
    assert json.loads((folder / "world.json").read_text()) == info
    assert _cache_entries(folder.parent) == ["world-2-80"]  # no temp folders left
    with pytest.raises(ConfigError):
        ensure_default_world(seed=-1, n_entities=80)


def test_a_complete_world_made_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two ranks generating the same world at once: the one finishing second must not delete the
    winner's complete copy (the winner may be reading it: 'corpus.jsonl: no such file')."""
    from searchrl.data import world as world_mod

    monkeypatch.setenv("SEARCHRL_CACHE", str(tmp_path / "cache"))
    folder = default_world_dir(3, 80)
    real_write = world_mod.write_world
    made = {}

    def write_while_another_process_wins(w, out):
        real_write(w, out)
        if not made:  # the other process: its copy lands while ours is still in the temp folder
            real_write(w, folder)
            made["inode"] = os.stat(folder / "corpus.jsonl").st_ino

    monkeypatch.setattr(world_mod, "write_world", write_while_another_process_wins)
    assert ensure_default_world(seed=3, n_entities=80) == folder
    assert os.stat(folder / "corpus.jsonl").st_ino == made["inode"]  # the winner's files, untouched
    assert _cache_entries(folder.parent) == [folder.name]  # our temp folder is gone


def _cache_entries(cache: Path) -> list[str]:
    """The cache folder's entries but the generation locks (plain files that stay by design)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_world_generation_waits_for_another_generator(tmp_path, monkeypatch):
    """While another process holds the world's generation lock nothing is written or deleted; once
    it lets go, the waiting call finds the copy the other one made and returns it untouched."""
    import fcntl
    import threading

    from searchrl.data import world as world_mod

    monkeypatch.setenv("SEARCHRL_CACHE", str(tmp_path / "cache"))
    folder = default_world_dir(4, 80)
    folder.parent.mkdir(parents=True)
    with open(folder.parent / (folder.name + ".lock"), "w") as other:  # the other generator
        fcntl.flock(other, fcntl.LOCK_EX)
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (ensure_default_world(seed=4, n_entities=80), done.set()))
        waiter.start()
        assert not done.wait(1.0)  # blocked on the lock
        assert _cache_entries(folder.parent) == []  # and nothing written meanwhile
        world_mod.write_world(world_mod.generate_world(4, 80), folder)  # the other one's copy lands
        inode = os.stat(folder / "corpus.jsonl").st_ino
    waiter.join(60)
    assert done.is_set() and os.stat(folder / "corpus.jsonl").st_ino == inode


def test_bad_options_raise_config_error():
    bad = ({"n_entities": 10}, {"seed": -3}, {"test_fraction": 2.0}, {"hop_weights": (0, 0)},
           {"colour": "red"})  # fmt: skip
    for kwargs in bad:
        with pytest.raises(ConfigError):
            generate_world(**{"seed": 1, "n_entities": 100, **kwargs})


def test_qa_loader_reads_questions(tmp_path, world):
    qa = pytest.importorskip("searchrl.data.qa")
    write_world(world, tmp_path)
    loaded = qa.load_qa(tmp_path / "questions.jsonl", source="world")
    assert [e.to_dict() for e in loaded] == [q.to_dict() for q in world.questions]
    assert len(qa.load_qa(tmp_path / "questions.jsonl", split="test")) == sum(
        q.split == "test" for q in world.questions
    )


def test_corpus_loader_reads_corpus(tmp_path, world):
    corpus = pytest.importorskip("searchrl.data.corpus")
    write_world(world, tmp_path)
    assert corpus.load_corpus(tmp_path / "corpus.jsonl") == world.passages


def _bm25(passages):
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")

    def tok(texts):
        return bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False)

    index = bm25s.BM25()
    index.index(tok([p.contents for p in passages]), show_progress=False)

    def search(texts, k=3):
        docs, _ = index.retrieve(tok(texts), k=k, show_progress=False)
        return docs

    return search


def test_multi_hop_needs_more_than_one_search():
    """bm25s with the question text alone rarely returns the 2-hop answer; hop queries do."""
    world = generate_world(seed=0, n_entities=1500)
    passages, qs = world.passages, world.questions
    search = _bm25(passages)
    top = search([q.question for q in qs])
    rates = {}
    for n_hops in (1, 2, 3):
        idx = [i for i, q in enumerate(qs) if q.extra["num_hops"] == n_hops]
        ans = [qs[i].golden_answers[0] for i in idx]
        top1 = sum(contains_answer(passages[top[i][0]].contents, a) for i, a in zip(idx, ans))
        top3 = sum(
            any(contains_answer(passages[d].contents, a) for d in top[i]) for i, a in zip(idx, ans)
        )
        rates[n_hops] = (top1 / len(idx), top3 / len(idx))
    assert rates[1][1] > 0.9  # one-hop questions are found by their own text
    assert rates[2][0] < MAX_2HOP_TOP1 and rates[2][1] < MAX_2HOP_TOP3, rates
    assert rates[3][1] < MAX_2HOP_TOP3, rates
    hops = [h for q in qs for h in q.extra["hops"]]
    found = search([h["query"] for h in hops])
    hit = sum(int(h["passage_id"]) in docs for h, docs in zip(hops, found))
    assert hit / len(hops) >= MIN_HOP_QUERY_TOP3


def test_normalize_matches_squad_rules():
    assert normalize("The Lantern of Velmor, a Tale!") == "lantern of velmor tale"
    assert contains_answer('"Skor Press"\nPublished by Skor Press.', "skor press")
    assert not contains_answer("Skorpress is here", "Skor Press")


# ------------------------------------------------------------------------------ comparison questions
def test_comparison_questions_take_their_answers_from_the_two_facts():
    from searchrl.data.world_comparisons import YEAR_QUESTIONS, comparison_questions, known_facts

    world = generate_world(seed=2, n_entities=300)
    train = [q for q in world.questions if q.split == "train"]
    facts = {(h["entity"], h["relation"]): h["answer"] for rel in known_facts(train).values() for h in rel}
    qs = comparison_questions(train, 40, seed=3)
    assert len(qs) == 40 and len({q.id for q in qs}) == 40
    kinds = Counter(q.extra["compare"] for q in qs)
    assert kinds == {"earlier": 10, "later": 10, "same": 20}
    assert Counter(q.golden_answers[0] for q in qs if q.extra["compare"] == "same") == {"yes": 10, "no": 10}
    pairs = set()
    for q in qs:
        a, b = q.extra["hops"]
        assert a["relation"] == b["relation"] and a["entity"] != b["entity"] and q.extra["num_hops"] == 2
        assert a["entity"] in q.question and b["entity"] in q.question
        assert facts[a["entity"], a["relation"]] == a["answer"] and facts[b["entity"], b["relation"]] == b["answer"]
        gold = q.golden_answers[0]
        if q.extra["compare"] == "same":
            assert gold == ("yes" if a["answer"] == b["answer"] else "no")
        else:
            assert a["relation"] in YEAR_QUESTIONS and a["answer"] != b["answer"]
            years = {a["entity"]: int(a["answer"]), b["entity"]: int(b["answer"])}
            want = min(years, key=years.get) if q.extra["compare"] == "earlier" else max(years, key=years.get)
            assert gold == want
        pairs.add((q.extra["compare"], a["relation"], frozenset((a["entity"], b["entity"]))))
    assert len(pairs) == 40  # no pair asked twice
    assert [q.question for q in comparison_questions(train, 40, seed=3)] == [q.question for q in qs]
    assert [q.question for q in comparison_questions(train, 40, seed=4)] != [q.question for q in qs]


def test_comparison_questions_stop_when_the_facts_run_out():
    from searchrl.data.world_comparisons import comparison_questions
    from searchrl.types import QAExample

    hop = {"entity": "Dawn", "relation": "release_year", "answer": "1990", "query": "Dawn released"}
    assert comparison_questions([QAExample("0", "q", ["1990"], extra={"hops": [hop]})], 5) == []  # one fact
    assert comparison_questions([QAExample("0", "q", ["x"])], 5) == []  # no hop chains
    two = [QAExample(str(i), "q", [y], extra={"hops": [{**hop, "entity": e, "answer": y}]})
           for i, (e, y) in enumerate([("Dawn", "1990"), ("Dusk", "1975")])]
    assert {q.golden_answers[0] for q in comparison_questions(two, 5)} == {"Dusk", "Dawn"}  # earlier, later
    assert len(comparison_questions(two, 5)) == 2
