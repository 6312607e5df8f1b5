"""`searchrl train --dry-run`: validates, counts parameters on the meta device, estimates memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from searchrl.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("preset,params", [("ppo_qwen2.5-3b", 3.09e9), ("grpo_qwen2.5-7b", 7.62e9)])
def test_dry_run_estimates_per_rank_memory_of_the_presets(preset, params, capsys):
    assert main(["train", "--config", str(CONFIGS / f"{preset}.yaml"), "--nproc", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    row = json.loads(out.strip().splitlines()[-1])
    assert row["params"] == pytest.approx(params, rel=0.01) and row["world"] == 8
    assert row["policy (fp32 weights, grads, AdamW)"] == pytest.approx(16 * row["params"] / 8 / 2**30, rel=1e-3)
    assert ("critic (fp32 weights, grads, AdamW)" in row) == preset.startswith("ppo")
    one = main(["train", "--config", str(CONFIGS / f"{preset}.yaml"), "--dry-run"])
    assert one == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["per_rank_gib"] > row["per_rank_gib"]


def test_dry_run_fails_on_a_bad_config_before_anything_else(capsys):
    assert main(["train", "--dry-run", "algo.kl_coef=0.1", "algo.kl_estimator=k1"]) == 2
    assert "algo.kl_estimator" in capsys.readouterr().err
