"""The whole training job end to end: data, retriever, models, warm-start, eval, RL, eval, report.

``run_training(cfg, resume)`` is what ``searchrl train`` runs. With the default config it is the
embedded default: the synthetic world (generated and cached on first use), an in-process BM25
index over it, SmolLM2-135M-Instruct, a short SFT format warm-start, GRPO, and greedy evaluation
on the world's held-out test questions before and after RL. Everything lands in ``cfg.out``:
``config.yaml``, ``metrics.jsonl``, ``eval_before.json`` / ``eval_after.json`` (+ trajectories),
``checkpoints/``, ``model/`` (the trained policy as a transformers folder), ``summary.json``, ``report/``. A crashed run continues with ``--resume``: the
warm-start and the "before" evaluation are stored once and not redone, RL continues from the
newest checkpoint. ``searchrl train --seeds`` passes ``shared_warm_start``, a folder where the
first seed leaves its warm-started weights and "before" evaluation for the others (see
:func:`_reuse_warm_start`).

Under torchrun every rank runs this function; rank 0 alone writes the run folder, evaluates,
exports and reports (the others wait at barriers). Left out: the SFT / rejection-sampling
baselines on several processes (refused).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from searchrl.config import to_dict
from searchrl.errors import SearchRLError
from searchrl.runlock import hold_run_lock
from searchrl.training.checkpoint import list_checkpoints, write_problem
from searchrl.training.config import TrainConfig
from searchrl.training.signals import StopOnSignal
from searchrl.types import QAExample

log = logging.getLogger(__name__)

WARMSTART_BASE = "warmstart_base.safetensors"  # LoRA: base weights with the warm-start adapter merged
SHARED_WEIGHTS = "policy.safetensors"  # in a shared warm-start folder: the warm-started policy
SHARED_KEY = "config.yaml"  # ... and the configuration it was trained under, less seed and out
BEFORE_FILES = ("eval_before.json", "eval_before_trajectories.jsonl")
SHARED_FILES = ("warmstart.json", *BEFORE_FILES)  # copied from a shared warm-start folder into each run


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def load_data(cfg: TrainConfig) -> tuple[list[QAExample], list[QAExample], Any]:
    """(train examples, eval examples, retriever) for the config."""
    from searchrl.data.qa import load_qa_many

    d = cfg.data
    if not d.train_files:
        questions, corpus_path = synthetic_world(d)
        train = [q for q in questions if q.split == "train"]
        evals = [q for q in questions if q.split == "test"]
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


def synthetic_world(d: Any) -> tuple[list[QAExample], Path]:
    """The synthetic world of ``d`` (a :class:`~searchrl.training.config.DataConfig`): its questions
    (every split) and its corpus file, generated and cached on first use. The one place the world
    is built from the config (training data, warm-start demonstrations, ``searchrl eval``)."""
    from searchrl.data.qa import load_qa
    from searchrl.data.world import DEFAULT_ENTITIES, ensure_default_world

    options = {"filler": d.world_filler} if d.world_filler != 1.0 else {}
    world = ensure_default_world(d.world_seed, d.world_entities or DEFAULT_ENTITIES, **options)
    return load_qa(world / "questions.jsonl"), world / "corpus.jsonl"


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

        return load_index(d.index, mmap=d.index_mmap, cache=d.search_cache)
    if cfg.method in ("direct", "cot"):
        return None
    return bm25_over(corpus_path)


def bm25_over(corpus_path: str | Path) -> Any:
    """An in-process BM25 retriever over a corpus file."""
    from searchrl.data.corpus import load_corpus
    from searchrl.retrieval.bm25 import BM25Retriever

    return BM25Retriever.build(load_corpus(corpus_path), show_progress=False)


def _evaluate(cfg: TrainConfig, examples, generator, retriever, tokenizer, out: Path, name: str) -> dict:
    from searchrl.eval.runner import evaluate, trajectory_record

    metrics, trajs = evaluate(examples, generator, retriever, tokenizer, cfg.eval_rollout_config,
                              method=cfg.method, batch_size=cfg.rollout_batch_size, progress=True)
    _write_json(out / f"{name}.json", metrics)
    with open(out / f"{name}_trajectories.jsonl", "w") as f:
        for t in trajs:
            f.write(json.dumps(trajectory_record(t)) + "\n")  # + answerable flag and scores, as `searchrl eval`
    return metrics


def _headline(metrics: dict) -> dict:
    avg = metrics["avg"]
    return {"em": avg["em"], "searches_per_question": avg["searches_per_question"]}


def _warm_start(cfg: TrainConfig, models, train: list[QAExample], retriever, out: Path) -> None:
    """SFT on scripted demonstrations; from the synthetic world when the data has no hop chains."""
    from searchrl.training.sft import demonstrations, demonstrations_by_hops, sft_train

    tok = models.tokenizer
    pool, demo_retriever = train, retriever
    if not any(q.extra.get("hops") for q in train):
        questions, corpus_path = synthetic_world(cfg.data)
        pool = [q for q in questions if q.split == "train"]
        if cfg.data.max_hops:
            pool = _within_hops(pool, cfg.data.max_hops)
        demo_retriever = bm25_over(corpus_path)
        log.info("warm-start: the training data has no hop chains; demonstrations come from the synthetic world")
    w = cfg.warmstart
    seed = cfg.seed if w.seed is None else w.seed
    n_compare = round(w.examples * w.comparisons)
    demos = demonstrations_by_hops(pool, tok, demo_retriever, cfg.rollout, w.examples - n_compare,
                                   w.multi_hop_share, seed=seed, method=cfg.method, style=w.style)
    if n_compare:
        from searchrl.data.world_comparisons import comparison_questions

        compare = comparison_questions(pool, n_compare, seed=seed)
        demos += demonstrations(compare, tok, demo_retriever, cfg.rollout, limit=n_compare, seed=seed,
                                method=cfg.method, style=w.style)
    if not demos:
        raise SearchRLError("warm-start produced no demonstrations; set warmstart.steps=0")
    t0 = time.perf_counter()
    losses = sft_train(models.policy, tok, demos, w.steps, w.batch_size, w.lr, micro_batch_size=cfg.micro_batch_size,
                       seed=seed, amp=models.amp, schedule=w.schedule, average_last=w.average_last)
    if models.dist.main:
        compared = sum(1 for d in demos if d.example.extra.get("compare"))
        _write_json(out / "warmstart.json", {"demonstrations": len(demos), "comparisons": compared, "losses": losses,
                                             "seconds": round(time.perf_counter() - t0, 1)})
    # The reference is the model RL starts from: a copy of the warm-started weights, or (LoRA) the
    # base with the warm-start adapter folded in, saved since LoRA checkpoints hold adapters only.
    if models.reference is not None:
        models.reference.load_state_dict(models.policy.state_dict())
    merged = models.restart_adapter()
    if merged and models.dist.main:
        from searchrl.training.models import save_base_weights

        save_base_weights(merged, out / WARMSTART_BASE)


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


def export_model(models, path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the trained policy as a plain transformers folder (LoRA merged) for ``--model PATH``.

    Under FSDP ``state`` holds the policy's full parameters (:meth:`ModelBundle.export_state`),
    saved through an empty (meta-device) instance of the policy's architecture. A failed write
    (a full disk) removes its partial folder and raises :class:`SearchRLError`; an earlier export at
    ``path`` is left as it was."""
    policy = models.policy
    if state is not None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            policy = AutoModelForCausalLM.from_config(models.policy.config)
    elif models.uses_lora:
        policy = policy.merge_and_unload()
    tmp = path.with_name(path.name + ".tmp")
    try:
        policy.save_pretrained(tmp, state_dict=state)
        models.tokenizer.save_pretrained(tmp)
    except Exception as e:  # noqa: BLE001 - a full disk surfaces as OSError, RuntimeError or SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise SearchRLError(f"could not write the trained model to {path} ({write_problem(e, path.parent)}): the "
                            "run's checkpoints are intact, free some space and rerun with --resume to write it") from e
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


