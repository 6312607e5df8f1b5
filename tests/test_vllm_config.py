"""The vLLM settings of the training config and what they build, without vLLM (main suite).

The engine itself is tested in tests/test_vllm.py (marker ``vllm``, ``bash scripts/test-vllm.sh``).
"""

from __future__ import annotations

import sys

import pytest
import torch

from searchrl.errors import ConfigError, SearchRLError
from searchrl.training.config import ModelConfig


def test_model_backend_fields_are_checked():
    assert ModelConfig().backend == "hf"
    cfg = ModelConfig(backend="vllm", vllm_gpu_memory_utilization=0.3, vllm_tensor_parallel_size=2, vllm_sleep=True)
    assert (cfg.vllm_gpu_memory_utilization, cfg.vllm_tensor_parallel_size, cfg.vllm_sleep) == (0.3, 2, True)
    for bad, match in [(dict(backend="tgi"), "model.backend"),
                       (dict(vllm_gpu_memory_utilization=0.0), "gpu_memory_utilization"),
                       (dict(vllm_tensor_parallel_size=0), "tensor_parallel_size"),
                       (dict(backend="vllm", lora_r=8), "LoRA")]:
        with pytest.raises(ConfigError, match=match):
            ModelConfig(**bad)


def test_the_shipped_configs_rollouts_get_exact_vllm_logprobs():
    """Every shipped training config samples where a vLLM engine built for its rollout temperature
    returns the policy's own log-probs (so ``logprob_drift`` stays numerics only): a new default
    temperature / top-p that vLLM cannot report exactly fails here, in the main suite, not only in
    the vLLM lane (which caught top-p 0.7 under the old fixed mode)."""
    from pathlib import Path

    from searchrl.config import load_yaml_config
    from searchrl.rollout.engine.protocol import SamplingParams
    from searchrl.rollout.engine.vllm_backend import logprob_caveat, logprobs_mode
    from searchrl.training.config import TrainConfig

    configs = {"default": TrainConfig()}
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        configs[path.name] = load_yaml_config(TrainConfig, path)
    assert len(configs) >= 3
    for name, cfg in configs.items():
        r = cfg.rollout
        sampling = SamplingParams(r.max_new_tokens_per_turn, r.temperature, r.top_p)
        assert logprob_caveat(logprobs_mode(r.temperature), sampling) is None, (name, r.temperature, r.top_p)
    # and it can fail: the previous fixed mode at the default's top-p
    d = configs["default"].rollout
    assert logprob_caveat("processed_logprobs", SamplingParams(8, 0.5, d.top_p)) is not None


def test_vllm_backend_without_vllm_is_a_clear_error(monkeypatch, tiny_lm):
    from searchrl.training.models import ModelBundle

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError even if installed
    model, tok = tiny_lm
    bundle = ModelBundle(model, tok, None, None, False, torch.device("cpu"))
    assert bundle.weight_sync(bundle.generator()) is None  # the HF backend runs the policy itself
    with pytest.raises(SearchRLError, match="pip install vllm"):
        bundle.generator(ModelConfig(backend="vllm"))


def test_tensor_parallel_engines_are_refused_under_several_processes():
    from searchrl.training.distributed import Dist
    from searchrl.training.models import build_models

    cfg = ModelConfig(backend="vllm", vllm_tensor_parallel_size=2, name="/nonexistent")
    with pytest.raises(ConfigError, match="vllm_tensor_parallel_size=2 with 2 training processes"):
        build_models(cfg, need_reference=False, need_critic=False, dist=Dist(rank=0, world=2))  # before any load


def test_weight_sync_sends_the_policys_parameters(tiny_lm):
    from searchrl.rollout.engine.vllm_backend import weight_chunks
    from searchrl.training.models import ModelBundle

    model, tok = tiny_lm
    got = []

    class Engine:  # the part of VLLMGenerator the trainer's sync_weights calls
        def load_weights(self, weights):
            got.extend(weights)

    sync = ModelBundle(model, tok, None, None, False, torch.device("cpu")).weight_sync(Engine())
    sync(model)
    assert [n for n, _ in got] == [n for n, _ in model.named_parameters()]
    assert all(torch.equal(t, p) for (_, t), p in zip(got, model.parameters()))
    # chunks of whole layers: a decoder layer never straddles two chunks
    chunks = list(weight_chunks(model.named_parameters(), chunk_bytes=1))
    layers = [{n.split(".")[2] for n, _ in c if ".layers." in n} for c in chunks]
    assert len(chunks) > 2 and all(len(s) <= 1 for s in layers)
    assert sum(len(c) for c in chunks) == len(got)


def test_sleep_between_rollouts_and_wake_for_the_weight_sync(tiny_lm):
    """The sleep/wake order (GPU only in practice) over a recording stand-in for ``vllm.LLM``."""
    from searchrl.rollout.engine.protocol import reset_cache
    from searchrl.rollout.engine.vllm_backend import VLLMGenerator

    class LLM:
        def __init__(self):
            self.calls = []

        def sleep(self, level):
            self.calls.append(("sleep", level))

        def wake_up(self, tags=None):
            self.calls.append(("wake", tags))

        def reset_prefix_cache(self):
            self.calls.append(("reset",))

        def collective_rpc(self, fn):
            self.calls.append(("reload", len(fn.keywords["weights"])))

    model, _ = tiny_lm
    gen = object.__new__(VLLMGenerator)  # the engine is not built: only its bookkeeping runs
    gen.llm, gen.sleep, gen._asleep, gen._used = LLM(), True, False, False
    reset_cache(gen)  # a rollout run starts: nothing generated yet, the engine stays awake
    gen.ensure_awake(use=True)  # generate / stream
    reset_cache(gen)  # the run ends: asleep during the update
    reset_cache(gen)
    gen.load_weights(model)  # the trainer's sync: weights first, then the KV cache
    reset_cache(gen)  # the next run starts awake
    n = len(model.state_dict())  # a module goes as its state dict (tied lm_head included)
    assert gen.llm.calls == [("reset",), ("sleep", 1), ("wake", ["weights"]), ("reload", n), ("wake", None),
                             ("reset",), ("reset",)]
    gen.sleep = False
    gen.ensure_awake(use=True)
    reset_cache(gen)
    assert gen.llm.calls[-1] == ("reset",)  # without sleep: the prefix cache is reset
