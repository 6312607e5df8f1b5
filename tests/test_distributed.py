"""Multi-process training on real gloo process groups: 2 ranks update like 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "dist_worker.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(out: Path, strategy: str, estimator: str, nproc: int) -> tuple[dict[str, torch.Tensor], float]:
    out.mkdir(parents=True)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    res = subprocess.run([*launch, str(WORKER), str(out), strategy, estimator], env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out / "weights.safetensors")), float((out / "grad_norm.txt").read_text())


@pytest.mark.parametrize("strategy,estimator", [
    ("fsdp", "gae"),
    pytest.param("fsdp", "grpo", marks=pytest.mark.slow),
    ("replicate", "grpo"),
    pytest.param("replicate", "reinforce_plus_plus", marks=pytest.mark.slow),
])
def test_two_ranks_update_like_one_process(tmp_path, strategy, estimator, tiny_tokenizer):
    one, gn1 = _run(tmp_path / "one", strategy, estimator, 1)
    two, gn2 = _run(tmp_path / "two", strategy, estimator, 2)
    assert one.keys() == two.keys() and one
    assert gn2 == pytest.approx(gn1, rel=1e-4)  # the same gradient: sums, not means, over ranks
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    moved = sum(int((one[n] != load_file(str(tmp_path / "one" / "weights.safetensors"))[n]).sum()) for n in one)
    assert moved == 0  # (sanity: the file read twice is the same)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from searchrl.testing import tiny_random_lm

    d = tmp_path_factory.mktemp("tiny-model")
    tiny_random_lm(tiny_tokenizer, seed=0).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _train_cmd(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "searchrl.cli", "train", f"out={out}", f"model.name={model_dir}", "model.amp=off",
            "save_every=1", "keep_checkpoints=5", "prompts_per_step=2", "algo.group_size=2", "mini_batch_size=4",
            "micro_batch_size=2", "algo.kl_coef=0.01", "data.world_entities=60", "data.eval_limit=2",
            "warmstart.steps=0", "rollout.max_turns=1", "rollout.max_new_tokens_per_turn=16",
            "rollout.min_turn_tokens=8", "report=false", *extra]


def test_train_cli_runs_on_two_processes_and_resumes_on_one(tiny_model_dir, tmp_path):
    """`searchrl train --nproc 2` (torchrun, gloo, FSDP2): rank 0 writes the run; its consolidated
    checkpoint then continues in a plain one-process run."""
    import json

    env = dict(_env(), SEARCHRL_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "run"
    res = subprocess.run([*_train_cmd(tiny_model_dir, out, "steps=2"), "--nproc", "2"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert [m["step"] for m in steps] == [1, 2]  # rank 0 alone logs
    assert (out / "model" / "config.json").exists()
    res = subprocess.run([*_train_cmd(tiny_model_dir, out, "steps=3"), "--resume"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "step-000002" in res.stderr
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert [m["step"] for m in steps] == [1, 2, 3]


def test_fsdp_generates_on_a_bf16_copy_and_exports_the_fp32_weights(tiny_model_dir, tmp_path):
    """Under FSDP each rank generates on an unsharded copy: in bf16 under amp (not fp32 plus a bf16
    copy of it); the exported model is still the policy's fp32 weights, gathered from the shards."""
    import json

    env = dict(_env(), SEARCHRL_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "run"
    cmd = [a for a in _train_cmd(tiny_model_dir, out, "steps=1") if a != "model.amp=off"]
    res = subprocess.run([*cmd, "model.amp=bf16", "--nproc", "2"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    exported = load_file(str(out / "model" / "model.safetensors"))
    trained = load_file(str(out / "checkpoints" / "step-000001" / "policy.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.float32}
    for name, w in trained.items():
        assert torch.equal(exported[name], w), name


def test_generation_copy_is_in_the_amp_dtype_and_keeps_buffers(tiny_tokenizer):
    from searchrl.testing import tiny_random_lm
    from searchrl.training.models import generation_copy

    model = tiny_random_lm(tiny_tokenizer, seed=0)
    gen = generation_copy(model, torch.bfloat16)
    assert {p.dtype for p in gen.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in gen.parameters())
    assert {b.dtype for b in gen.buffers() if b.is_floating_point()} <= {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the policy is untouched
    assert {p.dtype for p in generation_copy(model, None).parameters()} == {torch.float32}


def _worker_pids(marker: str) -> dict[int, int]:
    """LOCAL_RANK -> pid of the torchrun workers whose command line mentions ``marker``."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or marker not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:
            continue
        if "LOCAL_RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            pids[int(env["LOCAL_RANK"])] = int(proc.name)
    return pids


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_and_the_run_resumes_exactly(tiny_model_dir, tmp_path):
    """SIGKILL one of two ranks mid-run: the job ends (no hang) with a clear error; `--resume` on
    two ranks then ends with the uninterrupted run's weights."""
    import signal
    import time

    env = dict(_env(), SEARCHRL_CACHE=str(tmp_path / "cache"))
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = subprocess.run([*_train_cmd(tiny_model_dir, full, "steps=3", "eval_before=false"), "--nproc", "2"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen([*_train_cmd(tiny_model_dir, cut, "steps=3", "eval_before=false"), "--nproc", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = cut / "checkpoints" / "step-000001" / "COMPLETE"
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pids = _worker_pids(str(cut))
    assert target.exists() and 1 in pids, "the job never reached its step-1 checkpoint"
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and time.time() - t0 < 120
    assert "2-process job failed" in err and "--resume" in err
    res = subprocess.run([*_train_cmd(tiny_model_dir, cut, "steps=3", "eval_before=false"), "--nproc", "2",
                          "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(str(full / "checkpoints" / "step-000003" / "policy.safetensors"))
    b = load_file(str(cut / "checkpoints" / "step-000003" / "policy.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_each_rank_takes_its_own_gpu_before_joining_the_group(monkeypatch):
    """Under torchrun on CUDA every rank must compute on GPU LOCAL_RANK (NCCL refuses two ranks on
    one GPU); "cuda" without an index then resolves to it. Recorded without a GPU."""
    from searchrl.training import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
    d = distributed.init_from_env(torch.device("cuda"))
    assert calls == [("set_device", 3), ("init", "nccl")]
    assert (d.rank, d.world, d.local_rank) == (3, 4, 3)
    calls.clear()
    distributed.init_from_env(torch.device("cpu"))
    assert calls == [("init", "gloo")]  # no GPU selected on CPU