# what the warm-start and the "before" evaluation depend on (RL's settings, seed and out may differ)
SHARED_KEY_FIELDS = ("model", "data", "warmstart", "rollout", "eval_rollout", "method", "mode", "micro_batch_size",
                     "rollout_batch_size")
# ... less how RL samples: the demonstrations are scripted and the evaluation is greedy (its seed,
# read from rollout.seed, stays in the key through eval_rollout)
RL_SAMPLING_FIELDS = ("temperature", "top_p")


def _key_text(resolved: dict[str, Any], with_rl_sampling: bool) -> str:
    key = {k: resolved[k] for k in SHARED_KEY_FIELDS}
    if not with_rl_sampling:
        key["rollout"] = {k: v for k, v in key["rollout"].items() if k not in RL_SAMPLING_FIELDS}
    return yaml.safe_dump(key, sort_keys=True)


def shared_warm_start_key(cfg: TrainConfig, *, with_rl_sampling: bool = False) -> str:
    return _key_text(cfg.resolved(), with_rl_sampling)


def shared_warm_start_matches(cfg: TrainConfig, key: str) -> bool:
    """Whether a shared folder's key fits ``cfg`` (folders written by earlier versions kept the RL
    sampling fields in their key: they fit the run that wrote them, as before)."""
    resolved = cfg.resolved()
    return key in (_key_text(resolved, False), _key_text(resolved, True))


