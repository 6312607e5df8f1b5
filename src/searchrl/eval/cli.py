"""``searchrl eval | ask``: benchmark a model on QA files, or trace one question through the agent.

``eval`` writes into ``--out``: ``eval_config.json`` (what was run), ``trajectories.jsonl`` (one
:func:`~searchrl.eval.runner.trajectory_record` per line, appended and flushed chunk by chunk)
and, at the end, ``metrics.json`` (see :mod:`searchrl.eval.runner`: every metric with its 95 %
bootstrap interval); it prints a markdown table.
Re-running the same command **resumes**: ids already in ``trajectories.jsonl`` are not run again
(a half-written last line from a killed run is dropped) and the metrics are recomputed over every
selected example. A folder made by a run whose settings change the trajectories (data, split,
method, model, retriever, rollout budgets, seed...) is refused; ``--limit``, ``--batch-size``,
``--schedule`` and ``--device`` may differ (the metrics cover the examples the current ``--limit``
selects), so a run can be extended with a larger ``--limit``. Decoding is greedy.

``ask`` runs one question and prints the trace (:func:`~searchrl.eval.tables.format_trace`).

**One front door with** ``train``: both commands read the same configuration
(:class:`~searchrl.training.config.TrainConfig`): ``--config FILE`` (a YAML file such as
``configs/*.yaml``) and dotted ``KEY=VALUE`` overrides, then the flags, which are shorthands for
fields (:data:`SHORTHANDS`: ``--model`` is ``model.name``, ``--topk`` is ``eval_rollout.topk``...;
``--dtype`` defaults to ``model.dtype`` and may also be float16, which training refuses).
The generator comes from ``model`` (name, dtype, device, amp), the retriever from ``data`` (index,
retriever_url, else BM25 over ``data.corpus`` or over the synthetic world), the budgets and
sampling from ``eval_rollout``, the questions from ``--data``, else ``data.eval_files``, else the
synthetic world's test split (``data.eval_limit`` per dataset unless ``--limit`` is given).
Without ``--config`` and overrides, the budgets are :class:`~searchrl.rollout.config.RolloutConfig`'s
defaults (the paper's), greedy, on every question of ``--data`` (which is then required).

Left out: model identity checks beyond the path (a checkpoint overwritten in place is not
detected) and multi-process evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from searchrl.config import from_dict, load_yaml_config, to_dict
from searchrl.errors import ConfigError, DataFormatError
from searchrl.models import AMP_MODES
from searchrl.rollout.config import SCHEDULES, RolloutConfig
from searchrl.rollout.prompts import PROMPT_METHODS
from searchrl.runlock import hold_run_lock
from searchrl.types import QAExample

log = logging.getLogger(__name__)

CONFIG_FILE, TRAJ_FILE, METRICS_FILE = "eval_config.json", "trajectories.jsonl", "metrics.json"
# eval_config.json fields that do not change trajectories: a resumed run may change them
_FREE_FIELDS = ("limit", "batch_size", "device", "schedule")
RETRIEVAL_METHODS = ("search", "rag")

# flag -> the config field it sets (dotted); a flag left out keeps the configured value
SHORTHANDS = {
    "method": "method", "model": "model.name", "device": "model.device",
    "amp": "model.amp", "index": "data.index", "retriever_url": "data.retriever_url",
    "topk": "eval_rollout.topk", "max_turns": "eval_rollout.max_turns",
    "max_new_tokens": "eval_rollout.max_new_tokens_per_turn", "schedule": "eval_rollout.schedule",
    "temperature": "eval_rollout.temperature", "seed": "seed", "batch_size": "rollout_batch_size",
}  # fmt: skip


# ------------------------------------------------------------------------------ arguments
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    """The configuration (``--config``, overrides) and the flags that are shorthands for it."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides with dotted keys, e.g. eval_rollout.topk=5")
    p.add_argument("--config", "-c", help="YAML config file, as for `searchrl train` (configs/)")
    p.add_argument("--method", choices=PROMPT_METHODS, help="search agent or baseline (default: search)")
    p.add_argument("--model", help="model folder (e.g. an exported checkpoint), .gguf file or hub id "
                   "(default: the bundled SmolLM2-135M-Instruct)")  # fmt: skip
    p.add_argument("--backend", choices=["hf", "vllm"], default=None,
                   help="generation backend (default: model.backend of --config, else hf)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--dtype", help="model dtype (float32, bfloat16; default float32)")
    p.add_argument("--amp", choices=AMP_MODES,
                   help="hf backend: bf16 compute over fp32 weights, on a bf16 copy of them "
                   "(default auto: where the hardware has native bf16)")
    p.add_argument("--index", help="index directory built by `searchrl index`")
    p.add_argument("--retriever-url", help="URL of a /retrieve server (`searchrl serve`)")
    p.add_argument("--topk", type=_positive, help="passages per search (default: 3)")
    p.add_argument("--max-turns", type=int, help="turns that may search (default: 4)")
    p.add_argument("--max-new-tokens", type=_positive, help="tokens per model turn (default: 500)")
    p.add_argument("--seed", type=int, help="seed (default 0; recorded when decoding is greedy)")


