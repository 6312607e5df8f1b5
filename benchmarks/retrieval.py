"""Benchmark searchrl's retrieval: answer recall, serving throughput/latency, index build cost.

Prints one JSON line per configuration (each with the 1-minute load average, ``load1``: the
machines this runs on are often shared). Three parts, runnable separately:

    python benchmarks/retrieval.py recall [--data ../shared/data/miniwiki] [--kinds bm25,dense,hybrid]
                                          [--index-dir DIR] [--ks 1,3,5]
        Recall@k per miniwiki test set and their average (the six sets, unweighted): a question
        counts as found when a gold answer (SQuAD-normalised, as whole words) occurs in the title +
        text of one of its top-k passages, retrieved with the question text as the query. Indexes
        are read from DIR/<kind> and built there when missing; ``hybrid`` is composed in-process
        from DIR/bm25 and DIR/dense (RRF, the index defaults) unless DIR/hybrid exists. Without
        the data folder it prints one ``skipped`` line saying why.
    python benchmarks/retrieval.py throughput --index DIR [--batches 1,64] [--clients 1,16]
                                              [--duration 6] [--modes inproc,http]
        Queries/s (queries, not requests), p50/p99 request latency and errors for each batch size
        and number of concurrent clients (threads), in-process (``retriever.search``) and over
        HTTP (``HttpRetriever``, no retries, against ``searchrl serve`` started as a separate
        process on 127.0.0.1 and a free port, so the server does not share this process's GIL).
        Queries are real questions (``--queries``, else miniwiki's, else passage titles). Each
        configuration runs for at most ``--duration`` seconds and ``--max-queries`` queries (plus
        the requests in flight, each cut off by ``--timeout``, which counts as an error). Each line also gives
        CPU ms per query (this process + the server), steadier than queries/s on a busy machine,
        where the kernel shares CPU per thread: 16 in-process client threads get more of it than
        the server's single retriever thread. ``--breakdown`` adds one line with the CPU time of
        the HTTP path's parts, run in-process (search, server JSON encoding, client parsing).
        ``--threads N`` sets torch/OpenMP threads here and in the server (dense encoders on a
        busy machine can be far faster with 1 than with the default of one per core).
        ``--url URL`` loads a running server instead, ``--original FILE`` starts the original
        Search-R1 server file over the same index (see benchmarks/original_server.py).
    python benchmarks/retrieval.py build [--passages 100k,1M] [--kinds bm25] [--dense-passages 5000]
        Generates a synthetic world of about each size into the work folder, then times
        ``build_index`` in a fresh child process and reports its seconds, peak RSS and index size.
        Dense builds run at ``--dense-passages`` only (CPU encoding is ~170 passages/s at best on
        2 idle cores) and are extrapolated linearly to the requested sizes (``extrapolated``).
    python benchmarks/retrieval.py dense-scale | startup ...
        FAISS types at scale (memory, start-up, recall vs Flat, latency) and index start-up with
        and without mmap: see benchmarks/retrieval_scale.py.
    python benchmarks/retrieval.py table FILE...
        Markdown tables (recall, throughput, build) from saved output, for the README.

Indexes, worlds and server logs go to ``--work`` (default: a folder in the system temp dir),
never into the repository. Left out: GPU timings, re-ranking, and sharded/multi-replica serving.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    _ms, cpu_seconds, emit, int_list, log, peak_rss_mb, percentile, run_load,
    shared_data_dir, str_list,
)  # fmt: skip
from original_server import compare_results, http_target
from retrieval_scale import PARTS as SCALE_PARTS
from retrieval_scale import PROBES as SCALE_PROBES
from retrieval_scale import add_parsers as add_scale_parsers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATASETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique")
DEFAULT_WORK = Path(tempfile.gettempdir()) / "searchrl-bench"


# ------------------------------------------------------------------------------ indexes
def ensure_index(corpus: Path, kind: str, out: Path) -> Path:
    """``out`` as a ``kind`` index of ``corpus``, built (and reported) when it is missing."""
    from searchrl.retrieval.index import build_index

    if (out / "manifest.json").is_file():
        return out
    log(f"building {kind} index of {corpus} into {out}")
    t0 = time.perf_counter()
    build_index(corpus, kind, out)
    emit({"bench": "retrieval_index_build", "kind": kind, "corpus": str(corpus), "index": str(out),
          "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    return out


def open_retriever(index_dir: Path, kind: str, corpus: Path | None = None):
    """Load ``index_dir/kind``; a missing hybrid is composed from the bm25 and dense indexes."""
    from searchrl.retrieval.index import load_index

    path = index_dir / kind
    if kind == "hybrid" and not (path / "manifest.json").is_file():
        from searchrl.retrieval.hybrid import HybridRetriever

        sparse, dense = (open_retriever(index_dir, k, corpus) for k in ("bm25", "dense"))
        return HybridRetriever(sparse, dense)
    if corpus is not None:
        ensure_index(corpus, kind, path)
    return load_index(path)


# ------------------------------------------------------------------------------ recall
def recall_row(retriever, examples: list, ks: list[int], batch: int = 256) -> dict:
    """Recall@k of ``examples`` (on all of them and on the answerable ones) and search time."""
    from searchrl.rewards import normalize_answer

    kmax, found, t0 = max(ks), [], time.perf_counter()
    for lo in range(0, len(examples), batch):
        chunk = examples[lo : lo + batch]
        hits = retriever.search([e.question for e in chunk], kmax)
        for ex, row in zip(chunk, hits):
            golds = [g for g in (normalize_answer(a) for a in ex.golden_answers) if g]
            texts = [f" {normalize_answer(p.contents)} " for p in row]
            rank = next((r for r, t in enumerate(texts) if any(f" {g} " in t for g in golds)), None)
            found.append((rank, bool(ex.extra.get("answerable", True))))
    seconds = time.perf_counter() - t0
    answerable = [r for r, a in found if a]
    row = {"questions": len(found), "answerable": len(answerable)}
    for k in ks:
        row[f"recall@{k}"] = round(sum(r is not None and r < k for r, _ in found) / max(len(found), 1), 4)
    for k in ks:
        row[f"recall@{k}_answerable"] = round(
            sum(r is not None and r < k for r in answerable) / max(len(answerable), 1), 4
        )
    row["search_qps"] = round(len(found) / seconds, 1)
    return row


def cmd_recall(args: argparse.Namespace) -> int:
    data = Path(args.data) if args.data else (shared_data_dir() or Path("missing")) / "miniwiki"
    corpus, qdir = data / "corpus.jsonl", data / "questions"
    if not corpus.is_file() or not qdir.is_dir():
        reason = f"no miniwiki data at {data} (needs corpus.jsonl and questions/); pass --data"
        emit({"bench": "retrieval_recall", "skipped": True, "reason": reason})
        return 0
    from searchrl.data.qa import load_qa

    sets = {name: load_qa(qdir / f"{name}.jsonl", split=args.split) for name in args.datasets}
    index_dir = Path(args.index_dir or args.work / "miniwiki")
    ks = sorted(args.ks)
    averages = {}
    for kind in args.kinds:
        retriever = open_retriever(index_dir, kind, corpus)
        composed = kind == "hybrid" and not (index_dir / "hybrid" / "manifest.json").is_file()
        rows = []
        for name, examples in sets.items():
            log(f"recall {kind} {name} ({len(examples)} questions)")
            row = recall_row(retriever, examples, ks)
            rows.append(row)
            emit({"bench": "retrieval_recall", "kind": kind, "dataset": name, "split": args.split,
                  "composed_hybrid": composed, **row})  # fmt: skip
        avg = {key: round(sum(r[key] for r in rows) / len(rows), 4)
               for key in rows[0] if key.startswith("recall@")}  # fmt: skip
        averages[kind] = avg
        emit({"bench": "retrieval_recall", "kind": kind, "dataset": f"average_of_{len(rows)}",
              "split": args.split, "questions": sum(r["questions"] for r in rows), **avg})  # fmt: skip
    if "bm25" in averages and "hybrid" in averages and 3 in ks:
        h, b = averages["hybrid"]["recall@3"], averages["bm25"]["recall@3"]
        emit({"bench": "retrieval_target", "target": "hybrid recall@3 > bm25 (average of the sets)",
              "hybrid": h, "bm25": b, "met": h > b})  # fmt: skip
    return 0


# ------------------------------------------------------------------------------ throughput
def load_queries(index: Path, data: Path | None, limit: int = 20_000, path: Path | None = None) -> list[str]:
    """Questions from ``path`` (a QA jsonl), else miniwiki's (all sets), else the passage titles."""
    qdir = (data or (shared_data_dir() or Path("missing")) / "miniwiki") / "questions"
    queries = []
    if path is not None:
        queries = [json.loads(line)["question"] for line in path.open(encoding="utf-8") if line.strip()]
    elif qdir.is_dir():
        for path in sorted(qdir.glob("*.jsonl")):
            queries += [json.loads(line)["question"] for line in path.open(encoding="utf-8") if line.strip()]
    if not queries:
        with open(index / "passages.jsonl", encoding="utf-8") as f:
            for line, _ in zip(f, range(limit)):
                d = json.loads(line)
                queries.append(d.get("title") or d["text"][:80])
    random.Random(0).shuffle(queries)
    return queries[:limit]


