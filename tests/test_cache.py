"""Record / replay of searches (SQLite cache): exact replay, counters, restarts, wrong index,
strict replay, and the cache in front of a real BM25 index, in-process, over HTTP and in the CLI."""

from __future__ import annotations

import json
import sqlite3

import pytest

from searchrl.cli import main
from searchrl.data.corpus import write_corpus_jsonl
from searchrl.errors import ConfigError
from searchrl.retrieval.cache import CacheMiss, CachedRetriever, encode_hits
from searchrl.retrieval.index import build_index, index_fingerprint, load_index
from searchrl.types import Passage


class Counting:
    """Deterministic retriever: scores with awkward floats, counts the queries it is asked."""

    kind = "fake"
    num_passages = 7
    fingerprint = "sha256:fake-index"

    def __init__(self):
        self.asked: list[list[str]] = []

    def search(self, queries, k=3):
        self.asked.append(list(queries))
        return [[Passage(f"{q}-{i}", f"T{i}", f"text é {q}", 0.1 + 0.2 * i / 3) for i in range(k)]
                for q in queries]  # fmt: skip


def test_replay_is_exact_and_repeats_cost_nothing(tmp_path):
    inner = Counting()
    cache = CachedRetriever(inner, tmp_path / "c.sqlite")
    first = cache.search(["a", "b", "a", "a"], k=2)  # a GRPO group asking "a" three times
    assert inner.asked == [["a", "b"]]  # each distinct query searched once
    assert first == [Counting().search([q], 2)[0] for q in ["a", "b", "a", "a"]]
    again = cache.search(["b", "a"], k=2)
    assert inner.asked == [["a", "b"]]  # nothing new searched
    assert [encode_hits(h) for h in again] == [encode_hits(first[1]), encode_hits(first[0])]
    assert again[1][1].score == 0.1 + 0.2 / 3  # the float survives exactly
    cache.search(["a"], k=3)  # another k is another key
    assert inner.asked[-1] == ["a"]
    assert cache.stats() == {"lookups": 7, "hits": 4, "misses": 3, "hit_rate": 4 / 7}
    assert cache.entries() == 3 and cache.kind == "fake" and cache.num_passages == 7
    assert cache.search([], k=3) == []
    with pytest.raises(ValueError):
        cache.search(["a"], k=0)


def test_survives_restart_and_refuses_another_index(tmp_path):
    path = tmp_path / "c.sqlite"
    first = CachedRetriever(Counting(), path).search(["x", "y"], k=3)
    inner = Counting()
    reopened = CachedRetriever(inner, path)  # a restarted process
    assert reopened.search(["y", "x"], k=3) == first[::-1] and inner.asked == []
    assert reopened.stats()["hit_rate"] == 1.0
    other = Counting()
    other.fingerprint = "sha256:another-index"
    with pytest.raises(ConfigError, match="recorded with another index"):
        CachedRetriever(other, path)
    with pytest.raises(ConfigError, match="needs the index fingerprint"):
        CachedRetriever(type("Bare", (), {"search": lambda self, q, k=3: []})(), tmp_path / "d.sqlite")
    assert CachedRetriever(other, tmp_path / "e.sqlite", fingerprint="sha256:given").fingerprint == "sha256:given"


def test_strict_replay_mode_and_bad_files(tmp_path):
    path = tmp_path / "c.sqlite"
    CachedRetriever(Counting(), path).search(["x"], k=3)
    inner = Counting()
    strict = CachedRetriever(inner, path, mode="replay")
    assert strict.search(["x"], k=3)[0][0].id == "x-0"
    with pytest.raises(CacheMiss, match="1 of 2 queries"):
        strict.search(["x", "new"], k=3)
    assert inner.asked == []  # replay never searches
    with pytest.raises(ConfigError, match="does not exist"):
        CachedRetriever(Counting(), tmp_path / "missing.sqlite", mode="replay")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match="not a readable SQLite file"):
        CachedRetriever(Counting(), tmp_path / "junk.sqlite")
    other = sqlite3.connect(tmp_path / "other.sqlite")
    other.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    other.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    other.commit()
    other.close()
    with pytest.raises(ConfigError, match="not a searchrl search cache"):
        CachedRetriever(Counting(), tmp_path / "other.sqlite")
    with pytest.raises(ConfigError, match="cache mode"):
        CachedRetriever(Counting(), path, mode="write-only")


# ------------------------------------------------------------------ with a real index
@pytest.fixture(scope="module")
def bm25_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-idx")
    passages = [Passage(f"p{i}", t, x) for i, (t, x) in enumerate([
        ("Honeybees", "Honeybees collect nectar from flowers and turn it into honey."),
        ("Glaciers", "Glaciers are slow rivers of ice that carve valleys."),
        ("Chess", "Chess is a board game for two players."),
        ("Coffee", "Coffee is brewed from roasted beans."),
    ])]  # fmt: skip
    write_corpus_jsonl(passages, root / "corpus.jsonl")
    return build_index(root / "corpus.jsonl", "bm25", root / "bm25", show_progress=False)


