"""Mixed precision (bf16 compute over fp32 weights) in generation, SFT and the RL update.

References: the same computation in fp32, and generation under autocast versus on the bf16 copy
of the weights. bf16 rounding must change the numbers a little (proof that bf16 is active) but not
much; KV reuse must give the same tokens in bf16 as without reuse (first turn; later turns' first
tokens close); the copy must follow every change of the weights; weights and their gradients
stay fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from searchrl.config import apply_overrides
from searchrl.models import amp_context, amp_dtype
from searchrl.rollout.engine.protocol import SamplingParams
from searchrl.rollout.engine.hf import HFGenerator
from searchrl.training.batch import collate, response_logprobs
from searchrl.training.config import TrainConfig
from searchrl.types import QAExample, Trajectory

BF16 = torch.bfloat16


def prompts(tok):
    qs = ["Who wrote the novel about the white whale?", "Capital of France?", "Hi there, how are you"]
    return [tok.encode(q, add_special_tokens=False) for q in qs]


def test_amp_modes_and_auto_never_picks_bf16_without_hardware(monkeypatch):
    import searchrl.models as models

    assert amp_dtype("off", "cpu") is None and amp_dtype("bf16", "cpu") is BF16
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: False)
    assert amp_dtype("auto", "cpu") is None
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: True)
    assert amp_dtype("auto", "cpu") is BF16
    with pytest.raises(Exception, match="amp: unknown"):
        amp_dtype("fp16x", "cpu")


def test_bf16_generation_is_close_to_fp32_and_kv_reuse_agrees(tiny_lm):
    model, tok = tiny_lm
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    fp32 = HFGenerator(model, tok, kv_reuse=False).generate(prompts(tok), greedy)
    on = HFGenerator(model, tok, kv_reuse=True, amp=BF16)
    off = HFGenerator(model, tok, kv_reuse=False, amp=BF16)
    a1, b1 = on.generate(prompts(tok), greedy), off.generate(prompts(tok), greedy)
    assert [c.token_ids for c in a1] == [c.token_ids for c in b1]
    # second turn: continue every row with an inserted text; reuse must still agree
    ins = tok.encode("\n<information>doc</information>\n", add_special_tokens=False)
    nxt = [p + c.token_ids + ins for p, c in zip(prompts(tok), a1)]
    a2, b2 = on.generate(nxt, greedy), off.generate(nxt, greedy)
    assert on.kv_stats.reused_tokens > 0
    # bf16 rounds differently for different batch shapes, so a random model's near-tied tokens may
    # part later on; the first token of the turn sees the same context either way
    torch.testing.assert_close(torch.tensor([c.logprobs[0] for c in a2]),
                               torch.tensor([c.logprobs[0] for c in b2]), atol=0.05, rtol=0)
    lp16 = torch.tensor([c.logprobs[0] for c in b1])
    lp32 = torch.tensor([c.logprobs[0] for c in fp32])
    assert not torch.equal(lp16, lp32)  # autocast really ran in bf16
    torch.testing.assert_close(lp16, lp32, atol=0.1, rtol=0)


def test_bf16_copy_matches_autocast_and_follows_the_weights(tiny_lm):
    model, tok = tiny_lm
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    gen = HFGenerator(model, tok, amp=BF16)
    runner = gen.generation_model()
    assert runner is not model and runner is gen.generation_model()  # made once
    assert {p.dtype for p in runner.parameters()} == {BF16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the model is untouched
    assert [b.dtype for b in runner.buffers()] == [b.dtype for b in model.buffers()]
    autocast = HFGenerator(model, tok, amp=BF16, amp_copy=False)
    assert autocast.generation_model() is model
    assert HFGenerator(model, tok).generation_model() is model  # no amp: no copy
    first = lambda outs: torch.tensor([c.logprobs[0] for c in outs])  # noqa: E731
    fp32 = first(HFGenerator(model, tok).generate(prompts(tok), greedy))
    lp_copy = first(gen.generate(prompts(tok), greedy))
    lp_autocast = first(autocast.generate(prompts(tok), greedy))
    assert not torch.equal(lp_copy, fp32)  # bf16 really ran
    torch.testing.assert_close(lp_copy, fp32, atol=0.1, rtol=0)
    torch.testing.assert_close(lp_copy, lp_autocast, atol=0.1, rtol=0)

    # an optimizer step changes the weights: the next call runs the new ones
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.05
    opt.step()
    after = gen.generate(prompts(tok), greedy)
    assert gen.generation_model() is runner  # refreshed in place
    for mine, theirs in zip(runner.parameters(), model.parameters()):
        assert torch.equal(mine, theirs.detach().to(BF16))
    fresh = HFGenerator(model, tok, amp=BF16).generate(prompts(tok), greedy)
    assert [c.token_ids for c in after] == [c.token_ids for c in fresh]
    assert not torch.equal(first(after), lp_copy)


def test_model_amp_copy_setting_reaches_the_generator(tiny_lm):
    from searchrl.training.models import ModelBundle

    model, tok = tiny_lm
    assert apply_overrides(TrainConfig(), ["model.amp_copy=false"]).model.amp_copy is False
    assert TrainConfig().model.amp_copy is True
    for amp_copy in (True, False):
        bundle = ModelBundle(model, tok, None, None, False, torch.device("cpu"), BF16, amp_copy)
        assert (bundle.generator().generation_model() is model) is not amp_copy


def test_update_under_autocast_keeps_fp32_weights_and_tracks_fp32_loss(tiny_lm):
    model, tok = tiny_lm
    ex = QAExample("q", "question", ["x"])
    p = tok.encode("Question one?", add_special_tokens=False)
    r = tok.encode(" some answer text here", add_special_tokens=False)
    b = collate([Trajectory(ex, p, r, [1] * len(r), [0.0] * len(r))], tok.pad_token_id or 0)
    m = copy.deepcopy(model)
    with torch.no_grad():
        ref, _ = response_logprobs(m, b)
    with amp_context(BF16, "cpu"):
        logp, _ = response_logprobs(m, b)
    (-logp.sum()).backward()
    assert logp.dtype == torch.float32 and not torch.equal(logp.detach(), ref)
    torch.testing.assert_close(logp.detach(), ref, atol=0.1, rtol=0)
    assert all(q.dtype == torch.float32 and q.grad is not None and q.grad.dtype == torch.float32
               for q in m.parameters() if q.requires_grad)


def test_config_rejects_unknown_amp_and_reads_bare_off():
    from searchrl.errors import ConfigError

    assert apply_overrides(TrainConfig(), ["model.amp=off"]).model.amp == "off"  # YAML: off -> False
    with pytest.raises(ConfigError, match="model.amp"):
        apply_overrides(TrainConfig(), ["model.amp=fp16x"])
