"""Benchmark the synthetic world: generation speed/memory, and how searchable its questions are.

Prints one JSON line per measurement.

    python benchmarks/world.py speed --passages 10000,100000,1000000
        For each size, a fresh process generates and writes a world of about that many passages
        and reports seconds, passages/s and its peak RSS.
    python benchmarks/world.py answerability [--entities 3000] [--seed 0]
        Indexes the corpus with bm25s (stemmed, English stopwords; used directly, not searchrl's
        retriever) and reports, per hop count: how often each hop's query retrieves the passage
        that states the hop answer (top-1/top-3), and how often the final answer string occurs
        in the top-1/top-3 passages retrieved with the question text alone (a low rate for 2 and
        3 hops means one search is not enough).

Left out: dense retrieval, and timing the CLI's own start-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from searchrl.data.world import generate_world, write_world
from searchrl.data.world_graph import build_graph
from searchrl.data.world_questions import contains_answer


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(n_entities: int, seed: int) -> dict:
    """Generate and write one world in this process (called in a fresh child per size)."""
    t0 = time.perf_counter()
    world = generate_world(seed, n_entities)
    t_graph = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        info = write_world(world, tmp)
        seconds = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
    counts = info["counts"]
    return {
        "bench": "world_generate",
        "entities": n_entities,
        "passages": counts["passages"],
        "questions": counts["questions"],
        "seconds": round(seconds, 2),
        "graph_seconds": round(t_graph, 2),
        "passages_per_s": round(counts["passages"] / seconds),
        "cpu_seconds": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "files_mb": round(size_mb, 1),
    }


def speed(sizes: list[int], seed: int) -> None:
    probe = build_graph(seed, 20_000)
    ratio = probe.n_passages_total / len(probe)  # passages per entity
    for target in sizes:
        n = max(100, round(target / ratio))
        cmd = [sys.executable, __file__, "_one", "--entities", str(n), "--seed", str(seed)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


def answerability(n_entities: int, seed: int, k: int = 3) -> list[dict]:
    import bm25s
    import Stemmer

    world = generate_world(seed, n_entities)
    passages = world.passages
    by_id = {p.id: i for i, p in enumerate(passages)}
    stemmer = Stemmer.Stemmer("english")

    def tok(texts):
        return bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False)

    index = bm25s.BM25()
    index.index(tok([p.contents for p in passages]), show_progress=False)
    questions = world.questions

    def top(texts):
        docs, _ = index.retrieve(tok(texts), k=k, show_progress=False)
        return docs  # [n, k] passage indices

    q_top = top([q.question for q in questions])
    hops = [(qi, h) for qi, q in enumerate(questions) for h in q.extra["hops"]]
    h_top = top([h["query"] for _, h in hops])
    stats: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for qi, q in enumerate(questions):
        s, ans = stats[q.extra["num_hops"]], q.golden_answers[0]
        s["questions"] += 1
        s["answer_in_top1"] += contains_answer(passages[q_top[qi][0]].contents, ans)
        s["answer_in_topk"] += any(contains_answer(passages[d].contents, ans) for d in q_top[qi])
        first = by_id[q.extra["hops"][0]["passage_id"]]
        s["hop1_passage_in_topk"] += first in q_top[qi]
    for (qi, h), docs in zip(hops, h_top):
        s = stats[questions[qi].extra["num_hops"]]
        s["hops"] += 1
        s["hop_query_top1"] += docs[0] == by_id[h["passage_id"]]
        s["hop_query_topk"] += by_id[h["passage_id"]] in docs
    rows = []
    for n_hops in sorted(stats):
        s = stats[n_hops]
        row = {"bench": "world_answerability", "entities": n_entities,
               "passages": len(passages), "seed": seed, "k": k, "num_hops": n_hops,
               "questions": int(s["questions"])}  # fmt: skip
        for key in ("answer_in_top1", "answer_in_topk", "hop1_passage_in_topk"):
            row[key] = round(s[key] / s["questions"], 3)
        for key in ("hop_query_top1", "hop_query_topk"):
            row[key] = round(s[key] / s["hops"], 3)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["speed", "answerability", "_one"])
    ap.add_argument("--passages", default="10000,100000,1000000", help="speed: sizes")
    ap.add_argument("--entities", type=int, default=3000, help="answerability / _one: size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.mode == "speed":
        speed([int(x) for x in args.passages.split(",")], args.seed)
    elif args.mode == "_one":
        print(json.dumps(run_one(args.entities, args.seed)))
    else:
        for row in answerability(args.entities, args.seed):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
