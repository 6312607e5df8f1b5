"""``searchrl eval | ask``: benchmark a model on QA files, or trace one question through the agent.

``eval`` writes into ``--out``: ``eval_config.json`` (what was run), ``trajectories.jsonl`` (one
:func:`~searchrl.eval.runner.trajectory_record` per line, appended and flushed chunk by chunk)
and, at the end, ``metrics.json`` (see :mod:`searchrl.eval.runner`); it prints a markdown table.
Re-running the same command **resumes**: ids already in ``trajectories.jsonl`` are not run again
(a half-written last line from a killed run is dropped) and the metrics are recomputed over every
selected example. A folder made by a run whose settings change the trajectories (data, split,
method, model, retriever, rollout budgets, seed...) is refused; ``--limit``, ``--batch-size``,
``--schedule`` and ``--device`` may differ (the metrics cover the examples the current ``--limit``
selects), so a run can be extended with a larger ``--limit``. Decoding is greedy.

``ask`` runs one question and prints the trace (:func:`~searchrl.eval.tables.format_trace`).

Left out: model identity checks beyond the path (a checkpoint overwritten in place is not
detected) and multi-process evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from searchrl.config import to_dict
from searchrl.errors import ConfigError, DataFormatError
from searchrl.models import AMP_MODES
from searchrl.rollout.loop import SCHEDULES, RolloutConfig
from searchrl.rollout.prompts import PROMPT_METHODS
from searchrl.runlock import hold_run_lock
from searchrl.types import QAExample

log = logging.getLogger(__name__)

CONFIG_FILE, TRAJ_FILE, METRICS_FILE = "eval_config.json", "trajectories.jsonl", "metrics.json"
# eval_config.json fields that do not change trajectories: a resumed run may change them
_FREE_FIELDS = ("limit", "batch_size", "device", "schedule")
RETRIEVAL_METHODS = ("search", "rag")


# ------------------------------------------------------------------------------ arguments
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser, default_method: str) -> None:
    p.add_argument("--method", choices=PROMPT_METHODS, default=default_method,
                   help=f"search agent or baseline (default: {default_method})")  # fmt: skip
    p.add_argument("--model", help="model folder (e.g. an exported checkpoint), .gguf file or hub id "
                   "(default: the bundled SmolLM2-135M-Instruct)")  # fmt: skip
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="generation backend")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16)")
    p.add_argument("--amp", default="auto", choices=AMP_MODES,
                   help="hf backend: bf16 compute over fp32 weights, on a bf16 copy of them "
                   "(auto = where the hardware has native bf16)")
    p.add_argument("--index", help="index directory built by `searchrl index`")
    p.add_argument("--retriever-url", help="URL of a /retrieve server (`searchrl serve`)")
    p.add_argument("--topk", type=_positive, default=3, help="passages per search (default: 3)")
    p.add_argument("--max-turns", type=int, default=4, help="turns that may search (default: 4)")
    p.add_argument("--max-new-tokens", type=_positive, default=500,
                   help="tokens per model turn (default: 500)")  # fmt: skip


def register(subparsers: Any) -> None:
    """Add the ``eval`` and ``ask`` sub-commands."""
    e = subparsers.add_parser(
        "eval", help="evaluate a model on QA files (EM, F1, searches per question)",
        description="Evaluate the search agent or a baseline on QA files; re-run the same command "
        "to resume an interrupted run.",
    )  # fmt: skip
    e.add_argument("--data", required=True, help="QA file(s), comma-separated")
    e.add_argument("--split", default="test", help="split to keep ('all' keeps every split)")
    e.add_argument("--limit", type=_positive, help="first N questions of each dataset")
    e.add_argument("--out", required=True, help="output folder (created; resumed if it exists)")
    e.add_argument("--batch-size", type=_positive, default=32, help="trajectories in flight")
    e.add_argument("--schedule", choices=SCHEDULES, default="auto",
                   help="continuous batching or rounds (auto: continuous on GPU, rounds on CPU)")
    e.add_argument("--seed", type=int, default=0, help="seed (recorded; decoding is greedy)")
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_common(e, "search")
    e.set_defaults(func=cmd_eval)

    a = subparsers.add_parser("ask", help="run one question through the agent and print its trace")
    a.add_argument("question", help="the question")
    a.add_argument("--gold", action="append", help="a gold answer (repeatable): prints EM and F1")
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a.add_argument("--seed", type=int, default=0, help="sampling seed when temperature > 0")
    _add_common(a, "search")
    a.set_defaults(func=cmd_ask)


# ------------------------------------------------------------------------------ building blocks
def check_retriever_args(args: argparse.Namespace) -> None:
    """Fail early (before any loading) when the retriever options do not fit ``--method``."""
    if args.index and args.retriever_url:
        raise ConfigError("give either --index or --retriever-url, not both")
    if args.method in RETRIEVAL_METHODS and not (args.index or args.retriever_url):
        raise ConfigError(
            f"method {args.method!r} needs a retriever: pass --index DIR (built with `searchrl "
            "index`) or --retriever-url URL (a `searchrl serve` server)"
        )


def build_retriever(args: argparse.Namespace) -> Any:
    """The retriever named by ``--index`` / ``--retriever-url``; ``None`` for direct and cot."""
    check_retriever_args(args)
    if args.method not in RETRIEVAL_METHODS:
        if args.index or args.retriever_url:
            log.info("method %r does not retrieve: ignoring the retriever", args.method)
        return None
    if args.index:
        from searchrl.retrieval.index import load_index

        return load_index(args.index)
    if args.retriever_url:
        from searchrl.retrieval.client import HttpRetriever

        return HttpRetriever(args.retriever_url)


def build_generator(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(generator, tokenizer)`` for ``--model`` with ``--backend``, ``--device``, ``--dtype``."""
    from searchrl.models import load_tokenizer, resolve_device
    from searchrl.rollout.generator import make_generator

    if args.backend == "vllm":
        return make_generator("vllm", model_path=args.model, dtype=args.dtype), load_tokenizer(args.model)
    from searchrl.models import amp_dtype, load_model

    device = str(resolve_device(args.device))
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    amp = amp_dtype(args.amp, device, weights=args.dtype)
    return make_generator("hf", model=model, tokenizer=tokenizer, amp=amp), tokenizer


