"""Helpers the advantage estimators and the losses share: registry lookup and masked statistics.

Masked statistics take ``x`` and ``mask`` of the same shape and ignore whatever sits at
``mask == 0`` (NaN included: values there are replaced, never multiplied by zero). Left out:
anything that knows about models, tokens or configs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from searchrl.errors import ConfigError

__all__ = ["lookup", "masked_mean", "masked_var", "masked_whiten"]


def lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    """Return ``registry[name]`` or raise :class:`ConfigError` listing the valid names.

    >>> lookup({"a": 1}, "b", "thing")
    Traceback (most recent call last):
    ...
    searchrl.errors.ConfigError: unknown thing 'b'; valid names: a
    """
    try:
        return registry[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(registry))
        raise ConfigError(f"unknown {what} {name!r}; valid names: {valid}") from None


def _check_mask(x: Tensor, mask: Tensor) -> Tensor:
    if x.shape != mask.shape:
        raise ValueError(f"shape mismatch: tensor {tuple(x.shape)} vs mask {tuple(mask.shape)}")
    return mask.bool()


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over ``mask == 1`` (all of it, or along ``dim``); 0 where nothing is selected.

    >>> masked_mean(torch.tensor([1.0, 2.0, float("nan")]), torch.tensor([1, 1, 0]))
    tensor(1.5000)
    """
    m = _check_mask(x, mask)
    total = torch.where(m, x, torch.zeros_like(x)).sum(dim=dim)
    count = m.sum(dim=dim)
    return total / count.clamp_min(1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over ``mask == 1`` (scalar). ``unbiased`` uses ``n - 1`` (as ``torch.var``);
    with fewer than two selected elements the denominator is clamped to 1 (variance 0)."""
    m = _check_mask(x, mask)
    mean = masked_mean(x, m)
    sq = torch.where(m, (x - mean) ** 2, torch.zeros_like(x)).sum()
    n = m.sum()
    denom = (n - 1) if unbiased else n
    return sq / denom.clamp_min(1).to(sq.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with statistics over ``mask == 1`` (unbiased variance);
    ``shift_mean=False`` adds the mean back (scale only). Zero where ``mask == 0``.

    ``reduce`` sums a tensor over the processes that share the batch (e.g. ``Dist.sum``): the
    statistics are then those of the union of every process's selected elements.
    """
    m = _check_mask(x, mask)
    if reduce is None:
        mean, var = masked_mean(x, m), masked_var(x, m)
    else:
        xs = torch.where(m, x, torch.zeros_like(x)).double()
        n, s1, s2 = reduce(torch.stack([m.sum().double(), xs.sum(), (xs * xs).sum()])).tolist()
        mean_d = s1 / max(n, 1.0)
        var_d = max(s2 - n * mean_d * mean_d, 0.0) / max(n - 1.0, 1.0)
        mean, var = torch.tensor(mean_d, dtype=x.dtype), torch.tensor(var_d, dtype=x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))
