"""Rollout throughput: the multi-turn search loop versus raw generation and the original's way.

Prints one JSON line per configuration and KV-reuse setting (generated tokens/s, wall seconds,
tokens); the rollout budgets default to the CPU training defaults (``CPU_ROLLOUT``: 2 search
turns, top-2, 64 new tokens a turn, 200-token observations, 1024-token context):

- ``loop``: ``run_rollouts`` over world questions (stop strings during sampling, refill), once
  per schedule (``--schedule``: continuous batching and/or rounds), with the
  generator's KV counters (prompt tokens run, reused from kept rows, shared within a call) and
  the model time split into prefill and decode steps (with the steps' mean batch size).
- ``raw``: the backend's plain ``generate`` over the same questions' first prompts, at the same
  batch size, of exactly ``tokens_per_row`` new tokens per row (the loop's generated tokens per
  trajectory, rounded; EOS ignored, no stop strings, no retrieval): the ceiling the loop is
  measured against (``loop_over_raw_<schedule>``). Same KV-reuse setting as the loop.
  ``ceiling_<schedule>`` estimates the ratio the loop would reach if its only cost beyond raw
  were its extra prefill time (inserted tokens and later turns, which raw generation never
  reads), assuming its decoding costs what raw's does (it can cost less: rows leave the batch):
  on a CPU, where a prefilled token costs a large fraction of a decoded one, it is what any
  schedule can hope for.
- ``original``: the loop with a generator that, like the original Search-R1, ignores stop strings,
  generates each turn's whole budget and cuts the text afterwards (tokens/s counts kept tokens).

    python benchmarks/rollout.py                          # default model (SmolLM2-135M), CPU
    python benchmarks/rollout.py --model /path/to/sft-model --kv-reuse on
    python benchmarks/rollout.py --random-config qwen2.5-3b --device cuda --batch 64

A random model rarely writes a stop string, so with ``--random-config`` the loop and the original
behave alike; the comparison that matters there is ``loop`` vs ``raw``. Set ``OMP_NUM_THREADS``
to pin the CPU threads (printed as ``threads``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

from searchrl.rollout.engine.protocol import Completion, SamplingParams  # noqa: E402
from searchrl.training.config import CPU_ROLLOUT  # noqa: E402


class ForwardTimer:
    """Splits generation time: prefill forwards (more than one new token a row) versus decode
    steps (one), with the decode steps' mean batch size. :meth:`attach` wraps the ``forward`` of
    the module a generator runs (the model, or its half-precision copy). Syncs CUDA per forward."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.reset()

    def attach(self, module) -> None:
        import functools
        import inspect

        if getattr(module.forward, "_timed", False):
            return
        inner = module.forward

        @functools.wraps(inner)  # keeps the signature: HFGenerator checks logits_to_keep
        def timed(*args, **kwargs):
            return self.call(inner, *args, **kwargs)

        timed._timed = True
        timed.__signature__ = inspect.signature(inner)
        module.forward = timed  # instance attribute: Module.__call__ goes through it

    def reset(self):
        self.prefill_s = self.decode_s = 0.0
        self.steps = self.step_rows = 0

    def call(self, inner, *args, **kwargs):
        import torch

        t = time.perf_counter()
        out = inner(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        b, n = kwargs["input_ids"].shape
        if n == 1:
            self.decode_s += time.perf_counter() - t
            self.steps, self.step_rows = self.steps + 1, self.step_rows + b
        else:
            self.prefill_s += time.perf_counter() - t
        return out

    def summary(self) -> dict:
        return {"prefill_seconds": round(self.prefill_s, 2), "decode_seconds": round(self.decode_s, 2),
                "decode_steps": self.steps, "mean_decode_batch": round(self.step_rows / max(1, self.steps), 1)}


class CutAfterwards:
    """The original's generation: whole budget every turn, stop strings applied after the fact."""

    def __init__(self, inner, tokenizer):
        self.inner, self.tokenizer = inner, tokenizer
        self.kept = 0

    def reset_cache(self):
        self.inner.reset_cache()

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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder / id (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--random-config", default=None, help="random weights of a known shape, e.g. qwen2.5-3b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on GPU by default")
    ap.add_argument("--batch", type=int, default=32, help="trajectories in flight / raw batch size")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=CPU_ROLLOUT["max_new_tokens_per_turn"], help="per-turn budget")
    ap.add_argument("--max-turns", type=int, default=CPU_ROLLOUT["max_turns"])
    ap.add_argument("--topk", type=int, default=CPU_ROLLOUT["topk"])
    ap.add_argument("--max-obs-tokens", type=int, default=CPU_ROLLOUT["max_obs_tokens"])
    ap.add_argument("--max-context", type=int, default=CPU_ROLLOUT["max_context_tokens"])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus of the sampled rollouts (the embedded default trains at 0.7)")
    ap.add_argument("--kv-reuse", choices=("on", "off", "both"), default="both")
    ap.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                    help="bf16 compute over fp32 weights, as the trainer's model.amp (auto: where native)")
    ap.add_argument("--amp-copy", choices=("on", "off"), default="on",
                    help="amp on a bf16 copy of the weights (on) or under autocast (off)")
    ap.add_argument("--schedule", choices=("continuous", "rounds", "both"), default="both",
                    help="the loop's schedule (rollout.schedule); 'both' runs the loop twice")
    ap.add_argument("--skip-original", action="store_true")
    return ap.parse_args()


