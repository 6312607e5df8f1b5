"""The evaluation harness: metric aggregation, evaluate() over the real loop, `searchrl eval`
end to end (tiny random model saved to disk, BM25 index of a tiny corpus), resumption, errors, and
the `searchrl ask` trace."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from searchrl.cli import main
from searchrl.errors import DataFormatError
from searchrl.eval import cli as eval_cli
from searchrl.eval import runner
from searchrl.eval.runner import METRIC_KEYS, evaluate, summarize, trajectory_record
from searchrl.eval.tables import comparison_table, format_trace, metrics_table
from searchrl.rollout.engine.protocol import Completion
from searchrl.rollout.config import RolloutConfig
from searchrl.types import Passage, QAExample, Trajectory, Turn

CORPUS = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Berlin", "Berlin is the capital of Germany, on the river Spree."),
    ("Danube", "The Danube is the second-longest river in Europe."),
    ("Mount Fuji", "Mount Fuji is the highest mountain in Japan."),
    ("Nile", "The Nile is a major river in north-eastern Africa."),
]
QUESTIONS = {
    "nq": [("capital of France", "Paris"), ("capital of Germany", "Berlin"),
           ("highest mountain in Japan", "Mount Fuji")],
    "hotpotqa": [("second-longest river in Europe", "Danube"),
                 ("major river in Africa", "Nile"), ("largest city of France", "Paris")],
}  # fmt: skip


# ------------------------------------------------------------------------------ helpers
def traj(source, golds, answer, searches=0, tokens=5, answerable=None, qid=None):
    """A hand-made trajectory: ``searches`` search turns, then one answer turn (or none)."""
    extra = {} if answerable is None else {"answerable": answerable}
    ex = QAExample(qid or f"{source}-{golds[0]}-{answer}", "q", list(golds), source=source, extra=extra)
    turns = [Turn("<search>x</search>", "search", query="x") for _ in range(searches)]
    if answer is not None:
        turns.append(Turn(f"<think>t</think><answer>{answer}</answer>", "answer"))
    else:
        turns.append(Turn("rambling", "invalid"))
    return Trajectory(ex, [1], response_ids=[7] * tokens, turns=turns, finish_reason="answer")


class ScriptedAgent:
    """Turn 1: think, then search the question; turn 2: answer the title of the first passage."""

    def __init__(self, tokenizer):
        self.tok, self.calls = tokenizer, 0

    def generate(self, prompts, sampling, stop=None):
        self.calls += 1
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            question = re.findall(r"Question: (.*?)\?", text)[-1]
            titles = re.findall(r"Doc 1\(Title: (.*?)\)", text)
            if titles:
                reply = f"<think>found it</think><answer> {titles[-1]} </answer>"
            else:
                reply = f"<think>I need to look up {question}</think><search> {question} </search>"
            tokens = self.tok.encode(reply, add_special_tokens=False)
            out.append(Completion(tokens, [0.0] * len(tokens), "stop", None, reply))
        return out


class DictRetriever:
    """Passages whose title is the answer mapped to the query; a miss gives the Nile."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def search(self, queries, k=3):
        self.calls += 1
        return [[Passage(str(i), self.answers.get(q.strip(), "Nile"), "text", 2.5 - i)
                 for i in range(k)] for q in queries]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    """A tiny random model folder, a QA file per dataset, and a BM25 index of the corpus."""
    from searchrl.testing import tiny_random_lm
    from searchrl.retrieval.index import build_index

    root = tmp_path_factory.mktemp("eval-world")
    model = tiny_random_lm(tiny_tokenizer, seed=0)
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    with open(root / "corpus.jsonl", "w") as f:
        for i, (title, text) in enumerate(CORPUS):
            f.write(json.dumps({"id": str(i), "contents": f'"{title}"\n{text}'}) + "\n")
    build_index(root / "corpus.jsonl", "bm25", root / "index", show_progress=False)
    files = []
    for name, rows in QUESTIONS.items():
        path = root / f"{name}.jsonl"
        with open(path, "w") as f:
            for i, (q, a) in enumerate(rows):
                rec = {"id": f"{name}_{i}", "question": q, "golden_answers": [a], "split": "test",
                       "answerable": i != 2}  # fmt: skip
                f.write(json.dumps(rec) + "\n")
        files.append(str(path))
    return {"root": root, "model": str(root / "model"), "index": str(root / "index"),
            "data": ",".join(files)}  # fmt: skip


