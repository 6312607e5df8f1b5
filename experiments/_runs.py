"""Helpers shared by the experiment scripts: run ``searchrl`` as a child process into a folder (read
back when finished, resumed when not), and give a run the evaluation of the model it starts from.

Every experiment here follows one pattern: a format warm-start is trained and evaluated once
(``searchrl train steps=0``: its ``model`` folder and its held-out evaluation), then RL runs and
baselines start from that model folder, so they all compare against the same "before" answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from searchrl.errors import SearchRLError
from searchrl.eval.compare import AFTER, BEFORE, RUN_SUFFIX

SEARCHRL = [sys.executable, "-m", "searchrl.cli"]
DONE = {"train": "summary.json", "eval": "metrics.json", "index": "manifest.json"}  # what a finished run leaves


class RunFailed(RuntimeError):
    """A ``searchrl`` child process exited with an error."""


def run_searchrl(command: str, args: list[str], out: Path, log: Path, threads: int) -> Path:
    """``searchrl COMMAND --out OUT ARGS`` with ``threads`` CPU threads, its output appended to ``log``.

    A finished run (``summary.json`` of ``train``, ``metrics.json`` of ``eval``) is not run again; an
    unfinished ``train`` continues from its newest checkpoint (``--resume``; ``eval`` resumes by
    itself). Returns ``out``; raises :class:`RunFailed` with the log's path on a non-zero exit."""
    if (out / DONE[command]).is_file():
        return out
    cmd = [*SEARCHRL, command, "--out", str(out), *args]
    if command == "train" and out.exists() and any(out.iterdir()):
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"start {out} ({threads} thread(s)); log {log}", flush=True)
    with log.open("a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not (out / DONE[command]).is_file():
        raise RunFailed(f"{out}: searchrl {command} failed (exit {rc}); see the end of {log}")
    print(f"done  {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def summary(run: Path) -> dict:
    return json.loads((run / DONE["train"]).read_text())


def start_from(run: Path, warm: Path) -> None:
    """Give the run folder ``run`` the warm-start run's evaluation as its "before" evaluation."""
    run.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", RUN_SUFFIX):
        target = run / f"{BEFORE}{suffix}"
        if not target.exists():
            shutil.copyfile(warm / f"{AFTER}{suffix}", target)


def threads_per_job(jobs: int) -> int:
    """The CPUs this process may run on (``taskset`` / a cgroup's cpuset narrow them), shared out."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // jobs)


def finish(make: Callable[[], dict], fmt: Callable[[dict], str], written: Path) -> int:
    """A script's end: run ``make``, print ``fmt`` of its result and the file it wrote; exit 1 with
    one error line when a run failed or the input is wrong."""
    try:
        result = make()
    except (RunFailed, FileNotFoundError, SearchRLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(fmt(result))
    print(f"\nwrote {written}")
    return 0


def check_overrides(overrides: list[str], reserved: tuple[str, ...]) -> str | None:
    """An error message for overrides that are not KEY=VALUE or set a key the script sets itself."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        return f"overrides are KEY=VALUE, got {bad}"
    fixed = [o for o in overrides if o.split("=", 1)[0] in reserved]
    if fixed:
        return f"{fixed}: the script sets {', '.join(reserved)} itself"
    return None
