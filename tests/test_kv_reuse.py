"""KV-cache reuse in HFGenerator: with reuse on, every output equals the output with reuse off.

Reference: the same generator with ``kv_reuse=False`` (prefills every prompt from scratch, itself
checked against transformers' generate() in test_generator.py). Greedy tokens must be equal and
log-probs close (atol 1e-4), over calls that extend earlier outputs with inserted text, batches
mixing continued and new rows, the real multi-turn loop, and weights changed between calls. The
``kv_stats`` counters prove that reuse really happened where it should.
"""

from __future__ import annotations

import logging

import pytest
import torch

from searchrl.testing import tiny_random_lm
from searchrl.retrieval.bm25 import BM25Retriever
from searchrl.rollout.engine.protocol import ResettableGenerator, SamplingParams, reset_cache
from searchrl.rollout.engine.hf import HFGenerator
from searchrl.rollout.engine.kv_cache import KVEntry, KVStore, merge_caches, shared_groups
from searchrl.rollout.config import RolloutConfig
from searchrl.rollout.loop import RolloutStats, run_rollouts
from searchrl.rollout.prompts import build_prompt
from searchrl.types import Passage, QAExample

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
TEMPLATE = ("You are a careful assistant. Think step by step inside <think> and </think>, search "
            "with <search> query </search> when you lack knowledge, then answer.\nQuestion: ")
QUESTIONS = ["Who wrote the novel about the white whale that a one-legged captain hunts at sea?",
             "Capital of France?", "Hi"]
INSERTS = [
    "\n<information>Doc 1(Title: Moby) A whale.</information>\n",
    " Your previous action is invalid. ",
    "\n<information>No results.\n</information>\n\n" * 3,
]


def same(a, b, atol=1e-4):
    """Completions ``a`` (reuse on) and ``b`` (off) agree: tokens, finish, close log-probs."""
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs),
                                   atol=atol, rtol=0)  # fmt: skip


def extend(tok, prompts, outs, step):
    """Next-turn contexts: prompt + sampled tokens + an inserted text (different per row)."""
    return [
        p + c.token_ids + tok.encode(INSERTS[(i + step) % len(INSERTS)], add_special_tokens=False)
        for i, (p, c) in enumerate(zip(prompts, outs))
    ]


def tiny_gpt2(tok):
    """Absolute position embeddings: a wrong position id after a mask hole changes the output."""
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                     initializer_range=0.2)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def prompts(tiny_tokenizer):
    return [tiny_tokenizer.encode(TEMPLATE + q) for q in QUESTIONS]


# ---------------------------------------------------------------------------------------------
# (a) calls that extend earlier outputs with inserted text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_multi_call_extension_equals_no_reuse(tiny_tokenizer, prompts, arch, sampling):
    tok = tiny_tokenizer
    model = tiny_gpt2(tok) if arch == "gpt2" else tiny_random_lm(tok, seed=0)
    on, off = HFGenerator(model, tok), HFGenerator(model, tok, kv_reuse=False)
    assert on.kv_reuse and not off.kv_reuse
    batch = [p for p in prompts for _ in range(2)]  # a GRPO-like group of 2 per prompt
    new_tokens = None
    for step in range(3):
        before = on.kv_stats.prefilled_tokens
        a, b = on.generate(batch, sampling), off.generate(batch, sampling)
        same(a, b)
        assert on.cached_rows >= len(batch) and off.cached_rows == 0
        if new_tokens is not None:  # a continued row runs its last sampled token + the insertion
            assert on.kv_stats.prefilled_tokens - before == new_tokens
        old = batch
        batch = extend(tok, batch, a, step)
        new_tokens = sum(len(n) - len(o) - len(c.token_ids) + 1 for n, o, c in zip(batch, old, a))
    assert on.kv_stats.reused_tokens > 0 and on.kv_stats.shared_tokens > 0
    assert off.kv_stats.reused_tokens == off.kv_stats.shared_tokens == 0


def test_first_call_runs_a_shared_prefix_once(tiny_lm, prompts):
    model, tok = tiny_lm
    on, off = HFGenerator(model, tok), HFGenerator(model, tok, kv_reuse=False)
    batch = [prompts[0]] * 3 + prompts[1:]  # template shared by all, prompt 0 by three rows
    same(on.generate(batch, GREEDY), off.generate(batch, GREEDY))
    template = len(tok.encode(TEMPLATE))
    total = sum(len(p) for p in batch)
    assert off.kv_stats.prefilled_tokens == total
    assert on.kv_stats.prefilled_tokens == total - on.kv_stats.shared_tokens
    # the template (almost: tokens merge at its end) once instead of 5 times; prompt 0 once, not 3
    assert on.kv_stats.shared_tokens >= 4 * (template - 2) + 2 * (len(prompts[0]) - template - 1)


