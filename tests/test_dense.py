"""Dense retrieval, hybrid fusion and cross-encoder re-ranking on tiny data (bundled MiniLM, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchrl.retrieval import dense as dense_mod
from searchrl.retrieval.base import Retriever
from searchrl.retrieval.bm25 import BM25Retriever
from searchrl.retrieval.dense import DenseRetriever, Encoder, build_faiss, encode_shards
from searchrl.retrieval.hybrid import HybridRetriever, rrf_fuse, score_fuse
from searchrl.types import Passage

DOCS = [
    ("Pediatrics", "A pediatrician is a doctor who specialises in the medical care of infants, kids and teenagers."),
    ("Hospital billing", "The physician office treats every invoice the same way: the front desk files the paperwork."),
    ("Qorvath Industries", "Qorvath Industries was started in 1931 by the engineer Elin Mardsen in a small workshop."),
    ("Company founders", "Who founded a company matters: founders of industries shape their culture for decades."),
    ("Industrial history", "Many industries were founded during the industrial revolution by wealthy families."),
    ("Volcanoes", "A volcano is a rupture in the crust of a planet where lava escapes."),
    ("Violin", "The violin is a wooden string instrument played with a bow."),
    ("Photosynthesis", "Plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("Chess", "Chess is a board game for two players on a checkered board of 64 squares."),
    ("Coffee", "Coffee is brewed from roasted beans of the Coffea plant."),
    ("Veterinarian", "A veterinarian treats sick animals such as dogs, cats and horses."),
    ("Dentist", "A dentist cares for teeth and gums of children and adults."),
    ("Dishwasher error E-7731", "Error E-7731 on the dishwasher display: the water filter is blocked and must be cleaned."),
    ("Dishwasher error E-7713", "Code E-7713 on the display: the door is not closed properly."),
    ("Dishwasher error E-1377", "Dishwasher error E-1377 means the drain pump has failed."),
    ("Marathon", "A marathon is a long-distance foot race of 42.195 kilometres."),
    ("Running shoes", "Shoes for long races should be light; a race needs good shoes."),
    ("Pheidippides", "Legend says the messenger Pheidippides ran from Marathon to Athens to announce victory."),
    ("Glaciers", "Glaciers are slow rivers of ice that carve valleys into mountains."),
    ("Honeybees", "Honeybees collect nectar from flowers and turn it into honey in the hive."),
]
PASSAGES = [Passage(str(i), t, x) for i, (t, x) in enumerate(DOCS)]


@pytest.fixture(scope="module")
def flat(minilm_encoder, tmp_path_factory):
    shards = [np.ascontiguousarray(minilm_encoder.encode_passages([p.contents for p in PASSAGES]))]
    index, info = _index_from_arrays(shards, minilm_encoder.dim, "flat", tmp_path_factory.mktemp("flat"))
    return DenseRetriever(minilm_encoder, index, PASSAGES, info)


def _index_from_arrays(arrays, dim, kind, d, **kw):
    paths = []
    for i, a in enumerate(arrays):
        np.save(d / f"s{i}.npy", a)
        paths.append(d / f"s{i}.npy")
    return build_faiss(paths, dim, kind, show_progress=False, **kw)


def test_encoder_matches_sentence_transformers(minilm_encoder):
    from sentence_transformers import SentenceTransformer

    texts = [p.contents for p in PASSAGES[:6]] + ["short", "a much longer text " * 40]
    ours = minilm_encoder.encode(texts)
    ref = SentenceTransformer(minilm_encoder.path, device="cpu").encode(
        texts, normalize_embeddings=True, convert_to_numpy=True
    )
    assert ours.shape == (8, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    d = minilm_encoder.describe()
    assert (d["pooling"], d["normalize"], d["max_length"], d["dim"]) == ("mean", True, 256, 384)


def test_dense_finds_the_obvious_passage(flat):
    queries = ["what do bees make from flowers?", "rivers of ice in the mountains", "molten rock erupting"]
    results = flat.search(queries, k=3)
    assert isinstance(flat, Retriever)
    assert [r[0].title for r in results] == ["Honeybees", "Glaciers", "Volcanoes"]
    for r in results:
        assert len(r) == 3 and all(a.score >= b.score for a, b in zip(r, r[1:]))
    assert len(flat.search(["bees"], k=100)[0]) == len(PASSAGES)  # k > corpus: everything, once
    assert flat.search([], k=3) == []


def test_flat_hnsw_ivf_agree(flat, minilm_encoder, tmp_path):
    emb = flat.index.reconstruct_n(0, len(PASSAGES))  # (n, dim): the embeddings, not re-encoded
    halves = [emb[:11], emb[11:]]
    queries = ["honey", "doctor for children", "board game", "river of ice", "error code on the display"]
    want = [[p.id for p in r] for r in flat.search(queries, k=3)]
    for kind, kw in [("hnsw", {}), ("ivf", {})]:  # IVF: default nlist for 20 vectors is 1 list
        index, info = _index_from_arrays(halves, minilm_encoder.dim, kind, tmp_path, **kw)
        got = DenseRetriever(minilm_encoder, index, PASSAGES, info).search(queries, k=3)
        assert [[p.id for p in r] for r in got] == want, kind
        assert info["type"] == kind and info.get("nlist", 1) == 1


def test_encoder_prefixes_pooling_and_e5_defaults(tmp_path, minilm_encoder):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=minilm_encoder.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    folder = tmp_path / "tiny-e5-random"
    BertModel(cfg).save_pretrained(folder)
    minilm_encoder.tokenizer.save_pretrained(folder)
    e5 = Encoder(str(folder), show_progress=False)
    assert (e5.query_prefix, e5.passage_prefix, e5.pooling, e5.dim) == ("query: ", "passage: ", "mean", 32)
    np.testing.assert_allclose(e5.encode_queries(["x y"]), e5.encode(["query: x y"]), atol=1e-6)
    np.testing.assert_allclose(e5.encode_passages(["x y"]), e5.encode(["passage: x y"]), atol=1e-6)
    cls = Encoder(str(folder), pooling="cls", normalize=False, query_prefix="", show_progress=False)
    with torch.inference_mode():  # reference: the raw model's first-token state
        enc = cls.tokenizer(["hello world"], return_tensors="pt")
        ref = cls.model(**enc).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(cls.encode_queries(["hello world"]), ref, atol=1e-5)


class Interrupted(Exception):
    pass


def test_sentence_transformers_folder_with_extra_modules(tmp_path, minilm_encoder):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=minilm_encoder.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    minilm_encoder.tokenizer.save_pretrained(tmp_path / "bert")
    modules = [models.Transformer(str(tmp_path / "bert"), max_seq_length=64), models.Pooling(32, "cls"),
               models.Dense(32, 16)]
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    enc = Encoder(str(tmp_path / "st"), show_progress=False)
    assert (enc.backend, enc.dim, enc.pooling, enc.normalize, enc.max_length) == (
        "sentence-transformers", 16, "cls", False, 64)
    texts = ["one text", "another, longer text about rivers"]
    ref = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(enc.encode(texts), ref, atol=1e-5)


def test_resumable_encoding_equals_fresh(minilm_encoder, tmp_path, monkeypatch):
    ten = PASSAGES[:10]
    fresh = encode_shards(minilm_encoder, ten, tmp_path / "fresh", shard_size=4, show_progress=False)
    fresh_emb = np.concatenate([np.load(p) for p in fresh])
    assert [p.name for p in fresh] == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]

    calls, fail_at = [], [2]
    real = Encoder.encode_passages

    def flaky(self, texts, progress=None):
        calls.append(len(texts))
        if len(calls) in fail_at:
            raise Interrupted  # the build is killed while encoding the second shard
        return real(self, texts, progress)

    monkeypatch.setattr(Encoder, "encode_passages", flaky)
    with pytest.raises(Interrupted):
        encode_shards(minilm_encoder, ten, tmp_path / "resumed", shard_size=4, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["shard_00000.npy"]
    calls.clear()
    fail_at.clear()
    resumed = encode_shards(minilm_encoder, ten, tmp_path / "resumed", shard_size=4, show_progress=False)
    assert calls == [4, 2]  # only the two missing shards were encoded
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in resumed]), fresh_emb)


# ------------------------------------------------------------------------------ hybrid
class Fixed:
    """A fake retriever returning a fixed ranking (ids) for every query."""

    def __init__(self, ids, scores=None):
        self.ids, self.scores = ids, scores or [10.0 - i for i in range(len(ids))]
        self.asked = []

    def search(self, queries, k=3):
        self.asked.append(k)
        return [[Passage(i, i, i, s) for i, s in zip(self.ids[:k], self.scores)] for _ in queries]


def test_rrf_prefers_consensus_and_uses_a_larger_pool():
    sparse, dense = Fixed(["x", "r", "y", "z"]), Fixed(["w", "r", "x", "v"])
    hyb = HybridRetriever(sparse, dense)
    top = hyb.search(["q1", "q2"], k=2)
    assert [[p.id for p in r] for r in top] == [["x", "r"]] * 2  # x: 1/61+1/63 > r: 2/62
    assert top[0][0].score == pytest.approx(1 / 61 + 1 / 63)
    assert sparse.asked == [20] and dense.asked == [20]  # max(5k, 20)
    hyb.search(["q"], k=10)
    assert sparse.asked[-1] == 50
    lone = Passage("a", "", "")
    assert rrf_fuse([[lone], []]) == [(lone, pytest.approx(1 / 61))]  # found by one side only: kept


def test_score_fusion_weights():
    sparse = Fixed(["a", "b", "c"], [9.0, 5.0, 1.0])
    dense = Fixed(["c", "b", "a"], [0.9, 0.8, 0.1])
    only_dense = HybridRetriever(sparse, dense, fusion="score", alpha=1.0).search(["q"], k=3)[0]
    only_sparse = HybridRetriever(sparse, dense, fusion="score", alpha=0.0).search(["q"], k=3)[0]
    assert [p.id for p in only_dense] == ["c", "b", "a"] and [p.id for p in only_sparse] == ["a", "b", "c"]
    mixed = score_fuse(sparse.search(["q"])[0], dense.search(["q"])[0], alpha=0.5)
    assert [(p.id, round(s, 4)) for p, s in mixed] == [("b", 0.6875), ("a", 0.5), ("c", 0.5)]
    with pytest.raises(ValueError):
        HybridRetriever(sparse, dense, fusion="max")


def test_hybrid_beats_or_equals_each_side_on_constructed_case(flat):
    bm25 = BM25Retriever.build(PASSAGES, show_progress=False)
    cases = {  # query -> the passage that answers it
        "which doctor looks after children's health?": "Pediatrics",  # BM25 ranks Dentist first
        "what does dishwasher error E-7731 mean?": "Dishwasher error E-7731",  # dense confuses codes
        "who founded Qorvath Industries?": "Qorvath Industries",
        "who ran the first long race to Athens?": "Pheidippides",
    }

    def hits(retriever):
        return [r[0].title == want for r, want in zip(retriever.search(list(cases), k=3), cases.values())]

    h_bm25, h_dense = hits(bm25), hits(flat)
    h_rrf, h_score = hits(HybridRetriever(bm25, flat)), hits(HybridRetriever(bm25, flat, fusion="score"))
    assert h_bm25 == [False, True, True, True] and h_dense == [True, False, True, True]
    assert all(h_rrf)  # both single-engine failures are fixed by rank fusion
    assert sum(h_score) >= max(sum(h_bm25), sum(h_dense))


# ------------------------------------------------------------------------------ rerank
def test_rerank_reorders_base_candidates_by_cross_encoder(tmp_path, minilm_encoder, flat):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from searchrl.retrieval.rerank import RerankRetriever

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=minilm_encoder.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, num_labels=1)
    folder = tmp_path / "tiny-cross-encoder"
    BertForSequenceClassification(cfg).save_pretrained(folder)
    minilm_encoder.tokenizer.save_pretrained(folder)

    rr = RerankRetriever(flat, str(folder), fetch_k=6, device="cpu")
    queries = ["what do bees make?", "doctor for children"]
    got = rr.search(queries, k=3)
    base = flat.search(queries, k=6)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    for q, cands, out in zip(queries, base, got):
        with torch.inference_mode():
            enc = rr.model.tokenizer([q] * len(cands), [p.contents for p in cands], padding=True,
                                     truncation=True, return_tensors="pt")
            logits = model(**enc).logits[:, 0].numpy()  # (candidates,)
        order = np.argsort(-logits, kind="stable")[:3]
        assert [p.id for p in out] == [cands[i].id for i in order]
        assert {p.id for p in out} <= {p.id for p in cands}
        np.testing.assert_allclose([p.score for p in out], 1 / (1 + np.exp(-logits[order])), atol=1e-5)
    assert rr.kind == "dense+rerank" and rr.num_passages == len(PASSAGES)


def test_faiss_type_validation():
    from searchrl.errors import ConfigError

    with pytest.raises(ConfigError, match="flat, hnsw, ivf"):
        build_faiss([], 4, "pq")
    assert dense_mod.default_nlist(100_000) == 1265