def http_breakdown(retriever, queries: list[str], k: int, reps: int = 7) -> dict:
    """CPU time of the parts of one batch-64 HTTP request, run in-process (median of ``reps``, ms).

    Thread CPU time, not wall time, so that a busy machine does not inflate the figures.
    ``alt_json_dumps`` is what rendering the same answer with ``json.dumps`` alone would cost.
    """
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse

    from searchrl.retrieval.client import _parse_result
    from searchrl.retrieval.server import format_result, parse_request

    qs = queries[:64]
    body = json.dumps({"queries": qs, "topk": k, "return_scores": True}).encode()
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.thread_time()
        out = fn()
        parts.setdefault(name, []).append(time.thread_time() - t0)
        return out

    for _ in range(reps):
        req = timed("server_parse_request", lambda: parse_request(body, max_topk=100, max_queries=512))
        hits = timed("search", lambda: retriever.search(req.queries, req.topk))
        content = timed("server_format_result", lambda: {"result": format_result(hits, True)})
        encoded = timed("server_jsonable_encoder", lambda: jsonable_encoder(content))
        raw = timed("server_json_render", lambda: JSONResponse(encoded).body)
        timed("alt_json_dumps", lambda: json.dumps(content, ensure_ascii=False).encode())
        timed("client_json_loads", lambda: json.loads(raw))
        data = json.loads(raw)
        timed("client_parse_result", lambda: _parse_result(data, len(qs), "bench"))
    row = {f"{name}_cpu_ms": _ms(percentile(v, 50)) for name, v in parts.items()}
    row["response_bytes"] = len(raw)
    return row


