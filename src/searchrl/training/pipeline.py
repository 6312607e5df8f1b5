"""The whole training job end to end: data, retriever, models, warm-start, eval, RL, eval, report.

``run_training(cfg, resume)`` is what ``searchrl train`` runs. With the default config it is the
embedded default: the synthetic world (generated and cached on first use), an in-process BM25
index over it, SmolLM2-135M-Instruct, a short SFT format warm-start, GRPO, and greedy evaluation
on the world's held-out test questions before and after RL. Everything lands in ``cfg.out``:
``config.yaml``, ``metrics.jsonl``, ``eval_before.json`` / ``eval_after.json`` (+ trajectories),
``checkpoints/``, ``model/`` (the trained policy as a transformers folder), ``summary.json``, ``report/``. A crashed run continues with ``--resume``: the
warm-start and the "before" evaluation are stored once and not redone, RL continues from the
newest checkpoint.

Left out: multi-process training (see the README's scaling section).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from searchrl.config import save_yaml_config, to_dict
from searchrl.errors import SearchRLError
from searchrl.runlock import hold_run_lock
from searchrl.training.config import TrainConfig
from searchrl.training.signals import StopOnSignal
from searchrl.types import QAExample

log = logging.getLogger(__name__)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def load_data(cfg: TrainConfig) -> tuple[list[QAExample], list[QAExample], Any]:
    """(train examples, eval examples, retriever) for the config."""
    from searchrl.data.qa import load_qa_many

    d = cfg.data
    if not d.train_files:
        from searchrl.data.qa import load_qa
        from searchrl.data.world import DEFAULT_ENTITIES, ensure_default_world

        options = {"filler": d.world_filler} if d.world_filler != 1.0 else {}
        world = ensure_default_world(d.world_seed, d.world_entities or DEFAULT_ENTITIES, **options)
        questions = load_qa(world / "questions.jsonl")
        train = [q for q in questions if q.split == "train"]
        evals = [q for q in questions if q.split == "test"]
        corpus_path = world / "corpus.jsonl"
    else:
        train = load_qa_many(d.train_files, split="train")
        evals = []
        corpus_path = d.corpus
    if d.eval_files:
        evals = load_qa_many(d.eval_files, split="test")
    if d.max_hops:
        train, evals = _within_hops(train, d.max_hops), _within_hops(evals, d.max_hops)
    if d.train_limit:
        train = train[: d.train_limit]
    if d.eval_limit:
        by_source: dict[str, list[QAExample]] = {}
        for q in evals:
            by_source.setdefault(q.source, []).append(q)
        evals = [q for qs in by_source.values() for q in qs[: d.eval_limit]]
    if not train:
        raise SearchRLError("no training questions (check data.train_files and their split)")
    retriever = make_retriever(cfg, corpus_path)
    return train, evals, retriever


def _within_hops(examples: list[QAExample], max_hops: int) -> list[QAExample]:
    """Questions whose known hop count is at most ``max_hops`` (questions without one are kept).

    >>> qs = [QAExample(str(n), "q", ["a"], extra={"num_hops": n}) for n in (1, 2, 3)] + [QAExample("x", "q", ["a"])]
    >>> [q.id for q in _within_hops(qs, 2)]
    ['1', '2', 'x']
    """
    return [q for q in examples if q.extra.get("num_hops", 0) <= max_hops]


def make_retriever(cfg: TrainConfig, corpus_path: str | Path | None) -> Any:
    d = cfg.data
    if d.retriever_url:
        from searchrl.retrieval.client import HttpRetriever

        return HttpRetriever(d.retriever_url, wait=d.retriever_wait)
    if d.index:
        from searchrl.retrieval.index import load_index

        return load_index(d.index)
    if cfg.method in ("direct", "cot"):
        return None
    return bm25_over(corpus_path)


def bm25_over(corpus_path: str | Path) -> Any:
    """An in-process BM25 retriever over a corpus file."""
    from searchrl.data.corpus import load_corpus
    from searchrl.retrieval.bm25 import BM25Retriever

    return BM25Retriever.build(load_corpus(corpus_path), show_progress=False)


def _evaluate(cfg: TrainConfig, examples, generator, retriever, tokenizer, out: Path, name: str) -> dict:
    from searchrl.eval.runner import evaluate

    metrics, trajs = evaluate(examples, generator, retriever, tokenizer, cfg.eval_rollout,
                              method=cfg.method, batch_size=cfg.rollout_batch_size, progress=True)
    _write_json(out / f"{name}.json", metrics)
    with open(out / f"{name}_trajectories.jsonl", "w") as f:
        for t in trajs:
            f.write(json.dumps(t.to_dict()) + "\n")
    return metrics


def _headline(metrics: dict) -> dict:
    avg = metrics["avg"]
    return {"em": avg["em"], "searches_per_question": avg["searches_per_question"]}


def _warm_start(cfg: TrainConfig, models, train: list[QAExample], retriever, out: Path) -> None:
    """SFT on scripted demonstrations; from the synthetic world when the data has no hop chains."""
    from searchrl.training.sft import demonstrations, sft_train

    tok = models.tokenizer
    pool, demo_retriever = train, retriever
    if not any(q.extra.get("hops") for q in train):
        from searchrl.data.world import DEFAULT_ENTITIES, ensure_default_world
        from searchrl.data.qa import load_qa

        options = {"filler": cfg.data.world_filler} if cfg.data.world_filler != 1.0 else {}
        world = ensure_default_world(cfg.data.world_seed, cfg.data.world_entities or DEFAULT_ENTITIES, **options)
        pool = [q for q in load_qa(world / "questions.jsonl") if q.split == "train"]
        if cfg.data.max_hops:
            pool = _within_hops(pool, cfg.data.max_hops)
        demo_retriever = bm25_over(world / "corpus.jsonl")
        log.info("warm-start: the training data has no hop chains; demonstrations come from the synthetic world")
    demos = demonstrations(pool, tok, demo_retriever, cfg.rollout, limit=cfg.warmstart.examples, seed=cfg.seed,
                           method=cfg.method)
    if not demos:
        raise SearchRLError("warm-start produced no demonstrations; set warmstart.steps=0")
    losses = sft_train(models.policy, tok, demos, cfg.warmstart.steps, cfg.warmstart.batch_size,
                       cfg.warmstart.lr, micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, amp=models.amp)
    _write_json(out / "warmstart.json", {"demonstrations": len(demos), "losses": losses})
    if models.reference is not None:  # the reference is the model RL starts from
        models.reference.load_state_dict(models.policy.state_dict())


def _supervised_baseline(cfg: TrainConfig, trainer, train, generator, retriever, out: Path) -> None:
    """``mode=sft``: question -> gold answer; ``mode=rejection``: the policy's own correct trajectories."""
    from searchrl.training.sft import answer_sft_data, rejection_sampling_data, sft_train

    tok = trainer.tokenizer
    if cfg.mode == "sft":
        data = answer_sft_data(train, tok, method=cfg.method)
    else:
        data = rejection_sampling_data(train[: cfg.prompts_per_step * cfg.steps], generator, retriever, tok,
                                       cfg.rollout, n_samples=cfg.algo.group_size,
                                       batch_size=cfg.rollout_batch_size)
    if not data:
        raise SearchRLError(f"mode={cfg.mode}: no training data (rejection sampling kept no trajectory)")
    losses = sft_train(trainer.models.policy, tok, data, cfg.steps, cfg.mini_batch_size, cfg.optim.lr,
                       micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, amp=trainer.models.amp)
    for i, loss in enumerate(losses, 1):
        trainer.logger.log({"step": i, "sft_loss": loss, "examples": len(data)})
    trainer.step_idx = cfg.steps
    trainer.save()