def rollout_config(args: argparse.Namespace, temperature: float = 0.0) -> RolloutConfig:
    return RolloutConfig(
        max_turns=args.max_turns, topk=args.topk, max_new_tokens_per_turn=args.max_new_tokens,
        min_turn_tokens=min(RolloutConfig.min_turn_tokens, args.max_new_tokens),
        temperature=temperature, seed=args.seed, schedule=getattr(args, "schedule", "auto"),
    )  # fmt: skip


def load_examples(data: str, split: str, limit: int | None) -> list[QAExample]:
    """The examples of the comma-separated files, ``split`` kept, the first ``limit`` per dataset."""
    from searchrl.data.qa import load_qa_many

    paths = [p.strip() for p in data.split(",") if p.strip()]
    if not paths:
        raise ConfigError("--data: no file given")
    for p in paths:
        if not Path(p).is_file():
            raise DataFormatError(p, None, "QA data file not found (--data)")
    examples = load_qa_many(paths, split=None if split == "all" else split)
    if not examples:
        raise ConfigError(f"--data: no question with split {split!r} in {', '.join(paths)}")
    if limit is not None:
        counts: dict[str, int] = {}
        kept = []
        for ex in examples:
            counts[ex.source] = counts.get(ex.source, 0) + 1
            if counts[ex.source] <= limit:
                kept.append(ex)
        examples = kept
    return examples


# ------------------------------------------------------------------------------ output folder
def eval_config(args: argparse.Namespace, cfg: RolloutConfig) -> dict[str, Any]:
    """What ``eval_config.json`` records: everything that decides the trajectories, plus
    the free fields (``limit``, ``batch_size``, ``device``, ``schedule``)."""

    def where(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    uses_retriever = args.method in RETRIEVAL_METHODS
    return {
        "data": [where(p.strip()) for p in args.data.split(",") if p.strip()],
        "split": args.split,
        "method": args.method,
        "model": where(args.model) or "smollm2-135m-instruct",
        "backend": args.backend,
        "dtype": args.dtype,
        "amp": args.amp,
        "index": where(args.index) if uses_retriever else None,
        "retriever_url": args.retriever_url if uses_retriever else None,
        "rollout": {k: v for k, v in to_dict(cfg).items() if k != "schedule"},
        "limit": args.limit,
        "schedule": cfg.schedule,
        "batch_size": args.batch_size,
        "device": args.device,
    }


def check_resume(out: Path, config: dict[str, Any]) -> None:
    """Refuse ``out`` when it holds results of an evaluation with other settings."""
    path = out / CONFIG_FILE
    if not path.is_file():
        if (out / TRAJ_FILE).exists():
            raise ConfigError(f"{out} holds {TRAJ_FILE} but no {CONFIG_FILE}: not a searchrl eval "
                              "folder that can be resumed; choose another --out")  # fmt: skip
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); choose another --out") from None
    diffs = [k for k in config if k not in _FREE_FIELDS and old.get(k) != config[k]]
    if diffs:
        detail = "; ".join(f"{k}: {old.get(k)!r} there, {config[k]!r} now" for k in diffs)
        raise ConfigError(f"{out} holds an evaluation with other settings ({detail}); "
                          "use another --out, or delete the folder to start over")  # fmt: skip


