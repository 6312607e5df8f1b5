"""Memory-bounded FAISS types (IVF-PQ, OPQ, HNSW-SQ), the float16 refine copy, mmap loading and
query-time settings, on synthetic clustered vectors (no encoder) and on a tiny real index."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from searchrl.errors import ConfigError, IndexFormatError
from searchrl.retrieval.faiss_index import (
    build_faiss, read_faiss, refine_search, set_search_params, write_vectors,
)  # fmt: skip
from searchrl.retrieval.index import build_index, load_index, read_manifest
from searchrl.types import Passage

sys.path.insert(0, str(Path(__file__).parent))  # the tests' own helpers (--import-mode=importlib)
from test_index import TOPICS as INDEX_TOPICS  # noqa: E402


# the first six of test_index's topics, then one of our own
TOPICS = [*INDEX_TOPICS[:6], ("Tides", "Tides are the rise and fall of sea levels caused by the Moon's gravity.")]
PASSAGES = [Passage(f"p{i}", t, x) for i, (t, x) in enumerate(TOPICS)] + [
    Passage(f"q{i}", f"Filler {i}", f"Unrelated filler passage number {i} about nothing much.") for i in range(13)
]
QUERIES = ["where does honey come from", "ice carving valleys", "game with a checkered board"]


def clustered(n: int, dim: int, seed: int, centers: int = 40) -> np.ndarray:
    """Unit vectors drawn around ``centers`` random directions (some structure, like embeddings)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("vec")
    both = clustered(3200, 32, seed=0)
    x, q = both[:3000], both[3000:]  # queries: other points around the same centres
    shards = []
    for i, lo in enumerate(range(0, 3000, 1500)):
        shards.append(d / f"s{i}.npy")
        np.save(shards[-1], x[lo : lo + 1500])
    _, truth = _flat(x, q, 3)
    return d, shards, x, q, truth


def _flat(x, q, k):
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(q, k)


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), truth.tolist())]))


@pytest.mark.parametrize("kind", ["ivfpq", "opq", "hnswsq"])
def test_compressed_types_with_refine_match_flat(data, kind):
    d, shards, x, q, truth = data
    index, info = build_faiss(shards, 32, kind, pq_m=8, nlist=40, opq_niter=5, show_progress=False)
    assert index.ntotal == 3000 and index.is_trained and info["type"] == kind
    set_search_params(index, info, None, None)
    vectors = write_vectors(shards, d / f"{kind}.npy")
    assert vectors == {"refine": "float16", "refine_factor": 10}
    v = np.load(d / f"{kind}.npy", mmap_mode="r")
    assert v.dtype == np.float16 and v.shape == (3000, 32)
    _, plain = index.search(q, 3)
    scores, refined = refine_search(index, v, q, 3, 10)
    assert recall(refined, truth) >= 0.95
    assert recall(refined, truth) >= recall(plain, truth)
    # refined scores are exact dot products with the float16 copy, best first
    want = np.einsum("qd,qkd->qk", q, np.asarray(v[refined], dtype=np.float32))
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_pq_code_size_and_refine_make_the_difference(data):
    d, shards, x, q, truth = data
    index, info = build_faiss(shards, 32, "ivfpq", pq_m=4, nlist=40, show_progress=False)
    assert info["factory"] == "IVF40,PQ4x8np" and info["pq_m"] == 4
    assert faiss.extract_index_ivf(index).code_size == 4  # 4 bytes a vector instead of 128
    set_search_params(index, info, None, 40)
    _, plain = index.search(q, 3)
    write_vectors(shards, d / "pq4.npy")
    _, refined = refine_search(index, np.load(d / "pq4.npy", mmap_mode="r"), q, 3, 20)
    assert recall(plain, truth) < 0.9 <= recall(refined, truth)  # 4-byte codes alone are too coarse


def test_nprobe_and_ef_search_are_applied(data):
    d, shards, x, q, truth = data
    index, info = build_faiss(shards, 32, "ivfpq", pq_m=8, pq_bits=6, nlist=40, show_progress=False)
    set_search_params(index, info, None, 1)
    assert faiss.extract_index_ivf(index).nprobe == 1
    _, one = index.search(q, 3)
    set_search_params(index, info, None, 1000)
    assert faiss.extract_index_ivf(index).nprobe == 40  # capped at nlist
    _, every = index.search(q, 3)
    assert recall(one, truth) < recall(every, truth)
    hnsw, hinfo = build_faiss(shards, 32, "hnswsq", show_progress=False)
    set_search_params(hnsw, hinfo, 7, None)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 7
    set_search_params(hnsw, hinfo, None, None)
    assert faiss.downcast_index(hnsw).hnsw.efSearch == 128


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("kind", ["ivfpq", "hnswsq", "flat"])
def test_mmap_loading_maps_the_file_and_gives_the_same_results(data, tmp_path, kind):
    d, shards, x, q, truth = data
    index, info = build_faiss(shards, 32, kind, pq_m=8, nlist=40, show_progress=False)
    path = tmp_path / f"{kind}.index"
    faiss.write_index(index, str(path))
    set_search_params(index, info, None, None)
    want = index.search(q, 5)
    del index
    mapped = read_faiss(path, kind, mmap=True)
    assert str(path) in open("/proc/self/maps").read()  # served from the page cache, not a copy
    set_search_params(mapped, info, None, None)
    got = mapped.search(q, 5)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_refine_pads_and_breaks_ties_by_row():
    x = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    index = faiss.IndexFlatIP(2)
    index.add(x)
    scores, ids = refine_search(index, x.astype(np.float16), np.array([[1, 0]], dtype=np.float32), 5, 3)
    assert ids.tolist() == [[0, 1, 2, -1, -1]]
    assert scores[0, :3].tolist() == [1.0, 1.0, 0.0]


