"""Advantage estimators (GRPO, GAE, RLOO, REINFORCE++) as pure tensor functions behind a registry.

Conventions (shared with :mod:`searchrl.algos.losses`):

- token-level tensors are ``[B, T]`` over the *response* tokens, right-padded;
- ``mask`` ``[B, T]`` selects the tokens that take part: the trainer passes the loss mask (1 on
  tokens the model sampled, 0 on inserted retrieval/feedback tokens and padding), or the response
  mask for the paper's no-masking ablation. One ``mask`` drives everything: rewards, values and
  advantages at ``mask == 0`` are ignored on input and zero on output, and sequence recursions
  (GAE, discounted returns) run over the ``mask == 1`` tokens only, so credit flows *across*
  inserted tokens as if they were not there (the original Search-R1 GAE ran through them);
- outcome rewards are ``[B]`` and sit on the last ``mask == 1`` token of each row
  (:func:`place_outcome_reward`).

Masked-out inputs may hold anything, NaN included: they are replaced with zeros before any
arithmetic (``torch.where``, never ``x * mask``). Estimators compute in float32 (GRPO/RLOO group
statistics in float64) and carry no gradient. Left out: KL controllers (adaptive beta) and
per-turn (process) rewards; a caller can build those from :func:`apply_kl_penalty` and token rewards.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

from searchrl.algos.common import _check_mask, lookup, masked_mean, masked_var, masked_whiten
from searchrl.errors import ConfigError

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "apply_kl_penalty",
    "compute_advantages",
    "discounted_returns",
    "estimator_needs_critic",
    "gae",
    "get_advantage_estimator",
    "grpo",
    "lookup",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "place_outcome_reward",
    "register_advantage",
    "reinforce_plus_plus",
    "rloo",
]

AdvantageFn = Callable[..., "tuple[Tensor, Tensor]"]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}


# --------------------------------------------------------------------------- registry


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator adding an estimator to :data:`ADVANTAGE_ESTIMATORS` under ``name``.

    An estimator returns ``(advantages [B, T], returns [B, T])``, both zero where ``mask == 0``.
    Registering a name twice is an error (it would silently change what a config means).
    """

    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ConfigError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


def get_advantage_estimator(name: str) -> AdvantageFn:
    """The estimator registered as ``name``; unknown names raise ConfigError with the valid ones."""
    return lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


def estimator_needs_critic(name: str) -> bool:
    """True when the estimator takes value predictions (so the trainer must run a critic).

    >>> estimator_needs_critic("gae"), estimator_needs_critic("grpo")
    (True, False)
    """
    return "values" in inspect.signature(get_advantage_estimator(name)).parameters


def place_outcome_reward(rewards: Tensor, mask: Tensor) -> Tensor:
    """Put each scalar reward ``[B]`` on the last ``mask == 1`` token of its row -> ``[B, T]``.

    Rows with no selected token get no reward (all zeros).

    >>> place_outcome_reward(torch.tensor([1.0, 2.0]), torch.tensor([[1, 1, 0], [1, 0, 1]]))
    tensor([[0., 1., 0.],
            [0., 0., 2.]])
    """
    m = mask.bool()
    B, T = m.shape
    if rewards.shape != (B,):
        raise ValueError(f"rewards must be [B]={B}, got {tuple(rewards.shape)}")
    pos = torch.arange(T, device=m.device).expand(B, T)  # [B, T]
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=-1)  # [B]
    out = torch.zeros(B, T, dtype=torch.float32, device=m.device)
    has = last >= 0  # [B]
    rows = torch.nonzero(has).squeeze(-1)
    out[rows, last[rows]] = rewards.to(out.dtype)[rows]
    return out


def apply_kl_penalty(token_rewards: Tensor, kl: Tensor, beta: float, mask: Tensor) -> Tensor:
    """In-reward KL penalty (PPO in the paper, beta 0.001): ``r_t - beta * kl_t`` on ``mask == 1``,
    zero elsewhere. ``kl`` ``[B, T]`` comes from :func:`searchrl.algos.losses.kl_penalty`."""
    m = _check_mask(token_rewards, mask)
    out = token_rewards.float() - beta * kl.float()
    return torch.where(m, out, torch.zeros_like(out))


# --------------------------------------------------------------------------- scans over sampled tokens