def _reuse_warm_start(cfg: TrainConfig, models, shared: Path, out: Path) -> bool:
    """Load the warm-started policy another seed of this ``--seeds`` job left in ``shared`` (and copy
    its record and "before" evaluation into ``out``); False when there is none yet. The warm-start
    takes no draw from the global random state, so a seed run this way matches ``searchrl train
    seed=S`` (test_seeds.py)."""
    from searchrl.training.models import load_base_weights

    if not (shared / SHARED_WEIGHTS).is_file():
        return False
    if not shared_warm_start_matches(cfg, (shared / SHARED_KEY).read_text()):
        raise SearchRLError(f"{shared} holds a warm-start trained under another configuration; "
                            "remove it or choose another --out")
    load_base_weights(models.policy, shared / SHARED_WEIGHTS)
    if models.reference is not None:
        models.reference.load_state_dict(models.policy.state_dict())
    for name in SHARED_FILES:
        if (shared / name).is_file() and not (out / name).exists():
            shutil.copyfile(shared / name, out / name)
    log.info("warm-start: loaded the one %s holds (trained by an earlier seed of this job)", shared)
    return True


def _share_warm_start(cfg: TrainConfig, models, shared: Path, out: Path) -> None:
    """Leave the warm-started policy in ``shared`` for the next seeds (the weights last: their presence
    marks a complete folder)."""
    from searchrl.training.models import save_base_weights

    shared.mkdir(parents=True, exist_ok=True)
    (shared / SHARED_KEY).write_text(shared_warm_start_key(cfg))
    shutil.copyfile(out / "warmstart.json", shared / "warmstart.json")
    save_base_weights({n: p.detach().cpu() for n, p in models.policy.named_parameters()}, shared / SHARED_WEIGHTS)


def _open_run_dir(cfg: TrainConfig, out: Path, resume: bool, dist) -> None:
    """Refuse to mix runs in one folder (every rank checks before rank 0 writes anything)."""
    if out.exists() and any(out.iterdir()) and not resume:
        raise SearchRLError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if dist.enabled and cfg.model.lora_r > 0 and cfg.parallel.strategy == "fsdp":
        raise SearchRLError("LoRA on several processes: use parallel.strategy=replicate (adapters are small)")
    dist.barrier()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        hold_run_lock(out)  # a second job on this --out is refused (runlock.py)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    dist.barrier()


def _start(cfg: TrainConfig, trainer, train: list[QAExample], retriever, out: Path, resume: bool,
           shared: Path | None = None) -> bool:
    """Resume from the newest checkpoint, or warm-start (or load the ``shared`` one) and save step 0;
    True when resumed."""
    from searchrl.training.models import load_base_weights

    models = trainer.models
    if resume and models.uses_lora and (out / WARMSTART_BASE).exists():
        load_base_weights(models.policy, out / WARMSTART_BASE)
    resumed = resume and trainer.resume()
    if not resumed and cfg.warmstart.steps > 0 and not (shared and _reuse_warm_start(cfg, models, shared, out)):
        _warm_start(cfg, models, train, retriever, out)
        if shared:
            _share_warm_start(cfg, models, shared, out)
    if not list_checkpoints(out):
        trainer.save()  # step 0 = the model RL starts from, so --resume never redoes the warm-start
    return resumed


def _evaluate_on_rank0(cfg: TrainConfig, trainer, evals, retriever, out: Path, name: str) -> dict | None:
    """Evaluate the current policy on rank 0 (the others wait); its metrics there, None elsewhere."""
    models = trainer.models
    models.sync_generation_copy()  # collective under FSDP: every rank takes part
    metrics = None
    if models.dist.main:
        metrics = _evaluate(cfg, evals, trainer.generator, retriever, models.tokenizer, out, name)
    models.dist.barrier()
    return metrics


