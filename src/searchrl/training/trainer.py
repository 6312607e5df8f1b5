"""The RL trainer: one step = rollouts -> rewards -> log-probs/values -> advantages -> PPO update.

``Trainer.step()`` runs each stage as its own method so each can be read, tested and timed:

1. ``rollout``: the multi-turn search loop over ``prompts_per_step`` questions, ``group_size``
   samples each (the HF generator shares the policy's weights, so nothing needs syncing; a separate
   engine such as vLLM gets ``sync_weights``).
2. ``score``: outcome rewards from the response only (EM by default).
3. ``prepare``: old log-probs, reference log-probs, critic values (no grad, micro-batched) and
   advantages/returns, all ``[N, R]`` over response tokens. One ``mask`` (the loss mask, or the
   response mask for the no-masking ablation) drives KL, advantages, every loss and the metrics.
4. ``update``: ``ppo_epochs`` passes over shuffled mini-batches, each split into micro-batches
   whose losses use the mini-batch's token (or row) count as denominator, so any micro-batch size
   gives the same gradient.

Left out: multi-GPU data parallelism (launch with torchrun/accelerate, see README) and
asynchronous off-policy rollouts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from searchrl.algos.advantages import apply_kl_penalty, compute_advantages, masked_mean, place_outcome_reward
from searchrl.algos.losses import aggregate, kl_loss, kl_penalty, policy_loss, value_loss
from searchrl.rewards import RewardConfig, compute_reward, exact_match
from searchrl.rollout.loop import RolloutStats, run_rollouts
from searchrl.training.batch import TokenBatch, collate, micro_batches, response_logprobs
from searchrl.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_rng_state
from searchrl.training.config import TrainConfig
from searchrl.training.models import ModelBundle
from searchrl.training.monitor import MetricsLogger, peak_memory_mb
from searchrl.types import QAExample, Trajectory

log = logging.getLogger(__name__)


class DataSampler:
    """Epoch-wise seeded permutations of the training set; its position is checkpointed."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            perm = self._perm()
            take = perm[self.pos : self.pos + (k - len(out))].tolist()
            out.extend(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]


@dataclasses.dataclass
class Prepared:
    """Per-step training data, ``[N, R]`` over response tokens (R = the step's longest response)."""

    mask: torch.Tensor
    old_logprobs: torch.Tensor | None  # None: one on-policy pass, the update's own log-probs are "old"
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor
    rewards: torch.Tensor  # [N]


def _warmup_lambda(warmup: int) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


