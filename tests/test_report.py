"""The static training report: sections, numbers, escaping, PNGs, and partial run directories."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from searchrl.report import write_report
from searchrl.report.html import model_text, pick_trajectories

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(step: int, **extra) -> dict:
    m = {"step": step, "reward": 0.1 * step, "em": 0.05 * step, "searches_per_traj": 0.5 + 0.25 * step,
         "valid_action_rate": 0.9, "response_length": 120.0 + step, "entropy": 1.5 - 0.1 * step,
         "clipfrac": 0.02, "pg_loss": -0.01, "time_rollout": 3.0, "time_retrieval": 0.5,
         "time_prepare": 0.4, "time_update": 1.2, "time_step": 4.6, "update_tokens_per_s": 800.0,
         "peak_memory_mb": 2048.0, "lr": 1e-6, "grad_norm": 0.7}
    m.update(extra)
    return m


def _traj(i: int, answer: str | None, gold: str, text: str, searches: int) -> dict:
    turns = []
    for s in range(searches):
        turns.append({"text": f"<think>look up {i}</think><search>who founded Vel {s}</search>", "action": "search",
                      "query": f"who founded Vel {s}", "finish_reason": "stop",
                      "passages": [{"id": f"p{s}", "title": f"Vel Harbor {s}", "score": 12.3456},
                                   {"id": "q9", "title": "Tom & <Jerry>", "score": 3.5}]})
    turns.append({"text": text, "action": "answer" if answer is not None else "invalid", "query": None,
                  "passages": [], "finish_reason": "stop"})
    return {"id": f"t{i}", "question": f"Question {i} about Vel?", "golden_answers": [gold], "source": "world",
            "answer": answer, "reward": 1.0 if answer == gold else 0.0, "num_searches": searches,
            "finish_reason": "answer" if answer is not None else "max_turns", "turns": turns,
            "response_text": text}


def _eval(em: float, searches: float) -> dict:
    ds = {"n": 8, "em": em, "subem": em, "f1": em + 0.05, "em_answerable": em,
          "searches_per_question": searches, "turns": 2.0, "response_tokens": 95.5}
    return {"datasets": {"world_1hop": ds, "world_2hop": {**ds, "em": em / 2}}, "avg": {**ds, "em": 0.75 * em}}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _make_run(d: Path) -> Path:
    d.mkdir()
    rows = [_metrics(1, kl=0.001), _metrics(2, kl=0.002), {"step": 2, "val_em": 0.4375, "val_searches": 1.25},
            _metrics(3, kl=0.004)]
    _write_jsonl(d / "metrics.jsonl", rows)
    (d / "eval_before.json").write_text(json.dumps(_eval(0.125, 0.5)))
    (d / "eval_after.json").write_text(json.dumps(_eval(0.625, 1.75)))
    evil = "<think>try <script>alert(1)</script></think><answer>{}</answer>"
    trajs = [_traj(i, "Ana Roe" if i % 2 == 0 else "Bob", "Ana Roe", evil.format("Ana Roe" if i % 2 == 0 else "Bob"),
                   searches=i % 3) for i in range(10)]
    trajs.append(_traj(10, None, "Ana Roe", "<search>never closed", 0))
    _write_jsonl(d / "eval_after_trajectories.jsonl", trajs)
    _write_jsonl(d / "eval_before_trajectories.jsonl", trajs[:2])
    (d / "summary.json").write_text(json.dumps({"eval_before": {"em": 0.09375, "searches_per_question": 0.5},
                                                "eval_after": {"em": 0.46875, "searches_per_question": 1.75},
                                                "steps": 3, "wall_seconds": 125.0, "config": {"steps": 3}}))
    (d / "warmstart.json").write_text(json.dumps({"demonstrations": 64, "losses": [2.0, 1.2, 0.7]}))
    (d / "config.yaml").write_text("steps: 3\nalgo:\n  estimator: grpo  # <b>not bold</b>\n")
    return d


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    """(run dir, page) of a complete fake run; written once for the tests that only read it."""
    d = _make_run(tmp_path_factory.mktemp("report") / "run")
    index = write_report(d)
    assert index == d / "report" / "index.html"
    return d, index.read_text()


class _Balance(HTMLParser):
    """Checks that every opened element is closed in order (void elements aside)."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _image_refs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_sections_numbers_and_images(full_report):
    run_dir, page = full_report
    for section in ("Evaluation before and after RL", "Training curves", "Example trajectories", "Configuration",
                    "<details><summary>config</summary>"):
        assert section in page
    # per-dataset table: before/after EM, delta, searches per question, n
    assert "world_1hop" in page and "world_2hop" in page and "average" in page
    assert "0.125" in page and "0.625" in page and "+0.500" in page  # world_1hop EM before/after/delta
    assert "0.50" in page and "1.75" in page  # searches per question
    assert "0.094 → 0.469" in page  # headline from the eval files' averages
    assert "2.1 min" in page
    assert "estimator: grpo" in page
    refs = _image_refs(page)
    expected = {"reward.png", "em.png", "searches.png", "response_length.png", "kl.png", "entropy.png",
                "clipfrac.png", "timing.png", "warmstart.png"}
    assert expected <= set(refs)
    assert "value_loss" not in page or "losses.png" in refs
    for name in refs:
        assert "/" not in name  # relative, next to index.html
        data = (run_dir / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_report_escapes_model_text(full_report):
    page = full_report[1]
    body = page.split("<body>", 1)[1]
    for raw in ("<script", "<search>", "<think>", "<answer>", "<Jerry>", "<b>not bold"):
        assert raw not in body, raw
    assert '<span class="tag">&lt;script&gt;</span>' in body
    assert '<span class="tag">&lt;search&gt;</span>' in body
    assert "Tom &amp; &lt;Jerry&gt;" in body  # passage titles are data too
    assert "&lt;b&gt;not bold" in body


def test_report_trajectories_correct_and_wrong(full_report):
    page = full_report[1]
    assert page.count('class="traj ok"') == 3 and page.count('class="traj bad"') == 3
    assert "Vel Harbor 0" in page and "12.346" in page  # passage title and score
    assert "query: <code>who founded Vel 0</code>" in page
    assert "finish: answer" in page
    assert "(eval after)" in page


def test_pick_trajectories_prefers_searching_ones():
    trajs = [_traj(i, "x" if i < 4 else "y", "x", "<answer>.</answer>", searches=int(i in (2, 5))) for i in range(8)]
    picked = pick_trajectories(trajs, k=2)
    assert [ok for ok, _ in picked] == [True, True, False, False]
    assert [t["id"] for _, t in picked] == ["t2", "t0", "t5", "t4"]


def test_model_text_marks_tags_only_after_escaping():
    assert model_text("a < b & c") == "a &lt; b &amp; c"
    assert model_text('<img src=x onerror="1">') == "&lt;img src=x onerror=&quot;1&quot;&gt;"
    assert model_text("</answer>") == '<span class="tag">&lt;/answer&gt;</span>'


def test_report_with_only_metrics(tmp_path: Path, caplog):
    d = tmp_path / "partial"
    d.mkdir()
    _write_jsonl(d / "metrics.jsonl", [_metrics(1), _metrics(2)])
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')  # a line being written when the report runs
    page = write_report(d).read_text()
    assert "in progress" in page and "No evaluation yet." in page and "No evaluation trajectories yet." in page
    refs = _image_refs(page)
    assert "reward.png" in refs and "kl.png" not in refs and "warmstart.png" not in refs
    assert all((d / "report" / n).read_bytes().startswith(PNG_MAGIC) for n in refs)
    assert "metrics.jsonl:3" in caplog.text


def test_report_on_empty_run_dir(tmp_path: Path):
    page = write_report(tmp_path).read_text()
    assert "No metrics logged yet." in page and _image_refs(page) == []


def test_report_is_well_formed(full_report):
    checker = _Balance()
    checker.feed(full_report[1])
    assert checker.errors == [] and checker.stack == []


def test_report_falls_back_to_eval_before(tmp_path: Path):
    run_dir = _make_run(tmp_path / "run")
    (run_dir / "eval_after_trajectories.jsonl").unlink()
    (run_dir / "eval_after.json").unlink()
    page = write_report(run_dir).read_text()
    assert "(eval before)" in page
    assert page.count('class="traj ok"') == 1 and page.count('class="traj bad"') == 1


def test_report_reads_real_trajectory_records(tmp_path: Path):
    from searchrl.types import Passage, QAExample, Trajectory, Turn

    ex = QAExample("q1", "Who founded <Vel>?", ["Ana Roe"], source="world")
    turns = [Turn("<think>search it</think><search>Vel founder</search>", "search", "Vel founder",
                  [Passage("7", "Vel & Co", "text", 9.25)], finish_reason="stop"),
             Turn("<answer>Ana Roe</answer>", "answer", finish_reason="stop")]
    traj = Trajectory(ex, [1, 2], turns=turns, finish_reason="answer", reward=1.0)
    _write_jsonl(tmp_path / "eval_before_trajectories.jsonl", [traj.to_dict()])
    page = write_report(tmp_path).read_text()
    assert page.count('class="traj ok"') == 1
    assert "Who founded &lt;Vel&gt;?" in page and "Vel &amp; Co" in page and "9.250" in page
    assert "searches: 1" in page and "finish: answer" in page
