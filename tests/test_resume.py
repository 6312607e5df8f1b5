"""A training run killed mid-way (SIGKILL), stopped by SIGTERM, or left with a torn newest
checkpoint, then resumed, ends with exactly the uninterrupted run's weights; a second process on
the same ``out`` is refused while the first runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 4


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from searchrl.testing import tiny_random_lm

    d = tmp_path_factory.mktemp("tiny-model")
    model = tiny_random_lm(tiny_tokenizer, seed=0)
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _cmd(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "searchrl.cli", "train", f"out={out}", f"model.name={model_dir}",
            f"steps={STEPS}", "save_every=1", "keep_checkpoints=10", "prompts_per_step=2", "algo.group_size=2",
            "mini_batch_size=2", "micro_batch_size=2", "ppo_epochs=2", "algo.kl_coef=0.01",
            "data.world_entities=60", "data.eval_limit=2", "eval_before=false", "report=false",
            "warmstart.steps=0", "rollout.max_turns=1", "rollout.max_new_tokens_per_turn=16",
            "eval_rollout.max_turns=1", "eval_rollout.max_new_tokens_per_turn=16", *extra]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, SEARCHRL_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{STEPS:06d}" / "policy.safetensors"))


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    full = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(_cmd(tiny_model_dir, full), env=_env(full.parent), check=True, capture_output=True,
                   timeout=600)
    return full


def _same_weights_and_log(full: Path, cut: Path) -> None:
    a, b = _final_weights(full), _final_weights(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    import json

    def rewards(out: Path) -> list[float]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["reward"] for x in lines if '"reward"' in x]

    assert rewards(cut) == rewards(full)  # no duplicated or missing step records


def test_killed_run_resumes_to_identical_weights(tiny_model_dir, full_run, tmp_path):
    env = _env(tmp_path)
    full = full_run

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(tiny_model_dir, cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = cut / "checkpoints" / "step-000002" / "COMPLETE"
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind: as a crash or an OOM kill
    proc.wait()
    assert target.exists(), "the run never reached its step-2 checkpoint"
    assert not (cut / "checkpoints" / f"step-{STEPS:06d}").exists(), "killed too late to test anything"

    res = subprocess.run(_cmd(tiny_model_dir, cut, "--resume"), env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _final_weights(full), _final_weights(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [line for line in (cut / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]
    assert len(steps) == STEPS  # no duplicated or missing step records after the crash
    full_log = [line for line in (full / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]
    import json

    assert [json.loads(x)["reward"] for x in steps] == [json.loads(x)["reward"] for x in full_log]


def test_existing_run_dir_needs_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    res = subprocess.run(_cmd(tiny_model_dir, out), env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "--resume" in res.stderr


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum('"reward"' in x for x in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow  # two training processes: ~30-55 s
def test_sigterm_checkpoints_exits_nonzero_and_resumes_exactly(tiny_model_dir, full_run, tmp_path):
    """save_every=100: the only RL checkpoint is the one the SIGTERM path writes. While the run
    is going, a second process on the same out is refused by the run lock."""
    env = _env(tmp_path)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(tiny_model_dir, cut, "save_every=100"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(cut / "checkpoints" / "step-000000" / "COMPLETE", proc)
        second = subprocess.run(_cmd(tiny_model_dir, cut, "--resume"), env=env, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr[-1000:]
        deadline = time.time() + 600
        while _steps_logged(cut) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # stops at the next step boundary, well within 60 s
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.time() - t0 < 60
    assert proc.returncode == 2, err[-2000:]
    msgs = [x for x in err.splitlines() if "searchrl train: error:" in x]
    assert len(msgs) == 1, err[-2000:]
    last = msgs[0]
    assert last.startswith("searchrl train: error: stopped by SIGTERM after step ") and "--resume" in last
    step = int(last.split("after step ")[1].split(";")[0])
    assert 1 <= step < STEPS, "stopped too late to test anything"
    assert (cut / "checkpoints" / f"step-{step:06d}" / "COMPLETE").exists()
    assert _steps_logged(cut) == step

    res = subprocess.run(_cmd(tiny_model_dir, cut, "save_every=100", "--resume"), env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"step-{step:06d} (step {step})" in res.stderr
    _same_weights_and_log(full_run, cut)


@pytest.mark.slow
def test_torn_newest_checkpoint_resumes_from_the_previous_one(tiny_model_dir, full_run, tmp_path):
    env = _env(tmp_path)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(tiny_model_dir, cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(cut / "checkpoints" / "step-000002" / "COMPLETE", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = max((cut / "checkpoints").glob("step-*"), key=lambda p: p.name)
    assert newest.name != f"step-{STEPS:06d}", "killed too late to test anything"
    weights = newest / "policy.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
    res = subprocess.run(_cmd(tiny_model_dir, cut, "--resume"), env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{newest.name} is unusable" in res.stderr and "falls back" in res.stderr
    _same_weights_and_log(full_run, cut)