def eval_args(world, out, *extra):
    return ["eval", "--data", world["data"], "--model", world["model"], "--index", world["index"],
            "--out", str(out), "--max-new-tokens", "6", "--max-turns", "1", "--batch-size", "4",
            "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ aggregation
def hand_made():
    return [
        traj("nq", ["Paris"], "paris", searches=2, tokens=10, answerable=True),  # em 1
        traj("nq", ["Paris"], "Paris France", searches=1, tokens=20, answerable=True),  # f1 2/3
        traj("nq", ["Paris"], "Lyon", searches=0, tokens=30, answerable=False),
        traj("nq", ["Paris"], None, searches=1, tokens=40, answerable=True),  # no answer
        traj("hotpotqa", ["the Danube"], "Danube", searches=1, tokens=4),  # no flag: em 1
        traj("hotpotqa", ["Nile", "River Nile"], "river nile.", searches=3, tokens=6),  # em 1
        traj("musique", ["X"], "X", searches=0, tokens=8, answerable=False),  # em 1, no answerable
    ]


def test_summarize_known_values():
    m = summarize(hand_made())
    assert list(m["datasets"]) == ["nq", "hotpotqa", "musique"]
    nq, hp, mu = (m["datasets"][k] for k in ("nq", "hotpotqa", "musique"))
    assert set(nq) == set(METRIC_KEYS) and set(m["avg"]) == set(METRIC_KEYS)
    assert nq["n"] == 4 and nq["em"] == pytest.approx(0.25) and nq["subem"] == pytest.approx(0.5)
    assert nq["f1"] == pytest.approx((1 + 2 / 3) / 4)
    assert nq["em_answerable"] == pytest.approx(1 / 3)  # answerable: em 1, 0, 0
    assert nq["searches_per_question"] == pytest.approx(1.0)
    assert nq["turns"] == pytest.approx(2.0) and nq["response_tokens"] == pytest.approx(25.0)
    assert hp["em"] == 1.0 and hp["em_answerable"] == 1.0  # no flag: over all examples
    assert hp["searches_per_question"] == 2.0
    assert mu["em"] == 1.0 and mu["em_answerable"] is None
    avg = m["avg"]
    assert avg["n"] == 7
    assert avg["em"] == pytest.approx((0.25 + 1 + 1) / 3)
    assert avg["em_answerable"] == pytest.approx((1 / 3 + 1) / 2)  # None left out
    assert avg["f1"] == pytest.approx(((1 + 2 / 3) / 4 + 1 + 1) / 3)


def test_answer_in_text_reads_the_models_own_turns_only():
    plain = traj("nq", ["Paris"], None)
    plain.turns[-1].text = "I think it is Paris."  # right, but no <answer> block: EM 0
    told = traj("nq", ["Paris"], None, searches=1)
    told.turns[0].observation = "<information>Paris is the capital.</information>"  # read, not said
    wrong = traj("nq", ["Paris"], "Lyon")
    m = summarize([plain, told, wrong])["datasets"]["nq"]
    assert m["em"] == 0.0 and m["answer_in_text"] == pytest.approx(1 / 3)
    records = [json.loads(json.dumps(trajectory_record(t))) for t in (plain, told, wrong)]
    assert summarize(records)["datasets"]["nq"]["answer_in_text"] == pytest.approx(1 / 3)
    assert "answer in own text (diagnostic)" not in metrics_table(summarize([plain]))  # not a default row


def test_summarize_records_match_trajectories():
    """Resumption summarises JSON records: they must give the same numbers as the objects."""
    trajs = hand_made()
    records = [json.loads(json.dumps(trajectory_record(t))) for t in trajs]
    assert summarize(records) == summarize(trajs)
    assert [r["em"] for r in records] == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert "num_hops" not in records[0]
    trajs[0].example.extra["num_hops"] = 2
    assert trajectory_record(trajs[0])["num_hops"] == 2  # kept for `searchrl compare --by num_hops`
    mixed = summarize(records[:3] + trajs[3:])
    assert mixed == summarize(trajs)


def test_summarize_adds_an_interval_for_every_metric_and_keeps_the_old_shape():
    trajs = hand_made()
    m = summarize(trajs)
    assert set(m) == {"datasets", "avg", "ci95", "bootstrap"}
    assert set(m["datasets"]["nq"]) == set(METRIC_KEYS) and set(m["avg"]) == set(METRIC_KEYS)
    plain = summarize(trajs, resamples=0)  # the old output, exactly
    assert set(plain) == {"datasets", "avg"}
    assert plain["datasets"] == m["datasets"] and plain["avg"] == m["avg"]
    ci = m["ci95"]
    for name, metrics in [*m["datasets"].items(), ("avg", m["avg"])]:
        bounds = ci["avg"] if name == "avg" else ci["datasets"][name]
        assert set(bounds) == set(METRIC_KEYS) - {"n"}
        for key, b in bounds.items():
            if metrics[key] is None:
                assert b is None, (name, key)
            else:
                assert b[0] <= metrics[key] + 1e-9 and metrics[key] <= b[1] + 1e-9, (name, key, b)
    assert ci["datasets"]["hotpotqa"]["em"] == [1.0, 1.0]  # every answer right: no spread
    lo, hi = ci["datasets"]["nq"]["em"]  # EM 1, 0, 0, 0
    assert lo == 0.0 and 0.5 <= hi <= 0.75
    assert ci["datasets"]["nq"]["em_answerable"][1] <= 1.0 and ci["datasets"]["musique"]["em_answerable"] is None
    assert summarize(trajs) == m  # seeded
    assert summarize(trajs, seed=1)["bootstrap"]["seed"] == 1
    table = metrics_table(m, rows=("em", "n"), intervals=True)
    assert f"| EM | 0.250 [0.000, {hi:.3f}] | 1.000 [1.000, 1.000] |" in table
    assert "| questions | 4 | 2 | 1 | 7 |" in table
    assert metrics_table(m) == metrics_table(plain)  # intervals only on request


def test_tables_render_paper_layout():
    m = summarize(hand_made())
    table = metrics_table(m)
    header = table.splitlines()[0]
    assert header == "| metric | NQ | HotpotQA | Musique | avg |"
    assert "| EM | 0.250 | 1.000 | 1.000 | 0.750 |" in table
    assert "| EM (answerable) | 0.333 | 1.000 | - | 0.667 |" in table
    cmp = comparison_table({"direct": m, "search": m}, key="searches_per_question")
    assert cmp.splitlines()[2] == "| direct | 1.00 | 2.00 | 0.00 | 1.00 |"


# ------------------------------------------------------------------------------ evaluate()
def test_evaluate_runs_loop_and_scores(tiny_tokenizer):
    examples = [QAExample(f"{s}{i}", q, [a], source=s) for s, rows in QUESTIONS.items()
                for i, (q, a) in enumerate(rows)]  # fmt: skip
    right = {q: a for rows in QUESTIONS.values() for q, a in rows}
    right["major river in Africa"] = "Danube"  # one wrong retrieval in hotpotqa
    gen, ret = ScriptedAgent(tiny_tokenizer), DictRetriever(right)
    cfg = RolloutConfig(temperature=0.0, max_new_tokens_per_turn=64)
    metrics, trajs = evaluate(examples, gen, ret, tiny_tokenizer, cfg, batch_size=8, progress=False)
    assert [t.example.id for t in trajs] == [e.id for e in examples]
    assert metrics["datasets"]["nq"]["em"] == 1.0
    assert metrics["datasets"]["hotpotqa"]["em"] == pytest.approx(2 / 3)
    assert metrics["avg"]["em"] == pytest.approx(5 / 6)
    assert metrics["avg"]["searches_per_question"] == 1.0 and metrics["avg"]["turns"] == 2.0
    assert [t.reward for t in trajs] == [1, 1, 1, 1, 0, 1]
    assert ret.calls == 1 and gen.calls == 2  # one batched search round, two generation rounds
    trace = format_trace(trajs[0])
    for part in ("[turn 1] search", "think: I need to look up capital of France",
                 "search: capital of France", "1. [2.500] Paris  (id 0)", "Answer: Paris",
                 "Finish: answer (2 turns, 1 searches"):  # fmt: skip
        assert part in trace


# ------------------------------------------------------------------------------ the CLI
def test_eval_cli_end_to_end(world, tmp_path, capsys):
    out = tmp_path / "rag"
    assert main(eval_args(world, out, "--method", "rag")) == 0
    printed = capsys.readouterr().out
    assert "| metric | NQ | HotpotQA | avg |" in printed and "| questions | 3 | 3 | 6 |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"datasets", "avg", "ci95", "bootstrap"}
    assert set(metrics["ci95"]["datasets"]["nq"]) == set(METRIC_KEYS) - {"n"}
    assert metrics["bootstrap"]["resamples"] == 2000 and metrics["bootstrap"]["level"] == 0.95
    assert "95% bootstrap intervals" in printed
    assert set(metrics["datasets"]) == {"nq", "hotpotqa"} and metrics["avg"]["n"] == 6
    lines = read_lines(out / "trajectories.jsonl")
    assert sorted(r["id"] for r in lines) == sorted(f"{s}_{i}" for s in QUESTIONS for i in range(3))
    assert all(r["num_turns"] == 1 and 1 <= r["response_tokens"] <= 6 for r in lines)
    rag_turn = next(r for r in lines if r["id"] == "nq_0")["turns"][0]
    assert rag_turn["passages"][0]["title"] == "Paris"  # BM25 over the tiny corpus
    assert next(r for r in lines if r["id"] == "nq_2")["answerable"] is False
    config = json.loads((out / "eval_config.json").read_text())
    assert config["method"] == "rag" and config["rollout"]["temperature"] == 0.0
    assert config["index"] == str(Path(world["index"]).resolve())
    assert summarize(lines) == metrics


def test_eval_resumes_without_redoing_finished_ids(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "search"
    assert main(eval_args(world, out, "--method", "search", "--limit", "2")) == 0
    full = {r["id"]: r for r in read_lines(out / "trajectories.jsonl")}
    assert sorted(full) == ["hotpotqa_0", "hotpotqa_1", "nq_0", "nq_1"]
    metrics = json.loads((out / "metrics.json").read_text())

    # interrupted run: one finished line and a half-written one
    raw = (out / "trajectories.jsonl").read_text().splitlines(keepends=True)
    (out / "trajectories.jsonl").write_text(raw[0] + raw[1][: len(raw[1]) // 2])
    (out / "metrics.json").unlink()
    kept = json.loads(raw[0])["id"]
    seen: list[str] = []
    real = runner.run_scored

    def counting(examples, *a, **k):
        seen.extend(e.id for e in examples)
        return real(examples, *a, **k)

    monkeypatch.setattr(runner, "run_scored", counting)
    assert main(eval_args(world, out, "--method", "search", "--limit", "2")) == 0
    assert "resuming" in capsys.readouterr().out
    assert sorted(seen) == sorted(set(full) - {kept})
    resumed = read_lines(out / "trajectories.jsonl")
    assert sorted(r["id"] for r in resumed) == sorted(full)
    for r in resumed:  # greedy: the rerun produces what the first run produced
        assert r["response_text"] == full[r["id"]]["response_text"]
    assert json.loads((out / "metrics.json").read_text()) == metrics

    # nothing left: no generation, the model is not even loaded
    seen.clear()
    monkeypatch.setattr(eval_cli, "build_generator", lambda args: pytest.fail("model loaded"))
    assert main(eval_args(world, out, "--method", "search", "--limit", "2")) == 0
    assert seen == []
    monkeypatch.undo()
    monkeypatch.setattr(runner, "run_scored", counting)
    # a larger --limit extends the run with the new ids only, under another schedule too
    assert main(eval_args(world, out, "--method", "search", "--limit", "3", "--schedule", "continuous")) == 0
    assert sorted(seen) == ["hotpotqa_2", "nq_2"]
    assert json.loads((out / "metrics.json").read_text())["avg"]["n"] == 6
    assert json.loads((out / "eval_config.json").read_text())["schedule"] == "continuous"


def test_eval_refuses_other_settings(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(eval_args(world, out, "--method", "direct", "--limit", "1")) == 0
    capsys.readouterr()
    assert main(eval_args(world, out, "--method", "cot", "--limit", "1")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "method: 'direct' there, 'cot' now" in err
    assert main(eval_args(world, out, "--method", "direct", "--limit", "1", "--topk", "5")) == 2
    assert "rollout" in capsys.readouterr().err


def test_eval_errors(world, tmp_path, capsys):
    args = eval_args(world, tmp_path / "x", "--method", "direct")
    bad = [a if a != world["data"] else str(tmp_path / "missing.jsonl") for a in args]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "not found" in err
    no_index = [a for a in args if a not in ("--index", world["index"])]
    assert main(no_index[:-2] + ["--method", "rag"]) == 2
    err = capsys.readouterr().err
    assert "needs a retriever" in err and "--index" in err and "--retriever-url" in err
    assert main(args + ["--retriever-url", "http://127.0.0.1:9"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(args[:-1] + ["bogus"])
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_read_finished_rejects_a_broken_middle_line(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DataFormatError, match=r"trajectories.jsonl:2"):
        eval_cli.read_finished(path)
    path.write_text('{"id": "a"}\n{"id": "b", "ans')
    assert list(eval_cli.read_finished(path)) == ["a"]
    assert path.read_text() == '{"id": "a"}\n'


def test_ask_prints_the_trace(world, monkeypatch, capsys, tiny_tokenizer):
    monkeypatch.setattr(eval_cli, "build_generator",
                        lambda args: (ScriptedAgent(tiny_tokenizer), tiny_tokenizer))  # fmt: skip
    assert main(["ask", "capital of France", "--index", world["index"], "--gold", "Paris"]) == 0
    out = capsys.readouterr().out
    expected = ["Question: capital of France", "[turn 1] search",
                "think: I need to look up capital of France", "search: capital of France",
                "retrieved:", "(id 0)", "[turn 2] answer", "Answer: Paris",
                "Finish: answer (2 turns, 1 searches", "EM 1"]  # fmt: skip
    pos = [out.find(s) for s in expected]
    assert -1 not in pos and pos == sorted(pos), out
    assert re.search(r"1\. \[\d+\.\d{3}\] Paris", out)  # BM25 score shown with the title


def test_ask_with_a_model_folder(world, capsys):
    assert main(["ask", "capital of France", "--model", world["model"], "--method", "direct",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("Question: capital of France") and "[turn 1]" in out
    assert "Finish: " in out and "Answer: " in out


# ------------------------------------------------------------------------------ one front door
def test_eval_reads_the_train_config_and_flags_are_shorthands(world, tmp_path, capsys):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 3, "method": "search", "rollout_batch_size": 4,
        "model": {"name": world["model"], "device": "cpu", "amp": "off"},
        "data": {"index": world["index"], "eval_files": world["data"].split(","), "eval_limit": 2},
        "eval_rollout": {"max_turns": 1, "max_new_tokens_per_turn": 6, "min_turn_tokens": 4,
                         "topk": 2, "temperature": 0.0, "max_context_tokens": 900},
    }))  # fmt: skip
    out = tmp_path / "from-config"
    assert main(["eval", "--config", str(config), "eval_rollout.max_turns=0", "--topk", "1",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    recorded = json.loads((out / "eval_config.json").read_text())
    rollout = recorded["rollout"]
    # the YAML's budgets, then the dotted override, then the flag
    assert (rollout["max_new_tokens_per_turn"], rollout["min_turn_tokens"]) == (6, 4)
    assert (rollout["max_context_tokens"], rollout["max_turns"], rollout["topk"]) == (900, 0, 1)
    assert rollout["seed"] == 3 and recorded["batch_size"] == 4 and recorded["amp"] == "off"
    assert recorded["model"] == str(Path(world["model"]).resolve())
    assert recorded["index"] == str(Path(world["index"]).resolve())
    assert recorded["limit"] == 2  # data.eval_limit, per dataset
    lines = read_lines(out / "trajectories.jsonl")
    assert sorted(r["id"] for r in lines) == ["hotpotqa_0", "hotpotqa_1", "nq_0", "nq_1"]
    assert all(r["num_turns"] == 1 and 1 <= r["response_tokens"] <= 6 for r in lines)
    # a bad value in the config is a config error naming the field, before any work
    assert main(["eval", "--config", str(config), "eval_rollout.topk=0", "--out",
                 str(tmp_path / "bad")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "eval_rollout." in err and "topk: must be" in err and not (tmp_path / "bad").exists()


def test_eval_without_data_uses_the_one_synthetic_world(world, tmp_path, monkeypatch):
    from searchrl.training import pipeline
    from searchrl.training.config import TrainConfig

    questions = [QAExample(f"w{i}", q, [a], split=split, source="world")
                 for i, ((q, a), split) in enumerate(zip(QUESTIONS["nq"], ["train", "test", "test"]))]
    corpus = world["root"] / "corpus.jsonl"
    calls = []

    def fake_world(d):
        calls.append(d.world_seed)
        return questions, corpus

    monkeypatch.setattr(pipeline, "synthetic_world", fake_world)
    out = tmp_path / "world"
    assert main(["eval", "data.world_seed=7", "--model", world["model"], "--method", "rag",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    lines = read_lines(out / "trajectories.jsonl")
    assert sorted(r["id"] for r in lines) == ["w1", "w2"]  # the world's test split
    assert lines[0]["turns"][0]["passages"][0]["title"] == "Berlin"  # BM25 over the world corpus
    assert calls == [7, 7]  # questions and corpus, both from the one loader
    # training reads the same world through the same loader
    calls.clear()
    train, evals, retriever = pipeline.load_data(TrainConfig(method="direct"))
    assert [q.id for q in train] == ["w0"] and [q.id for q in evals] == ["w1", "w2"]
    assert calls == [0] and retriever is None
