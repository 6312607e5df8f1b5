"""The RL trainer: one step = rollouts -> rewards -> log-probs/values -> advantages -> PPO update.

``Trainer.step()`` runs each stage as its own method so each can be read, tested and timed:

1. ``rollout``: the multi-turn search loop over ``prompts_per_step`` questions (this rank's share
   of them), ``group_size`` samples each (the HF generator shares the policy's weights, so
   nothing needs syncing; a separate engine such as vLLM gets ``sync_weights``; under FSDP the
   generation copy is refreshed from the shards at the start of each step).
2. ``score``: outcome rewards from the response only (EM by default).
3. ``prepare``: old log-probs, reference log-probs, critic values (no grad, micro-batched) and
   advantages/returns, all ``[N, R]`` over response tokens. One ``mask`` (the loss mask, or the
   response mask for the no-masking ablation) drives KL, advantages, every loss and the metrics.
4. ``update``: ``ppo_epochs`` passes over shuffled mini-batches, each split into micro-batches
   whose losses use the mini-batch's token (or row) count over every rank as denominator, so any
   micro-batch size and any world size give the same gradient (:mod:`searchrl.training.distributed`).

Every forward pass of RL runs without dropout and at the rollout temperature; the old log-probs
are computed on the update's own micro-batches, so the PPO ratio is exactly 1 before the first
optimizer step. Left out: asynchronous off-policy rollouts.
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

from searchrl.algos.advantages import apply_kl_penalty, compute_advantages, place_outcome_reward
from searchrl.algos.common import masked_mean
from searchrl.algos.losses import aggregate, kl_loss, kl_penalty, policy_loss, value_loss
from searchrl.errors import SearchRLError
from searchrl.rewards import RewardConfig, compute_reward, exact_match
from searchrl.rollout.loop import RolloutStats, run_rollouts
from searchrl.training.batch import TokenBatch, collate, micro_batches, response_logprobs
from searchrl.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_rng_state
from searchrl.training.config import TrainConfig
from searchrl.training.data_sampler import DataSampler
from searchrl.training.distributed import (GatheredWeights, all_reduce_grads, clip_grad_norm, full_optimizer_state,
                                           is_sharded, load_full_optimizer_state, load_full_weights)
from searchrl.training.models import ModelBundle, disable_dropout
from searchrl.training.monitor import MetricsLogger, peak_memory_mb
from searchrl.types import QAExample, Trajectory

log = logging.getLogger(__name__)


class _Silent:
    """The metrics logger of ranks other than 0: they compute metrics, rank 0 writes them."""

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


class NonFiniteError(SearchRLError):
    """Too many optimizer steps in a row were skipped for a non-finite loss or gradient."""


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
    sampler_logprobs: torch.Tensor | None = None  # what the generator reported, 0 on inserted tokens
    sampled_mask: torch.Tensor | None = None  # 1 on sampled tokens (the loss mask)
    inert: torch.Tensor | None = None  # [N] bool: rows whose loss is exactly 0 (skipped, see _inert_rows)


def _warmup_lambda(warmup: int) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


def _sampler_logprobs(trajs: list[Trajectory], R: int) -> torch.Tensor:
    """The generator's per-token log-probs of each trajectory, right-padded: ``[N, R]``."""
    out = torch.zeros(len(trajs), R)
    for i, t in enumerate(trajs):
        if t.sampler_logprobs:
            out[i, : len(t.sampler_logprobs)] = torch.tensor(t.sampler_logprobs, dtype=torch.float32)
    return out


