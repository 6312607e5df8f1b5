"""`searchrl compare`: paired B - A from trajectory files, eval folders and training runs; samples
averaged per question; mismatched question sets refused; the training summary's gain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from searchrl.cli import main
from searchrl.eval.compare import compare_files, load_questions, resolve, resolve_pair, run_gain
from searchrl.eval.runner import summarize
from searchrl.eval.stats import grouped_intervals, paired_bootstrap


def record(qid, source, right, searches=1, answerable=None, gold="Paris"):
    """One trajectories.jsonl line: right -> the gold answer, wrong -> another one."""
    rec = {"id": qid, "source": source, "golden_answers": [gold], "answer": gold if right else "Lyon",
           "num_searches": searches, "num_turns": searches + 1, "response_tokens": 10}  # fmt: skip
    if answerable is not None:
        rec["answerable"] = answerable
    return rec


def write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def two_runs(n=60, seed=0):
    """A and B over the same questions in two datasets; B gets ~15 % more right."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for source in ("nq", "hotpotqa"):
        for i in range(n):
            qid = f"{source}_{i}"
            ra = rng.random() < 0.4
            rb = ra if rng.random() > 0.25 else rng.random() < 0.8  # B redraws a quarter, mostly right
            a.append(record(qid, source, ra, searches=1, answerable=i % 4 != 0))
            b.append(record(qid, source, rb, searches=2, answerable=i % 4 != 0))
    return a, b


def test_compare_matches_the_metrics_and_the_paired_bootstrap(tmp_path):
    a, b = two_runs()
    pa, pb = write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b)
    r = compare_files(pa, pb)
    ma, mb = summarize(a, resamples=0), summarize(b, resamples=0)
    assert list(r["datasets"]) == ["nq", "hotpotqa"] and r["n"] == 120
    for metric in ("em", "f1", "subem", "searches_per_question", "em_answerable"):
        for name in ("nq", "hotpotqa"):
            e = r["datasets"][name][metric]
            assert e["a"] == pytest.approx(ma["datasets"][name][metric])
            assert e["b"] == pytest.approx(mb["datasets"][name][metric])
            assert e["diff"] == pytest.approx(e["b"] - e["a"])
            assert e["ci95"][0] <= e["diff"] + 1e-9 <= e["ci95"][1] + 2e-9
        avg = r["avg"][metric]
        assert avg["a"] == pytest.approx(ma["avg"][metric]) and avg["b"] == pytest.approx(mb["avg"][metric])
    assert r["datasets"]["nq"]["em_answerable"]["n"] == 45 and r["avg"]["em_answerable"]["n"] == 90
    unflagged = write(tmp_path / "unflagged.jsonl", [{k: v for k, v in x.items() if k != "answerable"} for x in a])
    assert compare_files(unflagged, pb)["avg"]["em_answerable"]["n"] == 90  # B's flags count
    # the interval is the paired bootstrap of the per-question EM, stratified by dataset
    def em(records):
        return {s: [float(x["answer"] == "Paris") for x in records if x["source"] == s] for s in ("nq", "hotpotqa")}

    ref = paired_bootstrap(em(a), em(b))  # other random draws (seeded by name): close, not equal
    assert r["avg"]["em"]["diff"] == pytest.approx(ref.estimate)
    assert r["avg"]["em"]["ci95"] == pytest.approx([ref.low, ref.high], abs=0.02)
    diffs = {s: {"em": np.array(em(b)[s]) - np.array(em(a)[s])} for s in ("nq", "hotpotqa")}
    same_draws = grouped_intervals(diffs)  # the same resamples (seeded by dataset and metric)
    assert r["avg"]["em"]["ci95"] == same_draws["avg"]["em"].bounds()
    assert r["datasets"]["nq"]["em"]["ci95"] == same_draws["datasets"]["nq"]["em"].bounds()
    assert r["avg"]["searches_per_question"]["ci95"] == [1.0, 1.0]  # B always searches once more
    same = compare_files(pa, pa)
    assert all(same["avg"][m]["ci95"] == [0.0, 0.0] for m in ("em", "f1", "subem"))


def test_several_samples_per_question_are_averaged_first(tmp_path):
    a = [record("q1", "nq", True), record("q1", "nq", False), record("q2", "nq", False),
         record("q2", "nq", False), record("q1", "nq", True), record("q2", "nq", True)]  # fmt: skip
    b = [record("q2", "nq", True), record("q1", "nq", True)]  # other order, one sample each
    qa = load_questions(write(tmp_path / "a.jsonl", a))
    assert qa["q1"].scores["em"] == pytest.approx(2 / 3) and qa["q1"].samples == 3
    assert qa["q2"].scores["em"] == pytest.approx(1 / 3)
    r = compare_files(tmp_path / "a.jsonl", write(tmp_path / "b.jsonl", b))
    assert r["datasets"]["nq"]["n"] == 2  # questions, not trajectories
    assert r["datasets"]["nq"]["em"]["a"] == pytest.approx(0.5) and r["datasets"]["nq"]["em"]["b"] == 1.0
    assert r["samples_per_question"] == {"a": 3, "b": 1}