def test_option_errors(data):
    d, shards, *_ = data
    with pytest.raises(ConfigError, match="pq_m must divide"):
        build_faiss(shards, 32, "ivfpq", pq_m=7, show_progress=False)
    with pytest.raises(ConfigError, match="sq must be one of"):
        build_faiss(shards, 32, "hnswsq", sq="sq3", show_progress=False)
    with pytest.raises(ConfigError, match="needs >= 256 vectors"):
        build_faiss(shards, 32, "opq", train_size=100, show_progress=False)


# ------------------------------------------------------------------ through the index directory
def test_ivfpq_index_directory_build_load_mmap(tmp_path, minilm_encoder):
    from searchrl.data.corpus import write_corpus_jsonl

    corpus = tmp_path / "corpus.jsonl"
    write_corpus_jsonl(PASSAGES, corpus)
    out = build_index(corpus, "dense", tmp_path / "pq", faiss="ivfpq", pq_m=16, shard_size=8,
                      show_progress=False, device="cpu")  # fmt: skip
    info = read_manifest(out)["dense"]["faiss"]
    assert (info["type"], info["pq_m"], info["refine"], info["factory"]) == ("ivfpq", 16, "float16", "IVF1,PQ16x4np")
    assert np.load(out / "dense" / "vectors.npy", mmap_mode="r").shape == (len(PASSAGES), 384)
    flat = build_index(corpus, "dense", tmp_path / "flat", shard_size=8, show_progress=False, device="cpu")
    want = [[p.id for p in r] for r in load_index(flat, device="cpu").search(QUERIES[:3], k=3)]
    r = load_index(out, device="cpu", mmap=True, nprobe=1, refine_factor=7)
    assert faiss.extract_index_ivf(r.index).nprobe == 1 and r.refine_factor == 7
    assert [[p.id for p in row] for row in r.search(QUERIES[:3], k=3)] == want  # refine: exact order
    assert load_index(out, device="cpu").fingerprint != r.fingerprint  # query-time settings count
    np.save(out / "dense" / "vectors.npy", np.zeros((3, 384), dtype=np.float16))
    with pytest.raises(IndexFormatError, match="refine vectors|holds float16"):
        load_index(out, device="cpu")
    no_refine = build_index(corpus, "dense", tmp_path / "pq-plain", faiss="ivfpq", pq_m=16, refine="none",
                            shard_size=8, show_progress=False, device="cpu")  # fmt: skip
    assert "refine" not in json.loads((no_refine / "dense" / "dense.json").read_text())["faiss"]
    assert not (no_refine / "dense" / "vectors.npy").exists()


def test_cli_e5_preset_ivfpq_and_float16_encoder(tmp_path, minilm_encoder, capsys):
    """``--preset e5`` records e5's pooling and prefixes; fp16 encoding (the GPU set-up) agrees
    with float32 on CPU, and its index searches the same."""
    from searchrl.cli import main
    from searchrl.data.corpus import write_corpus_jsonl

    corpus = tmp_path / "corpus.jsonl"
    write_corpus_jsonl(PASSAGES, corpus)
    out = tmp_path / "e5-like"
    assert main(["index", "--corpus", str(corpus), "--kind", "dense", "--out", str(out), "--preset", "e5",
                 "--faiss", "ivfpq", "--pq-m", "16", "--dtype", "float16", "--device", "cpu",
                 "--shard-size", "8"]) == 0  # fmt: skip
    m = read_manifest(out)["dense"]
    assert (m["model"]["pooling"], m["model"]["query_prefix"], m["model"]["passage_prefix"]) == (
        "mean", "query: ", "passage: ")
    assert (m["model"]["dtype"], m["faiss"]["type"], m["faiss"]["refine"]) == ("float16", "ivfpq", "float16")
    r = load_index(out, device="cpu", mmap=True)
    assert r.encoder.dtype == "float16" and r.encoder.query_prefix == "query: "
    texts = [p.contents for p in PASSAGES[:5]]
    np.testing.assert_allclose(
        np.sum(r.encoder.encode(texts) * minilm_encoder.encode(texts), axis=1), 1.0, atol=2e-3
    )
    assert main(["search", "--index", str(out), "--mmap", "--nprobe", "1", "honey from flowers"]) == 0
    assert "Honeybees" in capsys.readouterr().out.split("2. [")[0]