def read_finished(path: Path) -> dict[str, dict[str, Any]]:
    """Records of ``trajectories.jsonl`` by id. A broken *last* line (a run killed while writing)
    is cut off the file; a broken line elsewhere raises :class:`DataFormatError`."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    done: dict[str, dict[str, Any]] = {}
    offset = 0
    for n, line in enumerate(lines, start=1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec_id = str(rec["id"])
        except (ValueError, KeyError, TypeError) as e:
            if all(not rest.strip() for rest in lines[n:]):
                log.warning("%s:%d: dropping a half-written last line", path, n)
                with open(path, "r+b") as f:
                    f.truncate(start)
                break
            raise DataFormatError(str(path), n, f"not a trajectory record ({e})") from None
        done[rec_id] = rec
    return done


# ------------------------------------------------------------------------------ commands
def _run_remaining(args, todo, out_file, total, done_count) -> float:
    """Roll out ``todo`` in chunks, appending records to ``out_file``; returns seconds spent."""
    from tqdm.auto import tqdm

    from searchrl.eval.runner import run_scored, trajectory_record

    t0 = time.perf_counter()
    retriever = build_retriever(args)
    generator, tokenizer = build_generator(args)
    cfg = rollout_config(args)
    log.info("model ready in %.1fs", time.perf_counter() - t0)
    chunk = args.batch_size * 4
    bar = tqdm(total=total, initial=done_count, desc=f"eval ({args.method})", unit="q",
               disable=args.no_progress)  # fmt: skip
    with open(out_file, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            trajs = run_scored(part, generator, retriever, tokenizer, cfg, args.method,
                               args.batch_size, progress=not args.no_progress)  # fmt: skip
            for t in trajs:
                f.write(json.dumps(trajectory_record(t), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(part))
    bar.close()
    return time.perf_counter() - t0


def cmd_eval(args: argparse.Namespace) -> int:
    from searchrl.eval.runner import summarize
    from searchrl.eval.tables import metrics_table

    check_retriever_args(args)
    examples = load_examples(args.data, args.split, args.limit)
    out = Path(args.out)
    config = eval_config(args, rollout_config(args))
    check_resume(out, config)
    out.mkdir(parents=True, exist_ok=True)
    hold_run_lock(out)  # a second process on this --out is refused (runlock.py)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    finished = read_finished(out / TRAJ_FILE)
    todo = [ex for ex in examples if ex.id not in finished]
    if finished:
        print(f"resuming {out}: {len(examples) - len(todo)} of {len(examples)} questions done")
    seconds = 0.0
    if todo:
        try:
            seconds = _run_remaining(args, todo, out / TRAJ_FILE, len(examples), len(examples) - len(todo))
        except KeyboardInterrupt:
            print(f"interrupted: finished questions are in {out / TRAJ_FILE}; "
                  "re-run the same command to resume")  # fmt: skip
            raise
        finished = read_finished(out / TRAJ_FILE)
    wanted = {ex.id for ex in examples}
    metrics = summarize([r for i, r in finished.items() if i in wanted])
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"\n{args.method} on {len(examples)} questions ({len(todo)} run now in {seconds:.0f}s)\n")
    print(metrics_table(metrics))
    print(f"\nwrote {out / METRICS_FILE} and {out / TRAJ_FILE}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from searchrl.eval.tables import format_trace
    from searchrl.rewards import exact_match, f1_score
    from searchrl.rollout.loop import run_rollouts

    if not args.question.strip():
        raise ConfigError("the question is empty")
    retriever = build_retriever(args)
    generator, tokenizer = build_generator(args)
    example = QAExample("ask", args.question, list(args.gold or []), source="ask")
    cfg = rollout_config(args, temperature=args.temperature)
    (traj,) = run_rollouts([example], generator, retriever, tokenizer, cfg, n_samples=1,
                           batch_size=1, method=args.method, progress=False)  # fmt: skip
    print(format_trace(traj))
    if args.gold:
        em, f1 = exact_match(traj.answer, args.gold), f1_score(traj.answer, args.gold)
        print(f"EM {em:.0f}  F1 {f1:.2f}  (gold: {' | '.join(args.gold)})")
    return 0
