"""Token sampling for the HF engine: greedy, tempered, top-p; per-batch or per-row random streams.

:func:`sample_next` draws every row from one ``torch.Generator`` in row order; :func:`sample_rows`
draws row ``i`` from a generator seeded with :func:`counter_seed` of its own seed and the index of
the token being drawn, so a row's tokens do not depend on which rows share its batch. Both return
the sampled tokens and their log-probs under ``log_softmax(logits / T)`` (``T = 1`` when greedy),
taken before top-p truncation.

Left out: repetition penalties, min-p / top-k, logit processors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from searchrl.rollout.engine.protocol import SamplingParams


def sample_next(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from ``logits`` (b, V); return ``(token_ids (b,), logprobs (b,))``.

    Greedy takes the argmax; otherwise an exponential race: the argmax of ``p_i / E_i`` with
    ``E_i = -log U_i`` exponential noise (``U`` drawn from ``generator`` in row order), an exact
    draw from ``p`` (as the Gumbel-max trick) at about half the cost of ``torch.multinomial``
    over a 49k vocabulary, and one that float noise in ``p`` only changes at a near-exact tie.
    Log-probs are ``log_softmax(logits / T)`` at the chosen token (``T = 1`` when greedy), taken
    before top-p truncation (see the module docstring).
    """
    if sampling.greedy:
        return _pick(logits, sampling, None)
    u = torch.rand(logits.shape, generator=generator, device=logits.device)  # (b, V)
    return _pick(logits, sampling, u)


def sample_rows(
    logits: torch.Tensor, sampling: SamplingParams, seeds: Sequence[int], counters: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`sample_next`, but row ``i``'s noise is drawn from a generator seeded with
    :func:`counter_seed` of its own ``seeds[i]`` and ``counters[i]`` (the index of the token being
    drawn), so a row's tokens do not depend on which other rows share its batch or when it joined."""
    if sampling.greedy:
        return _pick(logits, sampling, None)
    u = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)  # (b, V)
    g = torch.Generator(device=logits.device)
    for i, (seed, counter) in enumerate(zip(seeds, counters)):
        u[i].uniform_(generator=g.manual_seed(counter_seed(seed, counter)))
    return _pick(logits, sampling, u)


SEED_MASK = (1 << 64) - 1  # seeds are 64-bit


def counter_seed(seed: int, counter: int) -> int:
    """A 63-bit seed from ``(seed, counter)``: the splitmix64 finaliser of
    ``seed + (counter + 1) * golden`` (neighbouring counters give unrelated seeds).

    >>> counter_seed(7, 0) == counter_seed(7, 0) != counter_seed(7, 1)
    True
    """
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & SEED_MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & SEED_MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & SEED_MASK
    return (z ^ (z >> 31)) >> 1


def _pick(
    logits: torch.Tensor, sampling: SamplingParams, u: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token of each row given uniform noise ``u`` (b, V) (the argmax when ``None``) and its
    log-prob."""
    logits = logits.float()  # (b, V)
    if u is None:
        tokens = logits.argmax(dim=-1)  # (b,)
        logp = torch.log_softmax(logits, dim=-1)  # (b, V)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / sampling.temperature, dim=-1)  # (b, V)
    probs, ids = logp.exp(), None  # (b, V)
    if sampling.top_p < 1.0:  # race over the nucleus only: every other token has p = 0 and cannot win
        probs, ids = nucleus(probs, sampling.top_p)  # (b, k), (b, k)
        u = u.gather(-1, ids)
    tokens = (probs / u.log_().neg_()).argmax(dim=-1)  # (b,): p_i / E_i, E_i = -log U_i
    if ids is not None:
        tokens = ids.gather(-1, tokens[:, None]).squeeze(-1)  # nucleus column -> token id
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


NUCLEUS_FIRST_K = 64  # candidates taken before the nucleus is checked (grown 8x while too few)


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of each row of ``probs`` (b, V): ``(p, ids)``, both (b, k), the k most
    likely tokens in descending order with those outside the nucleus set to p = 0 (a token is in
    it when the mass of the tokens before it is < ``top_p``; the first always is).

    Sorting all 49k tokens of 32 rows took ~150 ms on one CPU thread (random logits; ~16 ms a
    decode step in a real rollout, ~7 % of the loop), so the k most likely tokens are taken first
    (``topk``: ~4 ms) and k grows only while some row's k tokens hold less than ``top_p`` of the
    mass: a token past them has at least that much mass before it, so it is outside the nucleus.
    The result is the full sort's, k columns of it.

    >>> p, ids = nucleus(torch.tensor([[0.1, 0.5, 0.15, 0.25]]), 0.7)
    >>> p.tolist(), ids.tolist()
    ([[0.5, 0.25, 0.0, 0.0]], [[1, 3, 2, 0]])
    """
    vocab = probs.shape[-1]
    k = min(NUCLEUS_FIRST_K, vocab)
    while True:
        top, ids = probs.topk(k, dim=-1)  # (b, k), sorted descending
        before = top.cumsum(dim=-1) - top  # mass of strictly more likely tokens
        if k == vocab or bool((before[:, -1] + top[:, -1] >= top_p).all()):
            return top.masked_fill(before >= top_p, 0.0), ids
        k = min(8 * k, vocab)
