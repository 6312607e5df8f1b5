"""RL algorithms as pure tensor functions: advantage estimators and losses, behind registries.

- :mod:`~searchrl.algos.advantages`: ``grpo``, ``gae`` (masked: credit skips inserted tokens),
  ``rloo``, ``reinforce_plus_plus``, registered in ``ADVANTAGE_ESTIMATORS``
  (``get_advantage_estimator(name)``, ``compute_advantages(name, ...)``), plus masked statistics,
  outcome-reward placement and the in-reward KL penalty.
- :mod:`~searchrl.algos.losses`: PPO clipped policy loss (clip-higher, dual clip), clipped value
  loss, KL estimators k1/k2/k3 (``KL_ESTIMATORS``) and KL loss, entropy and log-probs from logits,
  and ``aggregate`` (``AGGREGATIONS``: token-mean, seq-mean-token-sum, seq-mean-token-mean).

Everything takes one ``mask`` ``[B, T]`` over response tokens (the loss mask, or the response
mask for the no-masking ablation) and nothing else decides which tokens count. No model code,
no optimiser, no state: the trainer composes these.
"""

from searchrl.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    apply_kl_penalty,
    compute_advantages,
    discounted_returns,
    estimator_needs_critic,
    gae,
    get_advantage_estimator,
    grpo,
    masked_mean,
    masked_var,
    masked_whiten,
    place_outcome_reward,
    register_advantage,
    reinforce_plus_plus,
    rloo,
)
from searchrl.algos.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    entropy_from_logits,
    entropy_loss,
    get_kl_estimator,
    kl_loss,
    kl_penalty,
    logprobs_from_logits,
    policy_loss,
    register_aggregation,
    register_kl_estimator,
    value_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "aggregate",
    "apply_kl_penalty",
    "compute_advantages",
    "discounted_returns",
    "entropy_from_logits",
    "entropy_loss",
    "estimator_needs_critic",
    "gae",
    "get_advantage_estimator",
    "get_kl_estimator",
    "grpo",
    "kl_loss",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "place_outcome_reward",
    "policy_loss",
    "register_advantage",
    "register_aggregation",
    "register_kl_estimator",
    "reinforce_plus_plus",
    "rloo",
    "value_loss",
]
