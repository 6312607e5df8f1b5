"""``searchrl index | search | serve``: build an index directory, query it, serve it over HTTP.

``index`` shows progress bars and resumes an interrupted build when re-run with the same arguments.
``search`` prints each query's top passages (rank, score, title, id, text cut to a few lines).
``serve`` loads the index and hands it to :func:`searchrl.retrieval.server.serve` (imported lazily).
``search`` and ``serve`` take query-time settings (``--nprobe``, ``--ef-search``, ``--refine-factor``),
``--mmap`` (map the index from disk: start-up in seconds) and ``--cache FILE`` (record/replay of
searches, :mod:`searchrl.retrieval.cache`); the server just receives the wrapped retriever.
Left out: index inspection/merging commands (read ``DIR/manifest.json`` directly).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import time
from typing import Any

from searchrl.retrieval.faiss_index import FAISS_TYPES
from searchrl.retrieval.index import KINDS

# The original Search-R1 / FlashRAG e5 settings (normalised embeddings are the default anyway).
PRESETS = {"e5": {"pooling": "mean", "query_prefix": "query: ", "passage_prefix": "passage: "}}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "index", help="build a BM25 / dense / hybrid index of a corpus",
        description="Build an index directory from a corpus file (re-run the same command to resume).",
    )
    p.add_argument("--corpus", required=True, help="corpus file (jsonl, json or parquet; see data.corpus)")
    p.add_argument("--kind", choices=KINDS, default="bm25", help="index kind (default: bm25)")
    p.add_argument("--out", required=True, help="output index directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--model", help="embedding model folder or hub id (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--pooling", choices=["mean", "cls"], help="pooling (default: the model's own, else mean)")
    p.add_argument("--query-prefix", help='prefix of queries (default: "query: " for e5 models, else none)')
    p.add_argument("--passage-prefix", help='prefix of passages (default: "passage: " for e5 models)')
    p.add_argument("--max-length", type=int, help="max tokens per text (default: the model's own or 512)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="e5: mean pooling, query: / passage: prefixes")
    p.add_argument("--faiss", choices=FAISS_TYPES, default="flat", help="FAISS index type (default: flat)")
    p.add_argument("--nlist", type=int, help="IVF lists (default: about 4*sqrt(passages))")
    p.add_argument("--pq-m", type=int, help="PQ bytes per vector, ivfpq/opq (default: dim / 8)")
    p.add_argument("--pq-bits", type=int, default=8, help="bits per PQ code (default: 8)")
    p.add_argument("--sq", choices=["sq8", "sq4", "fp16"], default="sq8", help="hnswsq code type")
    p.add_argument("--train-size", type=int, help="codebook training sample (default: 64 per centroid)")
    p.add_argument("--refine", choices=["auto", "none", "float16", "float32"], default="auto",
                   help="exact re-scoring copy of the vectors (auto: float16 for ivfpq/opq/hnswsq)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size")
    p.add_argument("--shard-size", type=int, default=10_000, help="passages per embedding shard")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--fusion", choices=["rrf", "score"], default="rrf", help="hybrid fusion")
    p.add_argument("--alpha", type=float, default=0.5, help="dense weight of score fusion")
    p.add_argument("--no-stemming", action="store_true", help="BM25 without the English stemmer")
    p.set_defaults(func=cmd_index)

    s = subparsers.add_parser("search", help="query an index and print the top passages")
    s.add_argument("--index", required=True, help="index directory")
    s.add_argument("-k", type=int, default=3, help="passages per query (default: 3)")
    s.add_argument("--chars", type=int, default=300, help="characters of text shown per passage")
    s.add_argument("queries", nargs="+", help="one or more queries")
    _add_load_args(s)
    s.set_defaults(func=cmd_search)

    v = subparsers.add_parser("serve", help="serve an index over HTTP (Search-R1 /retrieve contract)")
    v.add_argument("--index", required=True, help="index directory")
    v.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-topk", type=int, default=100, help="largest topk a request may ask for")
    v.add_argument("--max-queries", type=int, default=512, help="most queries in one request")
    v.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (413 above)")
    v.add_argument("--workers", type=int, default=1, help="server processes sharing the loaded index")
    v.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $SEARCHRL_API_KEY); "
                   "needed to bind a non-loopback --host")
    v.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    v.add_argument("--rerank", help="cross-encoder folder: re-rank --fetch-k candidates")
    v.add_argument("--fetch-k", type=int, default=10, help="candidates re-ranked per query")
    _add_load_args(v)
    v.set_defaults(func=cmd_serve)


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="device of the embedding model (dense/hybrid)")
    p.add_argument("--model", help="embedding model path, if it moved since the index was built")
    p.add_argument("--mmap", action="store_true", help="memory-map the BM25 arrays and FAISS index")
    p.add_argument("--nprobe", type=int, help="IVF cells searched per query (default: the recorded one)")
    p.add_argument("--ef-search", type=int, help="HNSW efSearch (default: the recorded one, 128)")
    p.add_argument("--refine-factor", type=int, help="candidates re-scored per result (default: 10)")
    p.add_argument("--cache", help="SQLite file recording searches and replaying them (record/replay)")
    p.add_argument("--cache-mode", choices=["readwrite", "replay"], default="readwrite",
                   help="replay: answer only from --cache, fail on a query it lacks")


def _load(args: argparse.Namespace):
    from searchrl.retrieval.index import load_index

    return load_index(
        args.index, model=args.model, device=args.device, mmap=args.mmap, nprobe=args.nprobe,
        ef_search=args.ef_search, refine_factor=args.refine_factor,
    )  # fmt: skip


def _with_cache(retriever, args: argparse.Namespace):
    if not args.cache:
        return retriever
    from searchrl.retrieval.cache import CachedRetriever

    return CachedRetriever(retriever, args.cache, mode=args.cache_mode)


def cmd_index(args: argparse.Namespace) -> int:
    from searchrl.retrieval.index import build_index

    preset = PRESETS.get(args.preset or "", {})
    opts = dict(
        overwrite=args.overwrite, model=args.model, pooling=args.pooling or preset.get("pooling"),
        query_prefix=preset.get("query_prefix") if args.query_prefix is None else args.query_prefix,
        passage_prefix=preset.get("passage_prefix") if args.passage_prefix is None else args.passage_prefix,
        max_length=args.max_length, faiss=args.faiss, nlist=args.nlist, pq_m=args.pq_m,
        pq_bits=args.pq_bits, sq=args.sq, train_size=args.train_size, refine=args.refine,
        batch_size=args.batch_size, shard_size=args.shard_size, device=args.device, dtype=args.dtype,
        fusion=args.fusion, alpha=args.alpha,
    )  # fmt: skip
    if args.no_stemming:
        opts["stemmer"] = None
    t0 = time.time()
    out = build_index(args.corpus, args.kind, args.out, **opts)
    print(f"built {args.kind} index {out} in {time.time() - t0:.1f}s")
    return 0


def format_results(query: str, passages: list, chars: int = 300, width: int | None = None) -> str:
    """Readable block: the query, then rank, score, title, id and the start of each passage."""
    width = width or min(100, shutil.get_terminal_size((100, 20)).columns)
    lines = [f"query: {query}"]
    if not passages:
        lines.append("  (no passage matches)")
    for rank, p in enumerate(passages, start=1):
        score = f"{p.score:.4f}" if p.score is not None else "-"
        lines.append(f"  {rank}. [{score}] {p.title or '(untitled)'}  (id {p.id})")
        text = p.text if len(p.text) <= chars else p.text[: max(chars - 3, 0)].rstrip() + "..."
        lines.extend(textwrap.wrap(text, width=width, initial_indent="     ", subsequent_indent="     "))
    return "\n".join(lines)


def cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        from searchrl.errors import ConfigError

        raise ConfigError(f"-k must be >= 1, got {args.k}")
    retriever = _with_cache(_load(args), args)
    results = retriever.search(list(args.queries), k=args.k)
    print("\n\n".join(format_results(q, ps, args.chars) for q, ps in zip(args.queries, results)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from searchrl.retrieval.server import API_KEY_ENV, bind_policy, serve

    bind_policy(args.host, args.api_key or os.environ.get(API_KEY_ENV), args.insecure)  # before loading
    retriever = _load(args)
    if args.rerank:
        from searchrl.retrieval.rerank import RerankRetriever

        retriever = RerankRetriever(retriever, args.rerank, fetch_k=args.fetch_k, device=args.device)
    retriever = _with_cache(retriever, args)
    try:
        serve(retriever, host=args.host, port=args.port, max_topk=args.max_topk, max_queries=args.max_queries,
              max_body_bytes=args.max_body_bytes, workers=args.workers, api_key=args.api_key,
              insecure=args.insecure)
    finally:
        if args.cache:
            print(f"search cache {args.cache}: {retriever.stats_line()}", file=sys.stderr)
    return 0