def _bench_row(kind: str, passages, mode: str, batch: int, clients: int, stats: dict) -> dict:
    return {"bench": "retrieval_throughput", "kind": kind, "passages": passages, "mode": mode,
            "batch": batch, "clients": clients, "qps_unit": "queries/s",
            "threads": os.environ.get("OMP_NUM_THREADS"), **stats}  # fmt: skip


def cmd_throughput(args: argparse.Namespace) -> int:
    from searchrl.retrieval.client import HttpRetriever
    from searchrl.retrieval.index import load_index, read_manifest

    if args.threads:  # torch/OpenMP intra-op threads, here and (through the env) in the server
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    index = Path(args.index)
    manifest = read_manifest(index)
    kind, n = manifest["kind"], manifest["num_passages"]
    queries = load_queries(index, Path(args.data) if args.data else None, path=args.queries)
    results: dict[tuple[str, int, int], dict] = {}

    def sweep(mode: str, call, extra=lambda: {}, server: str | None = None) -> None:
        for batch in args.batches:
            for clients in args.clients:
                warm = min(1.0, args.duration)
                run_load(call, queries, batch, clients, warm, batch * clients)  # one request each
                log(f"{mode} batch {batch} clients {clients}")
                before = extra()
                stats = run_load(call, queries, batch, clients, args.duration, args.max_queries)
                after = extra()
                cpu = stats["bench_cpu_s"]
                if server:
                    stats["server"] = server
                if before and after and before["cpu"] is not None and after["cpu"] is not None:
                    stats["server_cpu_s"] = round(after["cpu"] - before["cpu"], 2)
                    cpu += stats["server_cpu_s"]
                stats["cpu_ms_per_query"] = round(1000 * cpu / max(stats["queries"], 1), 3)
                results[(mode, batch, clients)] = emit(_bench_row(kind, n, mode, batch, clients, stats))

    if "inproc" in args.modes:
        retriever = load_index(index)
        sweep("inproc", lambda cid, qs: retriever.search(qs, args.k))
        if args.breakdown:
            emit({"bench": "retrieval_http_breakdown", "kind": kind, "passages": n, "batch": 64,
                  "k": args.k, **http_breakdown(retriever, queries, args.k)})  # fmt: skip
        del retriever
    if "http" in args.modes:
        args.work.mkdir(parents=True, exist_ok=True)
        with http_target(args, index, args.work) as (url, server_cpu, label):
            if label != "searchrl" and args.compare:
                emit({"bench": "retrieval_same_results", "server": label, "url": url, "kind": kind,
                      **compare_results(url, index, queries[: args.compare], args.k)})  # fmt: skip
            clients = [HttpRetriever(url, timeout=args.timeout, retries=0) for _ in range(max(args.clients))]
            try:
                call = lambda cid, qs: clients[cid].search(qs, args.k)  # noqa: E731
                sweep("http", call, lambda: {"cpu": server_cpu()}, label)
            finally:
                for c in clients:
                    c.close()
    report_targets(results, kind)
    return 0


