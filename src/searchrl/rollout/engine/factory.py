"""Build a generation backend by name (``hf`` or ``vllm``).

Left out: picking a backend automatically (the caller names one) and any backend's own options,
which pass through as keyword arguments.
"""

from __future__ import annotations

from typing import Any

from searchrl.errors import ConfigError
from searchrl.rollout.engine.protocol import Generator

GENERATOR_KINDS = ("hf", "vllm")


def make_generator(
    kind: str = "hf",
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_path: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    **kwargs: Any,
) -> Generator:
    """Build a generation backend by name.

    ``hf``: wraps ``model``/``tokenizer`` when given (e.g. the policy being trained), else loads
    ``model_path`` (default: SmolLM2-135M-Instruct) with ``dtype`` (default float32) and
    ``device`` (default cpu); ``kwargs`` go to :class:`~searchrl.rollout.engine.hf.HFGenerator`
    (``batch_size``, ``eos_token_ids``, ``kv_reuse``, ``kv_keep_calls``).
    ``vllm``: a :class:`~searchrl.rollout.engine.vllm_backend.VLLMGenerator` over ``model_path`` (default:
    the cached SmolLM2 folder; vLLM picks its own device); ``kwargs`` go to it (``sleep``) and
    to the vLLM engine.

    >>> make_generator("tgi")
    Traceback (most recent call last):
    ...
    searchrl.errors.ConfigError: generator kind: unknown 'tgi'; valid: hf, vllm
    """
    if kind == "hf":
        from searchrl.models import load_model
        from searchrl.rollout.engine.hf import HFGenerator

        if model is None:
            model, loaded_tokenizer = load_model(
                model_path, dtype=dtype or "float32", device=device or "cpu"
            )
            tokenizer = tokenizer or loaded_tokenizer
        elif tokenizer is None:
            raise ConfigError("generator: a tokenizer must be given with the model")
        return HFGenerator(model, tokenizer, device=device, **kwargs)
    if kind == "vllm":
        from searchrl.rollout.engine.vllm_backend import VLLMGenerator

        if model is not None:
            raise ConfigError("generator: the vllm backend loads its own model; pass model_path")
        if dtype is not None:
            kwargs.setdefault("dtype", dtype)
        return VLLMGenerator(model_path, **kwargs)
    raise ConfigError(f"generator kind: unknown {kind!r}; valid: {', '.join(GENERATOR_KINDS)}")