def _compaction_order(mask: Tensor) -> Tensor:
    """Per-row permutation ``[B, T]`` that moves ``mask == 1`` positions to the front, in order."""
    return torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)


def _discounted_reverse_cumsum(x: Tensor, discount: float, chunk: int = 64) -> Tensor:
    """``y[t] = sum_{s >= t} discount**(s - t) * x[s]`` along the last dim of ``x`` ``[B, T]``.

    Blocked: inside a block of ``chunk`` positions it is one matmul with a ``[C, C]`` matrix of
    powers; blocks are chained right to left with a carry (``T / chunk`` small steps).
    """
    if discount == 1.0:
        return x.flip(-1).cumsum(-1).flip(-1)
    if discount == 0.0:
        return x.clone()
    B, T = x.shape
    C = max(1, min(chunk, T))
    k = torch.arange(C, device=x.device, dtype=torch.float64)
    gap = k[None, :] - k[:, None]  # [C, C]: j - i
    W = torch.where(gap >= 0, discount ** gap.clamp_min(0), torch.zeros_like(gap)).to(x.dtype)
    out = torch.empty_like(x)
    carry = torch.zeros(B, dtype=x.dtype, device=x.device)  # y at the first position after the block
    for end in range(T, 0, -C):
        start = max(0, end - C)
        n = end - start
        tail = (discount ** (n - k[:n])).to(x.dtype)  # [n]: discount**(end - t)
        y = x[:, start:end] @ W[:n, :n].T + carry[:, None] * tail  # [B, n]
        out[:, start:end] = y
        carry = y[:, 0]
    return out


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go over the ``mask == 1`` tokens only ``[B, T]`` (one discount step per
    selected token; inserted tokens neither earn nor discount). Zero where ``mask == 0``."""
    m = _check_mask(token_rewards, mask)
    r = torch.where(m, token_rewards.float(), torch.zeros((), device=m.device))  # [B, T]
    order = _compaction_order(m)  # [B, T]
    r_c = r.gather(1, order)  # [B, T] selected tokens first, zeros after
    ret_c = _discounted_reverse_cumsum(r_c, gamma)  # [B, T]
    ret = torch.zeros_like(r).scatter(1, order, ret_c)
    return torch.where(m, ret, torch.zeros_like(ret))


# --------------------------------------------------------------------------- group statistics


def _group_index(group_ids: Any, B: int, device: torch.device) -> tuple[Tensor, int]:
    """Dense group index ``[B]`` (long) and the number of groups, from any ids."""
    if isinstance(group_ids, Tensor):
        if group_ids.shape != (B,):
            raise ValueError(f"group_ids must be [B]={B}, got {tuple(group_ids.shape)}")
        uniq, inv = torch.unique(group_ids.to(device), return_inverse=True)
        return inv, len(uniq)
    ids = list(group_ids.tolist() if hasattr(group_ids, "tolist") else group_ids)
    if len(ids) != B:
        raise ValueError(f"group_ids has {len(ids)} entries for a batch of {B}")
    index: dict[Hashable, int] = {}
    dense = [index.setdefault(g, len(index)) for g in ids]
    return torch.tensor(dense, dtype=torch.long, device=device), len(index)


def _group_stats(rewards: Tensor, group_ids: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group mean, unbiased group std and group size, all ``[B]`` float64."""
    r = rewards.double()  # [B]
    g, G = _group_index(group_ids, r.shape[0], r.device)  # [B], int
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, g, r) / count  # [G]
    sq = torch.zeros_like(count).index_add_(0, g, (r - mean[g]) ** 2)  # [G]
    std = (sq / (count - 1).clamp_min(1)).sqrt()  # [G]
    return mean[g], std[g], count[g]


def _outcome_check(rewards: Tensor, mask: Tensor) -> Tensor:
    if rewards.dim() != 1 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(f"rewards must be [B]={mask.shape[0]}, got {tuple(rewards.shape)}")
    return mask.bool()


def _broadcast(adv: Tensor, m: Tensor) -> Tensor:
    """Scalar per-row advantage ``[B]`` -> ``[B, T]`` on ``mask == 1`` tokens."""
    full = adv.float()[:, None].expand(m.shape)  # [B, T]
    return torch.where(m, full, torch.zeros_like(full))