def report_targets(results: dict, kind: str) -> None:
    for clients in sorted({c for (_, _, c) in results}):
        http, inproc = results.get(("http", 64, clients)), results.get(("inproc", 64, clients))
        if http and inproc and inproc["qps"]:
            ratio = round(http["qps"] / inproc["qps"], 3)
            cpu_ratio = round(inproc["cpu_ms_per_query"] / max(http["cpu_ms_per_query"], 1e-9), 3)
            emit({"bench": "retrieval_target", "kind": kind,
                  "target": f"HTTP batch 64 within 20% of in-process throughput ({clients} client(s))",
                  "http_qps": http["qps"], "inproc_qps": inproc["qps"], "ratio": ratio,
                  "cpu_ratio": cpu_ratio, "met": ratio >= 0.8})  # fmt: skip
    runs = [r for (mode, _, c), r in results.items() if mode == "http" and c == 16]
    if runs:
        errors = sum(r["errors"] for r in runs)
        emit({"bench": "retrieval_target", "kind": kind, "target": "16 concurrent HTTP clients, zero errors",
              "requests": sum(r["requests"] for r in runs), "errors": errors,
              "met": errors == 0})  # fmt: skip


# ------------------------------------------------------------------------------ build
def world_entities(passages: int, seed: int) -> int:
    """Entities giving about ``passages`` passages (the ratio measured on a 20k-entity graph)."""
    from searchrl.data.world_graph import build_graph

    probe = build_graph(seed, 20_000)
    return max(100, round(passages / (probe.n_passages_total / len(probe))))


def ensure_world(passages: int, seed: int, work: Path) -> Path:
    """A world of about ``passages`` passages in ``work`` (generated in a child process once)."""
    out = work / f"world-{passages}-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    if not (out / "world.json").is_file():
        log(f"generating a world of ~{passages} passages into {out}")
        cmd = [sys.executable, "-m", "searchrl.cli", "world", "--out", str(out), "--seed", str(seed),
               "--entities", str(world_entities(passages, seed))]  # fmt: skip
        with open(work / f"world-{passages}-{seed}.log", "wb") as f:
            env = {**os.environ, "TQDM_DISABLE": "1"}
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
    return out


