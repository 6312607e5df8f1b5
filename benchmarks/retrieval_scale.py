"""Retrieval at scale: memory, start-up, recall vs Flat and latency of FAISS types; BM25 start-up.

Parts of ``benchmarks/retrieval.py`` (run them through it):

    python benchmarks/retrieval.py dense-scale [--n 100k] [--dim 768] [--vectors random|miniwiki]
                                               [--kinds flat,ivfpq,opq,hnswsq] [--nprobe 64]
        Builds each FAISS type over the same vectors (``random``: seeded standard-normal vectors,
        L2-normalised; ``miniwiki``: MiniLM shards from ``--emb-dir``, encoded beforehand, with
        real questions from ``--query-file``), then in a fresh child process per type loads it
        (``mmap`` on and off), searches ``--queries`` queries in batches of 64 and reports load
        seconds, resident memory (anonymous and file-backed, after load and after the searches),
        milliseconds per batch of 64 and recall@3 against the Flat index's top 3. One more line
        extrapolates the memory of each type to ``--target-n`` vectors of ``--target-dim``.
        On random vectors the nearest neighbours are barely nearer than the rest, so recall vs
        Flat there is a pessimistic bound for real embeddings (which cluster).
    python benchmarks/retrieval.py startup --index DIR [--mmap on,off]
        Loads a (BM25, dense or hybrid) index in a fresh child process with and without
        ``mmap`` and reports seconds, resident memory after load and after one batch of 64.
    python benchmarks/retrieval.py cache --index DIR [--distinct 2048] [--group 5] [--batch 64]
        The search cache on batches where each distinct query (a passage title) is asked
        ``--group`` times, shuffled: queries/s without a cache, while recording, and replaying;
        hit rates; and whether the replay equals the recording (and the uncached results).

Left out: GPU FAISS and sizes that do not fit this machine (the extrapolation line covers them).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import emit, log

HERE = Path(__file__).resolve()


def memory_mb() -> dict:
    """Resident memory of this process (MiB), split into anonymous and file-backed pages."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(rest.split()[0]) / 1024, 1)
    return {"rss_mb": out.get("VmRSS"), "rss_anon_mb": out.get("RssAnon"), "rss_file_mb": out.get("RssFile")}


# ------------------------------------------------------------------------------ vectors
def random_shards(n: int, dim: int, out: Path, seed: int = 0, shard: int = 50_000) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, lo in enumerate(range(0, n, shard)):
        path = out / f"shard_{i:05d}.npy"
        rows = min(shard, n - lo)
        if not (path.is_file() and np.load(path, mmap_mode="r").shape == (rows, dim)):
            x = np.random.default_rng(seed * 1000 + i).standard_normal((rows, dim), dtype=np.float32)
            np.save(path, x / np.linalg.norm(x, axis=1, keepdims=True))
        paths.append(path)
    return paths


