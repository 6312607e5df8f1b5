"""experiments/ablations.py end to end on a tiny random model: one warm-start per seed, every arm
trained from its model with the arm's overrides and scored against its evaluation."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "experiments" / "ablations.py"
_spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
ablations = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablations)

TINY = ["steps=1", "prompts_per_step=2", "data.eval_limit=4", "warmstart.steps=1", "warmstart.examples=8",
        "rollout.max_new_tokens_per_turn=16", "eval_rollout.max_new_tokens_per_turn=16"]


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    from searchrl.testing import tiny_random_lm

    path = tmp_path / "tiny"
    tiny_random_lm(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=600)


def test_arms_start_from_the_seeds_warm_start(tmp_path, tiny_model_dir):
    out = tmp_path / "ab"
    r = _run(out, "--seeds", "0", "--arms", "grpo,ppo", f"model.name={tiny_model_dir}", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    ws = out / "warmstart" / "seed-0"
    ws_cfg = (ws / "config.yaml").read_text()
    assert "\nsteps: 0\n" in ws_cfg and f"name: {tiny_model_dir}" in ws_cfg  # no RL in the warm-start
    assert json.loads((ws / "warmstart.json").read_text())["losses"]  # it did warm-start
    assert "report:" not in (ws.parent / "seed-0.log").read_text()  # report=false: no report named
    assert f"report: {out / 'grpo' / 'seed-0'}/report/index.html" in (out / "grpo" / "seed-0.log").read_text()
    for arm, estimator in (("grpo", "grpo"), ("ppo", "gae")):
        run = out / arm / "seed-0"
        cfg = (run / "config.yaml").read_text()
        assert f"name: {ws / 'model'}" in cfg and f"estimator: {estimator}" in cfg and "\nsteps: 1\n" in cfg
        assert not (run / "warmstart.json").exists()  # no second warm-start
        # the "before" answers are the warm-start's, byte for byte
        assert (run / "eval_before_trajectories.jsonl").read_bytes() == (ws / "eval_after_trajectories.jsonl").read_bytes()
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    result = json.loads((out / "ablations.json").read_text())
    assert set(result["arms"]) == {"grpo", "ppo"} and set(result["versus"]) == {"ppo"}
    assert result["arms"]["ppo"]["per_seed"]["0"]["n"] == 4
    assert "| ppo |" in r.stdout

    # a second call reads the finished runs instead of training again
    stamp = (out / "ppo" / "seed-0" / "summary.json").stat().st_mtime_ns
    r2 = _run(out, "--seeds", "0", "--arms", "grpo,ppo", f"model.name={tiny_model_dir}", *TINY)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert (out / "ppo" / "seed-0" / "summary.json").stat().st_mtime_ns == stamp
    assert "start " not in r2.stdout


def test_seeds_share_the_warm_start_unless_it_follows_the_seed():
    assert [ablations.warmstart_seed(s, ["data.eval_limit=4"]) for s in (0, 1, 2)] == [0, 0, 0]
    assert [ablations.warmstart_seed(s, ["warmstart.seed=null"]) for s in (0, 1, 2)] == [0, 1, 2]
    assert ablations.warmstart_seed(1, ["warmstart.seed=5"]) == 5


def test_a_failed_run_is_one_clear_error(tmp_path, tiny_model_dir):
    r = _run(tmp_path / "ab", "--seeds", "0", "--arms", "grpo", f"model.name={tiny_model_dir}", *TINY,
             f"data.eval_files={tmp_path / 'missing.jsonl'}")  # a valid config that fails in the run
    assert r.returncode == 1
    assert "searchrl train failed" in r.stderr and "Traceback" not in r.stderr


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit) as e:
        ablations.main(["--out", "x", "--arms", "grpo,nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        ablations.main(["--out", "x", "not-an-override"])
    with pytest.raises(SystemExit):
        ablations.main(["--out", "x", "seed=3"])  # the seeds come from --seeds
    assert ablations.main(["--out", "x", "--seeds", "0,0"]) == 1  # a clear error, not a traceback


def test_jobs_share_the_cpus_this_process_may_use(monkeypatch):
    import _runs  # importable once ablations.py has put experiments/ on sys.path

    monkeypatch.setattr(_runs.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert _runs.threads_per_job(1) == 1  # `taskset -c 3`: one thread, not os.cpu_count()
    monkeypatch.setattr(_runs.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert (_runs.threads_per_job(1), _runs.threads_per_job(2), _runs.threads_per_job(16)) == (8, 4, 1)


# ------------------------------------------------------------------------------ experiments/miniwiki.py
_mw_spec = importlib.util.spec_from_file_location("miniwiki", SCRIPT.parent / "miniwiki.py")
miniwiki = importlib.util.module_from_spec(_mw_spec)
_mw_spec.loader.exec_module(miniwiki)


def _tiny_miniwiki(root: Path) -> Path:
    """A folder shaped like ../shared/data/miniwiki: a corpus and six question files, 3 test + 4
    train questions each (made up here: the real data is never read by the default tests)."""
    data = root / "mw"
    (data / "questions").mkdir(parents=True)
    people = ["Ada Moss", "Ben Ray", "Cy Lee", "Dot Kay", "Eli Fox", "Fay Orr", "Gus Pim"]
    towns = ["Arden", "Bexley", "Corran", "Dunmore", "Elsby", "Farrow", "Glenn"]
    with open(data / "corpus.jsonl", "w") as f:
        for i, (p, t) in enumerate(zip(people, towns)):
            f.write(json.dumps({"id": str(i), "contents": f"{p}\n{p} was born in {t} and lived there."}) + "\n")
    for name in miniwiki.TEST_SETS:
        with open(data / "questions" / f"{name}.jsonl", "w") as f:
            for i, (p, t) in enumerate(zip(people, towns)):
                split = "test" if i < 3 else "train"
                f.write(json.dumps({"id": f"{name}-{i}", "question": f"where was {p} born", "golden_answers": [t],
                                    "split": split, "answerable": i != 1}) + "\n")
    return data


def test_miniwiki_runs_rl_and_baselines_from_one_warm_start(tmp_path, tiny_model_dir):
    data, out = _tiny_miniwiki(tmp_path), tmp_path / "mw-out"
    r = subprocess.run([sys.executable, str(SCRIPT.parent / "miniwiki.py"), "--data", str(data), "--out", str(out),
                        "--jobs", "2", *TINY[:2], "warmstart.steps=1", "warmstart.examples=8",
                        "rollout.max_new_tokens_per_turn=16", "eval_rollout.max_new_tokens_per_turn=16"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    ws, rl = out / "warmstart", out / "rl"
    assert json.loads((ws / "warmstart.json").read_text())["comparisons"] == 2  # the config's quarter of 8
    assert (rl / "eval_before_trajectories.jsonl").read_bytes() == (ws / "eval_after_trajectories.jsonl").read_bytes()
    for run in ("rl", "rag", "direct"):
        cfg = (out / run / ("config.yaml" if run == "rl" else "eval_config.json")).read_text()
        assert str(ws / "model") in cfg
    rag = [json.loads(line) for line in (out / "rag" / "trajectories.jsonl").read_text().splitlines()]
    assert len(rag) == 18 and {q["id"].split("-")[1] for q in rag} == {"0", "1", "2"}  # 3 test questions a set
    result = json.loads((out / "miniwiki.json").read_text())
    comp = result["comparisons"]["after RL - rag"]
    assert comp["n"] == 18 and len(comp["datasets"]) == 6
    assert comp["avg"]["em_answerable"]["n"] == 12  # question 1 of each set is flagged unanswerable
    sft_seconds = json.loads((ws / "warmstart.json").read_text())["seconds"]
    step_seconds = [json.loads(line).get("time_step", 0.0) for line in (rl / "metrics.jsonl").read_text().splitlines()]
    assert sft_seconds > 0 and result["steps"] == 1  # the training time leaves the evaluations out
    assert result["train_seconds"] == pytest.approx(sft_seconds + sum(step_seconds), abs=0.11)
    assert "after RL - rag" in r.stdout and "em_answerable" in r.stdout


def test_miniwiki_refuses_missing_data_and_reserved_overrides(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT.parent / "miniwiki.py"), "--data", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(SystemExit):
        miniwiki.main(["--data", "d", "--out", "o", "data.index=x"])


# ------------------------------------------------------------------------------ experiments/plan_decision.py
def test_plan_decision_reads_the_second_hop_probability_per_hop_count(tiny_model_dir):
    from searchrl.data.world import generate_world

    spec = importlib.util.spec_from_file_location("plan_decision", SCRIPT.parent / "plan_decision.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    world = generate_world(seed=1, n_entities=80)
    questions = [q for q in world.questions if len(q.extra["hops"]) <= 2][:12]
    out = probe.plan_decision(str(tiny_model_dir), questions)
    assert sum(h["n"] for h in out["hops"].values()) == len(questions)
    assert set(out["hops"]) == {len(q.extra["hops"]) for q in questions}
    for h in out["hops"].values():
        assert 0.0 <= h["p_more"] <= 1.0 and 0 <= h["over_half"] <= h["n"]
    assert 0.0 <= out["rank"] <= 1.0 and probe.rank([0.1, 0.2], [0.3, 0.15]) == 0.75
    assert probe.main([str(tiny_model_dir.parent / "missing")]) == 1  # one error line, no traceback


def test_plan_decision_reads_a_shared_warm_start_folder_as_its_weights(tiny_model_dir, tmp_path):
    """A ``--seeds`` job's ``OUT/warmstart`` (weights over the base its config names) probes as the same
    weights saved as a model folder, and not as the base model."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from searchrl.data.world import generate_world
    from searchrl.models import load_model

    spec = importlib.util.spec_from_file_location("plan_decision", SCRIPT.parent / "plan_decision.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    model, tok = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "moved")
    tok.save_pretrained(tmp_path / "moved")
    shared = tmp_path / "warmstart"
    shared.mkdir()
    (shared / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}}))
    save_file({n: p.detach().clone().contiguous() for n, p in model.named_parameters()}, str(shared / "policy.safetensors"))
    world = generate_world(seed=1, n_entities=80)
    questions = [q for q in world.questions if len(q.extra["hops"]) <= 2][:12]
    base, moved, warm = (probe.plan_decision(str(m), questions) for m in (tiny_model_dir, tmp_path / "moved", shared))
    assert warm["hops"] == moved["hops"] and warm["hops"] != base["hops"]


