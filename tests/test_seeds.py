"""`searchrl train --seeds`: a tiny end-to-end loop over two seeds (tiny random model, 60-entity
world, one RL step), resuming, errors, and the seeds summary's arithmetic on hand-made runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from searchrl.cli import main
from searchrl.errors import ConfigError
from searchrl.eval.stats import grouped_intervals
from searchrl.training import pipeline
from searchrl.training.seeds import parse_seeds, seeds_summary


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from searchrl.testing import tiny_random_lm

    d = tmp_path_factory.mktemp("tiny-model")
    tiny_random_lm(tiny_tokenizer, seed=0).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def train_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--seeds", "0,1", "--out", str(out), f"model.name={model_dir}", "steps=1",
            "prompts_per_step=2", "algo.group_size=2", "mini_batch_size=2", "micro_batch_size=2",
            "data.world_entities=60", "data.eval_limit=6", "report=false", "warmstart.steps=0",
            "rollout.max_turns=1", "rollout.max_new_tokens_per_turn=16", "eval_rollout.max_turns=1",
            "eval_rollout.max_new_tokens_per_turn=16", "model.amp=off", *extra]  # fmt: skip


def test_seeds_loop_end_to_end(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEARCHRL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "seeds"
    assert main(train_args(tiny_model_dir, out)) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "seeds.json").read_text())
    assert result["seeds"] == [0, 1] and "| mean |" in printed and "seeds.json" in printed
    assert "1-hop 0.000 -> 0.000 (+0.000)" in printed  # the random model never answers
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["config"]["seed"] == seed and summary["config"]["out"] == str(run)
        gain = summary["gain"]  # written by the pipeline: before -> after with its interval
        assert gain["n"] == 6 and gain["before"] == summary["eval_before"]["em"]
        assert gain["after"] == summary["eval_after"]["em"]
        assert gain["gain"] == pytest.approx(gain["after"] - gain["before"])
        assert gain["ci95"][0] <= gain["gain"] + 1e-9 <= gain["ci95"][1] + 2e-9
        assert set(gain["by_hops"]) <= {"1", "2"} and sum(e["n"] for e in gain["by_hops"].values()) == 6
        rec = json.loads((run / "eval_after_trajectories.jsonl").read_text().splitlines()[0])
        assert {"answerable", "em", "f1"} <= set(rec)  # the same records as `searchrl eval` writes
        row = result["per_seed"][str(seed)]
        assert (row["before"], row["after"], row["gain"], row["ci95"]) == (
            gain["before"], gain["after"], gain["gain"], gain["ci95"])
    gains = [result["per_seed"][s]["gain"] for s in ("0", "1")]
    assert result["gain"]["mean"] == pytest.approx(sum(gains) / 2) and result["gain"]["min"] == min(gains)
    assert result["gain"]["mean_ci95"] is not None

    # --resume reads finished seeds instead of training them again
    with monkeypatch.context() as m:
        m.setattr(pipeline, "run_training", lambda *a, **k: pytest.fail("a finished seed ran again"))
        assert main(train_args(tiny_model_dir, out, "--resume")) == 0
    assert json.loads((out / "seeds.json").read_text()) == result
    capsys.readouterr()
    assert main(train_args(tiny_model_dir, out)) == 2  # without --resume: refused, nothing overwritten
    assert "already holds a run" in capsys.readouterr().err
    assert main(train_args(tiny_model_dir, out, "seed=3")) == 2
    assert "--seeds or seed=N" in capsys.readouterr().err


def _exported(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def test_seeds_share_one_warm_start_and_match_single_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The second seed loads the first one's warm-start instead of training it again, and ends with the
    very weights and answers of a plain `searchrl train seed=1`; a changed setting is refused."""
    from searchrl.training import sft

    monkeypatch.setenv("SEARCHRL_CACHE", str(tmp_path / "cache"))
    calls = []
    real_sft_train = sft.sft_train
    monkeypatch.setattr(sft, "sft_train", lambda *a, **k: calls.append(1) or real_sft_train(*a, **k))
    warm = ["warmstart.steps=2", "warmstart.examples=8", "warmstart.lr=5e-2", "warmstart.batch_size=2"]
    out = tmp_path / "seeds"
    assert main([a for a in train_args(tiny_model_dir, out, *warm) if a != "warmstart.steps=0"]) == 0
    assert len(calls) == 1  # seed 1 loaded it
    shared = out / "warmstart"
    assert {"policy.safetensors", "config.yaml", "warmstart.json", "eval_before.json"} <= {f.name for f in shared.iterdir()}
    for name in ("warmstart.json", "eval_before.json", "eval_before_trajectories.jsonl"):
        assert (out / "seed-1" / name).read_bytes() == (out / "seed-0" / name).read_bytes()

    single = tmp_path / "single"
    args = [a for a in train_args(tiny_model_dir, single, *warm, "seed=1") if a not in ("--seeds", "0,1", "warmstart.steps=0")]
    assert main(args) == 0
    assert len(calls) == 2
    a, b = _exported(out / "seed-1"), _exported(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    after = (out / "seed-1" / "eval_after_trajectories.jsonl").read_text()
    assert after == (single / "eval_after_trajectories.jsonl").read_text()

    # the folder is reused only under the configuration it was trained with
    changed = [a for a in train_args(tiny_model_dir, out, *warm, "warmstart.lr=1e-2", "--resume") if a != "warmstart.steps=0"]
    shutil.rmtree(out / "seed-1")
    capsys.readouterr()
    assert main(changed) == 2
    assert "warm-start trained under another configuration" in capsys.readouterr().err


def test_single_run_prints_its_gain(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEARCHRL_CACHE", str(tmp_path / "cache"))
    args = [a for a in train_args(tiny_model_dir, tmp_path / "run") if a not in ("--seeds", "0,1")]
    assert main(args) == 0
    gain = json.loads((tmp_path / "run" / "summary.json").read_text())["gain"]
    lo, hi = gain["ci95"]
    assert f"EM gain {gain['gain']:+.3f}, 95% paired interval [{lo:+.3f}, {hi:+.3f}] over 6 questions" in (
        capsys.readouterr().out)


def test_parse_seeds_refuses_bad_lists():
    assert parse_seeds("2,0") == [2, 0]
    for bad in ("0,x", "", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def _fake_run(run: Path, before: list[float], after: list[float]) -> dict:
    """A run folder with before/after trajectories over questions q0..: 1.0 = right answer."""
    from searchrl.eval.compare import run_gain

    run.mkdir(parents=True)
    for name, ems in (("eval_before", before), ("eval_after", after)):
        with open(run / f"{name}_trajectories.jsonl", "w") as f:
            for i, em in enumerate(ems):
                source = "world_1hop" if i % 2 else "world_2hop"
                rec = {"id": f"q{i}", "source": source, "golden_answers": ["x"], "answer": "x" if em else "y"}
                f.write(json.dumps(rec) + "\n")
    summary = {"gain": run_gain(run), "wall_seconds": 1.0}
    (run / "summary.json").write_text(json.dumps(summary))
    return summary


def test_seeds_summary_arithmetic(tmp_path):
    rng = np.random.default_rng(0)
    n = 80
    runs = {}
    for seed, lift in ((0, 0.3), (1, -0.1), (2, 0.2)):
        before = (rng.random(n) < 0.4).astype(float)
        after = np.where(rng.random(n) < abs(lift), float(lift > 0), before)
        runs[seed] = (before, after)
        _fake_run(tmp_path / f"seed-{seed}", before.tolist(), after.tolist())
    summaries = {s: json.loads((tmp_path / f"seed-{s}" / "summary.json").read_text()) for s in runs}
    r = seeds_summary(tmp_path, summaries)
    per_seed_gain = {}
    for s, (b, a) in runs.items():
        macro = lambda v: (v[0::2].mean() + v[1::2].mean()) / 2  # noqa: E731 - two datasets
        per_seed_gain[s] = macro(a) - macro(b)
        assert r["per_seed"][str(s)]["gain"] == pytest.approx(per_seed_gain[s])
        assert r["per_seed"][str(s)]["n"] == n
    gains = list(per_seed_gain.values())
    assert r["gain"]["mean"] == pytest.approx(np.mean(gains))
    assert r["gain"]["min"] == pytest.approx(min(gains)) and r["gain"]["max"] == pytest.approx(max(gains))
    # the mean's interval: per question the gain averaged over seeds, stratified paired bootstrap
    diffs = np.mean([a - b for b, a in runs.values()], axis=0)
    ref = grouped_intervals({"world_2hop": {"em": diffs[0::2]}, "world_1hop": {"em": diffs[1::2]}})
    assert r["gain"]["mean_ci95"] == ref["avg"]["em"].bounds()
    assert ref["avg"]["em"].estimate == pytest.approx(r["gain"]["mean"])
    assert r["before_mean"] == pytest.approx(np.mean([r["per_seed"][str(s)]["before"] for s in runs]))


def test_shared_warm_start_key_ignores_rl_settings_only():
    """A --seeds folder's warm-start may be reused by runs that differ in how RL samples and steps
    (the demonstrations are scripted, "before" is evaluated greedily), not in what shapes the
    demonstrations or the evaluation."""
    from searchrl.config import apply_overrides
    from searchrl.training.config import TrainConfig
    from searchrl.training.pipeline import shared_warm_start_key, shared_warm_start_matches

    def cfg(*overrides):
        return apply_overrides(TrainConfig(), list(overrides))

    base = shared_warm_start_key(cfg())
    assert shared_warm_start_key(cfg("rollout.top_p=0.9", "rollout.temperature=0.8", "algo.search_cost=0.1",
                                     "optim.lr=1e-5", "seed=3")) == base
    for changed in ("rollout.topk=3", "rollout.max_obs_tokens=100", "rollout.seed=5", "eval_rollout.topk=3",
                    "warmstart.lr=1e-2"):
        assert shared_warm_start_key(cfg(changed)) != base, changed
        assert not shared_warm_start_matches(cfg(changed), base), changed
    # a folder written with the older key (RL sampling fields in it) still fits the run that wrote it
    legacy = shared_warm_start_key(cfg("rollout.top_p=0.9"), with_rl_sampling=True)
    assert legacy != shared_warm_start_key(cfg("rollout.top_p=0.9"))
    assert shared_warm_start_matches(cfg("rollout.top_p=0.9"), legacy)
    assert not shared_warm_start_matches(cfg("rollout.topk=3"), legacy)