def _train(cfg: TrainConfig, trainer, train, evals, retriever, out: Path) -> None:
    """The RL loop (or the paper's SFT / rejection-sampling baselines), with a progress bar; a
    SIGTERM / SIGINT stops it at the end of a step with a checkpoint (signals.py)."""
    dist = trainer.dist
    bar = tqdm(total=cfg.steps, initial=trainer.step_idx, desc="RL", unit="step", disable=not dist.main)
    stop = StopOnSignal()

    def on_step(m: dict) -> None:
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.2f}", srch=f"{m['searches_per_traj']:.2f}",
                        len=f"{m['response_length']:.0f}")
        if cfg.eval_every and m["step"] % cfg.eval_every == 0 and m["step"] < cfg.steps and evals:
            val = _evaluate_on_rank0(cfg, trainer, evals, retriever, out, f"eval_step{m['step']}")
            if val is not None:
                trainer.logger.log({"step": m["step"], "val_em": val["avg"]["em"],
                                    "val_searches": val["avg"]["searches_per_question"]})
        # every rank stops at the same step (a signal may reach the ranks at different times)
        if dist.sum_floats(float(stop.should_stop()))[0] > 0:
            bar.close()
            stop.check(m["step"], trainer.save(), force=True)

    if cfg.mode == "rl":
        with stop:
            trainer.fit(on_step=on_step)
    elif trainer.step_idx < cfg.steps:  # the paper's SFT / rejection-sampling baselines
        if dist.enabled:
            raise SearchRLError(f"mode={cfg.mode} runs on one process; drop --nproc / torchrun")
        _supervised_baseline(cfg, trainer, train, trainer.generator, retriever, out)
    bar.close()


def run_training(cfg: TrainConfig, resume: bool = False, shared_warm_start: Path | None = None) -> dict:
    """Run the configured job (see module doc); returns ``summary.json``'s content (on rank 0;
    other ranks of a multi-process job return ``{}``). ``shared_warm_start``: used only by a one-process,
    full fine-tuning run whose warm-start has a fixed seed; others train their own."""
    from searchrl.models import resolve_device
    from searchrl.training.distributed import init_from_env
    from searchrl.training.models import build_models
    from searchrl.training.trainer import Trainer

    t_start = time.perf_counter()
    out = Path(cfg.out)
    dist = init_from_env(resolve_device(cfg.model.device), cfg.parallel.timeout_s)
    _open_run_dir(cfg, out, resume, dist)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    train, evals, retriever = load_data(cfg)
    log.info("data: %d training questions, %d evaluation questions", len(train), len(evals))
    models = build_models(cfg.model, need_reference=cfg.algo.kl_coef > 0, need_critic=cfg.algo.needs_critic,
                          dist=dist, parallel=cfg.parallel)
    # model.backend: the policy itself, or a vLLM engine (its log-probs at the rollouts' temperature)
    generator = models.generator(cfg.model, cfg.rollout.temperature)
    trainer = Trainer(cfg, models, retriever, train, generator=generator, sync_weights=models.weight_sync(generator))
    # one warm-start for all seeds: it must not follow the seed, and only a one-process, full
    # fine-tuning run saves and loads it (otherwise each seed trains its own, as it always could)
    can_share = (cfg.warmstart.steps > 0 and cfg.warmstart.seed is not None and not dist.enabled
                 and not models.uses_lora)
    shared = shared_warm_start if can_share else None
    resumed = _start(cfg, trainer, train, retriever, out, resume, shared)
    before_path = out / "eval_before.json"
    if cfg.eval_before and evals and not before_path.exists():
        _evaluate_on_rank0(cfg, trainer, evals, retriever, out, "eval_before")
        if shared and shared.is_dir():
            for name in BEFORE_FILES:
                shutil.copyfile(out / name, shared / name)
    _train(cfg, trainer, train, evals, retriever, out)
    after = _evaluate_on_rank0(cfg, trainer, evals, retriever, out, "eval_after") if evals else None
    export_state = models.export_state()  # FSDP: the full weights gathered on rank 0 (a collective)
    if not dist.main:
        return {}
    summary: dict[str, Any] = {"steps": trainer.step_idx}
    if after is not None:
        if before_path.exists():
            summary["eval_before"] = _headline(json.loads(before_path.read_text()))
        summary["eval_after"] = _headline(after)
        from searchrl.eval.compare import run_gain  # before -> after with its paired 95% interval

        summary["gain"] = run_gain(out)
    prev = json.loads((out / "summary.json").read_text()) if resumed and (out / "summary.json").exists() else {}
    summary["wall_seconds"] = round(time.perf_counter() - t_start + prev.get("wall_seconds", 0.0), 1)
    summary["config"] = to_dict(cfg)
    summary["world_size"] = dist.world
    summary["model"] = str(export_model(models, out / "model", export_state))
    _write_json(out / "summary.json", summary)
    if cfg.report:
        from searchrl.report.html import write_report

        write_report(out)
    return summary
