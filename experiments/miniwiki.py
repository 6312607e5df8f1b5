"""RL on real questions against retrieval alone: miniwiki's NQ + HotpotQA, six test sets, RAG beside it.

    python experiments/miniwiki.py --data ../shared/data/miniwiki --out runs/miniwiki [--jobs 2]
        [--config configs/miniwiki.yaml] [KEY=VALUE ...]

``--data`` is a folder with ``corpus.jsonl`` and ``questions/{nq,triviaqa,popqa,hotpotqa,
2wikimultihopqa,musique}.jsonl`` (the layout of ``../shared/data/miniwiki``). In ``OUT``:

1. ``index``: BM25 over the corpus (``searchrl index``);
2. ``warmstart``: the config's format warm-start (demonstrations from the synthetic world: the real
   questions carry no hop chains; a quarter of them comparisons of two entities, as 2Wiki and
   HotpotQA ask, ``warmstart.comparisons``) and its evaluation on the test sets = the agent before RL
   (``searchrl train steps=0``), with its model folder;
3. ``rl``: RL on the NQ + HotpotQA training questions from that model, evaluated after RL on the
   same questions, its "before" evaluation being the warm-start's;
4. ``rag`` and ``direct``: ``searchrl eval`` of the retrieval-only and no-retrieval baselines with
   the same warm-started model (so that they can write ``<answer>``), the same questions and budgets.

Steps 3 and 4 run side by side with ``--jobs 2``. Finished steps are read, not run again (re-run
after a crash). Writes ``OUT/miniwiki.json`` and prints per-set tables of EM, F1 and EM over
answerable questions for the four, and the paired differences (after RL - RAG, after - before)
with 95 % bootstrap intervals over questions. The training time to hold to the config's budget
(``train_seconds``) is the warm-start's SFT time (``warmstart.json``) plus the RL steps' own times
(``time_step`` in ``metrics.jsonl``: rollouts and updates, every step of a resumed run counted
once), without the evaluations and start-ups around them.

Left out: the paper's SFT and rejection-sampling baselines (``mode=sft`` / ``mode=rs`` runs of the
same config) and dense retrieval (``--kind dense`` indexes work the same way).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import check_overrides, finish, run_searchrl, start_from, summary, threads_per_job  # noqa: E402

from searchrl.eval.compare import AFTER, BEFORE, RUN_SUFFIX, compare_files  # noqa: E402
from searchrl.eval.tables import SHORT_NAMES, markdown_table, ordered_datasets  # noqa: E402
from searchrl.training.monitor import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_SETS = ("nq", "hotpotqa")
TEST_SETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique")
METRICS = ("em", "f1", "em_answerable")
RESERVED = ("out", "model.name", "method", "data.index", "data.train_files", "data.eval_files", "data.corpus")


def _files(data: Path, names: tuple[str, ...]) -> list[Path]:
    files = [data / "questions" / f"{n}.jsonl" for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not (data / "corpus.jsonl").is_file():
        raise FileNotFoundError(f"--data {data}: missing {missing or [str(data / 'corpus.jsonl')]}")
    return files


def run_miniwiki(data: Path, out: Path, config: Path, overrides: list[str], jobs: int) -> dict:
    train_files, test_files = _files(data, TRAIN_SETS), _files(data, TEST_SETS)
    threads = threads_per_job(jobs)
    index = run_searchrl("index", ["--corpus", str(data / "corpus.jsonl"), "--kind", "bm25"], out / "index",
                         out / "index.log", threads * jobs)  # fmt: skip
    common = ["--config", str(config), f"data.index={index}",
              "data.train_files=[" + ",".join(map(str, train_files)) + "]",
              "data.eval_files=[" + ",".join(map(str, test_files)) + "]", *overrides]  # fmt: skip
    ws = run_searchrl("train", [*common, "steps=0", "eval_before=false", "report=false"], out / "warmstart",
                      out / "warmstart.log", threads * jobs)  # fmt: skip
    model = f"model.name={ws / 'model'}"
    start_from(out / "rl", ws)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rl = pool.submit(run_searchrl, "train", [*common, model, "warmstart.steps=0", "eval_before=false"],
                         out / "rl", out / "rl.log", threads)  # fmt: skip
        baselines = {m: pool.submit(run_searchrl, "eval", [*common, model, f"method={m}"], out / m, out / f"{m}.log",
                                    threads) for m in ("rag", "direct")}  # fmt: skip
        rl_dir = rl.result()
        for f in baselines.values():
            f.result()
    evals = {"direct": out / "direct" / "trajectories.jsonl", "rag": out / "rag" / "trajectories.jsonl",
             "before RL": rl_dir / f"{BEFORE}{RUN_SUFFIX}", "after RL": rl_dir / f"{AFTER}{RUN_SUFFIX}"}  # fmt: skip
    pairs = {"after RL - rag": ("rag", "after RL"), "after RL - before RL": ("before RL", "after RL"),
             "rag - direct": ("direct", "rag")}  # fmt: skip
    result = {
        "data": str(data), "config": str(config), "overrides": overrides,
        "train_seconds": train_seconds(ws, rl_dir),
        "steps": summary(rl_dir)["steps"],
        "comparisons": {name: compare_files(evals[a], evals[b], metrics=METRICS) for name, (a, b) in pairs.items()},
    }  # fmt: skip
    (out / "miniwiki.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def train_seconds(warmstart: Path, rl: Path) -> float | None:
    """The warm-start's SFT seconds plus the RL run's step seconds (evaluations excluded); None when
    the warm-start run is older than its ``seconds`` record."""
    sft = json.loads((warmstart / "warmstart.json").read_text()).get("seconds")
    rows = read_metrics(rl / "metrics.jsonl")
    return None if sft is None else round(sft + sum(r.get("time_step", 0.0) for r in rows), 1)


def format_miniwiki(result: dict) -> str:
    comps = result["comparisons"]
    sets = ordered_datasets([d for d in comps["after RL - rag"]["datasets"]])
    # every evaluation's per-set means, read off the comparisons that hold it
    holders = {"direct": ("rag - direct", "a"), "rag": ("after RL - rag", "a"),
               "before RL": ("after RL - before RL", "a"), "after RL": ("after RL - rag", "b")}  # fmt: skip

    def mean(name: str, d: str | None, m: str) -> str:
        comp, side = holders[name]
        e = (comps[comp]["avg"] if d is None else comps[comp]["datasets"][d])[m]
        return "-" if e is None else f"{e[side]:.3f}"

    seconds = result["train_seconds"]
    lines = [f"training time (warm-start SFT + {result['steps']} RL steps, evaluations excluded): "
             + (f"{seconds:.0f} s" if seconds is not None else "unknown (the warm-start run did not record it)")]
    header = ["", *[SHORT_NAMES.get(d, d) for d in sets], "avg"]
    for m in METRICS:
        rows = [[name, *[mean(name, d, m) for d in sets], mean(name, None, m)] for name in holders]
        lines += ["", m, markdown_table(header, rows)]
    for name, comp in comps.items():
        rows = []
        for m in METRICS:
            cells = []
            for e in [comp["datasets"][d][m] for d in sets] + [comp["avg"][m]]:
                cells.append("-" if e is None else f"{e['diff']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]")
            rows.append([m, *cells])
        lines += ["", f"{name} (paired over {comp['n']} questions, 95% bootstrap intervals)", markdown_table(header, rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder with corpus.jsonl and questions/")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "miniwiki.yaml")
    p.add_argument("--jobs", type=int, default=1, help="RL and the baselines side by side (2) or in turn (1)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every run")
    args = p.parse_args(argv)
    problem = check_overrides(args.overrides, RESERVED)
    if problem:
        p.error(problem)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    return finish(lambda: run_miniwiki(args.data, args.out, args.config, args.overrides, args.jobs),
                  format_miniwiki, args.out / "miniwiki.json")


if __name__ == "__main__":
    sys.exit(main())