class Trainer:
    def __init__(self, cfg: TrainConfig, models: ModelBundle, retriever: Any,
                 train_examples: list[QAExample], generator: Any = None,
                 sync_weights: Callable[[torch.nn.Module], None] | None = None):
        self.cfg, self.models, self.retriever = cfg, models, retriever
        self.tokenizer = models.tokenizer
        self.train_examples = train_examples
        self.generator = generator or models.generator()
        self.sync_weights = sync_weights
        self.run_dir = Path(cfg.out)
        self.sampler = DataSampler(len(train_examples), cfg.seed)
        oc = cfg.optim
        self.optimizer = torch.optim.AdamW(models.trainable_parameters(), lr=oc.lr, betas=tuple(oc.betas),
                                           weight_decay=oc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_lambda(oc.warmup_steps))
        self.critic_optimizer = self.critic_scheduler = None
        if models.critic is not None:
            self.critic_optimizer = torch.optim.AdamW(models.critic.parameters(), lr=oc.critic_lr,
                                                      betas=tuple(oc.betas), weight_decay=oc.weight_decay)
            self.critic_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.critic_optimizer, _warmup_lambda(oc.critic_warmup_steps))
        self.reward_cfg = RewardConfig(kind=cfg.algo.reward)
        self.step_idx = 0
        self.logger = MetricsLogger(self.run_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # ------------------------------------------------------------------ stages
    def rollout(self, examples: list[QAExample], stats: RolloutStats) -> list[Trajectory]:
        rcfg = dataclasses.replace(self.cfg.rollout, seed=self.cfg.seed * 1_000_003 + self.step_idx * 7_919)
        trajs = run_rollouts(examples, self.generator, self.retriever, self.tokenizer, rcfg,
                             n_samples=self.cfg.algo.group_size, batch_size=self.cfg.rollout_batch_size,
                             method=self.cfg.method, stats=stats, progress=False)
        if len(trajs) != len(examples) * self.cfg.algo.group_size:
            raise RuntimeError("rollout returned an unexpected number of trajectories")
        return trajs

    def score(self, trajs: list[Trajectory]) -> torch.Tensor:
        for t in trajs:
            t.reward = compute_reward(t, t.example, self.reward_cfg)
        return torch.tensor([t.reward for t in trajs], dtype=torch.float32)  # [N]

    def _loss_mask(self, batch: TokenBatch) -> torch.Tensor:
        return batch.loss_mask if self.cfg.algo.mask_retrieved else batch.response_mask

    @torch.no_grad()
    def prepare(self, trajs: list[Trajectory], rewards: torch.Tensor) -> Prepared:
        full = collate(trajs, self.pad_id)
        N, R = full.response_ids.shape
        mask = self._loss_mask(full)  # [N, R]
        a = self.cfg.algo
        ref = torch.zeros(N, R) if self.models.has_reference and a.kl_coef > 0 else None
        # With one epoch over one mini-batch the policy has not moved when the loss is computed, so
        # the old log-probs equal the update's own (detached): skip a full forward pass.
        on_policy = self.cfg.ppo_epochs == 1 and self.cfg.mini_batch_size >= N and not (ref is not None and a.kl_in_reward)
        old = None if on_policy else torch.zeros(N, R)
        values = torch.zeros(N, R) if self.models.critic is not None else None
        dev = self.models.device
        for rows in micro_batches(list(range(N)), self.cfg.micro_batch_size):
            b = collate([trajs[i] for i in rows], self.pad_id).to(dev)
            r = b.response_ids.shape[1]
            if old is not None:
                old[rows, :r] = response_logprobs(self.models.policy, b)[0].cpu()
            if ref is not None:
                with self.models.reference_mode() as ref_model:
                    ref[rows, :r] = response_logprobs(ref_model, b)[0].cpu()
            if values is not None:
                values[rows, :r] = self.models.critic(b).float().cpu()
        options: dict[str, Any] = {}
        if a.estimator == "grpo":
            options["norm_by_std"] = a.norm_by_std
        if a.estimator == "gae":
            options.update(gamma=a.gamma, lam=a.lam)
        if a.estimator in ("reinforce++", "reinforce_plus_plus"):
            options["gamma"] = a.gamma
        signal: dict[str, torch.Tensor] = {"rewards": rewards}  # placed on the last sampled token as needed
        if ref is not None and a.kl_in_reward:
            kl = kl_penalty(old, ref, a.kl_estimator)  # [N, R]
            signal = {"token_rewards": apply_kl_penalty(place_outcome_reward(rewards, mask), kl, a.kl_coef, mask)}
        groups = [i // a.group_size for i in range(N)]  # rollouts come ordered by example, then sample
        adv, ret = compute_advantages(a.estimator, mask=mask, values=values, group_ids=groups, **signal, **options)
        return Prepared(mask, old, ref, values, adv, ret, rewards)

    def _normalizer(self, mask: torch.Tensor) -> float:
        if self.cfg.algo.loss_agg == "token-mean":
            return float(mask.sum().clamp(min=1.0))
        return float((mask.sum(dim=1) > 0).sum().clamp(min=1))

    def update(self, trajs: list[Trajectory], prep: Prepared) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.algo
        policy, critic = self.models.policy, self.models.critic
        policy.train()
        N = len(trajs)
        sums: dict[str, float] = {}
        n_updates = 0
        dev = self.models.device
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_idx * 101 + epoch)
            order = torch.randperm(N, generator=g).tolist()
            for mini in micro_batches(order, cfg.mini_batch_size):
                norm = self._normalizer(prep.mask[mini])
                stats = self._accumulate(trajs, prep, mini, norm, dev)
                gn = self._optimizer_step()
                stats["grad_norm"] = gn
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_updates += 1
        self.scheduler.step()
        if self.critic_scheduler is not None:
            self.critic_scheduler.step()
        if self.sync_weights is not None:
            self.sync_weights(policy)
        return {k: v / max(n_updates, 1) for k, v in sums.items()}

    def _accumulate(self, trajs, prep: Prepared, mini: list[int], norm: float, dev) -> dict[str, float]:
        """Forward/backward over the micro-batches of one mini-batch; returns mini-batch metrics."""
        cfg, a = self.cfg, self.cfg.algo
        out: dict[str, float] = {}
        for rows in micro_batches(mini, cfg.micro_batch_size):
            b = collate([trajs[i] for i in rows], self.pad_id).to(dev)
            r = b.response_ids.shape[1]
            m = prep.mask[rows, :r].to(dev)
            w = float(m.sum()) / max(float(prep.mask[mini].sum()), 1.0)  # share of the mini-batch's tokens
            logp, ent = response_logprobs(self.models.policy, b, with_entropy=True, entropy_grad=a.entropy_coef > 0)
            old = logp.detach() if prep.old_logprobs is None else prep.old_logprobs[rows, :r].to(dev)
            pl, pm = policy_loss(logp, old, prep.advantages[rows, :r].to(dev), m,
                                 clip_eps=a.clip_eps, clip_eps_high=a.clip_eps_high, dual_clip=a.dual_clip,
                                 agg=a.loss_agg, normalizer=norm)
            loss = pl
            stats = {"pg_loss": pl.item(), **pm, "entropy": masked_mean(ent.detach(), m).item()}
            if prep.ref_logprobs is not None:
                ref = prep.ref_logprobs[rows, :r].to(dev)
                kl = kl_loss(logp, ref, m, a.kl_estimator, a.loss_agg, normalizer=norm)
                stats["kl"] = masked_mean(kl_penalty(logp.detach(), ref, a.kl_estimator), m).item()
                if not a.kl_in_reward:
                    loss = loss + a.kl_coef * kl
            if a.entropy_coef > 0:
                loss = loss - a.entropy_coef * aggregate(ent, m.bool(), a.loss_agg, norm)
            loss.backward()
            if self.models.critic is not None:
                v = self.models.critic(b)
                vl, vm = value_loss(v, prep.values[rows, :r].to(dev), prep.returns[rows, :r].to(dev), m,
                                    clip=a.value_clip, agg=a.loss_agg, normalizer=norm)
                (a.vf_coef * vl).backward()
                stats.update(value_loss=vl.item(), **vm)
            for k, val in stats.items():  # pg_loss/value_loss are already shares of the total
                share = 1.0 if k in ("pg_loss", "value_loss") else w
                out[k] = out.get(k, 0.0) + share * float(val)
        return out

    def _optimizer_step(self) -> float:
        clip = self.cfg.optim.grad_clip
        params = self.models.trainable_parameters()
        gn = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if torch.isfinite(gn):
            self.optimizer.step()
        else:
            log.warning("step %d: non-finite gradient norm, update skipped", self.step_idx)
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            cparams = list(self.models.critic.parameters())
            torch.nn.utils.clip_grad_norm_(cparams, clip if clip > 0 else float("inf"))
            self.critic_optimizer.step()
            self.critic_optimizer.zero_grad(set_to_none=True)
        return float(gn)

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        examples = [self.train_examples[i] for i in self.sampler.next(self.cfg.prompts_per_step)]
        stats = RolloutStats()
        trajs = self.rollout(examples, stats)
        t1 = time.perf_counter()
        rewards = self.score(trajs)
        with self.models.autocast():
            prep = self.prepare(trajs, rewards)
            t2 = time.perf_counter()
            upd = self.update(trajs, prep)
        t3 = time.perf_counter()
        self.step_idx += 1
        sampled = int(prep.mask.sum())
        metrics = {
            "step": self.step_idx,
            "reward": float(rewards.mean()),
            "em": float(np.mean([exact_match(t.answer, t.example.golden_answers) for t in trajs])),
            "searches_per_traj": float(np.mean([t.num_searches for t in trajs])),
            "valid_action_rate": float(np.mean([t.num_valid_actions / max(len(t.turns), 1) for t in trajs])),
            "response_length": float(np.mean([len(t.response_ids) for t in trajs])),
            "sampled_tokens": sampled,
            "lr": self.scheduler.get_last_lr()[0],
            "time_rollout": t1 - t0,
            "time_retrieval": float(getattr(stats, "retrieval_seconds", 0.0)),
            "time_prepare": t2 - t1,
            "time_update": t3 - t2,
            "time_step": t3 - t0,
            "update_tokens_per_s": sampled * self.cfg.ppo_epochs / max(t3 - t2, 1e-9),
            "peak_memory_mb": peak_memory_mb(),
            **upd,
        }
        self.last_trajectories = trajs
        self.logger.log(metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        s = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
             "sampler": self.sampler.state_dict(), "step": self.step_idx}
        if self.critic_optimizer is not None:
            s["critic_optimizer"] = self.critic_optimizer.state_dict()
            s["critic_scheduler"] = self.critic_scheduler.state_dict()
        return s

    def save(self) -> Path:
        path = save_checkpoint(self.run_dir, self.step_idx, self.models.policy, self.models.critic,
                               self.state_dict(), keep=self.cfg.keep_checkpoints)
        log.info("checkpoint written: %s", path)
        return path

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in the run directory, if any."""
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            return False
        if self.models.reference is not None and ckpts[0].name == "step-000000":
            load_checkpoint(ckpts[0], self.models.reference, None)  # the model RL started from
        s = load_checkpoint(ckpts[-1], self.models.policy, self.models.critic)
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(s["critic_optimizer"])
            self.critic_scheduler.load_state_dict(s["critic_scheduler"])
        self.sampler.load_state_dict(s["sampler"])
        self.step_idx = s["step"]
        set_rng_state(s["rng"])
        self.logger.truncate_after(self.step_idx)
        if self.sync_weights is not None:
            self.sync_weights(self.models.policy)
        log.info("resumed from %s (step %d)", ckpts[-1], self.step_idx)
        return True

    def fit(self, on_step: Callable[[dict[str, float]], None] | None = None) -> None:
        """Run until ``cfg.steps``, checkpointing every ``save_every`` steps and at the end."""
        while self.step_idx < self.cfg.steps:
            metrics = self.step()
            if not math.isfinite(metrics["reward"]):
                raise RuntimeError("non-finite reward")
            if on_step is not None:
                on_step(metrics)
            if self.step_idx % self.cfg.save_every == 0 or self.step_idx == self.cfg.steps:
                self.save()
