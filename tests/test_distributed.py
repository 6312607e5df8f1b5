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