# ---------------------------------------------------------------------------------------------
# (b) a batch mixing continued rows and new rows of different lengths


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("batch_size,overhead", [(None, 10**9), (None, 0), (2, 0)])
def test_batch_mixing_continued_and_new_rows(
    tiny_lm, prompts, batch_size, overhead, sampling, monkeypatch
):
    import searchrl.rollout.engine.decode as decode

    merged = []  # overhead 0: each new-part length its own prefill batch; 10**9: one batch
    monkeypatch.setattr(decode, "_BUCKET_OVERHEAD", overhead)
    monkeypatch.setattr(decode, "merge_caches", lambda *a: merged.append(a) or merge_caches(*a))
    model, tok = tiny_lm
    on = HFGenerator(model, tok, batch_size=batch_size)
    off = HFGenerator(model, tok, batch_size=batch_size, kv_reuse=False)
    first = on.generate(prompts, sampling)
    same(first, off.generate(prompts, sampling))
    cont = extend(tok, prompts, first, 0)
    mixed = [
        cont[2],  # short prompt + long insertion
        tok.encode("Completely different start, no template"),  # new, nothing in common
        cont[0],
        tok.encode(TEMPLATE + "A new question, longer than the others by a few words?"),  # new
        prompts[1] + first[1].token_ids[:3],  # a prefix of a kept row (partial reuse)
        tok.encode("x"),  # one token
    ]
    a, b = on.generate(mixed, sampling), off.generate(mixed, sampling)
    same(a, b)  # split prefill batches still draw each row's random numbers in row order
    if sampling.greedy:
        alone = [HFGenerator(model, tok, kv_reuse=False).generate([p], GREEDY)[0] for p in mixed]
        same(a, alone)
    assert on.kv_stats.reused_tokens >= len(cont[2]) - len(tok.encode(INSERTS[2])) + len(cont[0])
    assert bool(merged) == (overhead == 0)


def test_kept_rows_are_bounded_and_dropped(tiny_lm, prompts):
    model, tok = tiny_lm
    gen = HFGenerator(model, tok, kv_keep_calls=1)
    gen.generate(prompts, GREEDY)
    assert gen.cached_rows == 3
    gen.generate(prompts[:1], GREEDY)  # the others are not continued: dropped
    assert gen.cached_rows == 1
    gen.reset_cache()
    assert gen.cached_rows == 0
    gen.generate(prompts, SamplingParams(max_new_tokens=0))
    assert gen.cached_rows == 0


def test_store_match_takes_the_longest_prefix_and_leaves_one_token():
    store = KVStore()
    store.entries = [KVEntry([1, 2, 3], torch.zeros(1, 2, 1, 3, 1)),
                     KVEntry([1, 2, 3, 4, 5], torch.zeros(1, 2, 1, 5, 1))]  # fmt: skip
    m = store.match([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5], [1, 2, 9], [7, 1]])
    assert [(x.entry.tokens, x.length) if x else None for x in m] == [
        ([1, 2, 3, 4, 5], 5), ([1, 2, 3, 4, 5], 4), ([1, 2, 3], 2), None]  # fmt: skip
    store.end_call(m, [])  # entry 2 was continued in full by prompt 0: replaced (dropped)
    assert [e.tokens for e in store.entries] == [[1, 2, 3]]


def test_shared_groups_nest_and_respect_their_base():
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 7], [1, 2, 3, 4, 5]]
    assert shared_groups(prompts, [0] * 4, [0] * 4, 2) == [([0, 3, 1, 2], 3)]
    assert shared_groups(prompts, [3] * 4, [0] * 4, 1) == [([0, 3, 1], 4)]
    assert shared_groups(prompts, [3] * 4, [0, 0, 0, 9], 1) == [([0, 1], 4)]