# ------------------------------------------------------------------------------ experiments/group_votes.py
def test_group_votes_tabulates_sampled_rewards_and_group_votes_by_hop_count(tiny_model_dir):
    from searchrl.config import apply_overrides
    from searchrl.data.world import generate_world
    from searchrl.retrieval.bm25 import BM25Retriever
    from searchrl.training.config import TrainConfig

    spec = importlib.util.spec_from_file_location("group_votes", SCRIPT.parent / "group_votes.py")
    gv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gv)
    assert gv.vote([(1, 1.0), (2, 0.0), (2, 0.0)]) == "fewer" and gv.vote([(2, 1.0), (1, 0.0)]) == "more"
    assert gv.vote([(2, 1.0), (2, 0.0)]) == "other" and gv.vote([(1, 0.0), (2, 0.0)]) == "inert"
    world = generate_world(seed=1, n_entities=80)
    questions = gv.draw(world.questions, 6, seed=0)
    assert sorted(len(q.extra["hops"]) for q in questions) == [1, 1, 1, 2, 2, 2]
    cfg = apply_overrides(TrainConfig(), ["rollout.max_new_tokens_per_turn=16", "rollout.max_turns=1"])
    out = gv.group_votes(str(tiny_model_dir), questions, BM25Retriever.build(world.passages, show_progress=False),
                         cfg, samples=2)
    assert set(out["votes"]) == {1, 2}
    assert all(sum(v.values()) == 3 for v in out["votes"].values())  # every group votes once
    assert sum(c["n"] for d in out["reward_by_searches"].values() for c in d.values()) == 12  # 6 questions x 2
    assert gv.main([str(tiny_model_dir.parent / "missing")]) == 1
    assert gv.main([str(tiny_model_dir), "--questions", "2", "rollout.top_p=2"]) == 1  # a bad override after an option