def build_one(corpus: Path, kind: str, out: Path, limit: int | None) -> dict:
    """Child-process body: build one index and report seconds and this process's peak RSS."""
    import searchrl.retrieval.index  # noqa: F401 - counted in the baseline, not in the build
    from searchrl.retrieval.index import build_index

    if limit:
        from searchrl.data.corpus import iter_corpus, write_corpus_jsonl

        small = out.with_name(out.name + "-corpus.jsonl")
        write_corpus_jsonl((p for p, _ in zip(iter_corpus(corpus, progress=False), range(limit))), small)
        corpus = small
    base = peak_rss_mb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    build_index(corpus, kind, out, overwrite=True, show_progress=False)
    seconds = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    n, cpu = manifest["num_passages"], cpu_seconds() - c0
    return {"passages": n, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
            "passages_per_s": round(n / seconds), "passages_per_cpu_s": round(n / max(cpu, 1e-9)),
            "peak_rss_mb": peak_rss_mb(), "rss_before_build_mb": base,
            "index_mb": round(size / 2**20, 1)}  # fmt: skip


def cmd_build(args: argparse.Namespace) -> int:
    for size in args.passages:
        world = ensure_world(size, args.seed, args.work)
        info = json.loads((world / "world.json").read_text())
        for kind in args.kinds:
            limit = args.dense_passages if kind in ("dense", "hybrid") else None
            out = args.work / f"index-{kind}-{size}"
            log(f"building {kind} over {limit or info['counts']['passages']} passages of {world}")
            cmd = [sys.executable, __file__, "_build_one", "--corpus", str(world / "corpus.jsonl"),
                   "--kind", kind, "--out", str(out), "--limit", str(limit or 0)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                emit({"bench": "retrieval_build", "kind": kind, "passages": size, "failed": True,
                      "stderr_tail": done.stderr[-1500:]})  # fmt: skip
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row = {"bench": "retrieval_build", "kind": kind,
                   "world_passages": info["counts"]["passages"], **row}  # fmt: skip
            if limit and row["passages"] < info["counts"]["passages"]:
                scale = info["counts"]["passages"] / row["passages"]
                row["extrapolated_seconds"] = round(row["seconds"] * scale, 1)
                row["extrapolated_cpu_s"] = round(row["cpu_s"] * scale, 1)
                row["extrapolated"] = f"linear from {row['passages']} passages (encoding dominates)"
            emit(row)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
                out.with_name(out.name + "-corpus.jsonl").unlink(missing_ok=True)
    return 0


# ------------------------------------------------------------------------------ table
def cmd_table(args: argparse.Namespace) -> int:
    """Markdown tables (for the README) from JSON lines this script printed."""
    rows = [json.loads(line) for path in args.files for line in open(path) if line.startswith("{")]
    for bench, printer in (("retrieval_recall", _recall_table), ("retrieval_throughput", _throughput_table),
                           ("retrieval_build", _build_table)):  # fmt: skip
        chosen = [r for r in rows if r.get("bench") == bench and not (r.get("skipped") or r.get("failed"))]
        if chosen:
            print("\n".join(printer(chosen)) + "\n")
    return 0


def _recall_table(rows: list[dict]) -> list[str]:
    sets = list(dict.fromkeys(r["dataset"] for r in rows))
    out = ["| retriever (recall@1 / @3 / @5) | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        got = {r["dataset"]: r for r in rows if r["kind"] == kind}
        cells = [
            " / ".join(f"{got[s][f'recall@{k}']:.3f}" for k in (1, 3, 5)) if s in got else "-" for s in sets
        ]
        out.append(f"| {kind} | " + " | ".join(cells) + " |")
    return out


def _throughput_table(rows: list[dict]) -> list[str]:
    out = ["| index | mode | batch | clients | queries/s | p50 ms | p99 ms | errors | CPU ms/query | load1 |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {r['kind']} ({r['passages']:,}{', threads ' + r['threads'] if r.get('threads') else ''}) "
            f"| {r['mode']} | {r['batch']} | {r['clients']} "
            f"| {r['qps']:,.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} "
            f"| {r.get('cpu_ms_per_query', '-')} | {r['load1']} |"
        )
    return out


def _build_table(rows: list[dict]) -> list[str]:
    out = ["| kind | passages | build s (wall) | CPU s | peak RSS MB | index MB | load1 |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        extra = ""
        if "extrapolated" in r:
            extra = f" (~{r['extrapolated_seconds']:,.0f} s for {r['world_passages']:,})"
        out.append(
            f"| {r['kind']} | {r['passages']:,} | {r['seconds']}{extra} | {r['cpu_s']} "
            f"| {r['peak_rss_mb']} | {r['index_mb']} | {r['load1']} |"
        )
    return out


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="folder for indexes, worlds, logs")
    sub = ap.add_subparsers(dest="part", required=True)
    r = sub.add_parser("recall", help="recall@k on the miniwiki test sets")
    r.add_argument("--data", help="miniwiki folder (default: ../shared/data/miniwiki next to the repo)")
    r.add_argument("--kinds", type=str_list, default=["bm25", "dense", "hybrid"])
    r.add_argument("--datasets", type=str_list, default=list(DATASETS))
    r.add_argument("--index-dir", help="folder of <kind>/ index dirs (default: WORK/miniwiki)")
    r.add_argument("--ks", type=int_list, default=[1, 3, 5])
    r.add_argument("--split", default="test")
    t = sub.add_parser("throughput", help="queries/s and latency, in-process and over HTTP")
    t.add_argument("--index", required=True, help="index directory")
    t.add_argument("--data", help="miniwiki folder for the queries (default: ../shared/data/miniwiki)")
    t.add_argument("--queries", type=Path, help="QA jsonl whose questions are the queries (e.g. a world's)")
    t.add_argument("--batches", type=int_list, default=[1, 64])
    t.add_argument("--clients", type=int_list, default=[1, 16])
    t.add_argument("--modes", type=str_list, default=["inproc", "http"])
    t.add_argument("--duration", type=float, default=6.0, help="seconds per configuration")
    t.add_argument("--max-queries", type=int, default=50_000, help="queries per configuration")
    t.add_argument("-k", type=int, default=3)
    t.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout (s), counted as an error")
    t.add_argument("--threads", type=int, help="torch/OpenMP threads in-process and in the server")
    t.add_argument("--breakdown", action="store_true", help="time the HTTP path's parts in-process")
    t.add_argument("--url", help="load this running /retrieve server instead of starting searchrl serve")
    t.add_argument("--server-pid", type=int, help="with --url: the server's pid, to count its CPU time")
    t.add_argument("--original", help="start this Search-R1 retrieval_server.py (device set to CPU) "
                   "over --index's FAISS file and load it (see benchmarks/original_server.py)")
    t.add_argument("--original-python", default=sys.executable, help="python that runs --original")
    t.add_argument("--original-name", default="minilm", help="--retriever_name given to --original")
    t.add_argument("--corpus", help="corpus file for --original (default: the index's recorded corpus)")
    t.add_argument("--compare", type=int, default=16, help="queries whose top-k ids are compared first")
    b = sub.add_parser("build", help="index build time and memory on the synthetic world")
    b.add_argument("--passages", type=int_list, default=[100_000, 1_000_000])
    b.add_argument("--kinds", type=str_list, default=["bm25"])
    b.add_argument("--dense-passages", type=int, default=5000, help="passages actually encoded for dense")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--keep", action="store_true", help="keep the built indexes in WORK")
    m = sub.add_parser("table", help="markdown tables from saved JSON lines")
    m.add_argument("files", nargs="+", help="files holding this script's output")
    add_scale_parsers(sub, int_list, str_list)  # dense-scale, startup (benchmarks/retrieval_scale.py)
    o = sub.add_parser("_build_one")  # internal: one build in a fresh process
    o.add_argument("--corpus", type=Path, required=True)
    o.add_argument("--kind", required=True)
    o.add_argument("--out", type=Path, required=True)
    o.add_argument("--limit", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part == "_build_one":
        print(json.dumps(build_one(args.corpus, args.kind, args.out, args.limit or None)), flush=True)
        return 0
    if args.part in SCALE_PROBES:
        print(json.dumps(SCALE_PROBES[args.part](args)), flush=True)
        return 0
    parts = {"recall": cmd_recall, "throughput": cmd_throughput, "build": cmd_build, "table": cmd_table,
             **SCALE_PARTS}  # fmt: skip
    return parts[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
