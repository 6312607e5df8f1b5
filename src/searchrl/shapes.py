"""Shapes of public checkpoints (their ``config.json`` values), without any weights.

Used where a model's size matters but its weights are absent: ``searchrl train --dry-run`` (memory
estimates for a hub id) and random-weight benchmarks (:mod:`searchrl.testing`). Left out: any
shape not listed here (give a local folder with a ``config.json`` instead).
"""

from __future__ import annotations

from typing import Any

from searchrl.errors import ConfigError

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