def register(subparsers: Any) -> None:
    """Add the ``eval`` and ``ask`` sub-commands."""
    e = subparsers.add_parser(
        "eval", help="evaluate a model on QA files (EM, F1, searches per question)",
        description="Evaluate the search agent or a baseline on QA files; re-run the same command "
        "to resume an interrupted run.",
    )  # fmt: skip
    e.add_argument("--data", help="QA file(s), comma-separated (default with --config: "
                   "data.eval_files, else the synthetic world's test split)")
    e.add_argument("--split", default="test", help="split to keep ('all' keeps every split)")
    e.add_argument("--limit", type=_positive, help="first N questions of each dataset")
    e.add_argument("--out", required=True, help="output folder (created; resumed if it exists)")
    e.add_argument("--batch-size", type=_positive, help="trajectories in flight (default: 32)")
    e.add_argument("--schedule", choices=SCHEDULES,
                   help="continuous batching or rounds (default auto: continuous on GPU, rounds on CPU)")
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_common(e)
    e.set_defaults(func=cmd_eval)

    a = subparsers.add_parser("ask", help="run one question through the agent and print its trace")
    a.add_argument("question", help="the question")
    a.add_argument("--gold", action="append", help="a gold answer (repeatable): prints EM and F1")
    a.add_argument("--temperature", type=float, help="0 = greedy (the default)")
    _add_common(a)
    a.set_defaults(func=cmd_ask)


# ------------------------------------------------------------------------------ configuration
def resolve_config(args: argparse.Namespace) -> Any:
    """The :class:`~searchrl.training.config.TrainConfig` of this command: ``--config``, the
    overrides, then the flags given (:data:`SHORTHANDS`); written back onto ``args`` (module doc).
    """
    from searchrl.training.config import DataConfig, TrainConfig

    args.configured = bool(args.config or args.overrides)
    if args.configured:
        cfg = load_yaml_config(TrainConfig, args.config, args.overrides)
    else:  # the historical defaults of `searchrl eval`: the paper's budgets, every question
        cfg = TrainConfig(rollout=RolloutConfig(), data=DataConfig(eval_limit=0))  # evaluated greedy
    data = to_dict(cfg)
    for flag, dotted in SHORTHANDS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        section, _, name = dotted.rpartition(".")
        node = data[section] if section else data
        node[name] = value
        if dotted == "eval_rollout.max_new_tokens_per_turn":
            node["min_turn_tokens"] = min(cfg.eval_rollout_config.min_turn_tokens, value)
    if getattr(args, "data", None):
        data["data"]["eval_files"] = [p.strip() for p in args.data.split(",") if p.strip()]
    cfg = from_dict(TrainConfig, data)
    _write_back(args, cfg)
    return cfg


def _write_back(args: argparse.Namespace, cfg: Any) -> None:
    """Put the resolved values where the rest of this module reads them."""
    args.method, args.seed, args.batch_size = cfg.method, cfg.seed, cfg.rollout_batch_size
    m, d = cfg.model, cfg.data
    args.model, args.device, args.amp = m.name, m.device, m.amp
    args.backend = getattr(args, "backend", None) or m.backend
    args.dtype = args.dtype or m.dtype  # not validated as a training dtype: float16 runs too
    args.index, args.retriever_url = d.index, d.retriever_url
    args.index_mmap, args.search_cache = d.index_mmap, d.search_cache
    ev = cfg.eval_rollout_config
    args.rollout = replace(ev, seed=ev.seed if ev.seed is not None else cfg.seed)
    args.data_config = d if args.configured else None  # its world, when one is needed
    args.corpus = d.corpus if args.configured and not (d.index or d.retriever_url) else None
    if hasattr(args, "data"):
        args.data = ",".join(d.eval_files) or None
        if args.limit is None and args.configured:
            args.limit = d.eval_limit or None


# ------------------------------------------------------------------------------ building blocks
def check_retriever_args(args: argparse.Namespace) -> None:
    """Fail early (before any loading) when the retriever options do not fit ``--method``."""
    if args.index and args.retriever_url:
        raise ConfigError("give either --index or --retriever-url, not both")
    in_process = getattr(args, "configured", False)  # BM25 over data.corpus or the world
    if args.method in RETRIEVAL_METHODS and not (args.index or args.retriever_url or in_process):
        raise ConfigError(
            f"method {args.method!r} needs a retriever: pass --index DIR (built with `searchrl "
            "index`) or --retriever-url URL (a `searchrl serve` server)"
        )


