"""Continuous batching (HFStream): rows joining and leaving between decode steps compute what
they would alone.

References: :meth:`HFGenerator.generate` (itself checked against transformers' generate() in
test_generator.py) for greedy outputs, and the same stream run with other batch compositions for
sampled ones (every row draws from its own seeded random stream). The loop's continuous schedule
is compared with its round schedule in test_kv_reuse.py.
"""

from __future__ import annotations

import pytest
import torch

from searchrl.errors import SearchRLError
from searchrl.rollout.engine.protocol import GenerationStream, SamplingParams, StreamingGenerator
from searchrl.rollout.engine.hf import HFGenerator
from searchrl.rollout.engine.sampling import counter_seed, sample_next, sample_rows

PROMPTS = ["You are a careful assistant. Think, then search or answer.\nQuestion: Who wrote the "
           "novel about the white whale that a one-legged captain hunts at sea?",
           "Capital of France?", "Hi", "You are a careful assistant. Think, then search or "
           "answer.\nQuestion: Hi"]  # fmt: skip
SEEDS = [11, 12, 13, 14]


@pytest.fixture
def prompts(tiny_tokenizer):
    return [tiny_tokenizer.encode(p) for p in PROMPTS]


def drain(stream, schedule=None, budget=8):
    """Step until idle; ``schedule[k]`` = rows (key, prompt, seed) to add before step ``k``."""
    out, k = {}, 0
    schedule = dict(schedule or {})
    while stream.busy or any(s >= k for s in schedule):
        for key, prompt, seed in schedule.pop(k, []):
            stream.add(key, prompt, budget, seed)
        out.update(stream.step())
        k += 1
    return out


def close(a, b, atol=1e-4):
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert a.stop_string == b.stop_string and a.text == b.text
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol, rtol=0)


@pytest.mark.parametrize("stop", [None, ["doc", "strengthen"]])
def test_stream_greedy_equals_generate(tiny_lm, prompts, stop):
    lm, tok = tiny_lm
    gen = HFGenerator(lm, tok)
    assert isinstance(gen, StreamingGenerator) and gen.can_stream
    want = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0), stop=stop)
    with gen.stream(SamplingParams(temperature=0.0), stop=stop) as s:
        assert isinstance(s, GenerationStream)
        staggered = {0: [(0, prompts[0], None)], 2: [(1, prompts[1], None)],
                     3: [(2, prompts[2], None), (3, prompts[3], None)]}  # fmt: skip
        got = drain(s, staggered)
        assert s.steps > 0 and not s.busy
    for i, c in enumerate(want):
        close(got[i], c)
    reasons = [c.finish_reason for c in want]
    assert reasons == (["stop", "length", "stop", "length"] if stop else ["length"] * 4)


def test_sampled_rows_do_not_depend_on_their_batch(tiny_lm, prompts):
    lm, tok = tiny_lm
    gen = HFGenerator(lm, tok)
    sampling = SamplingParams(temperature=1.0, top_p=0.9)
    rows = [(i, p, seed) for i, (p, seed) in enumerate(zip(prompts, SEEDS))]
    runs = []
    with gen.stream(sampling) as s:  # all at once
        runs.append(drain(s, {0: rows}, budget=12))
    with gen.stream(sampling) as s:  # one by one, reversed, joining a running batch
        runs.append(drain(s, {3 * k: [r] for k, r in enumerate(reversed(rows))}, budget=12))
    for i in range(len(rows)):  # alone
        with gen.stream(sampling) as s:
            runs.append(drain(s, {0: [rows[i]]}, budget=12) | {j: None for j in range(4) if j != i})
    for i in range(len(rows)):
        alone = runs[2 + i][i]
        close(runs[0][i], alone)
        close(runs[1][i], alone)
    with gen.stream(sampling) as s:  # another seed, other tokens
        other = drain(s, {0: [(0, prompts[0], 99)]}, budget=12)[0]
    assert other.token_ids != runs[0][0].token_ids


def test_sample_rows_draws_from_each_rows_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    counts = torch.zeros(4)
    for k in range(3000):
        tokens, logps = sample_rows(logits, SamplingParams(temperature=1.0), [5, 6], [k, k])
        assert tokens[1] == 3 and logps[1] == 0.0  # a one-hot row
        counts[tokens[0]] += 1
    torch.testing.assert_close(counts / counts.sum(), torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03, rtol=0)
    for k in range(200):  # top-p 0.7 keeps 0.5 + 0.3
        tokens, _ = sample_rows(logits, SamplingParams(temperature=1.0, top_p=0.7), [5, 6], [k, k])
        assert tokens[0] in (0, 1)
    # a row's draw depends on its own (seed, counter) only, not on its neighbours
    alone = sample_rows(logits[:1], SamplingParams(temperature=1.0), [9], [3])[0]
    assert all(sample_rows(logits, SamplingParams(temperature=1.0), [9, s], [3, c])[0][0] == alone
               for s, c in ((1, 0), (2, 7)))  # fmt: skip
    greedy, lp = sample_rows(logits, SamplingParams(temperature=0.0), [0, 0], [0, 0])
    want = sample_next(logits, SamplingParams(temperature=0.0), None)
    assert greedy.tolist() == want[0].tolist() == [0, 3] and torch.equal(lp, want[1])
    seeds = {counter_seed(s, c) for s in range(50) for c in range(200)}
    assert len(seeds) == 50 * 200 and all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuing_a_row_reuses_its_kv(tiny_lm, prompts, temperature):
    lm, tok = tiny_lm
    insert = tok.encode("\n<information>Doc 1(Title: Moby) A whale.</information>\n",
                        add_special_tokens=False)  # fmt: skip
    sampling = SamplingParams(temperature=temperature)
    outs = {}
    for reuse in (True, False):
        gen = HFGenerator(lm, tok, kv_reuse=reuse)
        with gen.stream(sampling) as s:
            first = drain(s, {0: [(i, p, SEEDS[i]) for i, p in enumerate(prompts)]})
            nxt = [(i, prompts[i] + first[i].token_ids + insert, 100 + i) for i in range(len(prompts))]
            second = drain(s, {0: nxt[:2], 2: nxt[2:]})
        outs[reuse] = (first, second)
        if reuse:  # the second turn ran only the inserted tokens (and each row's last token)
            assert gen.kv_stats.reused_tokens >= sum(len(p) + len(first[i].token_ids) - 1
                                                     for i, p in enumerate(prompts))  # fmt: skip
        else:
            assert gen.kv_stats.reused_tokens == 0
    for part in (0, 1):
        for i in range(len(prompts)):
            close(outs[True][part][i], outs[False][part][i])


