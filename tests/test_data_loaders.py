"""Corpus and QA loaders: every format from tiny files written here, malformed input, and (marked
``shared``) every real file under ../shared/data checked against its README table."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from searchrl.data import corpus as corpus_mod
from searchrl.data.corpus import corpus_fingerprint, iter_corpus, load_corpus, write_corpus_jsonl
from searchrl.data.qa import (
    QA_FORMATS,
    guess_source,
    load_qa,
    load_qa_many,
    qa_contexts_as_passages,
)
from searchrl.errors import DataFormatError
from searchrl.types import Passage


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, value, indent=None) -> Path:
    path.write_text(json.dumps(value, indent=indent), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


PASSAGES = [
    Passage("0", "Paris", "Paris is the capital of France.\nIt lies on the Seine."),
    Passage("1", 'Quote "inside" title', "Text with “unicode” – dashes."),
    Passage("2", "", "A passage without a title."),
]


# ----------------------------------------------------------------------------- corpus formats


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz"])
def test_write_then_read_roundtrip(tmp_path, name):
    path = tmp_path / name
    assert write_corpus_jsonl(PASSAGES, path) == 3
    assert load_corpus(path) == PASSAGES
    assert not list(tmp_path.glob("*.tmp"))
    if name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            assert json.loads(f.readline()) == {"id": "0", "contents": PASSAGES[0].contents}


def test_searchr1_contents_format(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [{"id": 7, "contents": '"Evan Morris"\nEvan L. Morris was a lobbyist.'}, "", {"id": "x", "contents": "no title"}],
    )
    got = load_corpus(path)
    assert got == [Passage("7", "Evan Morris", "Evan L. Morris was a lobbyist."), Passage("x", "", "no title")]


def test_title_text_jsonl_ids_default_to_record_index(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"title": "A", "text": "a."}, "   ", {"title": "B", "text": "b."}])
    assert [(p.id, p.title, p.text) for p in iter_corpus(path)] == [("0", "A", "a."), ("1", "B", "b.")]


@pytest.mark.parametrize("indent", [None, 2])
def test_hipporag_list_and_title_mapping(tmp_path, indent):
    listed = write_json(tmp_path / "list.json", [{"title": "T1", "text": "one."}, {"title": "T2", "text": "two."}], indent)
    assert [(p.id, p.title, p.text) for p in load_corpus(listed)] == [("0", "T1", "one."), ("1", "T2", "two.")]
    mapping = {"Demon Dice": ["Demon Dice is a game.", " It has dice."], "Free Guy": ["A film.", "By Shawn Levy."]}
    mapped = write_json(tmp_path / "map.json", mapping, indent)
    assert [(p.id, p.title, p.text) for p in load_corpus(mapped)] == [
        ("0", "Demon Dice", "Demon Dice is a game. It has dice."),
        ("1", "Free Guy", "A film. By Shawn Levy."),
    ]


def test_parquet_corpus(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", [{"id": p.id, "contents": p.contents} for p in PASSAGES])
    assert load_corpus(path) == PASSAGES


# ----------------------------------------------------------------------------- corpus errors


def _error(fn, *args, **kwargs) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(
    "rows, line, needle",
    [
        ([{"id": 1, "contents": "a"}, {"id": 2, "contents": "b"}, '{"id": 3, "contents": '], 3, "bad JSON"),
        ([{"id": 1, "contents": "a"}, {"id": 2, "body": "b"}], 2, "'contents'"),
        ([{"id": 1, "contents": 5}], 1, "must be a string, got int"),
        ([{"id": [1], "contents": "a"}], 1, "'id' must be a string"),
        ([{"id": 1, "title": "t", "text": {"x": 1}}], 1, "'text' must be a string"),
        ([{"id": 1, "contents": "a"}, [1, 2]], 2, "expected a JSON object, got list"),
        ([{"id": "a", "contents": "x"}, {"id": "b", "contents": "y"}, {"id": "a", "contents": "z"}], 3,
         "duplicate id 'a' (first seen at line 1)"),
    ],
)
def test_corpus_errors_name_file_and_line(tmp_path, rows, line, needle):
    path = write_lines(tmp_path / "bad_corpus.jsonl", rows)
    err = _error(load_corpus, path)
    assert err.line == line
    assert f"bad_corpus.jsonl:{line}:" in str(err) and needle in str(err)


def test_corpus_errors_for_whole_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "empty file" in str(_error(load_corpus, empty))
    assert "empty" in str(_error(load_corpus, write_json(tmp_path / "none.json", [])))
    assert "no such file" in str(_error(load_corpus, tmp_path / "missing.jsonl"))
    err = _error(load_corpus, write_json(tmp_path / "list.json", [{"title": "a", "text": "x"}, {"title": "b"}]))
    assert "record 2:" in str(err) and err.line == 2 and "list.json" in str(err)
    text = tmp_path / "plain.txt"
    text.write_text("hello\n")
    assert "not JSON" in str(_error(load_corpus, text))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"title": "a",\n "text": "x"},\n {"title": }]')
    err = _error(load_corpus, broken)
    assert err.line == 3 and "bad JSON" in str(err)


def test_duplicate_check_can_be_disabled(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"id": 1, "contents": "a"}, {"id": 1, "contents": "b"}])
    assert len(list(iter_corpus(path, check_ids=False))) == 2


def test_write_rejects_what_would_not_read_back(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        write_corpus_jsonl([Passage("1", "a", "x"), Passage("1", "b", "y")], tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="newline"):
        write_corpus_jsonl([Passage("1", "a\nb", "x")], tmp_path / "c.jsonl")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_under_copy_and_sensitive_to_edits(tmp_path):
    path = tmp_path / "c.jsonl"
    write_corpus_jsonl(PASSAGES, path)
    fp = corpus_fingerprint(path)
    assert fp.startswith("sha256:") and fp == corpus_fingerprint(path)
    copy = tmp_path / "copy.jsonl"
    shutil.copy(path, copy)
    assert corpus_fingerprint(copy) == fp
    write_corpus_jsonl(PASSAGES[:2] + [Passage("2", "", "A passage without a titlf.")], copy)
    assert corpus_fingerprint(copy) != fp
    assert corpus_fingerprint(path, full=True) == fp  # small files are hashed whole by default


def test_sampled_fingerprint_for_big_files(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_FULL_HASH_MAX_BYTES", 1 << 20)
    data = bytearray(b"x" * (5 << 20))
    path = tmp_path / "big.jsonl"
    path.write_bytes(bytes(data))
    sampled = corpus_fingerprint(path)
    assert sampled != corpus_fingerprint(path, full=True)
    data[-10] = ord("y")  # a change in the tail block
    path.write_bytes(bytes(data))
    assert corpus_fingerprint(path) != sampled
    path.write_bytes(bytes(data) + b"\n")  # an append changes the size
    assert corpus_fingerprint(path) not in (sampled, corpus_fingerprint(path, full=True))


# ----------------------------------------------------------------------------- QA formats


def test_nq_open_jsonl(tmp_path):
    path = write_lines(
        tmp_path / "NQ-open.dev.jsonl",
        [{"question": "when was the moon landing", "answer": ["1969", "July 1969"]}, {"question": "q2", "answer": ["a"]}],
    )
    got = load_qa(path)
    assert [(e.id, e.question, e.golden_answers, e.split, e.source) for e in got] == [
        ("nq-0", "when was the moon landing", ["1969", "July 1969"], "test", "nq"),
        ("nq-1", "q2", ["a"], "test", "nq"),
    ]


def test_flashrag_and_miniwiki_jsonl(tmp_path):
    flash = write_lines(
        tmp_path / "popqa.jsonl",
        [{"id": "test_1", "question": "Who composed X?", "golden_answers": ["A", "B"], "metadata": {"s_pop": 3}}],
    )
    (ex,) = load_qa(flash)
    assert (ex.id, ex.golden_answers, ex.source, ex.extra) == ("test_1", ["A", "B"], "popqa", {"metadata": {"s_pop": 3}})
    (tmp_path / "questions").mkdir()
    mini = write_lines(
        tmp_path / "questions" / "hotpotqa.jsonl",
        [
            {"id": "a", "question": "q1", "golden_answers": ["x"], "split": "train", "answerable": True},
            {"id": "b", "question": "q2", "golden_answers": ["y"], "split": "test", "answerable": False},
            {"id": "c", "question": "q3", "golden_answers": ["z"], "split": "test", "answerable": True},
        ],
    )
    assert [e.id for e in load_qa(mini, split="test")] == ["b", "c"]
    assert [e.extra["answerable"] for e in load_qa(mini)] == [True, False, True]
    assert {e.source for e in load_qa(mini)} == {"hotpotqa"}
    assert load_qa(mini, split="validation") == []
    assert {e.source for e in load_qa(mini, source="mine")} == {"mine"}


VERL_PROMPT = "Answer the question, searching as needed.\nQuestion: who wrote hamlet?\n"
VERL_ROWS = [
    {  # Agentic-RAG style: extra_info carries question and a list answer
        "data_source": "nq", "prompt": [{"role": "user", "content": "who sang x"}], "ability": "QA",
        "reward_model": {"ground_truth": "Bob, Ann", "style": "rule"},
        "extra_info": {"question": "who sang x", "answer": ["Bob", "Ann"], "index": 0, "split": "train"},
    },
    {  # Search-R1 style: question only inside the prompt template, ground_truth {"target": [...]}
        "data_source": "nq", "prompt": [{"role": "user", "content": VERL_PROMPT}], "ability": "QA",
        "reward_model": {"ground_truth": {"target": ["Shakespeare"]}, "style": "rule"},
        "extra_info": {"question": None, "answer": None, "index": 1, "split": "test"},
    },
    {  # only a comma-joined ground-truth string: kept whole (answers can contain commas)
        "data_source": "nq", "prompt": [{"role": "user", "content": "where is salzburg"}], "ability": "QA",
        "reward_model": {"ground_truth": "Salzburg, Austria", "style": "rule"},
        "extra_info": {"question": "where is salzburg", "answer": None, "index": 2, "split": "test"},
    },
]


def test_verl_parquet_and_jsonl_agree(tmp_path):
    # a parquet column holds one type: string and struct ground truths go to separate files
    for name, rows in (("str", VERL_ROWS[::2]), ("struct", VERL_ROWS[1:2])):
        from_parquet = load_qa(write_parquet(tmp_path / f"nq_{name}.parquet", rows))
        assert [e.to_dict() for e in from_parquet] == [
            e.to_dict() for e in load_qa(write_lines(tmp_path / f"nq_{name}.jsonl", rows))
        ]
    from_jsonl = load_qa(write_lines(tmp_path / "nq_train.jsonl", VERL_ROWS))
    assert [(e.id, e.question, e.golden_answers, e.split) for e in from_jsonl] == [
        ("nq-0", "who sang x", ["Bob", "Ann"], "train"),
        ("nq-1", "who wrote hamlet?", ["Shakespeare"], "test"),
        ("nq-2", "where is salzburg", ["Salzburg, Austria"], "test"),
    ]
    assert from_jsonl[0].extra == {"data_source": "nq", "index": 0}


HOTPOT_CONTEXT = [["Scott Derrickson", ["Scott is a director.", " He was born in 1966."]], ["Ed Wood", ["Ed was American."]]]


@pytest.mark.parametrize("style", ["lists", "hf", "python-text"])
def test_hotpotqa_contexts(tmp_path, style):
    context = {
        "lists": HOTPOT_CONTEXT,
        "hf": {"title": [c[0] for c in HOTPOT_CONTEXT], "sentences": [c[1] for c in HOTPOT_CONTEXT]},
        "python-text": repr(HOTPOT_CONTEXT),
    }[style]
    row = {"_id": "5a8b", "question": "Same nationality?", "answer": "yes", "type": "comparison",
           "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]], "context": context}
    (ex,) = load_qa(write_json(tmp_path / "hotpot_dev_distractor_v1.json", [row]))
    assert (ex.id, ex.golden_answers, ex.source, ex.extra["type"]) == ("5a8b", ["yes"], "hotpotqa", "comparison")
    assert ex.extra["context"] == [("Scott Derrickson", "Scott is a director. He was born in 1966."), ("Ed Wood", "Ed was American.")]
    assert ex.extra["supporting_facts"] == [("Scott Derrickson", 0), ("Ed Wood", 0)]


def test_2wiki_jsonl_with_missing_context(tmp_path):
    rows = [{"_id": "a", "question": "q?", "answer": "Free Guy", "context": HOTPOT_CONTEXT},
            {"_id": "b", "question": "r?", "answer": "no", "context": None}]
    got = load_qa(write_lines(tmp_path / "2wiki_dev.jsonl", rows))
    assert [e.source for e in got] == ["2wikimultihopqa"] * 2 and got[1].extra["context"] == []
    passages = qa_contexts_as_passages(got + got, start_id=10)
    assert [(p.id, p.title) for p in passages] == [("10", "Scott Derrickson"), ("11", "Ed Wood")]


def test_musique(tmp_path):
    paragraphs = [{"idx": 0, "title": "Port Blair", "paragraph_text": "Capital of the islands.", "is_supporting": False},
                  {"idx": 1, "title": "Stanley", "paragraph_text": "Seat of the county.", "is_supporting": True}]
    row = {"id": "2hop__1_2", "question": "Seat of the county?", "answer": "Stanley", "answerable": "True",
           "answer_aliases": "['Stanley, ND', 'Stanley']", "paragraphs": repr(paragraphs), "question_decomposition": []}
    (ex,) = load_qa(write_lines(tmp_path / "musique_ans_dev.jsonl", [row]))
    assert ex.golden_answers == ["Stanley", "Stanley, ND"]
    assert ex.extra["answerable"] is True and ex.extra["supporting"] == [1]
    assert ex.extra["context"] == [("Port Blair", "Capital of the islands."), ("Stanley", "Seat of the county.")]


def test_json_list_of_pairs_and_gzip(tmp_path):
    rows = [{"test_id": 0, "question": "q0", "answer": ["A", "The A"]}, {"test_id": 1, "question": "q1", "answer": "yes"},
            {"test_id": 2, "question": "q2", "answer": 1983}]
    got = load_qa(write_json(tmp_path / "2wiki_dev_aliases.json", rows, indent=1))
    assert [(e.id, e.golden_answers) for e in got] == [("0", ["A", "The A"]), ("1", ["yes"]), ("2", ["1983"])]
    gz = tmp_path / "bamboogle.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert [(e.id, e.source) for e in load_qa(gz)] == [("bamboogle-0", "bamboogle")]


def test_guess_source_and_forced_format(tmp_path):
    assert guess_source("raw/nq/agenticrag_nq_test3610.parquet") == "nq"
    assert guess_source("data/hotpot_qa/test.parquet") == "hotpotqa"
    assert guess_source("x/TriviaQA-dev.json") == "triviaqa"
    path = write_lines(tmp_path / "mine.jsonl", [{"question": "q", "answer": "a", "golden_answers": ["b"]}])
    assert load_qa(path)[0].golden_answers == ["b"]
    assert load_qa(path, format="qa-pairs")[0].golden_answers == ["a"]
    assert "unknown format 'nope'" in str(_error(load_qa, path, format="nope"))


# ----------------------------------------------------------------------------- QA errors


@pytest.mark.parametrize(
    "rows, line, needle",
    [
        ([{"question": "q", "answer": "a"}, {"question": "q", "answer": "a"}, {"answer": "a"}], 3, "field 'question' missing"),
        ([{"question": "q", "answer": "a"}, {"question": "q"}], 2, "field 'answer' missing"),
        ([{"question": "q", "answer": "a"}, {"question": "   ", "answer": "a"}], 2, "field 'question' is empty"),
        ([{"question": "q", "answer": "a"}, {"question": "q", "answer": {"x": 1}}], 2, "'answer' must be a string or a list"),
        ([{"id": "1", "question": "q", "golden_answers": "a"}], 1, "'golden_answers' must be a list of strings"),
        ([{"id": "1", "question": "q", "golden_answers": []}], 1, "'golden_answers' is empty"),
        ([{"id": "1", "question": "q", "golden_answers": ["a"]}, {"id": "1", "question": "r", "golden_answers": ["b"]}], 2,
         "duplicate id '1' (first at line 1)"),
        ([{"question": "q", "answer": "a"}, "{not json"], 2, "bad JSON"),
        ([{"_id": "1", "question": "q", "answer": "a", "context": [["t", ["s"], "extra"]]}], 1, "'context' item 1"),
        ([{"prompt": [], "reward_model": {}, "extra_info": {"question": "q"}}], 1, "no answer"),
    ],
)
def test_qa_errors_name_file_and_line(tmp_path, rows, line, needle):
    err = _error(load_qa, write_lines(tmp_path / "bad_qa.jsonl", rows))
    assert err.line == line
    assert f"bad_qa.jsonl:{line}:" in str(err) and needle in str(err)


def test_qa_record_errors_and_unknown_format(tmp_path):
    rows = [{"id": str(i), "question": "q", "golden_answers": ["a"]} for i in range(4)]
    rows.append({"id": "4", "question": "q", "golden_answers": [["nested"]]})
    err = _error(load_qa, write_json(tmp_path / "bad.json", rows))
    assert "bad.json: record 5: 'golden_answers' must be a list of strings" in str(err) and err.line == 5
    err = _error(load_qa, write_lines(tmp_path / "corpus.jsonl", [{"id": "1", "contents": "x"}]))
    assert "unknown QA format" in str(err) and all(name in str(err) for name in QA_FORMATS)
    assert "no records" in str(_error(load_qa, write_json(tmp_path / "empty.json", [])))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty file" in str(_error(load_qa, empty))


# ----------------------------------------------------------------------------- many files, contexts


def test_load_qa_many_prefixes_ids_only_on_clash(tmp_path):
    nq = write_lines(tmp_path / "nq.jsonl", [{"id": "test_1", "question": "a", "golden_answers": ["x"]}])
    tqa = write_lines(tmp_path / "triviaqa.jsonl", [{"id": "test_1", "question": "b", "golden_answers": ["y"]}])
    pop = write_lines(tmp_path / "popqa.jsonl", [{"id": "test_2", "question": "c", "golden_answers": ["z"]}])
    assert [e.id for e in load_qa_many(f"{nq}, {pop}")] == ["test_1", "test_2"]
    assert [e.id for e in load_qa_many(f"{nq},{tqa}")] == ["nq:test_1", "triviaqa:test_1"]
    assert [e.id for e in load_qa_many([nq, pop], prefix_ids=True)] == ["nq:test_1", "popqa:test_2"]
    assert "occurs in more than one file" in str(_error(load_qa_many, [nq, tqa], prefix_ids=False))


# ----------------------------------------------------------------------------- real data (shared)

QA_COUNTS = {  # file -> (examples, splits), from ../shared/data/README.md and the files themselves
    "raw/2wikimultihopqa/agenticrag_2wiki_dev12576.parquet": (12576, {"test": 12576}),
    "raw/2wikimultihopqa/agenticrag_2wiki_dev12576_qa.json": (12576, {"test": 12576}),
    "raw/2wikimultihopqa/migres_2wiki_dev_sub200_ctx.jsonl": (200, {"test": 200}),
    "raw/2wikimultihopqa/trustmargin_2wiki_dev_first1000_aliases.json": (1000, {"test": 1000}),
    "raw/corpus/hipporag_hotpotqa_train.json": (100, {"train": 100}),
    "raw/corpus/hipporag_musique_train.json": (100, {"train": 100}),
    "raw/hotpotqa/agenticrag_hotpotqa_dev7405.jsonl": (7405, {"test": 7405}),
    "raw/hotpotqa/agenticrag_hotpotqa_dev7405.parquet": (7405, {"test": 7405}),
    "raw/hotpotqa/meve_hotpot_dev_distractor_first100.json": (100, {"test": 100}),
    "raw/hotpotqa/migres_hotpot_dev_sub200_ctx.jsonl": (200, {"test": 200}),
    "raw/musique/agenticrag_musique_dev2417.jsonl": (2417, {"test": 2417}),
    "raw/musique/agenticrag_musique_train19938.parquet": (19938, {"train": 19938}),
    "raw/musique/migres_musique_dev_sub200_ctx.jsonl": (200, {"test": 200}),
    "raw/nq/NQ-open.dev.jsonl": (3610, {"test": 3610}),
    "raw/nq/NQ-open.efficientqa.dev.1.1.jsonl": (1800, {"test": 1800}),
    "raw/nq/NQ-open.efficientqa.test.1.1.jsonl": (1769, {"test": 1769}),
    "raw/nq/agenticrag_nq_test3610.parquet": (3610, {"test": 3610}),
    "raw/nq/flashrag_nq_test_sub1000.jsonl": (1000, {"test": 1000}),
    "raw/popqa/flashrag_popqa_test_sub1000.jsonl": (1000, {"test": 1000}),
    "raw/triviaqa/flashrag_triviaqa_test_sub1000.jsonl": (1000, {"test": 1000}),
    "miniwiki/questions/nq.jsonl": (1000, {"train": 600, "test": 400}),
    "miniwiki/questions/hotpotqa.jsonl": (397, {"train": 241, "test": 156}),
    "miniwiki/questions/2wikimultihopqa.jsonl": (164, {"test": 164}),
    "miniwiki/questions/musique.jsonl": (300, {"test": 300}),
    "miniwiki/questions/popqa.jsonl": (1000, {"test": 1000}),
    "miniwiki/questions/triviaqa.jsonl": (1000, {"test": 1000}),
}
CORPUS_COUNTS = {
    "miniwiki/corpus.jsonl": 25556,
    "raw/corpus/searchr1_example_corpus.jsonl": 10,
    "raw/corpus/hipporag_2wikimultihopqa_corpus.json": 6119,
    "raw/corpus/hipporag_hotpotqa_train_corpus.json": 994,
    "raw/corpus/hipporag_musique_train_corpus.json": 1890,
}
ANSWERABLE_TEST = {"nq": 271, "hotpotqa": 147, "2wikimultihopqa": 150, "musique": 300, "popqa": 471, "triviaqa": 744}


@pytest.mark.shared
def test_every_shared_file_is_listed_here(shared_data):
    found = {str(p.relative_to(shared_data)) for p in (shared_data / "raw").rglob("*") if p.is_file()}
    found |= {str(p.relative_to(shared_data)) for p in (shared_data / "miniwiki" / "questions").iterdir()}
    assert found <= set(QA_COUNTS) | set(CORPUS_COUNTS)


@pytest.mark.shared
@pytest.mark.parametrize("rel", sorted(QA_COUNTS))
def test_shared_qa_files(shared_data, rel):
    examples = load_qa(shared_data / rel)
    count, splits = QA_COUNTS[rel]
    assert len(examples) == count and len({e.id for e in examples}) == count
    assert {s: sum(e.split == s for e in examples) for s in splits} == splits
    expected_source = rel.split("/")[1] if rel.startswith("raw/") and "/corpus/" not in rel else guess_source(rel)
    assert all(e.source == expected_source for e in examples)
    assert all(e.question.strip() and e.golden_answers and all(a for a in e.golden_answers) for e in examples)
    if rel.startswith("miniwiki/"):
        name = Path(rel).stem
        assert sum(e.split == "test" and e.extra["answerable"] is True for e in examples) == ANSWERABLE_TEST[name]
    if "_ctx" in rel or "hipporag" in rel or "meve" in rel:
        assert sum(bool(e.extra["context"]) for e in examples) == (164 if "2wiki" in rel else count)


@pytest.mark.shared
@pytest.mark.parametrize("rel", sorted(CORPUS_COUNTS))
def test_shared_corpora(shared_data, rel):
    passages = load_corpus(shared_data / rel)
    assert len(passages) == CORPUS_COUNTS[rel]
    assert all(p.text for p in passages) and sum(bool(p.title) for p in passages) == len(passages)
    assert "unknown QA format" in str(_error(load_qa, shared_data / rel))


@pytest.mark.shared
def test_shared_known_records(shared_data):
    (first,) = load_corpus(shared_data / "raw/corpus/searchr1_example_corpus.jsonl")[:1]
    assert (first.id, first.title) == ("0", "Evan Morris") and first.text.startswith("Evan Morris Evan L. Morris")
    nq = load_qa(shared_data / "raw/nq/agenticrag_nq_test3610.parquet")
    assert nq[0].golden_answers == ["14 December 1972 UTC", "December 1972"]
    assert [e.golden_answers for e in nq] == [e.golden_answers for e in load_qa(shared_data / "raw/nq/NQ-open.dev.jsonl")]
    hotpot = load_qa(shared_data / "raw/hotpotqa/agenticrag_hotpotqa_dev7405.parquet")
    assert [e.to_dict() for e in hotpot] == [e.to_dict() for e in load_qa(shared_data / "raw/hotpotqa/agenticrag_hotpotqa_dev7405.jsonl")]
    meve = load_qa(shared_data / "raw/hotpotqa/meve_hotpot_dev_distractor_first100.json")
    assert [(e.question, e.golden_answers) for e in meve] == [(e.question, e.golden_answers) for e in hotpot[:100]]
    aliases = load_qa(shared_data / "raw/2wikimultihopqa/trustmargin_2wiki_dev_first1000_aliases.json")
    assert aliases[1].golden_answers == ["Mask of Fu Manchu", "The Mask of Fu Manchu"]


@pytest.mark.shared
@pytest.mark.parametrize("name", ["hotpotqa", "musique"])
def test_shared_contexts_equal_hipporag_corpus(shared_data, name):
    """HippoRAG ships each question file's contexts as a corpus: both paths must give the same passages."""
    questions = load_qa(shared_data / f"raw/corpus/hipporag_{name}_train.json")
    from_contexts = {(p.title, p.text) for p in qa_contexts_as_passages(questions)}
    from_corpus = {(p.title, p.text) for p in load_corpus(shared_data / f"raw/corpus/hipporag_{name}_train_corpus.json")}
    assert from_contexts == from_corpus and len(from_corpus) > 900


@pytest.mark.shared
def test_shared_miniwiki_many_and_fingerprint(shared_data):
    files = ",".join(str(shared_data / "miniwiki/questions" / f"{n}.jsonl") for n in ANSWERABLE_TEST)
    train = load_qa_many(files, split="train")
    assert len(train) == 841 and {e.source for e in train} == {"nq", "hotpotqa"}
    everything = load_qa_many(files)
    assert len(everything) == 3861 == len({e.id for e in everything})
    fp = corpus_fingerprint(shared_data / "miniwiki/corpus.jsonl")
    assert fp == corpus_fingerprint(shared_data / "miniwiki/corpus.jsonl", full=True)