def test_cli_tables_json_and_run_folders(tmp_path, capsys):
    a, b = two_runs(n=20)
    run = tmp_path / "run"  # what `searchrl train` writes
    write(run / "eval_before_trajectories.jsonl", a)
    write(run / "eval_after_trajectories.jsonl", b)
    write(tmp_path / "rag" / "trajectories.jsonl", a)  # what `searchrl eval` writes
    assert resolve(str(run)) == run / "eval_after_trajectories.jsonl"
    assert resolve(str(run / "eval-before")) == run / "eval_before_trajectories.jsonl"
    assert resolve(str(tmp_path / "rag")) == tmp_path / "rag" / "trajectories.jsonl"
    assert resolve_pair(str(run), None) == (run / "eval_before_trajectories.jsonl",
                                            run / "eval_after_trajectories.jsonl")  # fmt: skip

    assert main(["compare", str(run)]) == 0
    text = capsys.readouterr().out
    expected = compare_files(run / "eval_before_trajectories.jsonl", run / "eval_after_trajectories.jsonl")
    em = expected["avg"]["em"]
    row = (f"| avg | 40 | {em['a']:.3f} | {em['b']:.3f} | {em['diff']:+.3f} | "
           f"[{em['ci95'][0]:+.3f}, {em['ci95'][1]:+.3f}] |")
    assert row in text and "| NQ | 20 |" in text and "| HotpotQA | 20 |" in text
    assert "EM (answerable)" in text and "searches / question" in text and "40 paired questions" in text

    assert main(["compare", str(tmp_path / "rag"), str(run), "--json", "--metrics", "em,f1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["avg"]) == {"n", "em", "f1"}
    assert out["avg"]["em"] == em and out["bootstrap"]["resamples"] == 2000
    assert main(["compare", str(run / "eval_before"), str(run), "--json", "--resamples", "500", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["bootstrap"] == {**out["bootstrap"], "resamples": 500, "seed": 3}


def test_grouping_by_hop_count(tmp_path, capsys):
    a, b = two_runs(n=20)
    for recs in (a, b):
        for i, r in enumerate(recs):
            r["num_hops"] = 1 + i % 2
    pa, pb = write(tmp_path / "a.jsonl", a), write(tmp_path / "b.jsonl", b)
    r = compare_files(pa, pb, metrics=("em",), by="num_hops")
    assert list(r["datasets"]) == ["num_hops=1", "num_hops=2"] and r["datasets"]["num_hops=2"]["n"] == 20
    two = [float(x["answer"] == "Paris") for x in b if x["num_hops"] == 2]
    assert r["datasets"]["num_hops=2"]["em"]["b"] == pytest.approx(np.mean(two))
    assert main(["compare", str(pa), str(pb), "--by", "num_hops", "--metrics", "em"]) == 0
    assert "| num_hops=1 | 20 |" in capsys.readouterr().out
    assert main(["compare", str(pa), str(pb), "--by", "colour"]) == 2
    assert "no 'colour' field" in capsys.readouterr().err


def test_different_questions_and_bad_input_are_clear_errors(tmp_path, capsys):
    a, b = two_runs(n=10)
    pa = write(tmp_path / "a.jsonl", a)
    pb = write(tmp_path / "b.jsonl", b[:-3] + [record("extra", "nq", True)])
    assert main(["compare", str(pa), str(pb)]) == 2
    err = capsys.readouterr().err
    assert "not evaluations of the same questions" in err
    assert "3 only in A (hotpotqa_7, hotpotqa_8, hotpotqa_9)" in err and "1 only in B (extra)" in err
    assert "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(a[0]) + "\nnot json\n")
    assert main(["compare", str(pa), str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nowhere"), str(pa)]) == 2
    assert "no evaluation found" in capsys.readouterr().err
    assert main(["compare", str(pa)]) == 2  # one argument: a training run is needed
    assert "training run folder" in capsys.readouterr().err
    assert main(["compare", str(pa), str(pa), "--metrics", "em,bleu"]) == 2
    assert "unknown bleu" in capsys.readouterr().err


def test_run_gain_for_the_training_summary(tmp_path, caplog):
    a, b = two_runs(n=30)
    run = tmp_path / "run"
    write(run / "eval_after_trajectories.jsonl", b)
    assert run_gain(run) is None  # no "before" evaluation (eval_before=false)
    write(run / "eval_before_trajectories.jsonl", a)
    g = run_gain(run)
    r = compare_files(run / "eval_before_trajectories.jsonl", run / "eval_after_trajectories.jsonl")
    assert g["metric"] == "em" and g["n"] == 60
    assert (g["before"], g["after"], g["gain"], g["ci95"]) == (
        r["avg"]["em"]["a"], r["avg"]["em"]["b"], r["avg"]["em"]["diff"], r["avg"]["em"]["ci95"])
    assert set(g["datasets"]) == {"nq", "hotpotqa"} and g["datasets"]["nq"]["n"] == 30
    assert "by_hops" not in g  # real datasets: no hop counts
    for name, recs in (("before", a), ("after", b)):
        write(run / f"eval_{name}_trajectories.jsonl", [{**x, "num_hops": 1 + (i >= 30)} for i, x in enumerate(recs)])
    g = run_gain(run)
    assert set(g["by_hops"]) == {"1", "2"} and g["by_hops"]["1"]["n"] == 30
    assert g["by_hops"]["1"] == {k: g["datasets"]["nq"][k] for k in ("n", "before", "after", "gain")} | {
        "ci95": g["by_hops"]["1"]["ci95"]}  # the first 30 questions are nq's
    write(run / "eval_before_trajectories.jsonl", a[:-1])
    assert run_gain(run) is None and "not evaluations of the same questions" in caplog.text
