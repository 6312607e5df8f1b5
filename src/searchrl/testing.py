"""Random models for tests and benchmarks, kept apart from production loading (:mod:`searchrl.models`).

* :func:`tiny_random_lm`: a tiny Llama/Qwen2-shaped model over a real tokenizer's vocabulary, for
  tests (cheap enough to build per test; ``tests/conftest.py``'s ``tiny_lm`` fixture);
* :func:`random_lm_from_config` / :func:`model_config`: real shapes (Qwen2.5-3B...) with random
  weights, for speed and memory benchmarks where no weights can be downloaded (weights do not
  change speed).

Nothing in training or evaluation imports this module. Left out: pretrained weights of any kind.
"""

from __future__ import annotations

from typing import Any

import torch

from searchrl.errors import ConfigError
from searchrl.models import resolve_device, resolve_dtype


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


_QWEN25_COMMON: dict[str, Any] = dict(
    model_type="qwen2", hidden_act="silu", max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, bos_token_id=151643,
    eos_token_id=151643, attention_dropout=0.0,
)

# Shapes of public checkpoints (their config.json), for benchmarks with random weights.
# Published sizes, checked in tests: 0.49B, 1.54B, 3.09B, 7.62B, 3.21B, 135M parameters.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(_QWEN25_COMMON, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN25_COMMON, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(_QWEN25_COMMON, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN25_COMMON, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, tie_word_embeddings=False),
    "llama3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192,
                        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                        head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
                        eos_token_id=128001, rope_parameters=dict(
                            rope_type="llama3", rope_theta=500000.0, factor=32.0,
                            low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2),
}


def model_config(name: str, **overrides: Any) -> Any:
    """A transformers config of a known public shape (see :data:`KNOWN_CONFIGS`).

    >>> model_config("qwen2.5-3b").num_hidden_layers
    36
    """
    key = name.lower()
    if key not in KNOWN_CONFIGS:
        raise ConfigError(f"model config: unknown {name!r}; valid: {', '.join(KNOWN_CONFIGS)}")
    from transformers import AutoConfig

    settings = {**KNOWN_CONFIGS[key], **overrides}
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


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
