"""Tests for searchrl.algos: advantage estimators and losses against hand-computed numbers,
vectorised GAE against a reference loop and against GAE on the compacted sequence, masking
consistency, registries, and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from searchrl.algos import (
    ADVANTAGE_ESTIMATORS,
    aggregate,
    apply_kl_penalty,
    compute_advantages,
    discounted_returns,
    entropy_from_logits,
    entropy_loss,
    estimator_needs_critic,
    gae,
    get_advantage_estimator,
    get_kl_estimator,
    grpo,
    kl_loss,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    place_outcome_reward,
    policy_loss,
    register_advantage,
    reinforce_plus_plus,
    rloo,
    value_loss,
)
from searchrl.errors import ConfigError

T_ = torch.tensor


def close(a, b, atol=1e-5):
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, float)
    np.testing.assert_allclose(a, np.asarray(b, dtype=float), atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------- helpers


def test_masked_stats_by_hand():
    x = T_([[1.0, 2.0, float("nan")], [3.0, float("inf"), 6.0]])
    m = T_([[1, 1, 0], [1, 0, 1]])
    sel = np.array([1.0, 2.0, 3.0, 6.0])
    close(masked_mean(x, m), 3.0)
    close(masked_mean(x, m, dim=-1), [1.5, 4.5])
    close(masked_var(x, m), sel.var(ddof=1))
    close(masked_var(x, m, unbiased=False), sel.var())
    w = masked_whiten(x, m)
    expect = (sel - 3.0) / math.sqrt(sel.var(ddof=1) + 1e-8)
    close(w, [[expect[0], expect[1], 0.0], [expect[2], 0.0, expect[3]]])
    close(masked_whiten(x, m, shift_mean=False)[0, 0], expect[0] + 3.0)
    empty = torch.zeros(2, 3, dtype=torch.long)
    assert masked_mean(x, empty).item() == 0.0  # nothing selected: 0, not NaN


def test_place_outcome_reward_last_sampled_token():
    mask = T_([[1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    out = place_outcome_reward(T_([2.0, -1.0, 5.0]), mask)
    expect = np.zeros((3, 6))
    expect[0, 4], expect[1, 0] = 2.0, -1.0  # row 2 has no sampled token: reward dropped
    close(out, expect)


def test_apply_kl_penalty_by_hand():
    r = T_([[0.0, 0.0, 1.0, 9.0]])
    kl = T_([[0.5, -1.0, 2.0, 3.0]])
    m = T_([[1, 1, 1, 0]])
    close(apply_kl_penalty(r, kl, 0.1, m), [[-0.05, 0.1, 0.8, 0.0]])


def test_aggregate_by_hand_ignores_masked_garbage_and_empty_rows():
    loss = T_([[1.0, 3.0, float("nan")], [float("inf"), 9.0, 9.0], [2.0, 4.0, 6.0]])
    m = T_([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    close(aggregate(loss, m, "token-mean"), (1 + 3 + 2 + 4 + 6) / 5)
    close(aggregate(loss, m, "seq-mean-token-sum"), (4 + 12) / 2)  # the empty row is left out
    close(aggregate(loss, m, "seq-mean-token-mean"), (2 + 4) / 2)
    close(aggregate(loss, m, "token-mean", normalizer=10), 16 / 10)
    close(aggregate(loss, m, "seq-mean-token-mean", normalizer=4), 6 / 4)
    assert aggregate(loss, torch.zeros(3, 3), "token-mean").item() == 0.0


# --------------------------------------------------------------------------- grpo / rloo


def test_grpo_by_hand_string_ids_and_singletons():
    rewards = T_([1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    ids = ["a", "a", "b", "b", "b", "c"]
    mask = T_([[1, 1, 0]] * 6)
    adv, ret = grpo(rewards, mask, ids)
    std_a = math.sqrt(0.5)  # unbiased std of [1, 0]
    std_b = math.sqrt(1.0 / 3.0)  # unbiased std of [0, 1, 1]
    per_row = [0.5 / (std_a + 1e-6), -0.5 / (std_a + 1e-6), (-2 / 3) / (std_b + 1e-6),
               (1 / 3) / (std_b + 1e-6), (1 / 3) / (std_b + 1e-6), 0.0]
    close(adv, [[a, a, 0.0] for a in per_row])
    assert torch.equal(adv, ret)
    raw, _ = grpo(rewards, mask, ids, singleton="raw")
    close(raw[5], [0.5, 0.5, 0.0])
    centred, _ = grpo(rewards, mask, ids, norm_by_std=False)
    close(centred[:, 0], [0.5, -0.5, -2 / 3, 1 / 3, 1 / 3, 0.0])
    # same groups named by ints in a tensor, or a numpy array of strings
    for other in (T_([7, 7, 3, 3, 3, 9]), np.array(ids)):
        assert torch.allclose(grpo(rewards, mask, other)[0], adv)


def test_grpo_equal_rewards_give_zero_without_nan():
    mask = torch.ones(6, 4)
    for value in (0.0, 1.0, 0.1):
        adv, _ = grpo(torch.full((6,), value), mask, [0, 0, 0, 1, 1, 1])
        assert torch.isfinite(adv).all()
        assert adv.abs().max().item() < 1e-6
    with pytest.raises(ValueError):
        grpo(torch.ones(3), torch.ones(3, 2), [0, 1])
    with pytest.raises(ConfigError):
        grpo(torch.ones(2), torch.ones(2, 2), [0, 0], singleton="bogus")


def test_rloo_by_hand():
    rewards = T_([1.0, 0.0, 0.5, 3.0])
    mask = T_([[1, 0], [1, 1], [0, 1], [1, 1]])
    adv, _ = rloo(rewards, mask, ["q", "q", "q", "lonely"])
    # baselines: (0 + .5)/2 = .25, (1 + .5)/2 = .75, (1 + 0)/2 = .5; singleton -> 0
    close(adv, [[0.75, 0.0], [-0.75, -0.75], [0.0, 0.0], [0.0, 0.0]])


# --------------------------------------------------------------------------- gae


def test_gae_by_hand_skips_inserted_tokens():
    r = T_([[0.0, 0.0, 5.0, 0.0, 1.0, 7.0], [0.0, 0.0, 2.0, 4.0, 4.0, 4.0]])
    v = T_([[0.5, 0.6, 9.0, 9.0, 0.8, 9.0], [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]])
    m = T_([[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8, whiten=False)
    # row 0 compacts to r=[0,0,1], v=[.5,.6,.8]; gamma*lam = .72
    d2 = 1 - 0.8
    d1 = 0.9 * 0.8 - 0.6
    d0 = 0.9 * 0.6 - 0.5
    a2, a1 = d2, d1 + 0.72 * d2
    a0 = d0 + 0.72 * a1
    # row 1: r=[0,0,2], v=[1,1,1]
    b2 = 2 - 1.0
    b1 = (0.9 - 1.0) + 0.72 * b2
    b0 = (0.9 - 1.0) + 0.72 * b1
    close(adv, [[a0, a1, 0, 0, a2, 0], [b0, b1, b2, 0, 0, 0]])
    close(ret, [[a0 + 0.5, a1 + 0.6, 0, 0, a2 + 0.8, 0], [b0 + 1, b1 + 1, b2 + 1, 0, 0, 0]])
    white, ret_w = gae(r, v, m, gamma=0.9, lam=0.8, whiten=True)
    sel = np.array([a0, a1, a2, b0, b1, b2])
    w = (sel - sel.mean()) / math.sqrt(sel.var(ddof=1) + 1e-8)
    close(white, [[w[0], w[1], 0, 0, w[2], 0], [w[3], w[4], w[5], 0, 0, 0]])
    assert torch.equal(ret, ret_w)  # returns are never whitened


def gae_loop(r, v, mask, gamma, lam):
    """Reference: per row, walk the sampled tokens right to left (float64, plain Python)."""
    r, v, mask = r.double().numpy(), v.double().numpy(), mask.bool().numpy()
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        next_v, last = 0.0, 0.0
        for t in reversed(range(r.shape[1])):
            if not mask[b, t]:
                continue
            delta = r[b, t] + gamma * next_v - v[b, t]
            last = delta + gamma * lam * last
            adv[b, t], next_v = last, v[b, t]
    return adv, np.where(mask, adv + v, 0.0)


def random_batch(B, T, seed, p_mask=0.3):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    m = (torch.rand(B, T, generator=g) > p_mask).long()
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    m = m * (torch.arange(T)[None, :] < lengths[:, None])  # right padding, some empty rows
    return r, v, m


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.7, 1.0), (1.0, 0.5)])
@pytest.mark.parametrize("T", [1, 7, 150])
def test_gae_vectorised_matches_reference_loop(gamma, lam, T):
    r, v, m = random_batch(6, T, seed=T)
    adv, ret = gae(r, v, m, gamma=gamma, lam=lam, whiten=False)
    ref_adv, ref_ret = gae_loop(r, v, m, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), ref_adv, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ret.numpy(), ref_ret, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("whiten", [False, True])
def test_gae_with_inserted_tokens_equals_gae_on_compacted_rows(whiten):
    r, v, m = random_batch(5, 90, seed=3)
    adv, ret = gae(r, v, m, gamma=0.95, lam=0.9, whiten=whiten)
    # compact each row by hand (drop masked tokens), left-align, run with a plain prefix mask
    keep = [torch.nonzero(row).squeeze(-1) for row in m]
    r_c, v_c, m_c = torch.zeros_like(r), torch.zeros_like(v), torch.zeros_like(m)
    for b, idx in enumerate(keep):
        n = len(idx)
        r_c[b, :n], v_c[b, :n], m_c[b, :n] = r[b, idx], v[b, idx], 1
    adv_c, ret_c = gae(r_c, v_c, m_c, gamma=0.95, lam=0.9, whiten=whiten)
    back_adv, back_ret = torch.zeros_like(adv), torch.zeros_like(ret)
    for b, idx in enumerate(keep):
        back_adv[b, idx], back_ret[b, idx] = adv_c[b, : len(idx)], ret_c[b, : len(idx)]
    torch.testing.assert_close(adv, back_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, back_ret, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- reinforce++


def test_reinforce_plus_plus_by_hand():
    m = T_([[1, 0, 1, 1], [1, 1, 0, 0]])
    adv, ret = reinforce_plus_plus(T_([1.0, 2.0]), m, gamma=0.5)
    # row 0: sampled rewards [0, 0, 1] -> returns [.25, .5, 1]; row 1: [0, 2] -> [1, 2]
    close(ret, [[0.25, 0, 0.5, 1.0], [1.0, 2.0, 0, 0]])
    sel = np.array([0.25, 0.5, 1.0, 1.0, 2.0])
    w = (sel - sel.mean()) / math.sqrt(sel.var(ddof=1) + 1e-8)
    close(adv, [[w[0], 0, w[1], w[2]], [w[3], w[4], 0, 0]])
    token = T_([[0.0, 9.0, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0]])  # the 9 sits on an inserted token
    adv_t, ret_t = reinforce_plus_plus(token, m, gamma=0.5)
    torch.testing.assert_close(ret_t, ret)
    torch.testing.assert_close(discounted_returns(token, m, 0.5), ret)


# --------------------------------------------------------------------------- masking consistency


def _scramble(x, m, value):
    """Replace entries at mask == 0 with ``value`` (float or 'random')."""
    noise = torch.randn_like(x.float()) * 1e3 if value == "random" else torch.full_like(x.float(), value)
    return torch.where(m.bool(), x, noise.to(x.dtype))


@pytest.mark.parametrize("junk", ["random", float("nan"), 1e6])
def test_masked_positions_change_nothing(junk):
    r, v, m = random_batch(4, 20, seed=11)
    rewards = torch.randn(4)
    ids = [0, 0, 1, 1]
    lp, old, ref, adv = (torch.randn(4, 20) * 0.3 for _ in range(4))
    outs = []
    for scr in (lambda x: x, lambda x: _scramble(x, m, junk)):
        res = [
            gae(scr(r), scr(v), m, 0.9, 0.8)[0],
            gae(scr(r), scr(v), m)[1],
            grpo(rewards, m, ids)[0],
            rloo(rewards, m, ids)[0],
            reinforce_plus_plus(scr(r), m, 0.9)[0],
            masked_whiten(scr(r), m),
            apply_kl_penalty(scr(r), scr(v), 0.1, m),
            policy_loss(scr(lp), scr(old), scr(adv), m, dual_clip=3.0)[0],
            policy_loss(scr(lp), scr(old), scr(adv), m, agg="seq-mean-token-mean")[0],
            value_loss(scr(v), scr(old), scr(r), m)[0],
            kl_loss(scr(lp), scr(ref), m, kind="k3"),
            kl_loss(scr(lp), scr(ref), m, kind="k2", agg="seq-mean-token-sum"),
        ]
        outs.append(res)
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


def test_masked_logits_change_no_entropy_loss():
    logits = torch.randn(3, 5, 11)
    m = T_([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    junk = torch.where(m.bool()[..., None], logits, torch.randn_like(logits) * 50)
    assert torch.equal(entropy_loss(logits, m), entropy_loss(junk, m))


# --------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    lp = T_([[0.0, -1.0, -2.0, -40.0]])
    ref = T_([[0.0, 0.0, -1.0, -10.0]])
    d = np.array([0.0, -1.0, -1.0, -30.0])  # logp - ref
    close(kl_penalty(lp, ref, "k1"), [d])
    close(kl_penalty(lp, ref, "kl"), [d])
    close(kl_penalty(lp, ref, "abs"), [np.abs(d)])
    close(kl_penalty(lp, ref, "k2"), [0.5 * d**2])
    k3 = np.exp(-d[:3]) + d[:3] - 1
    close(kl_penalty(lp, ref, "k3"), [[*k3, 10.0]], atol=1e-4)  # last one clamped to 10
    close(kl_penalty(lp, ref, "low_var_kl"), [[*k3, 10.0]], atol=1e-4)
    m = T_([[1, 1, 1, 0]])
    close(kl_loss(lp, ref, m, kind="k3"), k3.mean(), atol=1e-5)


def test_kl_estimators_track_true_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.2, 0.2, 0.3, 0.2])
    true_kl = float((p * (p / q).log()).sum())  # KL(p || q) ~ 0.55
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, ref = p.log()[x][None], q.log()[x][None]
    k1, k2, k3 = (kl_penalty(lp, ref, k) for k in ("k1", "k2", "k3"))
    assert k1.mean().item() > 0
    assert abs(k1.mean().item() - true_kl) < 0.02
    assert abs(k3.mean().item() - true_kl) < 0.02
    assert (k3 >= 0).all() and (k2 >= 0).all()
    assert (k1 < 0).any()  # k1 is unbiased but not pointwise positive
    assert k3.std() < k1.std()  # the low-variance one


# --------------------------------------------------------------------------- policy loss


def _ppo_inputs(ratios, advs, mask):
    old = torch.full((1, len(ratios)), -1.0)
    lp = (old + torch.log(T_([ratios]))).requires_grad_(True)
    return lp, old, T_([advs]), T_([mask])


def test_policy_loss_by_hand():
    lp, old, adv, m = _ppo_inputs([1.5, 0.5, 1.1, 0.7], [1.0, 1.0, -1.0, -2.0], [1, 1, 1, 0])
    loss, met = policy_loss(lp, old, adv, m, clip_eps=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clip active); token 1: max(-.5, -.8) = -.5; token 2: 1.1
    close(loss, (-1.2 - 0.5 + 1.1) / 3)
    close(met["clipfrac"], 1 / 3)
    r = np.array([1.5, 0.5, 1.1])
    close(met["approx_kl"], np.mean(r - 1 - np.log(r)))
    close(met["ratio_mean"], r.mean())
    close(met["ratio_max"], 1.5)
    loss.backward()
    # d/dlogp of -A*ratio/3 where unclipped; zero where clipped and at the masked token
    close(lp.grad, [[0.0, -0.5 / 3, 1.1 / 3, 0.0]])


def test_policy_loss_clip_higher_and_aggregations():
    lp, old, adv, m = _ppo_inputs([1.25, 1.25], [1.0, 1.0], [1, 1])
    sym, met_sym = policy_loss(lp, old, adv, m, clip_eps=0.2)
    high, met_high = policy_loss(lp, old, adv, m, clip_eps=0.2, clip_eps_high=0.28)
    close(sym, -1.2)
    close(high, -1.25)
    assert (met_sym["clipfrac"], met_high["clipfrac"]) == (1.0, 0.0)
    old = torch.zeros(2, 3)
    lp = torch.zeros(2, 3)  # ratio 1 everywhere: loss per token = -A
    adv = T_([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    m = T_([[1, 1, 0], [1, 0, 0]])
    expect = {"token-mean": -7 / 3, "seq-mean-token-sum": -(3 + 4) / 2,
              "seq-mean-token-mean": -(1.5 + 4) / 2}
    for agg, value in expect.items():
        close(policy_loss(lp, old, adv, m, agg=agg)[0], value)


def test_dual_clip_caps_negative_advantages():
    lp, old, adv, m = _ppo_inputs([5.0, 2.0, 5.0, 5.0], [-1.0, -1.0, 1.0, -1.0], [1, 1, 1, 0])
    plain, _ = policy_loss(lp, old, adv, m)
    dual, met = policy_loss(lp, old, adv, m, dual_clip=3.0)
    # token 0: max(5, 1.2) = 5 -> capped at 3; token 1: 2 < 3 stays; token 2 (A > 0): -1.2
    close(plain, (5.0 + 2.0 - 1.2) / 3)
    close(dual, (3.0 + 2.0 - 1.2) / 3)
    close(met["dual_clipfrac"], 1 / 3)
    dual.backward()
    close(lp.grad, [[0.0, 2.0 / 3, 0.0, 0.0]])  # capped and clipped tokens carry no gradient
    with pytest.raises(ConfigError):
        policy_loss(lp, old, adv, m, dual_clip=0.9)
    with pytest.raises(ConfigError):
        policy_loss(lp, old, adv, m, clip_eps=0.0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_normalizer_makes_micro_batches_sum_to_the_full_batch(agg):
    _, _, m = random_batch(6, 12, seed=5, p_mask=0.4)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 12, generator=g)
    old, adv = torch.randn(6, 12, generator=g) * 0.1 + base, torch.randn(6, 12, generator=g)
    full_lp = base.clone().requires_grad_(True)
    full, _ = policy_loss(full_lp, old, adv, m, agg=agg)
    full.backward()
    norm = m.sum() if agg == "token-mean" else m.bool().any(-1).sum()
    split_lp = base.clone().requires_grad_(True)
    total = sum(policy_loss(split_lp[s], old[s], adv[s], m[s], agg=agg, normalizer=norm)[0]
                for s in (slice(0, 2), slice(2, 6)))
    total.backward()
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(split_lp.grad, full_lp.grad)


# --------------------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    values = T_([[1.0, 2.0, 0.0, 5.0]], requires_grad=True)
    old = T_([[0.0, 2.0, 0.5, 0.0]])
    returns = T_([[1.5, 1.0, 0.0, 0.0]])
    m = T_([[1, 1, 1, 0]])
    loss, met = value_loss(values, old, returns, m, clip=0.5)
    # t0: plain .25, clipped (0 + .5 - 1.5)^2 = 1 -> 1; t1: 1 vs 1; t2: 0 vs (.5 - .5)^2 = 0
    close(loss, 0.5 * (1.0 + 1.0 + 0.0) / 3)
    close(met["vf_clipfrac"], 1 / 3)
    close(met["vpred_mean"], 1.0)
    close(met["vf_mse"], (0.25 + 1.0 + 0.0) / 3)
    loss.backward()
    # t0 clipped: no grad; t1: (2 - 1)/3; t2: value at return, 0; t3 masked
    close(values.grad, [[0.0, 1.0 / 3, 0.0, 0.0]])
    plain, _ = value_loss(values, old, returns, m, clip=None)
    close(plain, 0.5 * (0.25 + 1.0 + 0.0) / 3)


# --------------------------------------------------------------------------- from logits


def _np_log_softmax(x):
    x = x.astype(np.float64)
    s = x - x.max(-1, keepdims=True)
    return s - np.log(np.exp(s).sum(-1, keepdims=True))


def test_logprobs_from_logits_matches_numpy_and_chunks():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 10, 17, generator=g) * 4
    labels = torch.randint(0, 17, (3, 10), generator=g)
    labels[2, 7:] = -100
    ls = _np_log_softmax(logits.numpy())
    expect = np.take_along_axis(ls, np.maximum(labels.numpy(), 0)[..., None], -1)[..., 0]
    expect[2, 7:] = 0.0
    out = logprobs_from_logits(logits, labels)
    close(out, expect)
    for c in (1, 3, 64):
        torch.testing.assert_close(logprobs_from_logits(logits, labels, chunk_size=c), out)
    half = logprobs_from_logits(logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    close(half, expect, atol=0.1)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels[:, :5])


def test_entropy_from_logits_stable_and_chunked():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 9, generator=g) * 3
    ls = _np_log_softmax(logits.numpy())
    expect = -(np.exp(ls) * ls).sum(-1)
    out = entropy_from_logits(logits)
    close(out, expect)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), out)
    odd = torch.tensor([[[1e4, 1e4, -1e4, float("-inf")]]])  # two equal winners, one banned
    h = entropy_from_logits(odd)
    close(h, [[math.log(2)]])
    m = T_([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    close(entropy_loss(logits, m), (expect[0, 0] + expect[0, 1] + expect[0, 3]) / 3)


# --------------------------------------------------------------------------- registries and dispatch


def test_registry_errors_list_valid_names():
    with pytest.raises(ConfigError, match="gae.*grpo.*reinforce_plus_plus.*rloo"):
        get_advantage_estimator("ppo")
    with pytest.raises(ConfigError, match="k3"):
        get_kl_estimator("k4")
    with pytest.raises(ConfigError, match="token-mean"):
        aggregate(torch.ones(1, 2), torch.ones(1, 2), "mean")
    with pytest.raises(ConfigError, match="already registered"):
        register_advantage("gae")(lambda token_rewards, mask: (token_rewards, token_rewards))
    with pytest.raises(ConfigError, match="lam"):
        compute_advantages("gae", mask=torch.ones(1, 2), rewards=torch.ones(1),
                           values=torch.zeros(1, 2), lamda=0.9)


def test_custom_estimator_registration():
    @register_advantage("test_sign")
    def sign(rewards, mask):
        out = torch.where(mask.bool(), rewards.sign()[:, None].expand(mask.shape), 0.0)
        return out, out

    try:
        m = torch.ones(2, 3)
        adv, _ = compute_advantages("test_sign", mask=m, rewards=T_([-2.0, 3.0]))
        close(adv, [[-1, -1, -1], [1, 1, 1]])
        assert not estimator_needs_critic("test_sign")
    finally:
        del ADVANTAGE_ESTIMATORS["test_sign"]


def test_compute_advantages_dispatch():
    r, v, m = random_batch(4, 8, seed=9)
    m[:, 0] = 1  # every row has a sampled token
    rewards = torch.randn(4)
    placed = place_outcome_reward(rewards, m)
    ids = ["x", "x", "y", "y"]
    torch.testing.assert_close(compute_advantages("grpo", mask=m, token_rewards=placed, group_ids=ids),
                               grpo(rewards, m, ids))
    torch.testing.assert_close(compute_advantages("gae", mask=m, rewards=rewards, values=v, gamma=0.9),
                               gae(placed, v, m, gamma=0.9))
    torch.testing.assert_close(compute_advantages("rloo", mask=m, rewards=rewards, group_ids=ids),
                               rloo(rewards, m, ids))
    assert estimator_needs_critic("gae") and not estimator_needs_critic("reinforce_plus_plus")
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", mask=m, rewards=rewards)
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("grpo", mask=m, rewards=rewards)


# --------------------------------------------------------------------------- gradients


def test_gradients_flow_and_vanish_at_masked_positions():
    _, _, m = random_batch(3, 10, seed=8)
    m[:, 0] = 1
    bad = ~m.bool()
    lp = torch.randn(3, 10).masked_fill(bad, float("nan")).requires_grad_(True)
    old = torch.randn(3, 10).masked_fill(bad, float("inf"))
    ref = torch.randn(3, 10).masked_fill(bad, float("-inf"))
    adv = torch.randn(3, 10).masked_fill(bad, float("nan"))
    vals = torch.randn(3, 10).masked_fill(bad, float("nan")).requires_grad_(True)
    logits = torch.randn(3, 10, 7, requires_grad=True)
    loss = (policy_loss(lp, old, adv, m, dual_clip=3.0)[0] + kl_loss(lp, ref, m)
            + value_loss(vals, old, adv, m)[0] - 0.01 * entropy_loss(logits, m))
    loss.backward()
    for grad in (lp.grad, vals.grad, logits.grad):
        assert torch.isfinite(grad).all()
    assert (lp.grad[bad] == 0).all() and (vals.grad[bad] == 0).all()
    assert (logits.grad[bad] == 0).all()
    assert (lp.grad[~bad] != 0).any() and (vals.grad[~bad] != 0).any()
    assert (logits.grad[~bad] != 0).any()
