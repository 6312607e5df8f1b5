"""HFGenerator against references: transformers' own generate(), a full forward pass for log-probs,
a full-text decode for stop strings, and single-prompt runs for batching and row dropping.

Models are tiny random Llamas over the real SmolLM2 tokenizer (``tiny_lm`` in conftest.py): a real
byte-level BPE vocabulary gives multi-character tokens, so stop strings can straddle two tokens or
end inside one, and ``<|im_end|>`` is a real chat end token.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from searchrl.errors import ConfigError, SearchRLError
from searchrl.models import eos_token_ids
from searchrl.rollout.engine.factory import make_generator
from searchrl.rollout.engine.hf import HFGenerator
from searchrl.rollout.engine.protocol import Completion, Generator, SamplingParams
from searchrl.rollout.engine.sampling import sample_next
from searchrl.testing import tiny_random_lm

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)
TEXTS = [
    "The capital of France is",
    "Question: who wrote the novel about a whale? Think step by step and",
    "Hi",
]


@pytest.fixture
def prompts(tiny_lm):
    _, tok = tiny_lm
    return [tok.encode(t) for t in TEXTS]


def reference(model, tok, prompt, n, eos=None):
    """transformers' greedy generate() for one unpadded prompt, cut after the first EOS."""
    eos = eos_token_ids(tok, model) if eos is None else eos
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
        eos_token_id=list(eos), pad_token_id=tok.pad_token_id,
    )[0, len(prompt):].tolist()
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def first_stop_index(tok, ids, stop):
    """Reference rule: the first token after which the decoded text contains ``stop``."""
    for k in range(len(ids)):
        if stop in decode(tok, ids[: k + 1]):
            return k
    return None


# ---------------------------------------------------------------------------------------------
# equivalence with transformers' generate()


def test_implements_protocol(tiny_lm):
    assert isinstance(HFGenerator(*tiny_lm), Generator)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_single_prompts_match_hf_generate(tiny_tokenizer, prompts, arch):
    model = tiny_random_lm(tiny_tokenizer, arch=arch, seed=1)
    gen = HFGenerator(model, tiny_tokenizer)
    for p in prompts:
        (c,) = gen.generate([p], GREEDY)
        assert c.token_ids == reference(model, tiny_tokenizer, p, 16)
        assert c.finish_reason == "length" and len(c.token_ids) == 16


def tiny_gpt2(tok):
    """Absolute position embeddings: wrong position ids under left padding change the output."""
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
        initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_padded_batch_matches_hf_generate(tiny_lm, prompts, arch):
    model, tok = tiny_lm
    if arch == "gpt2":
        model = tiny_gpt2(tok)
    batch = HFGenerator(model, tok).generate(prompts, GREEDY)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert enc.input_ids.shape[1] > min(len(p) for p in prompts)  # really padded, on the left
    ref = model.generate(
        **enc, max_new_tokens=16, do_sample=False, eos_token_id=eos_token_ids(tok, model),
        pad_token_id=tok.pad_token_id,
    )[:, enc.input_ids.shape[1]:]
    for c, r in zip(batch, ref.tolist()):
        assert c.token_ids == r
        assert c.text == decode(tok, r)


def test_greedy_batch_equals_each_prompt_alone_and_chunking(tiny_lm, prompts):
    gen = HFGenerator(*tiny_lm)
    alone = [gen.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert [c.token_ids for c in gen.generate(prompts, GREEDY)] == alone
    chunked = HFGenerator(*tiny_lm, batch_size=2).generate(prompts, GREEDY)  # sorted, re-ordered
    assert [c.token_ids for c in chunked] == alone


# ---------------------------------------------------------------------------------------------
# log-probs and sampling


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3),
    SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=4),
    SamplingParams(max_new_tokens=12, temperature=0.0),
])
def test_logprobs_equal_full_forward(tiny_lm, prompts, sampling):
    model, tok = tiny_lm
    temperature = sampling.temperature if not sampling.greedy else 1.0
    for p, c in zip(prompts, HFGenerator(model, tok).generate(prompts, sampling)):
        assert len(c.logprobs) == len(c.token_ids) > 0
        ids = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1 : -1]  # (n, V): predicts each sampled token
        sampled = torch.tensor(c.token_ids)[:, None]  # (n, 1)
        expected = torch.log_softmax(logits / temperature, -1).gather(-1, sampled)[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_sampling_is_deterministic_under_a_seed(tiny_lm, prompts):
    gen = HFGenerator(*tiny_lm)
    s = SamplingParams(max_new_tokens=12, temperature=1.0, seed=11)
    first = [c.token_ids for c in gen.generate(prompts, s)]
    assert [c.token_ids for c in gen.generate(prompts, s)] == first
    other = [c.token_ids for c in gen.generate(prompts, SamplingParams(max_new_tokens=12, seed=12))]
    assert other != first
    same_prompt = gen.generate([prompts[0]] * 2, s)  # rows of one batch draw different tokens
    assert same_prompt[0].token_ids != same_prompt[1].token_ids


def test_tiny_top_p_is_greedy(tiny_lm, prompts):
    gen = HFGenerator(*tiny_lm)
    tiny_p = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=1e-6, seed=0)
    nucleus = gen.generate(prompts, tiny_p)
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert [c.token_ids for c in nucleus] == [c.token_ids for c in greedy]


