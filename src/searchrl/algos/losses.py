"""RL losses as pure tensor functions: PPO clipped policy loss, clipped value loss, KL estimators
and KL loss, entropy, log-probs from logits, and the masked aggregation they all share.

Same conventions as :mod:`searchrl.algos.advantages`: token tensors are ``[B, T]`` over response
tokens and one ``mask`` ``[B, T]`` (the loss mask, or the response mask for the no-masking
ablation) selects the tokens that count. Inputs at ``mask == 0`` are replaced by zeros before any
arithmetic, so whatever sits there (NaN included) changes neither a loss nor its gradient, and the
gradient at masked positions is exactly zero.

Aggregation (``agg``, registry :data:`AGGREGATIONS`), for a per-token loss ``L [B, T]``:

- ``"token-mean"``: sum of ``L`` over selected tokens / number of selected tokens (every token
  weighs the same; long answers weigh more). The default, as in veRL's recent releases.
- ``"seq-mean-token-sum"``: per row, sum over its selected tokens; mean over rows.
- ``"seq-mean-token-mean"``: per row, mean over its selected tokens; mean over rows (every
  sequence weighs the same: the original GRPO).

Rows with no selected token are left out of the row means. ``normalizer`` replaces the local
denominator (token count or row count) so that a trainer splitting a mini-batch into
micro-batches can pass the mini-batch's total and get exactly the full-batch gradient by summing.

Left out: the policy forward pass itself (see ``searchrl.training``), adaptive KL control, and
sequence-level ratios (GSPO); register new KL estimators or aggregations with the decorators.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from searchrl.algos.common import lookup, masked_mean
from searchrl.errors import ConfigError

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "aggregate",
    "entropy_from_logits",
    "entropy_loss",
    "get_kl_estimator",
    "kl_loss",
    "kl_penalty",
    "logprobs_from_logits",
    "policy_loss",
    "register_aggregation",
    "register_kl_estimator",
    "value_loss",
]

AggregateFn = Callable[[Tensor, Tensor, "float | Tensor | None"], Tensor]
KLFn = Callable[[Tensor, Tensor], Tensor]
AGGREGATIONS: dict[str, AggregateFn] = {}
KL_ESTIMATORS: dict[str, KLFn] = {}


def _sanitize(x: Tensor, m: Tensor) -> Tensor:
    """``x`` with zeros at ``mask == 0`` (no NaN can leak in, no gradient flows out there)."""
    if x.shape != m.shape:
        raise ValueError(f"shape mismatch: tensor {tuple(x.shape)} vs mask {tuple(m.shape)}")
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------- aggregation


def register_aggregation(name: str) -> Callable[[AggregateFn], AggregateFn]:
    """Decorator adding a loss aggregation ``(loss_mat, bool_mask, normalizer) -> scalar``."""

    def deco(fn: AggregateFn) -> AggregateFn:
        AGGREGATIONS[name] = fn
        return fn

    return deco


def _denominator(local: Tensor, normalizer: float | Tensor | None) -> Tensor:
    return local.clamp_min(1) if normalizer is None else torch.as_tensor(normalizer)


@register_aggregation("token-mean")
def _token_mean(loss: Tensor, m: Tensor, normalizer: float | Tensor | None) -> Tensor:
    return _sanitize(loss, m).sum() / _denominator(m.sum(), normalizer).to(loss)


@register_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(loss: Tensor, m: Tensor, normalizer: float | Tensor | None) -> Tensor:
    rows = _sanitize(loss, m).sum(-1)  # [B]
    return rows.sum() / _denominator(m.any(-1).sum(), normalizer).to(loss)


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(loss: Tensor, m: Tensor, normalizer: float | Tensor | None) -> Tensor:
    rows = _sanitize(loss, m).sum(-1) / m.sum(-1).clamp_min(1).to(loss)  # [B]
    return rows.sum() / _denominator(m.any(-1).sum(), normalizer).to(loss)


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar over ``mask == 1`` (modes: module docstring).

    >>> L = torch.tensor([[1.0, 3.0, 9.0], [2.0, 9.0, 9.0]])
    >>> m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> [round(aggregate(L, m, k).item(), 3) for k in ("token-mean", "seq-mean-token-sum",
    ...                                                 "seq-mean-token-mean")]
    [2.0, 3.0, 2.0]
    """
    fn = lookup(AGGREGATIONS, mode, "loss aggregation")
    return fn(loss_mat, mask.bool(), normalizer)


