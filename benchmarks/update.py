"""Cost of the RL update alone, on fixed trajectories: tokens/s and peak memory of prepare + update.

Two workloads, each printed as one JSON line:

- ``default``: the embedded default's model (SmolLM2-135M-Instruct, bf16 autocast where native)
  on the default step's shape: 32 multi-turn search trajectories (of 32 questions, taken as 8
  GRPO groups of 4 consecutive rows) made by the scripted demonstrations of the synthetic world (real prompts, real ``<information>``
  blocks, real loss masks), GRPO with the default config. ``update_tokens_per_s`` counts sampled
  (loss-mask) tokens over the time of ``prepare`` + ``update``, best of ``--repeats``. Rewards
  vary inside every group unless ``--uniform-groups K``: then K of the 8 groups got the same
  reward on all their samples, as many groups of a real step do (``inert_rows`` in a run's
  metrics counts their rows); a trainer that skips such rows does less work there.
- ``qwen0.5b``: a Qwen2.5-0.5B-shaped random model, fp32 weights, one update step over 2
  trajectories of ``--tokens`` tokens (micro-batch 2), a third of the response sampled tokens;
  ``peak_rss_mb`` is the process's peak resident memory minus its resident memory after the
  model was built (run each workload in its own process: ``--workload``).

Nothing here depends on a trained model: the trajectories are fixed, so two versions of the
trainer can be compared on exactly the same work (run the script against each checkout with
``PYTHONPATH=CHECKOUT/src``).

    OMP_NUM_THREADS=1 python benchmarks/update.py --workload default
    OMP_NUM_THREADS=2 python benchmarks/update.py --workload qwen0.5b --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trajectory(example, prompt, response, mask):
    from searchrl.types import Trajectory

    return Trajectory(example, prompt, response, mask, [0.0] * len(response))


def default_workload(repeats: int, uniform_groups: int = 0) -> dict:
    import torch

    from searchrl.config import apply_overrides
    from searchrl.training.config import TrainConfig
    from searchrl.training.models import build_models
    from searchrl.training.pipeline import load_data
    from searchrl.training.sft import demonstrations
    from searchrl.training.trainer import Trainer

    cfg = apply_overrides(TrainConfig(), [f"out={tempfile.mkdtemp(prefix='searchrl-upd-')}"])
    train, _, retriever = load_data(cfg)
    models = build_models(cfg.model, need_reference=cfg.algo.kl_coef > 0, need_critic=cfg.algo.needs_critic)
    n = cfg.prompts_per_step * cfg.algo.group_size
    demos = demonstrations(train, models.tokenizer, retriever, cfg.rollout, limit=n, seed=0)
    trajs = [_trajectory(d.example, d.prompt_ids, d.response_ids, d.loss_mask) for d in demos[:n]]
    trainer = Trainer(cfg, models, retriever, train)
    g = cfg.algo.group_size
    rewards = torch.tensor([0.0 if i // g < uniform_groups else float(i % 3 == 0)  # i % 3: varied in a group
                            for i in range(len(trajs))])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with models.autocast():
            prep = trainer.prepare(trajs, rewards)
            trainer.update(trajs, prep)
        best = min(best, time.perf_counter() - t0)
    sampled = sum(sum(t.loss_mask) for t in trajs)
    return {"workload": "default", "trajectories": len(trajs), "sampled_tokens": sampled,
            "response_tokens": sum(len(t.response_ids) for t in trajs), "seconds": round(best, 3),
            "update_tokens_per_s": round(sampled / best, 1),
            "uniform_groups": uniform_groups, "amp": str(models.amp).replace("torch.", "") if models.amp else "off"}


def qwen_workload(tokens: int) -> dict:
    import torch

    from searchrl.config import apply_overrides
    from searchrl.models import load_tokenizer
    from searchrl.training.config import TrainConfig
    from searchrl.training.models import build_models
    from searchrl.training.trainer import Trainer
    from searchrl.types import QAExample

    try:
        from searchrl.models import random_lm_from_config
    except ImportError:  # moved out of production loading
        from searchrl.testing import random_lm_from_config  # type: ignore[no-redef]

    tok = load_tokenizer()
    model = random_lm_from_config("qwen2.5-0.5b", dtype="float32", device="cpu")
    cfg = apply_overrides(TrainConfig(), [f"out={tempfile.mkdtemp(prefix='searchrl-upd-')}", "prompts_per_step=1",
                                          "algo.group_size=2", "mini_batch_size=2", "micro_batch_size=2",
                                          "model.amp=off"])
    models = build_models(cfg.model, need_reference=False, need_critic=False, model=model, tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    trajs = []
    for i in range(2):
        prompt = torch.randint(100, 20000, (tokens // 4,), generator=g).tolist()
        resp = torch.randint(100, 20000, (tokens - len(prompt),), generator=g).tolist()
        mask = [1 if (j // 40) % 3 == 0 else 0 for j in range(len(resp))]  # 40 sampled, 80 inserted, ...
        trajs.append(_trajectory(QAExample("q", "q", ["a"]), prompt, resp, mask))
    trainer = Trainer(cfg, models, None, [QAExample("q", "q", ["a"])])
    base = _rss_mb()
    t0 = time.perf_counter()
    prep = trainer.prepare(trajs, torch.tensor([1.0, 0.0]))
    trainer.update(trajs, prep)
    dt = time.perf_counter() - t0
    return {"workload": "qwen0.5b", "tokens_per_row": tokens, "rows": 2, "seconds": round(dt, 2),
            "peak_rss_mb": round(_peak_mb() - base, 1), "rss_after_build_mb": round(base, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("default", "qwen0.5b"), default="default")
    ap.add_argument("--repeats", type=int, default=3, help="default workload: best of N prepare+update")
    ap.add_argument("--tokens", type=int, default=1024, help="qwen0.5b workload: tokens per trajectory")
    ap.add_argument("--uniform-groups", type=int, default=0,
                    help="default workload: groups whose samples all get reward 0 (of 8)")
    ap.add_argument("--label", default="", help="a tag printed with the figures (e.g. the commit)")
    args = ap.parse_args()
    import torch

    row = (default_workload(args.repeats, args.uniform_groups) if args.workload == "default"
           else qwen_workload(args.tokens))
    row.update(label=args.label, threads=torch.get_num_threads(), load=round(os.getloadavg()[0], 2))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
