"""Rollout throughput: the multi-turn search loop versus raw generation and the original's way.

Prints one JSON line per configuration (generated tokens/s, wall seconds, tokens):

- ``loop``: ``run_rollouts`` over world questions (stop strings during sampling, refill).
- ``raw``: the backend's plain ``generate`` of the same number of new tokens per row at the same
  batch size (no stop strings, no retrieval): the ceiling the loop is measured against.
- ``original``: the loop with a generator that, like the original Search-R1, ignores stop strings,
  generates each turn's whole budget and cuts the text afterwards (tokens/s counts kept tokens).

    python benchmarks/rollout.py                          # default model (SmolLM2-135M), CPU
    python benchmarks/rollout.py --random-config qwen2.5-3b --device cuda --batch 64

A random model rarely writes a stop string, so with ``--random-config`` the loop and the original
behave alike; the comparison that matters there is ``loop`` vs ``raw``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from searchrl.rollout.generator import Completion, SamplingParams  # noqa: E402


class CutAfterwards:
    """The original's generation: whole budget every turn, stop strings applied after the fact."""

    def __init__(self, inner, tokenizer):
        self.inner, self.tokenizer = inner, tokenizer
        self.kept = 0

    def generate(self, prompts, sampling: SamplingParams, stop=None):
        outs = self.inner.generate(prompts, sampling, stop=None)
        cut = []
        for c in outs:
            ids = c.token_ids
            for n in range(1, len(ids) + 1):  # first prefix whose text holds a stop string
                text = self.tokenizer.decode(ids[:n])
                hit = next((s for s in (stop or []) if s in text), None)
                if hit:
                    ids = ids[:n]
                    break
            self.kept += len(ids)
            cut.append(Completion(ids, c.logprobs[: len(ids)], "stop" if len(ids) < len(c.token_ids) else c.finish_reason,
                                  text=self.tokenizer.decode(ids)))
        return cut


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path / id (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--random-config", default=None, help="random weights of a known shape, e.g. qwen2.5-3b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on GPU by default")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="per-turn budget")
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--skip-original", action="store_true")
    args = ap.parse_args()

    import torch

    from searchrl.data.corpus import load_corpus
    from searchrl.data.qa import load_qa
    from searchrl.data.world import ensure_default_world
    from searchrl.models import load_model, load_tokenizer, random_lm_from_config
    from searchrl.retrieval.bm25 import BM25Retriever
    from searchrl.rollout.hf import HFGenerator
    from searchrl.rollout.loop import RolloutConfig, RolloutStats, run_rollouts

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.random_config:
        tok = load_tokenizer()  # any real tokenizer works for speed; vocab follows the config
        model = random_lm_from_config(args.random_config, dtype=dtype, device=args.device)
        name = f"random-{args.random_config}"
    else:
        model, tok = load_model(args.model, dtype=dtype, device=args.device)
        name = args.model or "smollm2-135m-instruct"
    world = ensure_default_world()
    questions = [q for q in load_qa(world / "questions.jsonl") if q.split == "test"][: args.questions]
    retriever = BM25Retriever.build(load_corpus(world / "corpus.jsonl"), show_progress=False)
    gen = HFGenerator(model, tok)
    cfg = RolloutConfig(max_turns=args.max_turns, topk=args.topk, max_new_tokens_per_turn=args.max_new_tokens,
                        temperature=1.0, seed=0, max_context_tokens=4096)
    base = {"model": name, "device": args.device, "dtype": dtype, "batch": args.batch, "questions": len(questions),
            "max_new_tokens_per_turn": args.max_new_tokens, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "load": os.getloadavg()[0]}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    run_rollouts(questions[:2], gen, retriever, tok, cfg, batch_size=2, progress=False)  # warm-up
    stats = RolloutStats()
    sync(); t = time.perf_counter()
    trajs = run_rollouts(questions, gen, retriever, tok, cfg, batch_size=args.batch, stats=stats, progress=False)
    sync(); loop_s = time.perf_counter() - t
    loop_tps = stats.generated_tokens / loop_s
    print(json.dumps({**base, "mode": "loop", "generated_tokens": stats.generated_tokens, "seconds": round(loop_s, 2),
                      "tokens_per_s": round(loop_tps, 1), "retrieval_seconds": round(stats.retrieval_seconds, 3),
                      "rounds": stats.rounds,
                      "searches_per_question": sum(x.num_searches for x in trajs) / len(trajs)}), flush=True)

    # raw: the same number of new tokens per row, one batch at a time, no stop strings
    per_row = max(1, round(stats.generated_tokens / len(questions)))
    from searchrl.rollout.prompts import build_prompt

    prompts = [build_prompt(tok, q.question) for q in questions]
    sync(); t = time.perf_counter()
    produced = 0
    for i in range(0, len(prompts), args.batch):
        outs = gen.generate(prompts[i : i + args.batch], SamplingParams(max_new_tokens=per_row, temperature=1.0, seed=1),
                            stop=None)
        produced += sum(len(o.token_ids) for o in outs)
    sync(); raw_s = time.perf_counter() - t
    raw_tps = produced / raw_s
    print(json.dumps({**base, "mode": "raw", "generated_tokens": produced, "tokens_per_row": per_row,
                      "seconds": round(raw_s, 2), "tokens_per_s": round(raw_tps, 1),
                      "loop_over_raw": round(loop_tps / raw_tps, 3)}), flush=True)

    if not args.skip_original:
        orig = CutAfterwards(gen, tok)
        stats_o = RolloutStats()
        sync(); t = time.perf_counter()
        run_rollouts(questions, orig, retriever, tok, cfg, batch_size=args.batch, stats=stats_o, progress=False)
        sync(); o_s = time.perf_counter() - t
        print(json.dumps({**base, "mode": "original", "kept_tokens": orig.kept, "seconds": round(o_s, 2),
                          "kept_tokens_per_s": round(orig.kept / o_s, 1),
                          "loop_speedup": round(o_s / loop_s, 2)}), flush=True)


if __name__ == "__main__":
    main()