# --------------------------------------------------------------------------- estimators


@register_advantage("grpo")
def grpo(
    rewards: Tensor,
    mask: Tensor,
    group_ids: Any,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    singleton: str = "zero",
) -> tuple[Tensor, Tensor]:
    """GRPO outcome advantage: ``(r - group mean) / (group std + eps)`` on every selected token.

    Args:
        rewards: ``[B]`` outcome rewards.
        mask: ``[B, T]``.
        group_ids: ``[B]`` tensor or sequence of hashables (e.g. prompt ids); equal id = same group.
        norm_by_std: divide by the group std (False gives the mean-centred "Dr. GRPO" variant).
        eps: added to the std (1e-6 as in the paper).
        singleton: advantage for a group of one sample, which has no baseline: ``"zero"``
            (default: no signal) or ``"raw"`` (the reward itself, as veRL does; the paper's
            group-size-1 ablation relies on this).

    The std is unbiased (Bessel, as ``torch.std`` in veRL). A group whose rewards are all equal
    gets advantage 0 (no NaN). Returns ``(advantages, returns)``, here identical ``[B, T]``.
    """
    m = _outcome_check(rewards, mask)
    if singleton not in ("zero", "raw"):
        raise ConfigError(f"grpo singleton must be 'zero' or 'raw', got {singleton!r}")
    mean, std, count = _group_stats(rewards, group_ids)  # [B] each
    r = rewards.double()
    adv = r - mean
    if norm_by_std:
        adv = adv / (std + eps)
    alone = r if singleton == "raw" else torch.zeros_like(r)
    adv = torch.where(count == 1, alone, adv)  # [B]
    out = _broadcast(adv, m)
    return out, out.clone()


@register_advantage("rloo")
def rloo(rewards: Tensor, mask: Tensor, group_ids: Any) -> tuple[Tensor, Tensor]:
    """RLOO: each sample's baseline is the mean reward of the *other* samples of its group,
    ``A_i = r_i - (sum_g - r_i) / (n_g - 1)``. Groups of one sample get 0 (no baseline).
    Returns ``(advantages, returns)``, identical ``[B, T]``."""
    m = _outcome_check(rewards, mask)
    mean, _, count = _group_stats(rewards, group_ids)  # [B] each
    r = rewards.double()
    baseline = (mean * count - r) / (count - 1).clamp_min(1)
    adv = torch.where(count > 1, r - baseline, torch.zeros_like(r))  # [B]
    out = _broadcast(adv, m)
    return out, out.clone()


@register_advantage("gae")
def gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the ``mask == 1`` tokens only.

    The recursion ``delta_t = r_t + gamma * V(next) - V_t``, ``A_t = delta_t + gamma*lam*A(next)``
    takes "next" to be the next *selected* token (terminal value 0 after the last one), so
    inserted tokens get advantage 0 and do not break or discount the chain: the result equals GAE
    on the row with the masked tokens dropped, scattered back. Vectorised: rows are compacted
    with a stable argsort, then one blocked discounted reverse cumsum.

    Args:
        token_rewards: ``[B, T]`` (outcome reward placed by :func:`place_outcome_reward`, minus an
            optional KL penalty); values at ``mask == 0`` are ignored.
        values: ``[B, T]`` critic predictions for each token.
        mask: ``[B, T]``.
        gamma, lam: discount and GAE lambda (the paper: 1.0 and 1.0).
        whiten: whiten the advantages over the batch's selected tokens (veRL and the paper do).
        reduce: sums over processes (see :func:`masked_whiten`), so whitening uses every rank's tokens.

    Returns ``(advantages, returns)`` ``[B, T]``, with ``returns = raw advantages + values`` (the
    critic target, never whitened); both zero where ``mask == 0``.
    """
    m = _check_mask(token_rewards, mask)
    _check_mask(values, mask)
    zero = torch.zeros((), device=m.device)
    r = torch.where(m, token_rewards.float(), zero)  # [B, T]
    v = torch.where(m, values.detach().float(), zero)  # [B, T]
    order = _compaction_order(m)  # [B, T]
    r_c, v_c, m_c = r.gather(1, order), v.gather(1, order), m.gather(1, order)  # [B, T] each
    v_next = torch.cat([v_c[:, 1:], torch.zeros_like(v_c[:, :1])], dim=1)  # [B, T]; 0 past the end
    delta = torch.where(m_c, r_c + gamma * v_next - v_c, zero)  # [B, T]
    adv_c = _discounted_reverse_cumsum(delta, gamma * lam)  # [B, T]
    adv = torch.zeros_like(r).scatter(1, order, adv_c)
    adv = torch.where(m, adv, zero)
    returns = torch.where(m, adv + v, zero)
    if whiten:
        adv = masked_whiten(adv, m, reduce=reduce)
    return adv, returns


@register_advantage("reinforce_plus_plus")
def reinforce_plus_plus(
    token_rewards: Tensor, mask: Tensor, gamma: float = 1.0,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted reward-to-go over selected tokens, then whitened over the batch.

    ``token_rewards`` is ``[B, T]`` or an outcome reward ``[B]`` (placed on the last selected token).
    Returns ``(whitened advantages, unwhitened returns)`` ``[B, T]``, zero where ``mask == 0``.
    """
    m = mask.bool()
    if token_rewards.dim() == 1:
        token_rewards = place_outcome_reward(token_rewards, m)
    returns = discounted_returns(token_rewards, m, gamma)  # [B, T]
    return masked_whiten(returns, m, reduce=reduce), returns


