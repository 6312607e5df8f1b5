"""``searchrl train --dry-run``: validate a config and estimate memory per GPU, building nothing heavy.

The model's shape comes from its ``config.json`` (a local folder), from the cached default model,
or, for a hub id of a public shape this package knows (``Qwen/Qwen2.5-3B`` ...), from
:data:`searchrl.shapes.KNOWN_CONFIGS`; parameters are counted on the ``meta`` device (no
weights). The estimate per rank, for ``world`` ranks under FSDP2 (``parallel.strategy=fsdp``):

- policy: fp32 master weights, gradients and AdamW's two moments, sharded: ``16 P / world``
  bytes (LoRA: the base weights in ``model.dtype`` on every rank, adapters negligible);
- reference (KL > 0, full fine-tune): fp32 weights, sharded, ``4 P / world``;
- critic (PPO): like the policy;
- generation: HF engine: a bf16 copy under amp (under FSDP the unsharded copy is that copy),
  else under FSDP an unsharded copy in ``model.dtype``; vLLM: bf16 weights over its
  tensor-parallel size;
- KV cache for the rank's concurrent rollouts: ``rows x context x 2 x layers x kv_heads x
  head_dim x 2`` bytes (bf16);
- activations of one micro-batch: with gradient checkpointing, each layer's input kept
  (``2 x rows x T x hidden`` bytes per layer) plus one layer recomputed (~``34 x rows x T x
  hidden``); without, ~``34 x rows x T x hidden`` per layer; plus float32 logits of the sampled
  tokens (a third of the response, as measured for search trajectories).

Left out: allocator fragmentation, communication buffers and the CUDA context (add ~10-20 %).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from searchrl.errors import SearchRLError
from searchrl.training.config import TrainConfig

GiB = 2**30


def model_shape(name: str | None) -> Any:
    """A transformers config for ``model.name`` without loading weights (see the module doc)."""
    from transformers import AutoConfig

    from searchrl.models import resolve_model_path
    from searchrl.shapes import KNOWN_CONFIGS, model_config

    if name and Path(name).is_dir():
        return AutoConfig.from_pretrained(name)
    if name is None:
        return AutoConfig.from_pretrained(resolve_model_path(None))
    key = name.split("/")[-1].lower()
    if key in KNOWN_CONFIGS:
        return model_config(key)
    raise SearchRLError(f"model.name={name!r}: no local folder and not a known shape "
                        f"({', '.join(sorted(KNOWN_CONFIGS))}); give a local path for --dry-run")


def count_parameters(config: Any) -> int:
    """Parameters of a model built from ``config`` on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate(cfg: TrainConfig, world: int, config: Any, params: int) -> dict[str, float]:
    """Bytes per rank by component (see the module doc), in GiB."""
    m, ro = cfg.model, cfg.rollout
    P, W = float(params), max(world, 1)
    sharded = W > 1 and cfg.parallel.strategy == "fsdp"
    div = W if sharded else 1
    wbytes = 4 if m.dtype == "float32" else 2
    out: dict[str, float] = {}
    if m.lora_r > 0:
        out["policy (base weights + LoRA)"] = P * wbytes
    else:
        out["policy (fp32 weights, grads, AdamW)"] = 16 * P / div
    if cfg.algo.kl_coef > 0 and m.lora_r == 0:
        out["reference"] = wbytes * P / div
    if cfg.algo.needs_critic:
        out["critic (fp32 weights, grads, AdamW)"] = 16 * P / div
    amp = m.amp in ("bf16", "auto") and m.dtype == "float32"
    if m.backend == "vllm":
        out["generation (vLLM bf16 weights)"] = 2 * P / m.vllm_tensor_parallel_size
    else:
        half_copy = amp and m.amp_copy  # generation on a bf16 copy (under FSDP: the unsharded copy itself)
        gen = 2 * P if half_copy else (P * wbytes if sharded else 0.0)
        out["generation (HF copies)"] = gen
    H, L = config.hidden_size, config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or H // config.num_attention_heads
    rows = -(-cfg.rollout_batch_size // W)
    out["KV cache (rollouts)"] = rows * ro.max_context_tokens * 2 * L * kv_heads * head_dim * 2
    T, mb = ro.max_context_tokens, cfg.micro_batch_size
    per_layer_full = 34 * mb * T * H
    acts = (2 * mb * T * H * L + per_layer_full) if m.gradient_checkpointing else per_layer_full * L
    sampled = mb * (T // 3)
    out["activations (one micro-batch)"] = acts + sampled * config.vocab_size * 4
    return {k: v / GiB for k, v in out.items()}


def dry_run(cfg: TrainConfig, world: int) -> str:
    """The validated config's memory estimate as a printable table (also returned as JSON last line)."""
    config = model_shape(cfg.model.name)
    params = count_parameters(config)
    parts = estimate(cfg, world, config, params)
    total = sum(parts.values())
    lines = [f"config OK; model {cfg.model.name or 'SmolLM2-135M-Instruct (bundled)'}: {params / 1e9:.2f}B parameters, "
             f"{config.num_hidden_layers} layers; {world} rank(s), strategy {cfg.parallel.strategy}",
             f"memory estimate per rank (GiB): {total:.1f} in all"]
    lines += [f"  {name:40s} {gib:8.2f}" for name, gib in parts.items()]
    lines.append(json.dumps({"params": params, "world": world, "per_rank_gib": round(total, 2),
                             **{k: round(v, 3) for k, v in parts.items()}}))
    return "\n".join(lines)
