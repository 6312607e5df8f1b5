"""The paper's ablations at the embedded default's scale: retrieved-token masking on / off, GRPO / PPO.

    python experiments/ablations.py --out runs/ablations [--seeds 0,1,2] [--arms grpo,grpo-nomask,ppo]
        [--jobs 2] [KEY=VALUE ...]

One format warm-start is trained and evaluated (``OUT/warmstart/seed-W``, W = ``warmstart.seed``, 0
by default: ``searchrl train steps=0``, its model folder and its held-out evaluation; with
``warmstart.seed=null`` one per seed, W = S); then every arm runs RL with each seed from that model
(``OUT/ARM/seed-S``: ``searchrl train seed=S model.name=OUT/warmstart/seed-W/model warmstart.steps=0``
plus the arm's overrides), with the warm-start's evaluation copied in as its "before" evaluation. So
every arm starts from the same weights and is scored against the same questions and the same
"before" answers, and the warm-start (a third of a default run) is paid once, not per arm or seed.
One difference from a plain ``searchrl train``: a PPO critic starts from the warm-started model here
(from the base model there).

KEY=VALUE overrides apply to every run (e.g. ``data.eval_limit=120``). ``--jobs N`` runs N trainings
at once with ``OMP_NUM_THREADS = cores / N``. Finished runs (their ``summary.json``) are read, not run
again; an unfinished one continues from its newest checkpoint, so the script can be re-run after a
crash or Ctrl-C. Writes ``OUT/ablations.json`` (per arm: ``searchrl.training.seeds`` summaries; per
seed: each arm against ``grpo`` after RL, paired over questions) and prints markdown tables. Each
run's log is ``OUT/ARM/seed-S.log``.

Left out: the paper's other ablations (group size, top-k, base vs instruct), which are overrides of
the same runs (``algo.group_size=5``, ``rollout.topk=3``) given as extra ``--arms`` via ``ARMS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import check_overrides, finish, run_searchrl, start_from, summary, threads_per_job  # noqa: E402

from searchrl.config import apply_overrides  # noqa: E402
from searchrl.eval.compare import AFTER, RUN_SUFFIX, compare_files  # noqa: E402
from searchrl.training.config import TrainConfig  # noqa: E402
from searchrl.training.seeds import format_seeds, parse_seeds, seeds_summary  # noqa: E402

ARMS: dict[str, list[str]] = {
    "grpo": [],  # the embedded default
    "grpo-nomask": ["algo.mask_retrieved=false"],
    "ppo": ["algo.estimator=gae"],
    "ppo-nomask": ["algo.estimator=gae", "algo.mask_retrieved=false"],
    "grpo-unbalanced": ["data.balance_hops=false"],  # not the paper's: draws blind to hop counts (the default until session 18)
}
BASELINE = "grpo"


def warmstart_seed(seed: int, overrides: list[str]) -> int:
    """The seed of run ``seed``'s warm-start: ``warmstart.seed`` (0 unless overridden), or the run's."""
    cfg = apply_overrides(TrainConfig(), [f"seed={seed}", *overrides])
    return cfg.seed if cfg.warmstart.seed is None else cfg.warmstart.seed


def run_ablations(out: Path, seeds: list[int], arms: list[str], overrides: list[str], jobs: int) -> dict:
    threads = threads_per_job(jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        warm_seed = {s: warmstart_seed(s, overrides) for s in seeds}
        warm: dict[int, Future] = {}  # by warm-start seed: one for all seeds unless warmstart.seed=null
        for w in warm_seed.values():
            if w in warm:
                continue
            ws = out / "warmstart" / f"seed-{w}"
            args = [f"seed={w}", *overrides, "steps=0", "eval_before=false", "report=false"]
            warm[w] = pool.submit(run_searchrl, "train", args, ws, ws.parent / f"seed-{w}.log", threads)

        def arm_job(arm: str, s: int) -> dict:
            ws = warm[warm_seed[s]].result()  # the seed's warm-start first
            run = out / arm / f"seed-{s}"
            start_from(run, ws)
            args = [f"seed={s}", *overrides, f"model.name={ws / 'model'}", "warmstart.steps=0", "eval_before=false",
                    *ARMS[arm]]  # fmt: skip
            return summary(run_searchrl("train", args, run, run.parent / f"seed-{s}.log", threads))

        futures = {(arm, s): pool.submit(arm_job, arm, s) for s in seeds for arm in arms}
        summaries = {key: f.result() for key, f in futures.items()}
    result: dict = {"seeds": seeds, "overrides": overrides, "arms": {}, "versus": {}}
    for arm in arms:
        result["arms"][arm] = {"overrides": ARMS[arm],
                               **seeds_summary(out / arm, {s: summaries[(arm, s)] for s in seeds})}  # fmt: skip
    if BASELINE in arms:
        for arm in arms:
            if arm == BASELINE:
                continue
            per_seed = {}
            for s in seeds:
                r = compare_files(out / BASELINE / f"seed-{s}" / f"{AFTER}{RUN_SUFFIX}",
                                  out / arm / f"seed-{s}" / f"{AFTER}{RUN_SUFFIX}", metrics=("em",))  # fmt: skip
                per_seed[str(s)] = {k: r["avg"]["em"][k] for k in ("n", "diff", "ci95")}
            result["versus"][arm] = per_seed
    (out / "ablations.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_ablations(result: dict) -> str:
    lines = []
    for arm, r in result["arms"].items():
        lines += [f"### {arm} ({' '.join(r['overrides']) or 'the default'})", "", format_seeds(r), ""]
    seeds = [str(s) for s in result["seeds"]]
    rows = ["| arm | " + " | ".join(f"seed {s}: EM after (gain)" for s in seeds) + " | mean after | mean gain |",
            "|---|" + "---|" * (len(seeds) + 2)]
    for arm, r in result["arms"].items():
        cells = []
        for s in seeds:
            p = r["per_seed"][s]
            cells.append("-" if p["after"] is None else f"{p['after']:.3f} ({p['gain']:+.3f})")
        g = r["gain"]["mean"]
        rows.append(f"| {arm} | " + " | ".join(cells) + f" | {r['after_mean']:.3f} | "
                    + ("-" if g is None else f"{g:+.3f}") + " |")
    lines += ["### all arms", "", *rows, ""]
    for arm, per_seed in result["versus"].items():
        parts = [f"seed {s}: {v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for s, v in per_seed.items()]
        lines.append(f"{arm} - {BASELINE} after RL (EM, n={next(iter(per_seed.values()))['n']}): " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default="grpo,grpo-nomask,ppo", help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every run")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        p.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    problem = check_overrides(args.overrides, ("seed", "out"))
    if problem:
        p.error(problem + " (use --seeds and --out)")
    return finish(lambda: run_ablations(args.out, parse_seeds(args.seeds), arms, args.overrides, args.jobs),
                  format_ablations, args.out / "ablations.json")


if __name__ == "__main__":
    sys.exit(main())