# --------------------------------------------------------------------------- KL


def register_kl_estimator(*names: str) -> Callable[[KLFn], KLFn]:
    """Decorator adding a per-token KL estimator ``(logprobs, ref_logprobs) -> [B, T]``."""

    def deco(fn: KLFn) -> KLFn:
        for name in names:
            KL_ESTIMATORS[name] = fn
        return fn

    return deco


def get_kl_estimator(name: str) -> KLFn:
    """The KL estimator called ``name``; unknown names raise ConfigError with the valid ones."""
    return lookup(KL_ESTIMATORS, name, "KL estimator")


@register_kl_estimator("k1", "kl")
def _kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


@register_kl_estimator("abs")
def _kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return (logprobs - ref_logprobs).abs()


@register_kl_estimator("k2", "mse")
def _kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()


@register_kl_estimator("k3", "low_var_kl")
def _kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # keeps exp finite
    return (torch.exp(log_r) - log_r - 1.0).clamp(-10.0, 10.0)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token estimate ``[B, T]`` of KL(policy || reference) from tokens sampled by the policy.

    With ``d = logprobs - ref_logprobs``: ``k1``/``kl`` is ``d`` (unbiased, can be negative);
    ``abs`` is ``|d|``; ``k2``/``mse`` is ``d**2 / 2`` (biased, >= 0); ``k3``/``low_var_kl`` is
    ``exp(-d) + d - 1`` (unbiased, >= 0, low variance; the paper's GRPO KL loss). As in veRL, k3
    clamps ``-d`` to [-20, 20] before ``exp`` and the result to [-10, 10] (gradient 0 where
    clamped), which keeps one wild token from dominating. Positions are not masked here: use
    :func:`kl_loss`, or pass the result to ``apply_kl_penalty`` with a mask.

    >>> kl_penalty(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 0.0]), "k3")
    tensor([0.0000, 0.7183])
    """
    return get_kl_estimator(kind)(logprobs, ref_logprobs)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kind: str = "low_var_kl",
    agg: str = "token-mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """KL loss term (GRPO in the paper: k3, coefficient 0.001 applied by the caller): the masked
    aggregate of :func:`kl_penalty`. Gradient flows into ``logprobs`` only."""
    m = mask.bool()
    lp = _sanitize(logprobs, m)
    ref = _sanitize(ref_logprobs.detach(), m)
    return aggregate(kl_penalty(lp, ref, kind), m, agg, normalizer)


# --------------------------------------------------------------------------- policy and value


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (to minimise) and metrics.

    Per token, with ``ratio = exp(logprobs - old_logprobs)`` (log-ratio clamped to [-20, 20]):
    ``L = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))``
    (``clip_eps_high`` defaults to ``clip_eps``; a larger one is DAPO's clip-higher). With
    ``dual_clip = c > 1``, tokens with ``A < 0`` are further capped at ``-A * c`` (dual-clip PPO:
    a huge ratio on a bad token cannot blow up the loss). Aggregated by ``agg``.

    Args: ``logprobs`` ``[B, T]`` (with grad), ``old_logprobs`` and ``advantages`` ``[B, T]``
    (no grad), ``mask`` ``[B, T]``.

    Metrics (floats, over selected tokens): ``clipfrac`` (share of tokens where the clipped term is
    the active one), ``dual_clipfrac`` (share capped by the dual clip, when on), ``approx_kl``
    (k3 estimate of KL(old || new): ``mean(ratio - 1 - log ratio)``, >= 0), ``ratio_mean``,
    ``ratio_max``.
    """
    if clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
        raise ConfigError(f"clip_eps must be > 0, got {clip_eps} / {clip_eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ConfigError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    m = mask.bool()
    adv = _sanitize(advantages.detach(), m)  # [B, T]
    log_ratio = (_sanitize(logprobs, m) - _sanitize(old_logprobs.detach(), m)).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # [B, T]; exactly 1 at masked tokens
    high = clip_eps if clip_eps_high is None else clip_eps_high
    pg_plain = -adv * ratio
    pg_clip = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    pg = torch.maximum(pg_plain, pg_clip)  # [B, T]
    with torch.no_grad():
        ratio_d, log_ratio_d = ratio.detach(), log_ratio.detach()
        metrics = {
            "clipfrac": masked_mean((pg_clip > pg_plain).float(), m).item(),
            "approx_kl": masked_mean(ratio_d - 1.0 - log_ratio_d, m).item(),
            "ratio_mean": masked_mean(ratio_d, m).item(),
            "ratio_max": _sanitize(ratio_d, m).max().item() if m.any() else 0.0,
        }
    if dual_clip is not None:
        pg_dual = -adv * dual_clip
        capped = (adv < 0) & (pg_dual < pg)  # [B, T]
        pg = torch.where(adv < 0, torch.minimum(pg, pg_dual), pg)
        metrics["dual_clipfrac"] = masked_mean(capped.float(), m).item()
    return aggregate(pg, m, agg, normalizer), metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.5,
    agg: str = "token-mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss ``0.5 * max((V - R)**2, (V_old + clip(V - V_old, -c, c) - R)**2)``.

    ``values`` ``[B, T]`` carry the gradient; ``old_values`` (critic output at rollout time) and
    ``returns`` (from the advantage estimator) are targets. ``clip=None`` gives the plain squared
    error. Metrics: ``vf_clipfrac`` (share of tokens where the clipped error is the larger one),
    ``vpred_mean``, ``vf_mse`` (unclipped mean squared error).
    """
    if clip is not None and clip <= 0:
        raise ConfigError(f"value clip must be > 0 (or None), got {clip}")
    m = mask.bool()
    v = _sanitize(values, m)  # [B, T]
    ret = _sanitize(returns.detach(), m)
    err_plain = (v - ret).square()  # [B, T]
    if clip is None:
        err, clipped = err_plain, torch.zeros_like(m)
    else:
        old = _sanitize(old_values.detach(), m)
        err_clip = (old + (v - old).clamp(-clip, clip) - ret).square()
        err, clipped = torch.maximum(err_plain, err_clip), err_clip > err_plain
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean(clipped.float(), m).item(),
            "vpred_mean": masked_mean(v.detach(), m).item(),
            "vf_mse": masked_mean(err_plain.detach(), m).item(),
        }
    return aggregate(0.5 * err, m, agg, normalizer), metrics


# --------------------------------------------------------------------------- from logits


def _chunks(T: int, chunk_size: int | None) -> range:
    step = T if not chunk_size or chunk_size >= T else chunk_size
    return range(0, T, max(step, 1))


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int | None = None) -> Tensor:
    """Log-probability of each label ``[B, T]`` (float32) from logits ``[B, T, V]`` (any dtype).

    Computed as ``logit[label] - logsumexp(logits)`` in float32, ``chunk_size`` positions at a
    time, so the full float32 ``[B, T, V]`` log-softmax is never materialised (this matters most
    without grad, e.g. reference log-probs). Negative labels (``-100`` padding) give 0.
    The caller aligns labels with logits (logits at position t predict token t + 1).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    valid = labels >= 0  # [B, T]
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    out = []
    for s in _chunks(labels.shape[-1], chunk_size):
        lf = logits[..., s : s + (chunk_size or labels.shape[-1]), :].float()  # [B, c, V]
        idx = safe[..., s : s + lf.shape[-2]]  # [B, c]
        picked = lf.gather(-1, idx.unsqueeze(-1)).squeeze(-1)  # [B, c]
        out.append(picked - torch.logsumexp(lf, dim=-1))
    lp = torch.cat(out, dim=-1)  # [B, T]
    return torch.where(valid, lp, torch.zeros_like(lp))


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Entropy ``[B, T]`` (float32, nats) of the softmax over ``logits`` ``[B, T, V]``.

    ``-sum p log p`` with ``log p`` from ``log_softmax`` (stable for large logits); ``-inf`` logits
    (banned tokens) contribute 0 rather than NaN. Chunked over T like :func:`logprobs_from_logits`.

    >>> entropy_from_logits(torch.zeros(1, 1, 4))  # uniform over 4: log 4
    tensor([[1.3863]])
    """
    T = logits.shape[-2]
    tiny = torch.finfo(torch.float32).min
    out = []
    for s in _chunks(T, chunk_size):
        logp = F.log_softmax(logits[..., s : s + (chunk_size or T), :].float(), dim=-1)  # [B, c, V]
        out.append(-(logp.exp() * logp.clamp_min(tiny)).sum(-1))  # [B, c]
    return torch.cat(out, dim=-1)


def entropy_loss(
    logits: Tensor,
    mask: Tensor,
    agg: str = "token-mean",
    chunk_size: int | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Masked aggregate of :func:`entropy_from_logits` (the caller subtracts ``coef * entropy``)."""
    return aggregate(entropy_from_logits(logits, chunk_size), mask.bool(), agg, normalizer)