def test_load_index_with_cache_equals_uncached(bm25_index, tmp_path):
    plain = load_index(bm25_index)
    assert plain.fingerprint == index_fingerprint(bm25_index)
    assert index_fingerprint(bm25_index, nprobe=8) != plain.fingerprint
    cached = load_index(bm25_index, cache=tmp_path / "c.sqlite")
    assert isinstance(cached, CachedRetriever) and cached.fingerprint == plain.fingerprint
    queries = ["honey from flowers", "board game", "zzzz"]
    assert cached.search(queries, k=2) == plain.search(queries, k=2)
    assert load_index(bm25_index, cache=tmp_path / "c.sqlite").search(queries, k=2) == plain.search(queries, k=2)


def test_server_replays_through_the_wrapped_retriever(bm25_index, tmp_path):
    from searchrl.retrieval.client import HttpRetriever
    from searchrl.retrieval.server import BackgroundServer, create_app

    path = tmp_path / "served.sqlite"
    queries = ["honey from flowers", "ice valleys", "honey from flowers"]
    bodies = []
    for _ in range(2):  # the second server is a restart over the same cache file
        cached = load_index(bm25_index, cache=path)
        with BackgroundServer(create_app(cached)) as srv:
            client = HttpRetriever(srv.url, retries=0)
            bodies.append(json.dumps([[vars(p) for p in r] for r in client.search(queries, k=2)]))
            client.close()
        stats = cached.stats()
    assert bodies[0] == bodies[1]
    assert stats == {"lookups": 3, "hits": 3, "misses": 0, "hit_rate": 1.0}


def test_cli_cache_option(bm25_index, tmp_path, monkeypatch, capsys):
    import searchrl.retrieval.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda retriever, **kw: seen.update(retriever=retriever))
    path = tmp_path / "cli.sqlite"
    assert main(["serve", "--index", str(bm25_index), "--cache", str(path), "--mmap"]) == 0
    assert isinstance(seen["retriever"], CachedRetriever) and seen["retriever"].path == path
    assert "0 lookups, 0 hits, 0 misses, hit rate -" in capsys.readouterr().err  # printed on exit
    assert main(["search", "--index", str(bm25_index), "--cache", str(path), "honey"]) == 0
    assert "Honeybees" in capsys.readouterr().out
    assert main(["search", "--index", str(bm25_index), "--cache", str(path), "--cache-mode", "replay",
                 "honey"]) == 0  # fmt: skip
    assert "Honeybees" in capsys.readouterr().out
    assert main(["search", "--index", str(bm25_index), "--cache", str(path), "--cache-mode", "replay",
                 "never asked"]) == 2  # fmt: skip
    assert "not in" in capsys.readouterr().err


def test_training_records_searches_and_logs_the_hit_rate(bm25_index, tmp_path, tiny_lm):
    """`data.index` + `data.search_cache`: the trainer's retriever records every search, and each
    step logs the cache's hit rate since the start (a question drawn again is replayed)."""
    from searchrl.config import apply_overrides
    from searchrl.training.config import TrainConfig
    from searchrl.training.models import build_models
    from searchrl.training.pipeline import make_retriever
    from searchrl.training.trainer import Trainer
    from searchrl.types import QAExample

    model, tok = tiny_lm
    cfg = apply_overrides(TrainConfig(), [f"out={tmp_path / 'run'}", f"data.index={bm25_index}",
                                          f"data.search_cache={tmp_path / 'searches.sqlite'}", "method=rag",
                                          "prompts_per_step=2", "algo.group_size=2", "mini_batch_size=4",
                                          "micro_batch_size=4", "rollout.max_turns=1",
                                          "rollout.max_new_tokens_per_turn=8", "rollout.min_turn_tokens=4",
                                          "model.amp=off"])
    retriever = make_retriever(cfg, None)
    assert isinstance(retriever, CachedRetriever)
    bundle = build_models(cfg.model, need_reference=False, need_critic=False, model=model, tokenizer=tok)
    tr = Trainer(cfg, bundle, retriever, [QAExample(f"e{i}", f"Where is Paris {i}", ["France"]) for i in range(2)])
    assert tr.step()["search_cache_hit_rate"] == 0.0  # first step: every query is new
    assert tr.step()["search_cache_hit_rate"] == pytest.approx(0.5)  # the same two questions, replayed
    assert (tmp_path / "searches.sqlite").stat().st_size > 0
