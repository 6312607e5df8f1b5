"""Random models for tests and benchmarks, kept apart from production loading (:mod:`searchrl.models`).

* :func:`tiny_random_lm`: a tiny Llama/Qwen2-shaped model over a real tokenizer's vocabulary, for
  tests (cheap enough to build per test; ``tests/conftest.py``'s ``tiny_lm`` fixture);
* :func:`random_lm_from_config`: real shapes (Qwen2.5-3B..., :mod:`searchrl.shapes`) with random
  weights, for speed and memory benchmarks where no weights can be downloaded (weights do not
  change speed).

Nothing in training or evaluation imports this module. Left out: pretrained weights of any kind.
"""

from __future__ import annotations

from typing import Any

import torch

from searchrl.errors import ConfigError
from searchrl.models import resolve_device, resolve_dtype
from searchrl.shapes import KNOWN_CONFIGS, model_config

__all__ = ["KNOWN_CONFIGS", "model_config", "random_lm_from_config", "tiny_random_lm"]


def tiny_random_lm(
    tokenizer: Any, *, arch: str = "llama", seed: int = 0, dtype: str | torch.dtype = "float32",
    **config_overrides: Any,
) -> Any:
    """A tiny random causal LM (2 layers, hidden 64) over ``tokenizer``'s vocabulary, in eval mode.

    ``arch`` is ``"llama"`` or ``"qwen2"``; ``config_overrides`` go to the config. Weights come from
    a private RNG seeded with ``seed`` (the global RNG is left untouched). The init scale
    (``initializer_range=0.2``) is larger than usual so that logits are spread and greedy choices
    are not near-ties: batched and unbatched runs then pick the same tokens.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise ConfigError(f"arch: unknown {arch!r}; valid: {', '.join(classes)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
    )
    settings.update(config_overrides)
    config = classes[arch](**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    return model.eval()


def random_lm_from_config(
    name: str, *, dtype: str | torch.dtype = "bfloat16", device: str | torch.device | None = "cpu",
    seed: int = 0, **overrides: Any,
) -> Any:
    """A model of a real shape (e.g. ``"qwen2.5-3b"``) with random weights, built directly on
    ``device`` (``"meta"`` builds shapes only). For speed benchmarks: weights do not change
    speed."""
    from transformers import AutoModelForCausalLM

    config = model_config(name, **overrides)
    dev = torch.device("meta") if str(device) == "meta" else resolve_device(device)
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        with dev:
            model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    return model.eval()
