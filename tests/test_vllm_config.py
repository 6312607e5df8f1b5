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


def test_vllm_backend_without_vllm_is_a_clear_error(monkeypatch, tiny_lm):
    from searchrl.training.models import ModelBundle

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError even if installed
    model, tok = tiny_lm
    bundle = ModelBundle(model, tok, None, None, False, torch.device("cpu"))
    assert bundle.weight_sync(bundle.generator()) is None  # the HF backend runs the policy itself
    with pytest.raises(SearchRLError, match="pip install vllm"):
        bundle.generator(ModelConfig(backend="vllm"))


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
