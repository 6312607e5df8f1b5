"""RL step cost: time and peak memory per step, split into rollout / retrieval / update.

Prints one JSON line per measured step (after one warm-up step) with the trainer's own timings:
``time_rollout`` (generation + retrieval), ``time_retrieval``, ``time_prepare`` (reference
log-probs, values, advantages), ``time_update`` and tokens/s of the update (sampled tokens).

    python benchmarks/train.py                                   # the CPU default (SmolLM2-135M, GRPO)
    python benchmarks/train.py model.lora_r=16                    # LoRA
    python benchmarks/train.py --random-config qwen2.5-3b model.device=cuda model.amp=bf16    # fp32 master weights

    python benchmarks/train.py --nproc 2                          # 2 ranks under torchrun (FSDP2; gloo on CPU)

Extra arguments are the same dotted overrides as ``searchrl train``. With ``--nproc N`` every rank
prints its own line (``rank``, its own ``rank_peak_memory_mb``; the timings are the step's, the
same on every rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--random-config", default=None, help="random weights of a known shape, e.g. qwen2.5-3b")
    ap.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up step)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (launches torchrun on this machine)")
    args = ap.parse_args()
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        import subprocess

        argv = [a for a in sys.argv[1:] if not a.startswith("--nproc")]
        if "--nproc" in sys.argv:
            i = sys.argv.index("--nproc")
            argv = sys.argv[1:i] + sys.argv[i + 2:]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        sys.exit(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc-per-node={args.nproc}", __file__, *argv], env=env).returncode)

    import torch

    from searchrl.config import apply_overrides
    from searchrl.models import load_tokenizer
    from searchrl.testing import random_lm_from_config
    from searchrl.training.config import TrainConfig
    from searchrl.models import resolve_device
    from searchrl.training.distributed import init_from_env
    from searchrl.training.models import build_models
    from searchrl.training.monitor import peak_memory_mb
    from searchrl.training.pipeline import load_data
    from searchrl.training.trainer import Trainer

    out = tempfile.mkdtemp(prefix="searchrl-bench-")
    cfg = apply_overrides(TrainConfig(), [f"out={out}", f"steps={args.steps + 1}", *args.overrides])
    train, _, retriever = load_data(cfg)
    model = tok = None
    if args.random_config:
        tok = load_tokenizer()
        dev = cfg.model.device if cfg.model.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model = random_lm_from_config(args.random_config, dtype=cfg.model.dtype, device=dev)
    dist = init_from_env(resolve_device(cfg.model.device), cfg.parallel.timeout_s)
    models = build_models(cfg.model, need_reference=cfg.algo.kl_coef > 0, need_critic=cfg.algo.needs_critic,
                          model=model, tokenizer=tok, dist=dist, parallel=cfg.parallel)
    trainer = Trainer(cfg, models, retriever, train)
    keys = ("time_rollout", "time_retrieval", "time_prepare", "time_update", "time_step", "update_tokens_per_s",
            "peak_memory_mb", "sampled_tokens", "response_length", "searches_per_traj")
    for i in range(args.steps + 1):
        m = trainer.step()
        if i == 0:
            continue  # warm-up (allocator, kernels, caches)
        print(json.dumps({"model": args.random_config or cfg.model.name or "smollm2-135m-instruct",
                          "lora_r": cfg.model.lora_r, "estimator": cfg.algo.estimator, "device": str(models.device),
                          "dtype": cfg.model.dtype, "amp": str(models.amp).replace("torch.", "") if models.amp else "off",
                          "trajectories": cfg.trajectories_per_step,
                          "micro_batch": cfg.micro_batch_size, "threads": torch.get_num_threads(),
                          "load": round(os.getloadavg()[0], 2), "step": m["step"],
                          "world": dist.world, "rank": dist.rank, "rank_peak_memory_mb": round(peak_memory_mb(), 1),
                          **{k: round(m[k], 3) if isinstance(m[k], float) else m[k] for k in keys}}), flush=True)


if __name__ == "__main__":
    main()