def random_queries(m: int, dim: int, seed: int = 12345) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((m, dim), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def miniwiki_shards(emb_dir: Path, limit: int) -> list[Path]:
    """The complete shards of an ``encode_shards`` folder, up to about ``limit`` rows."""
    paths, rows = [], 0
    for p in sorted(emb_dir.glob("shard_*.npy")):
        if rows >= limit:
            break
        paths.append(p)
        rows += np.load(p, mmap_mode="r").shape[0]
    if not paths:
        raise SystemExit(f"no embedding shards in {emb_dir}")
    return paths


# ------------------------------------------------------------------------------ dense
def cmd_dense_scale(args) -> int:
    import faiss

    from searchrl.retrieval.faiss_index import build_faiss, write_vectors

    work = args.work / f"dense-{args.vectors}-{args.n}-{args.dim}"
    if args.vectors == "random":
        shards = random_shards(args.n, args.dim, work / "emb")
        queries = random_queries(args.queries, args.dim)
    else:
        shards = miniwiki_shards(args.emb_dir, args.n)
        queries = np.load(args.query_file)[: args.queries].astype(np.float32)
    n = sum(np.load(p, mmap_mode="r").shape[0] for p in shards)
    dim = int(np.load(shards[0], mmap_mode="r").shape[1])
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "queries.npy", queries)
    write_vectors(shards, work / "vectors.npy")
    for kind in args.kinds:
        path = work / f"{kind}.index"
        info_path = path.with_suffix(".json")
        if not path.is_file():
            log(f"building {kind} over {n} x {dim} ({args.vectors})")
            t0 = time.perf_counter()
            index, info = build_faiss(shards, dim, kind, nlist=args.nlist, pq_m=args.pq_m,
                                      train_size=args.train_size, opq_niter=args.opq_niter,
                                      show_progress=False)  # fmt: skip
            info["build_s"] = round(time.perf_counter() - t0, 1)
            faiss.write_index(index, str(path))
            info_path.write_text(json.dumps(info))
            del index
        info = json.loads(info_path.read_text())
        for mmap in args.mmap:
            for refine in ([False, True] if kind != "flat" else [False]):
                cmd = [sys.executable, str(HERE.with_name("retrieval.py")), "--work", str(args.work),
                       "_dense_probe", "--dir", str(work), "--kind", kind, "--nprobe", str(args.nprobe),
                       "--ef-search", str(args.ef_search), "--refine-factor", str(args.refine_factor)]
                cmd += ["--mmap"] if mmap else []
                cmd += ["--refine"] if refine else []  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    emit({"bench": "retrieval_dense_scale", "kind": kind, "failed": True,
                          "stderr_tail": done.stderr[-800:]})  # fmt: skip
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                emit({"bench": "retrieval_dense_scale", "vectors": args.vectors, "n": n, "dim": dim,
                      "kind": kind, "factory": info.get("factory"), "build_s": info.get("build_s"),
                      "index_mb": round(path.stat().st_size / 2**20, 1), **row})  # fmt: skip
    emit(extrapolate(args.target_n, args.target_dim, args.pq_m, args.nlist_target))
    return 0


def dense_probe(args) -> dict:
    """Child process: load one index, search, report memory, latency and recall vs Flat."""
    import faiss

    from searchrl.retrieval.faiss_index import open_vectors, read_faiss, refine_search, set_search_params

    work = Path(args.dir)
    faiss.omp_set_num_threads(max(1, int(args.threads)))
    queries = np.load(work / "queries.npy")
    base = memory_mb()
    t0 = time.perf_counter()
    index = read_faiss(work / f"{args.kind}.index", args.kind, mmap=args.mmap)
    load_s = time.perf_counter() - t0
    info = json.loads((work / f"{args.kind}.json").read_text())
    set_search_params(index, info, args.ef_search, args.nprobe)
    vectors = open_vectors(work / "vectors.npy") if args.refine else None
    after_load = memory_mb()
    ids, times = [], []
    for lo in range(0, len(queries), 64):
        q = np.ascontiguousarray(queries[lo : lo + 64])
        t = time.perf_counter()
        if vectors is not None:
            _, got = refine_search(index, vectors, q, 3, args.refine_factor)
        else:
            _, got = index.search(q, 3)
        times.append(time.perf_counter() - t)
        ids.append(got)
    ids = np.concatenate(ids)
    truth_path = work / "flat_top3.npy"
    if args.kind == "flat":
        np.save(truth_path, ids)
    truth = np.load(truth_path) if truth_path.is_file() else None
    rec = None
    if truth is not None:
        rec = float(np.mean([len(set(a) & set(b)) / 3 for a, b in zip(ids.tolist(), truth.tolist())]))
    end = memory_mb()
    return {"mmap": args.mmap, "refine": f"float16 x{args.refine_factor}" if args.refine else None,
            "nprobe": args.nprobe if args.kind in ("ivf", "ivfpq", "opq") else None,
            "ef_search": args.ef_search if args.kind in ("hnsw", "hnswsq") else None,
            "queries": int(len(queries)), "load_s": round(load_s, 3),
            "rss_after_load_mb": round(after_load["rss_mb"] - base["rss_mb"], 1),
            "rss_after_search_mb": round(end["rss_mb"] - base["rss_mb"], 1),
            "rss_file_after_search_mb": round(end["rss_file_mb"] - base["rss_file_mb"], 1),
            "ms_per_batch64_p50": round(1000 * statistics.median(times), 1),
            "recall@3_vs_flat": None if rec is None else round(rec, 4), "threads": int(args.threads)}  # fmt: skip


