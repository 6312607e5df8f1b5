"""One RL update on fixed trajectories, on one process or under torchrun; rank 0 saves the weights.

Run by tests/test_distributed.py: ``python tests/dist_worker.py OUT STRATEGY ESTIMATOR`` (one
process) or the same under ``python -m torch.distributed.run --nproc-per-node 2`` (two ranks, gloo).
Each rank updates on its share of the same 8 trajectories; with the loss normalisers and batch
statistics summed over ranks, the weights must match the one-process run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(out: Path, strategy: str, estimator: str) -> None:
    from safetensors.torch import save_file

    from searchrl.config import apply_overrides
    from searchrl.models import load_tokenizer
    from searchrl.testing import tiny_random_lm
    from searchrl.training.config import TrainConfig
    from searchrl.training.distributed import full_parameters, init_from_env
    from searchrl.training.models import build_models
    from searchrl.training.trainer import Trainer
    from searchrl.types import QAExample, Trajectory

    tok = load_tokenizer()
    group = 1 if estimator == "gae" else 2
    cfg = apply_overrides(TrainConfig(), [
        f"out={out / 'run'}", "model.amp=off", "model.device=cpu", f"parallel.strategy={strategy}",
        f"algo.estimator={estimator}", f"algo.group_size={group}", f"prompts_per_step={8 // group}",
        "mini_batch_size=8", "micro_batch_size=2", "ppo_epochs=2", "algo.kl_coef=0.01", "optim.lr=1e-3"])
    dist = init_from_env(torch.device("cpu"))
    model = tiny_random_lm(tok, seed=0)
    models = build_models(cfg.model, need_reference=True, need_critic=cfg.algo.needs_critic, model=model,
                          tokenizer=tok, dist=dist, parallel=cfg.parallel)
    trainer = Trainer(cfg, models, None, [QAExample("q", "q", ["a"])])
    g = torch.Generator().manual_seed(0)
    trajs = []
    for i in range(8):
        a = torch.randint(100, 1000, (3 + i % 4,), generator=g).tolist()
        ins = tok.encode("\n<information>doc</information>\n", add_special_tokens=False)
        b = torch.randint(100, 1000, (2 + i % 3,), generator=g).tolist()
        prompt = tok.encode(f"Question {i // group}?", add_special_tokens=False)
        trajs.append(Trajectory(QAExample(f"q{i // group}", "q", ["x"]), prompt, a + ins + b,
                                [1] * len(a) + [0] * len(ins) + [1] * len(b), [0.0] * (len(a) + len(ins) + len(b)),
                                sample_index=i % group))
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25])
    mine = dist.share(list(range(8)))
    local = [trajs[i] for i in mine]
    prep = trainer.prepare(local, rewards[mine])
    metrics = trainer.update(local, prep)
    weights = {n: t.cpu().contiguous() for n, t in full_parameters(models.policy)}
    if models.critic is not None:
        weights.update({f"critic.{n}": t.cpu().contiguous() for n, t in full_parameters(models.critic)})
    if dist.main:
        save_file(weights, str(out / "weights.safetensors"))
        (out / "grad_norm.txt").write_text(repr(metrics["grad_norm"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