def test_unsupported_cache_falls_back_to_no_reuse(tiny_tokenizer, prompts, caplog):
    model = tiny_random_lm(tiny_tokenizer, arch="qwen2", use_sliding_window=True,
                           sliding_window=8, max_window_layers=0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="searchrl.rollout.engine.hf"):
        gen = HFGenerator(model, tiny_tokenizer)
    assert not gen.kv_reuse and "DynamicSlidingWindowLayer" in caplog.text
    gen.generate(prompts, GREEDY)
    assert gen.cached_rows == 0 and gen.kv_stats.reused_tokens == 0


# ---------------------------------------------------------------------------------------------
# (c) the real multi-turn loop


def _steered(lm, bigrams: dict[int, int], strength: float = 30.0):
    """Wrap ``lm`` so that each token in ``bigrams`` makes its successor very likely (a function
    of the last token only, so it stays a causal LM that KV reuse must reproduce)."""

    class Steered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm, self.config, self.generation_config = lm, lm.config, lm.generation_config
            nxt = torch.full((lm.get_input_embeddings().num_embeddings,), -1, dtype=torch.long)
            for a, b in bigrams.items():
                nxt[a] = b
            self.register_buffer("nxt", nxt)

        def get_input_embeddings(self):
            return self.lm.get_input_embeddings()

        def forward(self, input_ids, logits_to_keep=0, **kw):
            out = self.lm(input_ids=input_ids, logits_to_keep=logits_to_keep, **kw)
            k = out.logits.shape[1]
            target = self.nxt[input_ids[:, -k:]]  # (b, k)
            bias = torch.zeros_like(out.logits).scatter_(-1, target.clamp(min=0)[..., None],
                                                         strength)  # (b, k, V)  # fmt: skip
            out.logits = out.logits + bias * (target >= 0)[..., None]
            return out

    return Steered().eval()


def _world(tok):
    docs = [Passage(str(i), t, f"{t} is a city in {c}.") for i, (t, c) in
            enumerate([("Paris", "France"), ("Rome", "Italy"), ("Lyon", "France")])]  # fmt: skip
    retriever = BM25Retriever.build(docs, show_progress=False)
    exs = [QAExample(str(i), q, ["x"]) for i, q in enumerate(QUESTIONS)]
    ids = {s: tok.encode(s, add_special_tokens=False) for s in
           ("\n", "<search>Paris</search>", "</information>\n\n")}  # fmt: skip
    chain = [ids["\n"][-1], *ids["<search>Paris</search>"]]  # '\n' '<' 'search' '>' 'Paris' '</'
    bigrams = dict(zip(chain, chain[1:]))
    bigrams[ids["</information>\n\n"][-1]] = chain[1]  # after an observation: search again
    return retriever, exs, bigrams


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_run_rollouts_identical_with_and_without_reuse(tiny_lm, temperature):
    lm, tok = tiny_lm
    retriever, exs, bigrams = _world(tok)
    cfg = RolloutConfig(max_turns=2, topk=2, max_new_tokens_per_turn=12, max_obs_tokens=60,
                        min_turn_tokens=4, temperature=temperature, seed=3,
                        max_context_tokens=1024)  # fmt: skip
    for model, n_searches in ((_steered(lm, bigrams), 2), (lm, 0)):  # steered; purely random
        runs = {}
        for reuse in (True, False):
            gen, stats = HFGenerator(model, tok, kv_reuse=reuse), RolloutStats()
            runs[reuse] = run_rollouts(exs, gen, retriever, tok, cfg, n_samples=2, batch_size=4,
                                       stats=stats, progress=False)  # fmt: skip
            assert gen.cached_rows == 0  # reset at the end of the run
            assert (gen.kv_stats.reused_tokens > 0) == reuse
        for t_on, t_off in zip(runs[True], runs[False]):
            assert t_on.response_ids == t_off.response_ids
            assert t_on.loss_mask == t_off.loss_mask and t_on.finish_reason == t_off.finish_reason
            torch.testing.assert_close(torch.tensor(t_on.sampler_logprobs),
                                       torch.tensor(t_off.sampler_logprobs), atol=1e-4, rtol=0)
        assert [t.num_searches for t in runs[True]] == [n_searches] * 6
        if n_searches:
            assert {t.finish_reason for t in runs[True]} == {"search_on_last_turn"}


def _loop_cfg(**kw):
    base = dict(max_turns=2, topk=2, max_new_tokens_per_turn=12, max_obs_tokens=60,
                min_turn_tokens=4, seed=3, max_context_tokens=1024)  # fmt: skip
    return RolloutConfig(**(base | kw))