def test_parked_rows_lend_their_prefix_and_are_dropped_after_release(tiny_lm, prompts):
    lm, tok = tiny_lm
    gen = HFGenerator(lm, tok)
    with gen.stream(SamplingParams(temperature=0.0)) as s:
        drain(s, {0: [(0, prompts[0], None), (1, prompts[1], None)]})
        assert set(s._parked) == {0, 1}
        s.release(0)
        assert set(s._parked) == {0, 1}  # kept until the next join: a new row may borrow it
        before = gen.kv_stats.reused_tokens
        got = drain(s, {0: [(3, prompts[3], None)]})  # shares the instruction with prompt 0
        shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[3])) if a != b)
        assert gen.kv_stats.reused_tokens - before == shared >= 16
        assert set(s._parked) == {1, 3}
    assert not s._parked and s.decoder is None
    with HFGenerator(lm, tok, kv_reuse=False).stream(SamplingParams(temperature=0.0)) as s:
        close(got[3], drain(s, {0: [(3, prompts[3], None)]})[3])  # same output from scratch


def test_leaving_rows_trim_the_cache_width(tiny_lm, prompts):
    lm, tok = tiny_lm
    gen = HFGenerator(lm, tok)
    long, short = prompts[0], prompts[2]
    with gen.stream(SamplingParams(temperature=0.0)) as s:
        s.add("long", long, 1)  # leaves after its first token
        s.add("short", short, 5)
        s.step()
        assert s.running == 1
        assert s.decoder.batch.attention.shape[1] == len(short) + 1  # the long row's columns are gone
        drain(s)


def test_stream_errors_and_zero_budget(tiny_lm, prompts):
    lm, tok = tiny_lm
    gen = HFGenerator(lm, tok)
    s = gen.stream(SamplingParams(temperature=1.0))
    with pytest.raises(SearchRLError, match="context manager"):
        s.step()
    with s:
        s.add("a", prompts[0], 0)
        with pytest.raises(SearchRLError, match="already queued"):
            s.add("a", prompts[1], 4)
        with pytest.raises(SearchRLError, match="outside the model's vocabulary"):
            s.add("b", [10**7], 4)
        with pytest.raises(SearchRLError, match="empty"):
            s.add("c", [], 4)
        done = s.step()
        assert [(k, c.token_ids, c.finish_reason) for k, c in done] == [("a", [], "length")]
        s.add("a", prompts[1], 2)  # the key is free again
        assert drain(s)["a"].finish_reason in ("length", "eos")
    with pytest.raises(SearchRLError, match="top_p"):
        gen.stream(SamplingParams(temperature=1.0, top_p=0.0))


def test_changed_weights_inside_a_stream_are_an_error(tiny_lm, prompts):
    lm, tok = tiny_lm
    gen = HFGenerator(lm, tok)
    with gen.stream(SamplingParams(temperature=0.0)) as s:
        drain(s, {0: [(0, prompts[0], None)]})
        with torch.no_grad():
            next(lm.parameters()).add_(0.1)
        s.add(1, prompts[1], 4)
        with pytest.raises(SearchRLError, match="weights changed"):
            s.step()


@pytest.mark.gpu
def test_stream_on_cuda(tiny_lm, prompts):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    lm, tok = tiny_lm
    gen = HFGenerator(lm, tok, device="cuda", amp=torch.bfloat16)  # fp32 weights: a bf16 copy runs
    assert gen.generation_model() is not lm and gen.prefers_stream
    want = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    with gen.stream(SamplingParams(temperature=0.0)) as s:
        got = drain(s, {0: [(0, prompts[0], None)], 2: [(i, prompts[i], None) for i in (1, 2, 3)]})
    for i, c in enumerate(want):  # bf16: the first token's log-prob is robust to batch shapes
        assert got[i].token_ids[0] == c.token_ids[0]
        assert abs(got[i].logprobs[0] - c.logprobs[0]) < 0.05
    rows = [(i, p, seed) for i, (p, seed) in enumerate(zip(prompts, SEEDS))]
    with gen.stream(SamplingParams(temperature=1.0)) as s:
        a = drain(s, {0: rows})
    with gen.stream(SamplingParams(temperature=1.0)) as s:
        b = drain(s, {0: rows})
    assert [a[i].token_ids for i in range(4)] == [b[i].token_ids for i in range(4)]  # seeded