# --------------------------------------------------------------------------- uniform entry point


def compute_advantages(
    name: str,
    *,
    mask: Tensor,
    rewards: Tensor | None = None,
    token_rewards: Tensor | None = None,
    values: Tensor | None = None,
    group_ids: Any = None,
    config: Any = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Call estimator ``name`` with whatever it needs, so a trainer needs no per-estimator code.

    Outcome estimators (grpo, rloo) get ``rewards [B]``, or the masked row sums of
    ``token_rewards``; token estimators (gae, reinforce_plus_plus) get ``token_rewards [B, T]``, or
    ``rewards`` placed on the last selected token. ``options`` are the estimator's own keyword
    arguments (``gamma``, ``lam``, ``norm_by_std``...); unknown ones raise ConfigError. With
    ``config`` (any object, e.g. the algo config), each keyword argument of the estimator that is
    not given takes the attribute of the same name where ``config`` has one. ``reduce`` (a sum over
    processes) goes to the estimators that compute batch statistics (those with a ``reduce``
    argument); the others are per row or per group and need none.

    >>> from types import SimpleNamespace
    >>> m = torch.ones(2, 1)
    >>> compute_advantages("grpo", mask=m, rewards=torch.tensor([1.0, 0.0]), group_ids=[0, 0],
    ...                    config=SimpleNamespace(norm_by_std=False, gamma=0.5))[0].squeeze(1)
    tensor([ 0.5000, -0.5000])
    """
    fn = get_advantage_estimator(name)
    params = inspect.signature(fn).parameters
    if reduce is not None and "reduce" in params:
        options = {**options, "reduce": reduce}
    if config is not None:
        data = {"mask", "rewards", "token_rewards", "values", "group_ids", "reduce"}
        taken = {k: getattr(config, k) for k in params if k not in data and k not in options and hasattr(config, k)}
        options = {**taken, **options}
    m = mask.bool()
    if rewards is None and token_rewards is None:
        raise ValueError("compute_advantages needs rewards [B] or token_rewards [B, T]")
    kwargs: dict[str, Any] = {"mask": m}
    if "rewards" in params:
        if rewards is None:
            rewards = torch.where(m, token_rewards.float(), torch.zeros((), device=m.device)).sum(-1)
        kwargs["rewards"] = rewards
    if "token_rewards" in params:
        kwargs["token_rewards"] = (
            token_rewards if token_rewards is not None else place_outcome_reward(rewards, m)
        )
    for needed, given in (("values", values), ("group_ids", group_ids)):
        if needed in params:
            if given is None:
                raise ValueError(f"advantage estimator {name!r} needs {needed}")
            kwargs[needed] = given
    for key, value in options.items():
        if key not in params or key in kwargs:
            valid = sorted(set(params) - set(kwargs) - {"values", "group_ids"})
            raise ConfigError(f"advantage estimator {name!r} has no option {key!r}; options: {valid}")
        kwargs[key] = value
    return fn(**kwargs)