def build_retriever(args: argparse.Namespace) -> Any:
    """The retriever named by ``--index`` / ``--retriever-url`` (with a config: else BM25 over
    ``data.corpus`` or the synthetic world); ``None`` for direct and cot."""
    check_retriever_args(args)
    if args.method not in RETRIEVAL_METHODS:
        if args.index or args.retriever_url:
            log.info("method %r does not retrieve: ignoring the retriever", args.method)
        return None
    if args.index:
        from searchrl.retrieval.index import load_index

        return load_index(args.index, mmap=getattr(args, "index_mmap", False),
                          cache=getattr(args, "search_cache", None))
    if args.retriever_url:
        from searchrl.retrieval.client import HttpRetriever

        return HttpRetriever(args.retriever_url)
    from searchrl.training.pipeline import bm25_over, synthetic_world

    return bm25_over(args.corpus or synthetic_world(args.data_config)[1])


def build_generator(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(generator, tokenizer)`` for ``--model`` with ``--backend``, ``--device``, ``--dtype``."""
    from searchrl.models import load_tokenizer, resolve_device
    from searchrl.rollout.engine.factory import make_generator

    if args.backend == "vllm":
        return make_generator("vllm", model_path=args.model, dtype=args.dtype), load_tokenizer(args.model)
    from searchrl.models import amp_dtype, load_model

    device = str(resolve_device(args.device))
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    amp = amp_dtype(args.amp, device, weights=args.dtype)
    return make_generator("hf", model=model, tokenizer=tokenizer, amp=amp), tokenizer


def select_examples(args: argparse.Namespace) -> list[QAExample]:
    """``--data`` (or ``data.eval_files``), else, with a config, the synthetic world's test split
    (questions within ``data.max_hops``); the first ``--limit`` per dataset."""
    if args.data:
        return load_examples(args.data, args.split, args.limit)
    if args.data_config is None:
        raise ConfigError("--data: give QA file(s), or a --config whose data section names them "
                          "(or uses the synthetic world)")  # fmt: skip
    from searchrl.training.pipeline import _within_hops, synthetic_world

    d = args.data_config
    questions = [q for q in synthetic_world(d)[0] if q.split == "test"]
    if d.max_hops:
        questions = _within_hops(questions, d.max_hops)
    return _first_per_source(questions, args.limit)


def _first_per_source(examples: list[QAExample], limit: int | None) -> list[QAExample]:
    if limit is None:
        return examples
    counts: dict[str, int] = {}
    kept = []
    for ex in examples:
        counts[ex.source] = counts.get(ex.source, 0) + 1
        if counts[ex.source] <= limit:
            kept.append(ex)
    return kept


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
    return _first_per_source(examples, limit)


# ------------------------------------------------------------------------------ output folder
def eval_config(args: argparse.Namespace, cfg: RolloutConfig) -> dict[str, Any]:
    """What ``eval_config.json`` records: everything that decides the trajectories, plus
    the free fields (``limit``, ``batch_size``, ``device``, ``schedule``)."""

    def where(p: str | None) -> str | None:
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    uses_retriever = args.method in RETRIEVAL_METHODS
    if args.data:
        data = [where(p.strip()) for p in args.data.split(",") if p.strip()]
    else:
        d = args.data_config
        data = [f"synthetic world (seed {d.world_seed}, entities {d.world_entities or 'default'}, "
                f"filler {d.world_filler}, max_hops {d.max_hops})"]  # fmt: skip
    return {
        "data": data,
        "split": args.split,
        "method": args.method,
        "model": where(args.model) or "smollm2-135m-instruct",
        "backend": args.backend,
        "dtype": args.dtype,
        "amp": args.amp,
        "index": where(args.index) if uses_retriever else None,
        "retriever_url": args.retriever_url if uses_retriever else None,
        "corpus": where(args.corpus) if uses_retriever and args.corpus else None,
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
    cfg = args.rollout
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

    resolve_config(args)
    check_retriever_args(args)
    examples = select_examples(args)
    out = Path(args.out)
    config = eval_config(args, args.rollout)
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
    print(metrics_table(metrics, intervals=True))
    print(f"[brackets]: 95% bootstrap intervals over questions ({metrics['bootstrap']['resamples']} resamples)")
    print(f"\nwrote {out / METRICS_FILE} and {out / TRAJ_FILE}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from searchrl.eval.tables import format_trace
    from searchrl.rewards import exact_match, f1_score
    from searchrl.rollout.loop import run_rollouts

    if not args.question.strip():
        raise ConfigError("the question is empty")
    resolve_config(args)
    retriever = build_retriever(args)
    generator, tokenizer = build_generator(args)
    example = QAExample("ask", args.question, list(args.gold or []), source="ask")
    (traj,) = run_rollouts([example], generator, retriever, tokenizer, args.rollout, n_samples=1,
                           batch_size=1, method=args.method, progress=False)  # fmt: skip
    print(format_trace(traj))
    if args.gold:
        em, f1 = exact_match(traj.answer, args.gold), f1_score(traj.answer, args.gold)
        print(f"EM {em:.0f}  F1 {f1:.2f}  (gold: {' | '.join(args.gold)})")
    return 0
