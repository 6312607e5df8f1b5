"""Where a warm-started model stands on the one decision RL has to learn: plan a second search or not.

    python experiments/plan_decision.py MODEL [MODEL ...] [--limit 120] [--seed 0]

MODEL: a model folder (a run's ``model/``) or a shared warm-start folder (``OUT/warmstart`` of
``searchrl train --seeds``: its ``policy.safetensors`` over the base model its ``config.yaml`` names).

The format warm-start's demonstrations (``warmstart.style=plan``) open with ``<think> I need to
find <what hop 1 looks up>`` and then either end the plan (``. That takes 1 search.``) or go on to
the next hop (``, then <what hop 2 looks up>. That takes 2 searches.``). For every held-out
question of the embedded default's world this feeds the prompt and that opening (hop 1's wording,
as the demonstrations write it) and reads the model's next-token probabilities: ``p_more`` =
P(",") / (P(",") + P(".")), the chance that a sampled plan goes on to a second hop. Printed per
model as one JSON line, by the question's hop count: the mean ``p_more``, how many questions have
it above one half (what greedy decoding plans), and the count; and ``rank``: the share of (1-hop,
2-hop) question pairs in which the 2-hop question has the higher ``p_more`` (ties count a half;
1.0 = every 2-hop question above every 1-hop one).

What it is for: RL can only learn which questions need a second search from groups whose samples
differ in that choice. A model with ``p_more`` near 0 on 2-hop questions gives RL nothing to
compare (every sample searches once and fails alike); one near 1 on 2-hop and near 0 on 1-hop
questions has little left to learn. It takes seconds per model, against minutes for an RL run.
``rank`` says how much of the decision is per question: GRPO at the embedded default's budget
mostly moves one bias shared by all questions (README, "The default over three seeds"), and a
shift of that bias raises 2-hop questions without taking 1-hop ones along only where the model
already ranks them apart.
The probe forces the demonstrations' wording of hop 1; a model that words its plan otherwise
decides elsewhere, so read it beside the evaluation's searches per question.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def rank(lower: list[float], higher: list[float]) -> float:
    """The share of pairs (a from ``lower``, b from ``higher``) with b > a, ties counting a half.

    >>> rank([0.1, 0.2], [0.3, 0.15])
    0.75
    """
    pairs = [(b > a) + 0.5 * (b == a) for a in lower for b in higher]
    return sum(pairs) / len(pairs)


def load(model_dir: str):
    """``(model, tokenizer)`` from a model folder or a shared warm-start folder (see the module doc)."""
    import yaml

    from searchrl.models import load_model
    from searchrl.training.models import load_base_weights
    from searchrl.training.pipeline import SHARED_KEY, SHARED_WEIGHTS

    folder = Path(model_dir)
    if (folder / "config.json").is_file():
        return load_model(model_dir)
    base = (yaml.safe_load((folder / SHARED_KEY).read_text()).get("model") or {}).get("name")
    model, tok = load_model(base)
    load_base_weights(model, folder / SHARED_WEIGHTS)
    return model, tok


def plan_decision(model_dir: str, questions: list, method: str = "search") -> dict:
    from searchrl.rollout.prompts import build_prompt
    from searchrl.training.sft import demo_turns, need_phrase

    model, tok = load(model_dir)
    comma, stop = tok.encode(",", add_special_tokens=False)[-1], tok.encode(".", add_special_tokens=False)[-1]
    by_hops: dict[int, list[float]] = {}
    for q in questions:
        hop = q.extra["hops"][0]
        first_turn, need = demo_turns(q)[0], need_phrase(hop["relation"], hop["entity"])
        opening = first_turn[: first_turn.index(need) + len(need)]  # the demonstration up to its decision
        ids = build_prompt(tok, q.question, method) + tok.encode(opening, add_special_tokens=False)
        with torch.no_grad():
            p = model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        by_hops.setdefault(len(q.extra["hops"]), []).append((p[comma] / (p[comma] + p[stop])).item())
    out = {"model": model_dir, "hops": {h: {"p_more": round(sum(v) / len(v), 3), "over_half": sum(x > 0.5 for x in v),
                                            "n": len(v)} for h, v in sorted(by_hops.items())}}  # fmt: skip
    if 1 in by_hops and 2 in by_hops:
        out["rank"] = round(rank(by_hops[1], by_hops[2]), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model folders (e.g. a run's model/) or shared warm-start folders (OUT/warmstart)")
    p.add_argument("--limit", type=int, default=120, help="held-out questions (data.eval_limit)")
    p.add_argument("--seed", type=int, default=0, help="the world's seed (data.world_seed)")
    args = p.parse_args(argv)
    from searchrl.config import apply_overrides
    from searchrl.training.config import TrainConfig
    from searchrl.training.pipeline import load_data

    from searchrl.training.pipeline import SHARED_KEY, SHARED_WEIGHTS

    missing = [m for m in args.models if not (Path(m) / "config.json").is_file()
               and not ((Path(m) / SHARED_WEIGHTS).is_file() and (Path(m) / SHARED_KEY).is_file())]
    if missing:
        print(f"error: neither a model folder (config.json) nor a shared warm-start folder (policy.safetensors "
              f"and config.yaml): {', '.join(missing)}", file=sys.stderr)
        return 1
    cfg = apply_overrides(TrainConfig(), [f"data.world_seed={args.seed}", f"data.eval_limit={args.limit}"])
    _, held_out, _ = load_data(cfg)  # the questions `searchrl train` evaluates on
    for m in args.models:
        print(json.dumps(plan_decision(m, held_out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