class Trainer:
    """Composes the models, generator, retriever and algorithm into ``step()`` / ``fit()`` (module doc)."""

    def __init__(self, cfg: TrainConfig, models: ModelBundle, retriever: Any,
                 train_examples: list[QAExample], generator: Any = None,
                 sync_weights: Callable[[torch.nn.Module], None] | None = None):
        self.cfg, self.models, self.retriever = cfg, models, retriever
        self.tokenizer = models.tokenizer
        self.train_examples = train_examples
        self.generator = generator or models.generator()
        self.sync_weights = sync_weights
        self.run_dir = Path(cfg.out)
        hops = [e.extra.get("num_hops") for e in train_examples] if cfg.data.balance_hops else None
        if hops is not None and None in hops:  # real QA files carry no hop counts: silent unless mixed
            if any(h is not None for h in hops):
                log.warning("data.balance_hops: some training questions have no hop count; drawing unbalanced")
            hops = None
        self.sampler = DataSampler(len(train_examples), cfg.seed, strata=hops)
        oc = cfg.optim
        self.optimizer = torch.optim.AdamW(models.trainable_parameters(), lr=oc.lr, betas=tuple(oc.betas),
                                           eps=oc.eps, weight_decay=oc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_lambda(oc.warmup_steps))
        self.critic_optimizer = self.critic_scheduler = None
        if models.critic is not None:
            self.critic_optimizer = torch.optim.AdamW(models.critic.parameters(), lr=oc.critic_lr,
                                                      betas=tuple(oc.betas), eps=oc.eps,
                                                      weight_decay=oc.weight_decay)
            self.critic_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.critic_optimizer, _warmup_lambda(oc.critic_warmup_steps))
        self.reward_cfg = RewardConfig(kind=cfg.algo.reward, search_cost=cfg.algo.search_cost)
        self.step_idx = 0
        self.nonfinite_in_a_row = 0
        self.dist = models.dist
        if cfg.resample_rounds and self.dist.enabled:
            raise SearchRLError("resample_rounds on several processes is not supported yet (each rank would have to "
                                "agree on which groups to keep): run it in one process, or set resample_rounds=0")
        self.sharded = is_sharded(models.policy)
        self.logger = MetricsLogger(self.run_dir) if self.dist.main else _Silent()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Log-probs, the PPO ratio, the KL and the entropy all refer to the distribution the
        # rollouts sampled from: softmax(logits / T) (T = 1 for greedy rollouts, as the sampler).
        self.temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        if cfg.rollout.top_p < 1.0:
            # with one on-policy optimiser step per RL step and no KL or entropy term, the ratio is 1 and
            # only the policy gradient's log pi remains: the tokens the nucleus cut are never pushed down
            off_policy = cfg.ppo_epochs > 1 or cfg.mini_batch_size < cfg.trajectories_per_step
            (log.warning if off_policy or cfg.algo.kl_coef > 0 or cfg.algo.entropy_coef > 0 else log.info)(
                "rollout.top_p=%s: the trainer's log-probs (PPO ratio, KL, entropy) use the whole "
                "temperature-scaled distribution, not the top-p truncated one", cfg.rollout.top_p)

    # ------------------------------------------------------------------ stages
    def rollout(self, examples: list[QAExample], stats: RolloutStats, round_idx: int = 0) -> list[Trajectory]:
        seed = self.cfg.seed * 1_000_003 + self.step_idx * 7_919 + self.dist.rank * 104_729 + round_idx * 15_485_863
        rcfg = dataclasses.replace(self.cfg.rollout, seed=seed)
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

    def _informative_groups(self, trajs: list[Trajectory], stats: RolloutStats) -> tuple[list[Trajectory], dict[str, float]]:
        """``resample_rounds``: keep the groups whose rewards differ (the only ones GRPO/RLOO learn from
        without a KL term), drawing and rolling out further questions, up to ``resample_rounds`` more
        rounds, until ``prompts_per_step`` such groups are found; fill the rest of the step with groups
        of equal rewards, in drawing order, so that every step has the same number of rows."""
        G, K = self.cfg.algo.group_size, self.cfg.prompts_per_step
        keep: list[list[Trajectory]] = []
        spare: list[list[Trajectory]] = []
        drawn, rounds = 0, 0
        while True:
            for i in range(0, len(trajs), G):
                group = trajs[i : i + G]
                (keep if len({t.reward for t in group}) > 1 else spare).append(group)
            drawn += len(trajs) // G
            if len(keep) >= K or rounds >= self.cfg.resample_rounds:
                break
            rounds += 1
            missing = K - len(keep)  # draw twice what is missing (about half the groups teach something)
            more = [self.train_examples[i] for i in self.sampler.next(min(K, 2 * missing))]
            trajs = self.rollout(more, stats, round_idx=rounds)
            self.score(trajs)
        found = len(keep)
        groups = keep[:K] + spare[: max(K - found, 0)]
        out = [t for g in groups for t in g]
        return out, {"groups_informative": float(min(found, K)), "questions_drawn": float(drawn),
                     "resample_rounds": float(rounds)}

    def _loss_mask(self, batch: TokenBatch) -> torch.Tensor:
        return batch.loss_mask if self.cfg.algo.mask_retrieved else batch.response_mask

    def _rl_mode(self) -> None:
        """No dropout in any RL forward pass (old, reference, new, values), whatever the module mode."""
        for m in (self.models.policy, self.models.reference, self.models.critic):
            disable_dropout(m)

    def _plan(self, trajs: list[Trajectory], epoch: int) -> list[list[list[int]]]:
        """Epoch ``epoch``'s mini-batches, each a list of micro-batches of row indices.

        Mini-batches are drawn at random; inside one, rows are grouped by length into micro-batches
        (the mini-batch's gradient is their sum, so the grouping changes only the padding: ~10 % of
        the tokens and ~20 % of the attention of the default step with random pairs, ~1-3 % sorted).
        """
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step_idx * 101 + epoch)
        order = torch.randperm(len(trajs), generator=g).tolist()
        lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
        return [micro_batches(sorted(mini, key=lengths.__getitem__), self.cfg.micro_batch_size)
                for mini in micro_batches(order, self._local_mini_batch)]

    def _live(self, mini: list[list[int]], inert: torch.Tensor | None) -> list[list[int]]:
        """The micro-batches of mini-batch ``mini`` without its inert rows (regrouped, still by length)."""
        if inert is None or not inert.any():
            return mini
        return micro_batches([i for micro in mini for i in micro if not inert[i]], self.cfg.micro_batch_size)

    @property
    def _local_mini_batch(self) -> int:
        """Rows of one mini-batch on this rank (``mini_batch_size`` counts every rank's rows)."""
        return max(self.cfg.mini_batch_size // self.dist.world, 1)

    def _logprobs(self, model: torch.nn.Module, b: TokenBatch, **kw: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Under FSDP the root module's forward must run (it gathers the embedding and head shards).
        return response_logprobs(model, b, temperature=self.temperature, mask=self._loss_mask(b),
                                 head_only=not self.sharded, **kw)

    @torch.no_grad()
    def prepare(self, trajs: list[Trajectory], rewards: torch.Tensor) -> Prepared:
        """Old / reference log-probs and values (no grad), then advantages and returns.

        The forward passes use the micro-batches of the update's first epoch, so the old log-probs
        are computed on exactly the tensors the update will see (the ratio starts at exactly 1).
        """
        self._rl_mode()
        full = collate(trajs, self.pad_id)
        N, R = full.response_ids.shape
        mask = self._loss_mask(full)  # [N, R]
        a = self.cfg.algo
        ref = torch.zeros(N, R) if self.models.has_reference and a.kl_coef > 0 else None
        # With one epoch over one mini-batch the policy has not moved when the loss is computed, so
        # the old log-probs equal the update's own (detached): skip a full forward pass.
        on_policy = self.cfg.ppo_epochs == 1 and self._local_mini_batch >= N and not (ref is not None and a.kl_in_reward)
        old = None if on_policy else torch.zeros(N, R)
        values = torch.zeros(N, R) if self.models.critic is not None else None
        plan = self._plan(trajs, 0)
        adv = ret = inert = None
        if ref is None and values is None:  # the advantages need no forward pass: first, to skip inert rows
            adv, ret = self._advantages(mask, rewards, None, None, None)
            inert = self._inert_rows(adv, mask)
            if inert is not None and inert.all():  # one micro-batch still runs, to measure the drift
                inert[plan[0][0]] = False
        for rows in (rows for mini in plan for rows in self._live(mini, inert)):
            b = collate([trajs[i] for i in rows], self.pad_id).to(self.models.device)
            r = b.response_ids.shape[1]
            if old is not None:
                old[rows, :r] = self._logprobs(self.models.policy, b)[0].cpu()
            if ref is not None:
                with self.models.reference_mode() as ref_model:
                    ref[rows, :r] = self._logprobs(ref_model, b)[0].cpu()
            if values is not None:
                values[rows, :r] = self.models.critic(b).float().cpu()
        if adv is None:
            adv, ret = self._advantages(mask, rewards, old, ref, values)
        return Prepared(mask, old, ref, values, adv, ret, rewards, _sampler_logprobs(trajs, R), full.loss_mask,
                        inert)

    def _advantages(self, mask: torch.Tensor, rewards: torch.Tensor, old: torch.Tensor | None,
                    ref: torch.Tensor | None, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages and returns ``[N, R]`` of the configured estimator (KL in the reward if set)."""
        a = self.cfg.algo
        signal: dict[str, torch.Tensor] = {"rewards": rewards}  # placed on the last sampled token as needed
        if ref is not None and a.kl_in_reward:
            kl = kl_penalty(old, ref, a.kl_estimator)  # [N, R]
            signal = {"token_rewards": apply_kl_penalty(place_outcome_reward(rewards, mask), kl, a.kl_coef, mask)}
        groups = [i // a.group_size for i in range(mask.shape[0])]  # rollouts come ordered by example, then sample
        reduce = self.dist.sum if self.dist.enabled else None  # batch statistics over every rank's rows
        return compute_advantages(a.estimator, mask=mask, values=values, group_ids=groups, config=a,
                                  reduce=reduce, **signal)

    def _inert_rows(self, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """``[N]`` bool: rows whose loss and gradient are exactly zero, which the update skips (None:
        no row can be skipped).

        That is a row whose advantage is 0 on every loss token (a GRPO/RLOO group whose samples all
        got the same reward) when the loss has no other term: no KL to a reference, no entropy bonus,
        no critic (the caller checks the first and the last). The loss denominator still counts their
        tokens, so the gradient is the one they would give; only their forward and backward passes
        are saved. Not under FSDP, whose forward passes are collectives every rank must run alike.
        (When every row is inert, ``prepare`` keeps one micro-batch running: its gradient is 0,
        and ``logprob_drift`` is still measured.)
        """
        if self.sharded or self.cfg.algo.entropy_coef > 0:
            return None
        return ((adv != 0) & mask.bool()).sum(dim=1) == 0

    def _normalizer(self, mask: torch.Tensor) -> float:
        """The loss denominator of a mini-batch: its tokens (or rows) on every rank together."""
        if self.cfg.algo.loss_agg == "token-mean":
            local = float(mask.sum())
        else:
            local = float((mask.sum(dim=1) > 0).sum())
        return max(self.dist.sum_floats(local)[0], 1.0)

    def update(self, trajs: list[Trajectory], prep: Prepared) -> dict[str, float]:
        """``ppo_epochs`` passes of mini-batch optimizer steps; returns the mean of their metrics."""
        self._rl_mode()
        self.models.policy.train()
        sums: dict[str, float] = {}
        skipped = 0
        # on-policy (no old log-probs): the first epoch's own log-probs, for the drift
        seen = torch.zeros_like(prep.mask) if prep.old_logprobs is None else None
        counts: dict[str, int] = {}
        for epoch in range(self.cfg.ppo_epochs):
            for mini in self._plan(trajs, epoch):
                rows = [i for micro in mini for i in micro]
                norm = self._normalizer(prep.mask[rows])  # over every row, inert ones included
                live = self._live(mini, prep.inert)
                # One autocast region per mini-batch: autocast caches its bf16 casts of the weights
                # until the region ends, so a region spanning an optimizer step would keep
                # computing with the weights from before it.
                with self.models.autocast():
                    stats = self._accumulate(trajs, prep, live, norm, seen if epoch == 0 else None)
                if not live:  # the same optimizer step as with the zero gradients they would give
                    for p in self.models.trainable_parameters():
                        p.grad = torch.zeros_like(p)
                if self.dist.enabled and not self.sharded:  # replicate: sum the gradients over ranks
                    all_reduce_grads(self._all_trainable(), self.dist)
                norms, bad = self._optimizer_step()
                stats.update(norms)
                skipped += self._check_finite(bad, stats)
                for k, v in stats.items():  # a mini-batch of inert rows only has no loss metrics
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        self.scheduler.step()
        if self.critic_scheduler is not None:
            self.critic_scheduler.step()
        if self.sync_weights is not None:
            self.sync_weights(self.models.policy)
        out = {k: v / counts[k] for k, v in sums.items()}
        out["skipped_updates"] = float(skipped)
        inert = prep.inert if prep.inert is not None else torch.zeros(prep.mask.shape[0], dtype=torch.bool)
        out["inert_rows"] = float(inert.sum())
        # over the rows that have trainer log-probs (inert rows never ran a forward pass)
        out["logprob_drift"] = self._drift(prep.old_logprobs if seen is None else seen, prep, rows=~inert)
        return out

    def _all_trainable(self) -> list[torch.nn.Parameter]:
        critic = list(self.models.critic.parameters()) if self.models.critic is not None else []
        return self.models.trainable_parameters() + critic

    @staticmethod
    def _drift(trainer_logprobs: torch.Tensor, prep: Prepared, rows: torch.Tensor | None = None) -> float:
        """Mean |sampler log-prob - trainer log-prob| over sampled tokens (how far generation and
        training numerics disagree; large values mean the PPO ratio is off before any update),
        over the rows where ``rows`` ``[N]`` is True (default: all)."""
        if prep.sampler_logprobs is None or prep.sampled_mask is None or (rows is not None and not rows.any()):
            return float("nan")
        r = trainer_logprobs.shape[1]
        m = prep.sampled_mask[:, :r] if rows is None else prep.sampled_mask[:, :r] * rows[:, None]
        return masked_mean((prep.sampler_logprobs[:, :r] - trainer_logprobs).abs(), m).item()

    def _accumulate(self, trajs, prep: Prepared, mini: list[list[int]], norm: float,
                    seen: torch.Tensor | None = None) -> dict[str, float]:
        """Forward/backward over the micro-batches of one mini-batch; returns mini-batch metrics.
        On-policy, the trainer's log-probs of these rows are also written into ``seen``."""
        a = self.cfg.algo
        dev = self.models.device
        total = max(float(prep.mask[[i for micro in mini for i in micro]].sum()), 1.0)  # metrics' weights
        out: dict[str, float] = {}
        for rows in mini:
            b = collate([trajs[i] for i in rows], self.pad_id).to(dev)
            r = b.response_ids.shape[1]
            m = prep.mask[rows, :r].to(dev)
            w = float(m.sum()) / total  # share of the mini-batch's tokens
            logp, ent = self._logprobs(self.models.policy, b, with_entropy=True, entropy_grad=a.entropy_coef > 0)
            if prep.old_logprobs is None:
                old = logp.detach()
                if seen is not None:
                    seen[rows, :r] = old.float().cpu()
            else:
                old = prep.old_logprobs[rows, :r].to(dev)
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

    def _optimizer_step(self) -> tuple[dict[str, float], list[str]]:
        """Clip and apply the accumulated gradients of the policy and the critic, each skipped when
        its gradient norm is not finite. Returns the norms and what was skipped."""
        clip = self.cfg.optim.grad_clip
        limit = clip if clip > 0 else float("inf")
        norms: dict[str, float] = {}
        bad: list[str] = []
        parts = [("grad_norm", "policy", self.models.trainable_parameters(), self.optimizer)]
        if self.critic_optimizer is not None:
            parts.append(("critic_grad_norm", "critic", list(self.models.critic.parameters()), self.critic_optimizer))
        for key, name, params, opt in parts:
            gn = clip_grad_norm(params, limit, self.dist)
            norms[key] = gn
            if math.isfinite(gn):
                opt.step()
            else:
                bad.append(f"{name} gradient norm")
            opt.zero_grad(set_to_none=True)
        return norms, bad

    def _check_finite(self, bad: list[str], stats: dict[str, float]) -> int:
        """Count a skipped optimizer step; stop the run after ``optim.nonfinite_patience`` in a row."""
        if not bad:
            self.nonfinite_in_a_row = 0
            return 0
        self.nonfinite_in_a_row += 1
        losses = [f"{k}={v}" for k, v in stats.items() if not math.isfinite(v)]
        what = ", ".join(bad + losses)
        log.warning("step %d: update skipped, non-finite %s", self.step_idx + 1, what)
        if self.nonfinite_in_a_row >= self.cfg.optim.nonfinite_patience:
            raise NonFiniteError(f"step {self.step_idx + 1}: {self.nonfinite_in_a_row} optimizer steps in a row "
                                 f"skipped for non-finite values ({what}); stopping (the last checkpoint is intact)")
        return 1

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        examples = [self.train_examples[i] for i in self.sampler.next(self.cfg.prompts_per_step)]
        examples = self.dist.share(examples)  # the same draw on every rank; each rolls out its share
        self.models.sync_generation_copy()  # FSDP: the generation copy follows the shards
        stats = RolloutStats()
        trajs = self.rollout(examples, stats)
        rewards = self.score(trajs)
        resampled: dict[str, float] = {}
        if self.cfg.resample_rounds:
            trajs, resampled = self._informative_groups(trajs, stats)
            rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
        t1 = time.perf_counter()
        with self.models.autocast():  # no weight changes inside: one region, weights cast once
            prep = self.prepare(trajs, rewards)
        t2 = time.perf_counter()
        upd = self.update(trajs, prep)  # one autocast region per mini-batch (see update)
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
            **resampled,
            **upd,
        }
        if callable(getattr(self.retriever, "stats", None)):  # a record/replay cache (data.search_cache)
            rate = self.retriever.stats().get("hit_rate")
            metrics["search_cache_hit_rate"] = float(rate) if rate is not None else 0.0
        metrics = self._across_ranks(metrics)
        self.last_trajectories = trajs
        self.logger.log(metrics)
        return metrics

    def _across_ranks(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Metrics of the whole step: counts summed over ranks, everything else averaged."""
        if not self.dist.enabled:
            return metrics
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step")
        totals = self.dist.sum_floats(*(float(metrics[k]) for k in keys))
        for k, v in zip(keys, totals):
            metrics[k] = v if k in ("sampled_tokens", "skipped_updates") else v / self.dist.world
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _optimizer_state(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Any:
        return full_optimizer_state(model, opt) if self.sharded else opt.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and sampler states (under FSDP gathered in full: a collective)."""
        s = {"optimizer": self._optimizer_state(self.models.policy, self.optimizer),
             "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(), "step": self.step_idx,
             "optimizer_format": "full" if self.sharded else "torch", "world_size": self.dist.world}
        if self.critic_optimizer is not None:
            s["critic_optimizer"] = self._optimizer_state(self.models.critic, self.critic_optimizer)
            s["critic_scheduler"] = self.critic_scheduler.state_dict()
        return s

    def save(self) -> Path:
        """Write a checkpoint (rank 0 writes; under FSDP every rank helps gather it first)."""
        policy, critic = self.models.policy, self.models.critic
        if self.sharded:
            policy = GatheredWeights(policy, keep=self.dist.main)
            critic = GatheredWeights(critic, keep=self.dist.main) if critic is not None else None
        state = self.state_dict()
        path = self.run_dir / "checkpoints" / f"step-{self.step_idx:06d}"
        if self.dist.main:
            path = save_checkpoint(self.run_dir, self.step_idx, policy, critic, state, keep=self.cfg.keep_checkpoints)
            log.info("checkpoint written: %s", path)
        self.dist.barrier()
        return path

    def _load(self, path: Path, policy: torch.nn.Module, critic: torch.nn.Module | None) -> dict[str, Any]:
        """Load a checkpoint's weights into plain or sharded modules; returns its saved state."""
        if not (self.sharded or (critic is not None and is_sharded(critic))):
            return load_checkpoint(path, policy, critic)
        from safetensors.torch import load_file

        load_full_weights(policy, load_file(str(path / "policy.safetensors")))
        if critic is not None:
            load_full_weights(critic, load_file(str(path / "critic.safetensors")))
        return torch.load(path / "state.pt", weights_only=False)

    def _load_optimizer(self, model: torch.nn.Module, opt: torch.optim.Optimizer, state: Any, fmt: str) -> None:
        if fmt == "full":  # written by a sharded run: keyed by parameter names
            load_full_optimizer_state(model, opt, state)
        elif self.sharded:
            raise SearchRLError("this checkpoint's optimizer state was written by a run without FSDP; "
                                "resume it with parallel.strategy=replicate or on one process")
        else:
            opt.load_state_dict(state)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in the run directory, if any."""
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            return False
        if self.models.reference is not None and ckpts[0].name == "step-000000":
            self._load(ckpts[0], self.models.reference, None)  # the model RL started from
        s = self._load(ckpts[-1], self.models.policy, self.models.critic)
        fmt = s.get("optimizer_format", "torch")
        self._load_optimizer(self.models.policy, self.optimizer, s["optimizer"], fmt)
        self.scheduler.load_state_dict(s["scheduler"])
        if self.critic_optimizer is not None:
            self._load_optimizer(self.models.critic, self.critic_optimizer, s["critic_optimizer"], fmt)
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