def main() -> None:
    args = parse_args()

    import torch

    from searchrl.data.corpus import load_corpus
    from searchrl.data.qa import load_qa
    from searchrl.data.world import ensure_default_world
    from searchrl.models import amp_dtype, load_model, load_tokenizer
    from searchrl.testing import random_lm_from_config
    from searchrl.retrieval.bm25 import BM25Retriever
    from searchrl.rollout.engine.hf import HFGenerator
    from searchrl.rollout.engine.kv_cache import KVStats
    from searchrl.rollout.config import RolloutConfig
    from searchrl.rollout.loop import RolloutStats, run_rollouts
    from searchrl.rollout.prompts import build_prompt

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.random_config:
        tok = load_tokenizer()  # any real tokenizer works for speed; vocab follows the config
        model = random_lm_from_config(args.random_config, dtype=dtype, device=args.device)
        name = f"random-{args.random_config}"
    else:
        model, tok = load_model(args.model, dtype=dtype, device=args.device)
        name = args.model or "smollm2-135m-instruct"
    amp = amp_dtype(args.amp, args.device, dtype)
    world = ensure_default_world()
    questions = [q for q in load_qa(world / "questions.jsonl") if q.split == "test"][: args.questions]
    retriever = BM25Retriever.build(load_corpus(world / "corpus.jsonl"), show_progress=False)
    cfg = RolloutConfig(max_turns=args.max_turns, topk=args.topk, max_new_tokens_per_turn=args.max_new_tokens,
                        max_obs_tokens=args.max_obs_tokens, max_context_tokens=args.max_context,
                        temperature=args.temperature, top_p=args.top_p, seed=0)
    base = {"model": name, "device": args.device, "dtype": dtype,
            "amp": str(amp).replace("torch.", "") if amp else "off",
            "amp_copy": bool(amp) and args.amp_copy == "on", "batch": args.batch, "questions": len(questions),
            "max_turns": cfg.max_turns, "topk": cfg.topk, "max_new_tokens_per_turn": cfg.max_new_tokens_per_turn,
            "max_obs_tokens": cfg.max_obs_tokens, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    timer = ForwardTimer(args.device.startswith("cuda"))
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.kv_reuse]
    schedules = ["continuous", "rounds"] if args.schedule == "both" else [args.schedule]
    for reuse in settings:
        row = {**base, "kv_reuse": reuse}
        gen = HFGenerator(model, tok, kv_reuse=reuse, amp=amp, amp_copy=args.amp_copy == "on")
        loops = []  # (schedule, tokens/s, generated tokens)
        for schedule in schedules:
            cfg.schedule = schedule
            run_rollouts(questions[:2], gen, retriever, tok, cfg, batch_size=2, progress=False)  # warm-up
            timer.attach(gen.generation_model())
            gen.kv_stats = KVStats()  # count the measured run only
            stats = RolloutStats()
            timer.reset()
            sync(); t = time.perf_counter()
            trajs = run_rollouts(questions, gen, retriever, tok, cfg, batch_size=args.batch, stats=stats,
                                 progress=False)
            sync(); loop_s = time.perf_counter() - t
            loops.append((schedule, stats.generated_tokens / loop_s, stats.generated_tokens, timer.prefill_s))
            emit({**row, "mode": "loop", "schedule": schedule, "generated_tokens": stats.generated_tokens,
                  "seconds": round(loop_s, 2), "tokens_per_s": round(loops[-1][1], 1),
                  "generation_seconds": round(stats.generation_seconds, 2),
                  "retrieval_seconds": round(stats.retrieval_seconds, 3), "rounds": stats.rounds,
                  "generator_calls": stats.generator_calls, "inserted_tokens": stats.inserted_tokens,
                  "searches_per_question": round(sum(x.num_searches for x in trajs) / len(trajs), 3),
                  "longest_trajectory_tokens": max(sum(x.loss_mask) for x in trajs),
                  **vars(gen.kv_stats), **timer.summary()})

        # raw: the loop's new tokens per trajectory, every row exactly that many (EOS ignored)
        per_row = max(1, round(loops[0][2] / len(questions)))
        raw = HFGenerator(model, tok, eos_token_ids=[], kv_reuse=reuse, amp=amp,
                          amp_copy=args.amp_copy == "on")
        prompts = [build_prompt(tok, q.question) for q in questions]
        sampling = SamplingParams(max_new_tokens=per_row, temperature=cfg.temperature, top_p=cfg.top_p, seed=1)
        raw.generate(prompts[:2], SamplingParams(max_new_tokens=2, temperature=cfg.temperature, seed=1))  # warm-up
        raw.reset_cache()
        timer.attach(raw.generation_model())
        timer.reset()
        sync(); t = time.perf_counter()
        produced = 0
        for i in range(0, len(prompts), args.batch):
            produced += sum(len(o.token_ids) for o in raw.generate(prompts[i : i + args.batch], sampling))
        sync(); raw_s = time.perf_counter() - t
        raw_tps = produced / raw_s
        # the ratio a loop would reach if its only cost beyond raw generation were the prefill of
        # what raw generation never reads (inserted tokens, later turns): an estimated ceiling
        ceiling = {f"ceiling_{name}": round(raw_s / (raw_s + max(0.0, pre - timer.prefill_s)), 3)
                   for name, _, _, pre in loops}
        emit({**row, "mode": "raw", "generated_tokens": produced, "tokens_per_row": per_row,
              "seconds": round(raw_s, 2), "tokens_per_s": round(raw_tps, 1),
              **{f"loop_over_raw_{name}": round(tps / raw_tps, 3) for name, tps, _, _ in loops}, **ceiling,
              **timer.summary()})

        if not args.skip_original:
            cfg.schedule = "rounds"  # the original's schedule (a generate call per round)
            orig = CutAfterwards(gen, tok)
            stats_o = RolloutStats()
            sync(); t = time.perf_counter()
            run_rollouts(questions, orig, retriever, tok, cfg, batch_size=args.batch, stats=stats_o, progress=False)
            sync(); o_s = time.perf_counter() - t
            emit({**row, "mode": "original", "kept_tokens": orig.kept,
                  "seconds": round(o_s, 2), "kept_tokens_per_s": round(orig.kept / o_s, 1),
                  "kept_over_raw": round(orig.kept / o_s / raw_tps, 3),
                  **{f"loop_speedup_{name}": round(tps / (orig.kept / o_s), 2) for name, tps, _, _ in loops}})


if __name__ == "__main__":
    main()
