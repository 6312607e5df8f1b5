"""The retrieval server dies in the middle of `searchrl train` and `searchrl eval` (real processes).

Training uses ``method=rag`` so that every step calls the server (a random tiny model would
rarely emit a search). Back within ``data.retriever_wait``: the step completes and the run goes on.
Not back: the run stops with one clear error line and its last checkpoint intact, and ``--resume``
finishes once the server is back. Eval: the run that lost its server stops with the error; the
same command after a restart answers every question exactly once in ``trajectories.jsonl``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).parents[1] / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

STEPS = 4
pytestmark = pytest.mark.slow  # each test runs two or three searchrl processes (~40-90 s)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from searchrl.testing import tiny_random_lm

    d = tmp_path_factory.mktemp("tiny-model")
    tiny_random_lm(tiny_tokenizer, seed=0).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return soak.make_index(tmp_path_factory.mktemp("outage-index"), passages=300)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, SEARCHRL_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train(model_dir: Path, out: Path, url: str, wait: float, *extra: str) -> list[str]:
    return [sys.executable, "-m", "searchrl.cli", "train", f"out={out}", f"model.name={model_dir}",
            f"steps={STEPS}", "save_every=1", "keep_checkpoints=10", "prompts_per_step=2", "algo.group_size=2",
            "mini_batch_size=2", "micro_batch_size=2", "ppo_epochs=1", "algo.kl_coef=0", "method=rag",
            f"data.retriever_url={url}", f"data.retriever_wait={wait}", "data.world_entities=60",
            "data.eval_limit=2", "eval_before=false", "report=false", "warmstart.steps=0", "rollout.max_turns=1",
            "rollout.max_new_tokens_per_turn=16", "eval_rollout.max_turns=1", "eval_rollout.max_new_tokens_per_turn=16",
            *extra]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), "the run never got there"


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]


def test_train_survives_a_server_restart_within_the_wait(tiny_model_dir, index, tmp_path):
    srv = soak.Server(index).wait()
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(tiny_model_dir, out, srv.url, 60), env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "checkpoints" / "step-000001" / "COMPLETE", proc)
        srv.stop(signal.SIGKILL)
        time.sleep(4)  # steps that need the server now wait in the client's retry loop
        assert proc.poll() is None, "the run died while the server was down"
        srv = soak.Server(index, port=srv.port).wait()
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.stop()
    assert proc.returncode == 0, err[-3000:]
    assert "no retrieval server answered" in err  # the outage was met, and logged
    assert _steps(out) == list(range(1, STEPS + 1))


def test_train_stops_cleanly_when_the_server_stays_down(tiny_model_dir, index, tmp_path):
    from searchrl.training.checkpoint import list_checkpoints

    srv = soak.Server(index).wait()
    out = tmp_path / "run"
    proc = subprocess.Popen(_train(tiny_model_dir, out, srv.url, 3), env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "checkpoints" / "step-000001" / "COMPLETE", proc)
        srv.stop(signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    msgs = [x for x in err.splitlines() if "searchrl train: error:" in x]
    assert len(msgs) == 1 and "unavailable" in msgs[0] and srv.url in msgs[0], err[-3000:]
    good = list_checkpoints(out)
    last = int(good[-1].name.split("-")[1])
    assert 1 <= last < STEPS and _steps(out)[-1] >= last  # the last checkpoint is intact and usable

    srv = soak.Server(index, port=srv.port).wait()
    try:
        res = subprocess.run(_train(tiny_model_dir, out, srv.url, 3, "--resume"), env=_env(tmp_path),
                             capture_output=True, text=True, timeout=600)
    finally:
        srv.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    assert _steps(out) == list(range(1, STEPS + 1))


def test_eval_answers_every_question_exactly_once_across_an_outage(tiny_model_dir, index, tmp_path):
    data = tmp_path / "nq_test.jsonl"
    n = 24
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"where is river{i} city?",
                                        "golden_answers": ["x"]}) + "\n" for i in range(n)))
    out = tmp_path / "eval"
    srv = soak.Server(index).wait()

    def cmd(url: str) -> list[str]:
        return [sys.executable, "-m", "searchrl.cli", "eval", "--data", str(data), "--model", str(tiny_model_dir),
                "--retriever-url", url, "--method", "rag", "--out", str(out), "--max-new-tokens", "6",
                "--batch-size", "2", "--device", "cpu", "--no-progress"]

    env = _env(tmp_path, SEARCHRL_RETRIEVER_WAIT="2")
    proc = subprocess.Popen(cmd(srv.url), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    traj = out / "trajectories.jsonl"
    try:
        deadline = time.time() + 600
        while (not traj.exists() or not traj.read_text().strip()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        srv.stop(signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(traj.read_text().splitlines())
    assert proc.returncode == 2 and "unavailable" in err, err[-3000:]
    assert 0 < done_before < n, "the outage must hit the run part-way"

    srv = soak.Server(index, port=srv.port).wait()
    try:
        res = subprocess.run(cmd(srv.url), env=env, capture_output=True, text=True, timeout=600)
    finally:
        srv.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    ids = [json.loads(x)["id"] for x in traj.read_text().splitlines() if x.strip()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n)) and len(ids) == n  # each exactly once
    assert f"resuming {out}: {done_before} of {n} questions done" in res.stdout