def test_sample_next_follows_the_tempered_and_truncated_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)  # (N, 4)
    g = torch.Generator().manual_seed(0)
    tokens, logps = sample_next(logits, SamplingParams(temperature=1.0), g)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    torch.testing.assert_close(logps, torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[tokens])
    tokens, _ = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), g)  # keeps 0.5+0.3
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    tokens, logps = sample_next(logits, SamplingParams(temperature=0.5), g)
    sharp = torch.softmax(logits[0] / 0.5, -1)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(freq, sharp, atol=0.015, rtol=0)
    torch.testing.assert_close(logps, sharp.log()[tokens])


# ---------------------------------------------------------------------------------------------
# stopping


def _ascii(text):
    return text.isascii() and text.strip() != "" and "\ufffd" not in text


def find_stop(tok, ids, mid_token):
    """A stop string over greedy output ``ids`` that straddles tokens k-1 and k and, when
    ``mid_token``, ends one character before the end of token k. Returns (stop, k)."""
    for k in range(3, len(ids) - 2):
        prev, cur = decode(tok, [ids[k - 1]]), decode(tok, [ids[k]])
        if not (_ascii(prev) and _ascii(cur) and len(cur) >= 3 and len(prev) >= 2):
            continue
        stop = prev[-2:] + (cur[:-1] if mid_token else cur)
        if first_stop_index(tok, ids, stop) == k and stop not in cur and stop not in prev:
            return stop, k
    raise AssertionError("no suitable stop string in the reference output")


@pytest.mark.parametrize("mid_token", [False, True])
def test_stop_string_ends_its_row_and_others_continue(tiny_lm, prompts, mid_token):
    model, tok = tiny_lm
    gen = HFGenerator(model, tok)
    refs = [c.token_ids for c in gen.generate(prompts, GREEDY)]
    stop, k = find_stop(tok, refs[0], mid_token)
    assert all(first_stop_index(tok, r, stop) is None for r in refs[1:])
    out = gen.generate(prompts, GREEDY, stop=["<never-seen>", stop])
    assert out[0].token_ids == refs[0][: k + 1]  # kept exactly as sampled, whole last token
    assert (out[0].finish_reason, out[0].stop_string) == ("stop", stop)
    assert stop in out[0].text and out[0].text == decode(tok, refs[0][: k + 1])
    assert out[0].text.endswith(stop) != mid_token
    for c, r in zip(out[1:], refs[1:]):
        assert (c.token_ids, c.finish_reason, c.stop_string) == (r, "length", None)


def test_eos_ends_rows_and_rows_dropping_out_match_single_runs(tiny_lm, prompts):
    model, tok = tiny_lm
    refs = [c.token_ids for c in HFGenerator(model, tok).generate(prompts, GREEDY)]
    eos = {refs[0][4], refs[1][9]} - set(refs[2])  # rows 0 and 1 end at different steps
    assert len(eos) == 2
    gen = HFGenerator(model, tok, eos_token_ids=sorted(eos))
    sizes = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        out = gen.generate(prompts, GREEDY)
    finally:
        hook.remove()
    for c, r, p in zip(out, refs, prompts):
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        assert c.token_ids == r[:cut] == reference(model, tok, p, 16, eos=eos)
        assert c.finish_reason == ("eos" if cut < len(r) or r[-1] in eos else "length")
        assert c.token_ids == gen.generate([p], GREEDY)[0].token_ids  # same as alone
    assert [o.finish_reason for o in out[:2]] == ["eos", "eos"]
    assert sizes[0] == 3 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)  # rows dropped


def test_default_eos_ids_include_chat_end_tokens(tiny_lm):
    model, tok = tiny_lm
    ids = eos_token_ids(tok, model)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert tok.convert_tokens_to_ids("<|endoftext|>") in ids
    assert HFGenerator(model, tok).eos_token_ids == frozenset(ids)


def test_max_new_tokens(tiny_lm, prompts):
    gen = HFGenerator(*tiny_lm)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert [(len(c.token_ids), c.finish_reason) for c in out] == [(5, "length")] * 3
    empty = gen.generate(prompts[:2], SamplingParams(max_new_tokens=0))
    assert [(c.token_ids, c.logprobs, c.finish_reason) for c in empty] == [([], [], "length")] * 2
    assert gen.generate([], GREEDY) == []


def test_bad_prompts_raise_clear_errors(tiny_lm):
    gen = HFGenerator(*tiny_lm)
    with pytest.raises(SearchRLError, match="prompt 1 is empty"):
        gen.generate([[1, 2], []], GREEDY)
    with pytest.raises(SearchRLError, match="outside the model's vocabulary"):
        gen.generate([[1, 10**6]], GREEDY)