def extrapolate(n: int, dim: int, pq_m: int | None, nlist: int | None) -> dict:
    """Resident bytes of each type at ``n`` vectors of ``dim`` (codes + ids + fixed tables).

    Passages (``passages.jsonl``) and the refine copy are memory-mapped: they cost disk, and RAM
    only for the rows that searches touch; the passage offsets (8 bytes a passage) stay in RAM.
    """
    from searchrl.retrieval.faiss_index import default_nlist, default_pq_m

    m, nl = pq_m or default_pq_m(dim), nlist or default_nlist(n)
    gb = 1e9
    per = {"flat": 4 * dim, "ivfpq": m + 8, "opq": m + 8, "hnswsq_sq8": dim + 2 * 32 * 4,
           "hnswsq_sq4": dim // 2 + 2 * 32 * 4}  # fmt: skip
    fixed = {"flat": 0, "ivfpq": nl * dim * 4 + m * 256 * (dim // m) * 4, "hnswsq_sq8": 2 * dim * 4,
             "hnswsq_sq4": 2 * dim * 4}  # fmt: skip
    fixed["opq"] = fixed["ivfpq"] + dim * dim * 4
    row = {"bench": "retrieval_dense_extrapolation", "n": n, "dim": dim, "pq_m": m, "nlist": nl,
           "formula": "GB = (n * bytes_per_vector + fixed) / 1e9 + n * 8 (passage offsets) / 1e9",
           "refine_disk_gb": round(n * dim * 2 / gb, 1), "flat_disk_gb": round(n * dim * 4 / gb, 1)}  # fmt: skip
    for kind, b in per.items():
        row[f"{kind}_bytes_per_vector"] = b
        row[f"{kind}_ram_gb"] = round((n * b + fixed[kind] + n * 8) / gb, 2)
    return row


# ------------------------------------------------------------------------------ start-up
def cmd_startup(args) -> int:
    for mmap in args.mmap:
        cmd = [sys.executable, str(HERE.with_name("retrieval.py")), "_startup_probe", "--index", str(args.index)]
        cmd += ["--mmap"] if mmap else []
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            emit({"bench": "retrieval_startup", "index": str(args.index), "failed": True,
                  "stderr_tail": done.stderr[-800:]})  # fmt: skip
            continue
        emit({"bench": "retrieval_startup", "index": str(args.index), **json.loads(done.stdout.splitlines()[-1])})
    return 0


def startup_probe(args) -> dict:
    """Child process: load an index (timed, memory before/after) and run one batch of 64."""
    base = memory_mb()
    from searchrl.retrieval.index import load_index, read_manifest

    imported = memory_mb()
    t0 = time.perf_counter()
    retriever = load_index(args.index, mmap=args.mmap)
    load_s = time.perf_counter() - t0
    loaded = memory_mb()
    m = read_manifest(args.index)
    with open(Path(args.index) / "passages.jsonl", encoding="utf-8") as f:
        queries = [json.loads(line)["title"] or "query" for line, _ in zip(f, range(64))]
    t1 = time.perf_counter()
    retriever.search(queries, k=3)
    first = time.perf_counter() - t1
    end = memory_mb()
    return {"kind": m["kind"], "passages": m["num_passages"], "mmap": args.mmap, "load_s": round(load_s, 3),
            "rss_imports_mb": round(imported["rss_mb"] - base["rss_mb"], 1),
            "rss_after_load_mb": round(loaded["rss_mb"] - imported["rss_mb"], 1),
            "rss_after_first_batch_mb": round(end["rss_mb"] - imported["rss_mb"], 1),
            "rss_file_after_first_batch_mb": round(end["rss_file_mb"] - imported["rss_file_mb"], 1),
            "first_batch64_s": round(first, 3)}  # fmt: skip


# ------------------------------------------------------------------------------ record / replay
def cmd_cache(args) -> int:
    """Queries/s without a cache, recording (first pass) and replaying (second pass, new process
    state), on batches where each distinct query is asked ``--group`` times (a GRPO group)."""
    import random

    from searchrl.retrieval.cache import CachedRetriever, encode_hits
    from searchrl.retrieval.index import load_index

    plain = load_index(args.index)
    titles: dict[str, None] = {}
    with open(Path(args.index) / "passages.jsonl", encoding="utf-8") as f:
        for line in f:
            titles.setdefault(json.loads(line)["title"] or "query")
            if len(titles) == args.distinct:
                break
    titles = list(titles)
    asked = [t for t in titles for _ in range(args.group)]
    random.Random(0).shuffle(asked)
    batches = [asked[lo : lo + args.batch] for lo in range(0, len(asked), args.batch)]
    path = args.work / "search-cache.sqlite"
    path.unlink(missing_ok=True)
    outputs = {}
    for name in ("no cache", "record", "replay"):
        retriever = plain if name == "no cache" else CachedRetriever(plain, path)
        t0 = time.perf_counter()
        outputs[name] = [encode_hits(h) for b in batches for h in retriever.search(b, k=3)]
        seconds = time.perf_counter() - t0
        stats = retriever.stats() if name != "no cache" else {}
        emit({"bench": "retrieval_cache", "pass": name, "kind": getattr(plain, "kind", None),
              "queries": len(asked), "distinct": len(titles), "group": args.group, "batch": args.batch,
              "seconds": round(seconds, 3), "qps": round(len(asked) / seconds, 1),
              "hit_rate": stats.get("hit_rate"), "cache_mb": round(path.stat().st_size / 2**20, 2)
              if path.is_file() else None})  # fmt: skip
    emit({"bench": "retrieval_cache", "replay_equals_record": outputs["record"] == outputs["replay"],
          "record_equals_uncached": outputs["record"] == outputs["no cache"]})  # fmt: skip
    return 0


def add_parsers(sub, int_list, str_list) -> None:
    d = sub.add_parser("dense-scale", help="FAISS types: memory, start-up, recall vs Flat, latency")
    d.add_argument("--n", type=lambda s: int_list(s)[0], default=100_000, help="vectors (e.g. 100k)")
    d.add_argument("--dim", type=int, default=768)
    d.add_argument("--vectors", choices=["random", "miniwiki"], default="random")
    d.add_argument("--emb-dir", type=Path, help="encode_shards folder (vectors miniwiki)")
    d.add_argument("--query-file", type=Path, help=".npy of encoded queries (vectors miniwiki)")
    d.add_argument("--queries", type=int, default=1024)
    d.add_argument("--kinds", type=str_list, default=["flat", "ivfpq", "opq", "hnswsq"])
    d.add_argument("--nlist", type=int, help="IVF lists (default: about 4*sqrt(n))")
    d.add_argument("--pq-m", type=int, help="PQ bytes a vector (default: dim / 8)")
    d.add_argument("--train-size", type=int, help="codebook training sample")
    d.add_argument("--opq-niter", type=int, default=10)
    d.add_argument("--nprobe", type=int, default=64)
    d.add_argument("--ef-search", type=int, default=128)
    d.add_argument("--refine-factor", type=int, default=10)
    d.add_argument("--mmap", type=lambda s: [x == "on" for x in str_list(s)], default=[True],
                   help="on, off or on,off")
    d.add_argument("--target-n", type=int, default=21_015_300)
    d.add_argument("--target-dim", type=int, default=768)
    d.add_argument("--nlist-target", type=int, help="IVF lists at the target size (default 4*sqrt)")
    s = sub.add_parser("startup", help="load time and memory of an index, with and without mmap")
    s.add_argument("--index", type=Path, required=True)
    s.add_argument("--mmap", type=lambda s: [x == "on" for x in str_list(s)], default=[False, True])
    c = sub.add_parser("cache", help="record/replay cache: queries/s and hit rate on GRPO-like batches")
    c.add_argument("--index", type=Path, required=True)
    c.add_argument("--distinct", type=int, default=2048, help="distinct queries (passage titles)")
    c.add_argument("--group", type=int, default=5, help="times each query is asked")
    c.add_argument("--batch", type=int, default=64)
    p = sub.add_parser("_dense_probe")
    for name in ("--dir", "--kind"):
        p.add_argument(name, required=True)
    for name, default in (("--nprobe", 64), ("--ef-search", 128), ("--refine-factor", 10), ("--threads", 2)):
        p.add_argument(name, type=int, default=default)
    p.add_argument("--mmap", action="store_true")
    p.add_argument("--refine", action="store_true")
    q = sub.add_parser("_startup_probe")
    q.add_argument("--index", required=True)
    q.add_argument("--mmap", action="store_true")


PARTS = {"dense-scale": cmd_dense_scale, "startup": cmd_startup, "cache": cmd_cache}
PROBES = {"_dense_probe": dense_probe, "_startup_probe": startup_probe}
