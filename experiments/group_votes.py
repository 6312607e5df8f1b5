"""Which way GRPO's groups push the number of searches, from sampled rollouts of a model.

    python experiments/group_votes.py MODEL [--questions 32] [--samples 4] [--seed 0] [KEY=VALUE ...]

Draws ``--questions`` training questions of the embedded default's world, half 1-hop and half
2-hop, rolls each out ``--samples`` times with the training rollout settings (``rollout.*``; the
KEY=VALUE overrides are `searchrl train`'s, e.g. ``rollout.top_p=0.7``) and scores them with the
training reward (``algo.reward``). Prints one JSON line: per hop count, the mean reward of the
samples by their number of searches, and how the groups vote. A group's vote is the sign of
``sum((r_i - mean r) * searches_i)`` over its samples: with group-normalised advantages, positive
means its update makes more searches likelier, negative fewer; ``inert`` groups have one reward
for all samples (no advantage), ``other`` groups have rewards that differ among samples with the
same number of searches only (a contrast, but not about searching).

What it is for: the model's plan ("That takes N searches") behaves like one bias shared by all
questions, so its drift under RL follows the sum of these votes. Greedy evaluation can show a
model that chains two searches well while its sampled chains rarely pay; this shows what RL
sees, in a couple of minutes per setting.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path


def vote(samples: list[tuple[int, float]]) -> str:
    """``more``, ``fewer``, ``inert`` or ``other`` for one group's (searches, reward) samples.

    >>> vote([(1, 1.0), (2, 0.0), (1, 1.0), (2, 0.0)])
    'fewer'
    >>> vote([(1, 0.0), (2, 1.0), (1, 0.0), (1, 0.0)])
    'more'
    >>> vote([(1, 0.0), (2, 0.0)]), vote([(1, 1.0), (1, 0.0)])
    ('inert', 'other')
    """
    rewards = [r for _, r in samples]
    mean = sum(rewards) / len(rewards)
    if max(rewards) == min(rewards):
        return "inert"
    push = sum((r - mean) * s for s, r in samples)
    return "more" if push > 1e-9 else "fewer" if push < -1e-9 else "other"


def group_votes(model_dir: str, questions: list, retriever, cfg, samples: int) -> dict:
    from searchrl.models import amp_dtype, load_model
    from searchrl.rewards import RewardConfig, compute_reward
    from searchrl.rollout.engine.hf import HFGenerator
    from searchrl.rollout.loop import run_rollouts

    model, tok = load_model(model_dir)  # fp32 weights and the trainer's precision settings, as RL generates
    gen = HFGenerator(model, tok, amp=amp_dtype(cfg.model.amp, "cpu"), amp_copy=cfg.model.amp_copy)
    trajs = run_rollouts(questions, gen, retriever, tok, cfg.rollout, n_samples=samples,
                         batch_size=cfg.rollout_batch_size, method=cfg.method, progress=False)
    reward_cfg = RewardConfig(kind=cfg.algo.reward)
    by_searches: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    groups: dict[tuple[int, str], list[tuple[int, float]]] = defaultdict(list)  # (hops, question id)
    for t in trajs:
        r = compute_reward(t, t.example, reward_cfg)
        hops = len(t.example.extra["hops"])
        by_searches[hops][t.num_searches].append(r)
        groups[(hops, t.example.id)].append((t.num_searches, r))
    votes: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(("fewer", "more", "inert", "other"), 0))
    for (hops, _), g in groups.items():
        votes[hops][vote(g)] += 1
    return {"model": model_dir,
            "reward_by_searches": {h: {s: {"n": len(v), "reward": round(sum(v) / len(v), 3)} for s, v in sorted(d.items())}
                                   for h, d in sorted(by_searches.items())},
            "votes": {h: votes[h] for h in sorted(votes)}}  # fmt: skip


def draw(train: list, n: int, seed: int) -> list:
    """``n`` training questions, half 1-hop and half 2-hop (seeded)."""
    rng = random.Random(seed)
    picked = []
    for hops in (1, 2):
        pool = [q for q in train if len(q.extra.get("hops") or []) == hops]
        picked += rng.sample(pool, min(len(pool), n // 2))
    return picked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model folder (e.g. a run's model/)")
    p.add_argument("--questions", type=int, default=32, help="training questions, half of each hop count")
    p.add_argument("--samples", type=int, default=4, help="rollouts per question (algo.group_size)")
    p.add_argument("--seed", type=int, default=0, help="which questions are drawn")
    p.add_argument("overrides", nargs="*", help="searchrl train overrides (KEY=VALUE)")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    from searchrl.config import apply_overrides
    from searchrl.errors import SearchRLError
    from searchrl.training.config import TrainConfig
    from searchrl.training.pipeline import load_data

    if not (Path(args.model) / "config.json").is_file():
        print(f"error: not a model folder (no config.json): {args.model}", file=sys.stderr)
        return 1
    try:
        cfg = apply_overrides(TrainConfig(), args.overrides)
    except SearchRLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    train, _, retriever = load_data(cfg)
    questions = draw(train, args.questions, args.seed)
    if not questions:
        print("error: the training data has no questions with hop chains (the synthetic world's)", file=sys.stderr)
        return 1
    print(json.dumps(group_votes(args.model, questions, retriever, cfg, args.samples)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
