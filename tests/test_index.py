"""Index directories: build / load every kind, resume an interrupted build, reject broken ones, CLI."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from searchrl.cli import main
from searchrl.data.corpus import load_corpus, write_corpus_jsonl
from searchrl.errors import ConfigError, IndexFormatError
from searchrl.retrieval import dense as dense_mod
from searchrl.retrieval.bm25 import BM25Retriever
from searchrl.retrieval.dense import DenseRetriever
from searchrl.retrieval.hybrid import HybridRetriever
from searchrl.retrieval.index import PassageStore, build_index, load_index, read_manifest
from searchrl.types import Passage

TOPICS = [
    ("Honeybees", "Honeybees collect nectar from flowers and turn it into honey in the hive."),
    ("Glaciers", "Glaciers are slow rivers of ice that carve valleys into mountains."),
    ("Volcanoes", "A volcano is a rupture in the crust of a planet where lava escapes."),
    ("Violin", "The violin is a wooden string instrument played with a bow."),
    ("Chess", "Chess is a board game for two players on a checkered board of 64 squares."),
    ("Coffee", "Coffee is brewed from roasted beans of the Coffea plant."),
    ("Photosynthesis", "Plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("Lighthouses", "A lighthouse is a tower with a bright lamp that guides ships at night."),
    ("Origami", "Origami is the Japanese art of folding paper into shapes such as cranes."),
    ("Tides", "Tides are the rise and fall of sea levels caused by the Moon's gravity."),
]
PASSAGES = [Passage(f"p{i}", t, x) for i, (t, x) in enumerate(TOPICS)] + [
    Passage(f"q{i}", f'Filler "{i}"', f"Unrelated filler passage number {i} about nothing much, é ü 漢字.")
    for i in range(10)
]
QUERIES = ["where does honey come from", "ice carving valleys", "game with a checkered board", "zzzz"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, minilm_encoder):
    root = tmp_path_factory.mktemp("idx")
    corpus = root / "corpus.jsonl"
    write_corpus_jsonl(PASSAGES, corpus)
    dirs = {}
    for kind in ("bm25", "dense", "hybrid"):
        dirs[kind] = build_index(corpus, kind, root / kind, shard_size=8, show_progress=False, device="cpu")
    return corpus, dirs


def test_manifest_and_passages(built):
    corpus, dirs = built
    for kind, d in dirs.items():
        m = read_manifest(d)
        assert m["kind"] == kind and m["format_version"] == 1 and m["num_passages"] == len(PASSAGES)
        assert m["corpus"]["path"] == str(corpus.resolve()) and m["corpus"]["fingerprint"].startswith("sha256:")
        assert m["searchrl_version"] and m["created"] and m["build_seconds"] >= 0 and not m["resumed"]
        assert ("bm25" in m) == (kind != "dense") and ("dense" in m) == (kind != "bm25")
        assert not (d.parent / f"{d.name}.tmp").exists()
    dm = read_manifest(dirs["dense"])["dense"]
    assert dm["model"]["name"] == "all-MiniLM-L6-v2" and dm["model"]["dim"] == 384
    assert dm["model"]["pooling"] == "mean" and dm["faiss"]["type"] == "flat"
    assert sorted(p.name for p in dirs["hybrid"].iterdir()) == [
        "bm25", "dense", "manifest.json", "passages.jsonl", "passages.offsets.npy"]
    store = PassageStore(dirs["bm25"])
    assert list(store) == load_corpus(corpus) == PASSAGES  # exact round trip, unicode included
    assert store[-1] == PASSAGES[-1] and store[2:4] == PASSAGES[2:4]
    with pytest.raises(IndexError):
        store[len(PASSAGES)]


def test_loaded_indexes_equal_direct_retrievers(built, minilm_encoder):
    _, dirs = built
    bm25 = load_index(dirs["bm25"])
    assert isinstance(bm25, BM25Retriever)
    assert bm25.search(QUERIES, k=3) == BM25Retriever.build(PASSAGES, show_progress=False).search(QUERIES, k=3)
    dense = load_index(dirs["dense"], device="cpu")
    assert isinstance(dense, DenseRetriever)
    direct = minilm_encoder.encode_passages([p.contents for p in PASSAGES])
    np.testing.assert_allclose(dense.index.reconstruct_n(0, len(PASSAGES)), direct, atol=1e-5)
    results = dense.search(QUERIES, k=3)
    assert [r[0].title for r in results[:3]] == ["Honeybees", "Glaciers", "Chess"]
    hybrid = load_index(dirs["hybrid"], device="cpu")
    assert isinstance(hybrid, HybridRetriever) and hybrid.fusion == "rrf" and hybrid.k_rrf == 60
    assert hybrid.sparse.search(QUERIES, k=5) == bm25.search(QUERIES, k=5)
    assert [r[0].title for r in hybrid.search(QUERIES, k=3)[:3]] == ["Honeybees", "Glaciers", "Chess"]
    assert load_index(dirs["hybrid"], fusion="score", device="cpu").fusion == "score"


class Interrupted(Exception):
    pass


def test_interrupted_build_resumes_and_equals_fresh(built, tmp_path, monkeypatch):
    corpus, dirs = built
    out = tmp_path / "dense"
    calls, fail_at = [], {2}
    real = dense_mod.Encoder.encode_passages

    def flaky(self, texts, progress=None):
        calls.append(len(texts))
        if len(calls) in fail_at:
            raise Interrupted
        return real(self, texts, progress)

    monkeypatch.setattr(dense_mod.Encoder, "encode_passages", flaky)
    with pytest.raises(Interrupted):
        build_index(corpus, "dense", out, shard_size=8, show_progress=False, device="cpu")
    assert not out.exists() and (tmp_path / "dense.tmp" / "dense" / "emb" / "shard_00000.npy").is_file()
    with pytest.raises(IndexFormatError, match="interrupted build"):
        load_index(out)
    calls.clear()
    fail_at.clear()
    build_index(corpus, "dense", out, shard_size=8, show_progress=False, device="cpu")
    assert calls == [8, 4]  # shards 1 and 2 only
    assert read_manifest(out)["resumed"] is True and not (tmp_path / "dense.tmp").exists()
    got = load_index(out, device="cpu").search(QUERIES, k=5)
    want = load_index(dirs["dense"], device="cpu").search(QUERIES, k=5)
    assert [[p.id for p in r] for r in got] == [[p.id for p in r] for r in want]
    np.testing.assert_allclose([p.score for r in got for p in r], [p.score for r in want for p in r], rtol=1e-6)


def test_interrupted_build_with_other_settings_starts_over(built, tmp_path, monkeypatch):
    corpus, _ = built
    out = tmp_path / "idx"
    monkeypatch.setattr(BM25Retriever, "build", classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(Interrupted)))
    with pytest.raises(Interrupted):
        build_index(corpus, "bm25", out, show_progress=False)
    monkeypatch.undo()
    build_index(corpus, "bm25", out, show_progress=False, k1=1.2)  # another setting: not a resume
    m = read_manifest(out)
    assert m["resumed"] is False and m["bm25"]["k1"] == 1.2


def test_output_rules_and_options(built, tmp_path):
    corpus, dirs = built
    out = tmp_path / "o"
    build_index(corpus, "bm25", out, show_progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        build_index(corpus, "bm25", out, show_progress=False)
    build_index(corpus, "bm25", out, show_progress=False, overwrite=True, stemmer=None)
    assert read_manifest(out)["bm25"]["stemmer"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no .tmp / .old left behind
    with pytest.raises(ConfigError, match="unknown index option.*colour.*valid: overwrite"):
        build_index(corpus, "bm25", tmp_path / "x", colour="red")
    with pytest.raises(ConfigError, match="unknown index kind 'splade'"):
        build_index(corpus, "splade", tmp_path / "x")
    with pytest.raises(ConfigError, match="faiss must be one of flat, hnsw, ivf"):
        build_index(corpus, "dense", tmp_path / "x", faiss="pq")
    with pytest.raises(Exception, match="corpus file not found"):
        build_index(tmp_path / "none.jsonl", "bm25", tmp_path / "x")


def _edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _write_garbage(path):
    path.write_bytes(b"\x93NUMPY garbage" + bytes(range(200)))


def _replace_faiss(n, dim):
    def fn(d):
        index = faiss.IndexFlatIP(dim)
        index.add(np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32))
        faiss.write_index(index, str(d / "dense" / "faiss.index"))
    return fn


N = len(PASSAGES)
CORRUPTIONS = {  # name -> (source index, mutation, expected message)
    "missing dir": ("bm25", lambda d: shutil.rmtree(d), "does not exist"),
    "no manifest": ("bm25", lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest not json": ("bm25", lambda d: (d / "manifest.json").write_text("{"), "not valid JSON"),
    "unknown kind": ("bm25", lambda d: _edit_json(d / "manifest.json", lambda m: m.update(kind="splade")),
                     "unknown kind 'splade'; valid: bm25, dense, hybrid"),
    "future format": ("bm25", lambda d: _edit_json(d / "manifest.json", lambda m: m.update(format_version=99)),
                      "format_version 99 is not supported"),
    "missing field": ("hybrid", lambda d: _edit_json(d / "manifest.json", lambda m: m.pop("dense")),
                      "field 'dense' is missing"),
    "count mismatch": ("bm25", lambda d: _edit_json(d / "manifest.json", lambda m: m.update(num_passages=N + 1)),
                       f"holds {N} passages but manifest.json says {N + 1}"),
    "passages truncated": ("bm25", lambda d: (d / "passages.jsonl").write_bytes(
        (d / "passages.jsonl").read_bytes()[:-40]), "truncated or replaced"),
    "offsets missing": ("bm25", lambda d: (d / "passages.offsets.npy").unlink(), "missing passages file"),
    "bm25 file missing": ("bm25", lambda d: (d / "bm25" / "vocab.index.json").unlink(), "missing BM25 file"),
    "bm25 array corrupt": ("bm25", lambda d: _write_garbage(d / "bm25" / "data.csc.index.npy"),
                           "corrupt BM25 index"),
    "bm25 other corpus": ("hybrid", lambda d: _edit_json(d / "bm25" / "params.index.json",
                                                         lambda p: p.update(num_docs=N + 5)),
                          f"indexes {N + 5} documents but the index has {N} passages"),
    "faiss missing": ("dense", lambda d: (d / "dense" / "faiss.index").unlink(), "missing dense index file"),
    "faiss corrupt": ("dense", lambda d: _write_garbage(d / "dense" / "faiss.index"), "corrupt FAISS index"),
    "faiss count": ("dense", _replace_faiss(3, 384), f"holds 3 vectors but the index has {N} passages"),
    "faiss dim": ("dense", _replace_faiss(N, 8), "dimension 8 but dense.json says 384"),
    "manifest dim": ("dense", lambda d: _edit_json(d / "manifest.json",
                                                   lambda m: m["dense"]["model"].update(dim=768)),
                     "dense dim 768 but the FAISS index has dim 384"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_broken_index_raises_clear_error(built, tmp_path, case):
    src, mutate, message = CORRUPTIONS[case]
    d = tmp_path / "copy"
    shutil.copytree(built[1][src], d)
    mutate(d)
    with pytest.raises(IndexFormatError) as err:
        load_index(d, device="cpu")
    assert message in str(err.value)


def test_checksum_verification_and_moved_model(built, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(built[1]["dense"], d)
    raw = (d / "passages.jsonl").read_bytes()
    (d / "passages.jsonl").write_bytes(raw.replace(b"Glaciers are slow", b"Glaciers are SLOW"))
    load_index(d, device="cpu")  # same size, ends intact: only the checksum sees it
    with pytest.raises(IndexFormatError, match="checksum"):
        load_index(d, verify=True, device="cpu")
    _edit_json(d / "dense" / "dense.json", lambda s: s["model"].update(name="/nonexistent/model"))
    with pytest.raises(ConfigError, match="embedding model not found"):
        load_index(d, device="cpu")
    assert load_index(d, model="all-MiniLM-L6-v2", device="cpu").search(["honey"], k=1)[0][0].title == "Honeybees"


# ------------------------------------------------------------------------------ CLI
def test_cli_index_search_and_errors(built, tmp_path, capsys):
    corpus, _ = built
    out = tmp_path / "cli-hnsw"
    args = ["index", "--corpus", str(corpus), "--kind", "dense", "--out", str(out), "--faiss", "hnsw",
            "--batch-size", "4", "--device", "cpu"]
    assert main(args) == 0
    assert read_manifest(out)["dense"]["faiss"]["type"] == "hnsw"
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(["search", "--index", str(out), "-k", "2", "where does honey come from", "lava"]) == 0
    text = capsys.readouterr().out
    assert "query: where does honey come from" in text and "1. [" in text and "2. [" in text
    assert "Honeybees  (id p0)" in text and "Volcanoes" in text and "3. [" not in text
    assert main(["search", "--index", str(tmp_path / "nope"), "q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["index", "--corpus", str(corpus), "--kind", "bm25", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "b"), "zzzz"]) == 0
    assert "(no passage matches)" in capsys.readouterr().out


def test_cli_serve_loads_index_and_calls_server(built, monkeypatch):
    import searchrl.retrieval.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda retriever, **kw: seen.update(retriever=retriever, **kw))
    assert main(["serve", "--index", str(built[1]["bm25"]), "--port", "8123", "--max-topk", "7",
                 "--max-queries", "9"]) == 0
    assert isinstance(seen["retriever"], BM25Retriever)
    assert (seen["host"], seen["port"], seen["max_topk"], seen["max_queries"]) == ("127.0.0.1", 8123, 7, 9)