def _same_trajectories(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.response_ids == y.response_ids and x.loss_mask == y.loss_mask
        assert x.finish_reason == y.finish_reason and x.turns == y.turns
        torch.testing.assert_close(torch.tensor(x.sampler_logprobs), torch.tensor(y.sampler_logprobs),
                                   atol=1e-4, rtol=0)  # fmt: skip


def test_continuous_schedule_equals_rounds_when_greedy(tiny_lm):
    lm, tok = tiny_lm
    retriever, exs, bigrams = _world(tok)
    model = _steered(lm, bigrams)
    runs = {}
    for schedule in ("continuous", "rounds"):
        stats = RolloutStats()
        runs[schedule] = run_rollouts(exs, HFGenerator(model, tok), retriever, tok,
                                      _loop_cfg(temperature=0.0, schedule=schedule), n_samples=2,
                                      batch_size=4, stats=stats, progress=False)  # fmt: skip
        assert stats.generated_tokens == sum(sum(t.loss_mask) for t in runs[schedule])
    _same_trajectories(runs["continuous"], runs["rounds"])
    assert all(t.num_searches == 2 for t in runs["rounds"])


def test_continuous_trajectories_do_not_depend_on_the_batch_size(tiny_lm):
    lm, tok = tiny_lm
    retriever, exs, bigrams = _world(tok)
    model = _steered(lm, bigrams, strength=3.0)  # a nudge: trajectories differ, some search
    cfg = _loop_cfg(temperature=1.0, schedule="continuous")
    runs = [run_rollouts(exs, HFGenerator(model, tok), retriever, tok, cfg, n_samples=2,
                         batch_size=b, progress=False) for b in (1, 4, 6)]  # fmt: skip
    _same_trajectories(runs[0], runs[1])
    _same_trajectories(runs[0], runs[2])
    assert len({tuple(t.response_ids) for t in runs[0]}) == 6  # sampled: all different
    other = run_rollouts(exs, HFGenerator(model, tok), retriever, tok,
                         _loop_cfg(temperature=1.0, seed=4, schedule="continuous"), n_samples=2,
                         batch_size=4, progress=False)  # fmt: skip
    assert [t.response_ids for t in other] != [t.response_ids for t in runs[0]]


def test_continuous_schedule_keeps_the_batch_size(tiny_lm):
    lm, tok = tiny_lm
    retriever, exs, bigrams = _world(tok)
    gen = HFGenerator(_steered(lm, bigrams, strength=3.0), tok)  # trajectories of many lengths
    seen = []  # (running rows, queued rows, keys in flight) before every step
    real_stream = gen.stream

    def stream(*a, **kw):
        s = real_stream(*a, **kw)
        step = s.step

        def traced():
            seen.append((s.running, len(s._queued), set(s._keys)))
            return step()

        s.step = traced
        return s

    gen.stream = stream
    stats = RolloutStats()
    trajs = run_rollouts(exs, gen, retriever, tok, _loop_cfg(temperature=1.0, schedule="continuous"),
                         n_samples=2, batch_size=4, stats=stats, progress=False)  # fmt: skip
    assert len(trajs) == 6 and stats.generator_calls == len(seen)
    assert max(len(keys) for *_, keys in seen) == 4  # never more than batch_size in flight
    assert {k for *_, keys in seen for k in keys} == {(i, s) for i in range(3) for s in range(2)}
    # (refill beside running trajectories of other lengths: test_loop's scripted stream)


def test_auto_schedule_is_rounds_on_cpu(tiny_lm):
    lm, tok = tiny_lm
    gen = HFGenerator(lm, tok)
    assert gen.can_stream and not gen.prefers_stream  # measured faster on CPU (README)
    gen.stream = lambda *a, **kw: pytest.fail("the auto schedule streamed on CPU")
    run_rollouts([QAExample("0", "q", ["a"])], gen, None, tok, _loop_cfg(), method="direct",
                 progress=False)  # fmt: skip


def test_schedule_config_errors(tiny_lm):
    lm, tok = tiny_lm
    with pytest.raises(Exception, match="rollout.schedule"):
        RolloutConfig(schedule="async")
    with pytest.raises(Exception, match="cannot stream"):
        run_rollouts([QAExample("0", "q", ["a"])], _Recorder(), None, tok,
                     RolloutConfig(schedule="continuous"), method="direct", progress=False)  # fmt: skip


class _Recorder:
    """A generator stub that records reset_cache() calls around generate()."""

    def __init__(self):
        self.log = []

    def generate(self, prompts, sampling, stop=None):
        from searchrl.rollout.engine.protocol import Completion

        self.log.append("generate")
        return [Completion([1], [0.0], "eos") for _ in prompts]

    def reset_cache(self):
        self.log.append("reset")


def test_run_rollouts_resets_at_start_and_end(tiny_tokenizer):
    gen = _Recorder()
    assert isinstance(gen, ResettableGenerator)
    run_rollouts([QAExample("0", "q", ["a"])], gen, None, tiny_tokenizer, method="direct",
                 progress=False)  # fmt: skip
    assert gen.log == ["reset", "generate", "reset"]
    reset_cache(object())  # a generator without the method: nothing happens


# ---------------------------------------------------------------------------------------------
# (d) changed weights never use stale KV


def _perturb(model, how: str) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for p in model.parameters():
            noise = 0.3 * torch.randn_like(p)
            if how == "optimizer":
                p.grad = -noise
            elif how == "data":
                p.data.add_(noise)  # its own version counter: not detected by the guard
    if how == "optimizer":
        torch.optim.SGD(model.parameters(), lr=1.0).step()


@pytest.mark.parametrize("how", ["optimizer", "data+reset", "data+run_rollouts"])
def test_changed_weights_never_use_stale_kv(tiny_lm, prompts, how):
    model, tok = tiny_lm
    gen = HFGenerator(model, tok)
    first = gen.generate(prompts, GREEDY)
    cont = extend(tok, prompts, first, 0)
    _perturb(model, "optimizer" if how == "optimizer" else "data")
    if how == "data+reset":
        gen.reset_cache()
    elif how == "data+run_rollouts":  # the loop resets at its start and end
        run_rollouts([QAExample("0", "q", ["a"])], gen, None, tok,
                     RolloutConfig(max_new_tokens_per_turn=2, min_turn_tokens=1),
                     method="direct", progress=False)  # fmt: skip
    fresh = HFGenerator(model, tok, kv_reuse=False).generate(cont, GREEDY)
    same(gen.generate(cont, GREEDY), fresh)
    assert gen.kv_stats.reused_tokens == 0 or how == "data+run_rollouts"


def test_stale_kv_would_change_the_output(tiny_lm, prompts):
    """The control for the test above: without the guard or a reset, stale KV is used."""
    model, tok = tiny_lm
    gen = HFGenerator(model, tok)
    cont = extend(tok, prompts, gen.generate(prompts, GREEDY), 0)
    _perturb(model, "data")  # not detected: this is what reset_cache() is for
    stale = gen.generate(cont, GREEDY)
    fresh = HFGenerator(model, tok, kv_reuse=False).generate(cont, GREEDY)
    assert gen.kv_stats.reused_tokens > 0
    diff = max(abs(x - y) for a, b in zip(stale, fresh) for x, y in zip(a.logprobs, b.logprobs))
    assert diff > 1e-2


@pytest.mark.parametrize("lazy", [False, True])
def test_past_cache_and_merge_layouts(tiny_lm, lazy):
    """Pasts left-padded with zeros; merged parts right-aligned, rows in part order; a cache
    whose layers are created lazily (no config) is filled the same way."""
    from searchrl.rollout.engine.kv_cache import past_cache

    config = None if lazy else tiny_lm[0].config
    a, b = torch.randn(2, 2, 3, 4, 5), torch.randn(2, 2, 3, 2, 5)  # (layers, 2, H, n, D)
    cache = past_cache(config, [a, None, b])
    keys = cache.layers[1].keys  # (3, H, 4, D)
    assert keys.shape == (3, 3, 4, 5)
    assert torch.equal(keys[0], a[1, 0]) and not keys[1].any()
    assert torch.equal(keys[2, :, 2:], b[1, 0]) and not keys[2, :, :2].any()
    other = past_cache(config, [b])
    merged, mask = merge_caches(config, [(cache, torch.ones(3, 4)), (other, torch.ones(1, 2))])
    assert mask.tolist()[3] == [0, 0, 1, 1] and merged.layers[0].values.shape == (4, 3, 4, 5)
    assert torch.equal(merged.layers[0].values[3, :, 2:], b[0, 1])
    assert torch.equal(merged.layers[1].keys[:3], keys)