def export_model(models, path: Path) -> Path:
    """Save the trained policy as a plain transformers folder (LoRA merged) for ``--model PATH``."""
    policy = models.policy.merge_and_unload() if models.uses_lora else models.policy
    tmp = path.with_name(path.name + ".tmp")
    policy.save_pretrained(tmp)
    models.tokenizer.save_pretrained(tmp)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def run_training(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run the configured job (see module doc); returns ``summary.json``'s content."""
    from searchrl.training.checkpoint import list_checkpoints
    from searchrl.training.models import build_models
    from searchrl.training.trainer import Trainer

    t_start = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise SearchRLError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    hold_run_lock(out)  # a second process on this --out is refused (runlock.py)
    save_yaml_config(cfg, out / "config.yaml")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    train, evals, retriever = load_data(cfg)
    log.info("data: %d training questions, %d evaluation questions", len(train), len(evals))
    models = build_models(cfg.model, need_reference=cfg.algo.kl_coef > 0, need_critic=cfg.algo.needs_critic)
    tok = models.tokenizer
    generator = models.generator()
    trainer = Trainer(cfg, models, retriever, train, generator=generator)
    resumed = resume and trainer.resume()

    if not resumed and cfg.warmstart.steps > 0:
        _warm_start(cfg, models, train, retriever, out)
    if not list_checkpoints(out):
        trainer.save()  # step 0 = the model RL starts from, so --resume never redoes the warm-start
    before_path = out / "eval_before.json"
    if cfg.eval_before and evals and not before_path.exists():
        _evaluate(cfg, evals, generator, retriever, tok, out, "eval_before")

    bar = tqdm(total=cfg.steps, initial=trainer.step_idx, desc="RL", unit="step")
    stop = StopOnSignal()

    def on_step(m: dict) -> None:
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.2f}", srch=f"{m['searches_per_traj']:.2f}",
                        len=f"{m['response_length']:.0f}")
        if cfg.eval_every and m["step"] % cfg.eval_every == 0 and m["step"] < cfg.steps and evals:
            val = _evaluate(cfg, evals, generator, retriever, tok, out, f"eval_step{m['step']}")
            trainer.logger.log({"step": m["step"], "val_em": val["avg"]["em"],
                                "val_searches": val["avg"]["searches_per_question"]})
        if stop.should_stop():  # SIGTERM / SIGINT: checkpoint this step, then stop (signals.py)
            bar.close()
            stop.check(m["step"], trainer.save())

    if cfg.mode == "rl":
        with stop:
            trainer.fit(on_step=on_step)
    elif trainer.step_idx < cfg.steps:  # the paper's SFT / rejection-sampling baselines
        _supervised_baseline(cfg, trainer, train, generator, retriever, out)
    bar.close()
    summary: dict[str, Any] = {"steps": trainer.step_idx}
    if evals:
        after = _evaluate(cfg, evals, generator, retriever, tok, out, "eval_after")
        if before_path.exists():
            summary["eval_before"] = _headline(json.loads(before_path.read_text()))
        summary["eval_after"] = _headline(after)
    prev = json.loads((out / "summary.json").read_text()) if resumed and (out / "summary.json").exists() else {}
    summary["wall_seconds"] = round(time.perf_counter() - t_start + prev.get("wall_seconds", 0.0), 1)
    summary["config"] = to_dict(cfg)
    summary["model"] = str(export_model(models, out / "model"))
    _write_json(out / "summary.json", summary)
    if cfg.report:
        from searchrl.report.html import write_report

        write_report(out)
    return summary