def test_training_mode_is_restored_and_training_still_works(tiny_lm, prompts):
    model, tok = tiny_lm
    model.train()
    out = HFGenerator(model, tok).generate(prompts[:1], GREEDY)
    assert model.training
    ids = torch.tensor([prompts[0] + out[0].token_ids])  # the trainer's use: backward afterwards
    model(ids, labels=ids).loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
    model.eval()
    assert out[0].token_ids == HFGenerator(model, tok).generate(prompts[:1], GREEDY)[0].token_ids


# ---------------------------------------------------------------------------------------------
# factory and the vLLM backend (not installed here: only its error and its pure helpers)


def test_make_generator_hf_wraps_given_model(tiny_lm, prompts):
    model, tok = tiny_lm
    gen = make_generator("hf", model=model, tokenizer=tok, batch_size=2)
    assert isinstance(gen, HFGenerator) and gen.batch_size == 2 and gen.model is model
    with pytest.raises(ConfigError, match="tokenizer"):
        make_generator("hf", model=model)


def test_vllm_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError even if installed
    from searchrl.rollout.engine.vllm_backend import VLLMGenerator

    with pytest.raises(SearchRLError, match="pip install vllm"):
        VLLMGenerator("/nonexistent")
    with pytest.raises(SearchRLError, match="pip install vllm"):
        make_generator("vllm")


def test_vllm_helpers_map_params_and_outputs():
    from searchrl.rollout.engine.vllm_backend import (
        _sampled_logprobs,
        finish_from_vllm,
        vllm_sampling_kwargs,
    )

    greedy = SamplingParams(max_new_tokens=9, temperature=0.0, top_p=0.5)
    kw = vllm_sampling_kwargs(greedy, None, [], 0)
    got = (kw["temperature"], kw["top_p"], kw["max_tokens"], kw["stop"], kw["seed"])
    assert got == (0.0, 1.0, 9, None, None)
    assert finish_from_vllm("abort", None) == ("length", None)
    lp = [
        {5: SimpleNamespace(logprob=-0.5), 7: SimpleNamespace(logprob=-3.0)},
        {9: SimpleNamespace(logprob=-0.1)},
    ]
    assert _sampled_logprobs([5, 9], lp) == [-0.5, -0.1]
    with pytest.raises(SearchRLError):
        _sampled_logprobs([5], None)


# ---------------------------------------------------------------------------------------------
# real model / GPU


@pytest.mark.slow
def test_smollm2_answers_a_trivial_question():
    from searchrl.models import load_model

    model, tok = load_model()
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    sampling = SamplingParams(max_new_tokens=24, temperature=0.0)
    (c,) = HFGenerator(model, tok).generate([prompt], sampling)
    assert "Paris" in c.text
    assert c.finish_reason == "eos" and c.token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.gpu
def test_greedy_on_cuda_matches_cpu(tiny_lm, prompts):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, tok = tiny_lm
    cpu = HFGenerator(model, tok).generate(prompts, GREEDY)
    on_gpu = HFGenerator(model, tok, device="cuda")
    sampled = on_gpu.generate(prompts, SamplingParams(max_new_tokens=8, seed=0))
    gpu = HFGenerator(model, tok).generate(prompts, GREEDY)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
    assert all(len(c.token_ids) == 8 for c in sampled) and isinstance(sampled[0], Completion)


def test_nucleus_from_the_top_k_equals_the_full_sort_and_samples_the_same_tokens():
    from searchrl.rollout.engine.sampling import NUCLEUS_FIRST_K, nucleus

    def full_sort(probs, top_p):  # the definition: sort everything, keep tokens with < top_p mass before them
        p, order = probs.sort(dim=-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)
        return torch.zeros_like(probs).scatter_(-1, order, p)

    g = torch.Generator().manual_seed(0)
    vocab = 5000
    # peaked rows (a nucleus of a few tokens), flat ones (more than NUCLEUS_FIRST_K tokens: k grows) and
    # a uniform one (k reaches the whole vocabulary)
    logits = torch.cat([torch.randn(6, vocab, generator=g) * 12, torch.randn(3, vocab, generator=g) * 0.5,
                        torch.zeros(1, vocab)])
    probs = torch.softmax(logits, -1)
    for top_p in (0.3, 0.7, 0.95):
        p, ids = nucleus(probs, top_p)
        assert p.shape[1] > NUCLEUS_FIRST_K  # the flat rows made it look further
        got, want = torch.zeros_like(probs).scatter_(-1, ids, p), full_sort(probs, top_p)
        torch.testing.assert_close(got[:-1], want[:-1], atol=0, rtol=0)
        # the uniform row is all ties: which tokens come first is the sort's choice, how many is not
        assert int((got[-1] > 0).sum()) == int((want[-1] > 0).sum()) >= top_p * vocab
        tokens, _ = sample_next(logits, SamplingParams(temperature=1.0, top_p=top_p), torch.Generator().manual_seed(1))
        u = torch.rand(probs.shape, generator=torch.Generator().manual_seed(1))
        expected = (full_sort(probs, top_p) / -u.log()).argmax(-1)  # the race over the whole vocabulary
        assert torch.equal(tokens[:-1], expected[:-1])
