"""``searchrl train``: run a training job from a YAML config plus dotted overrides.

With no arguments it runs the embedded default (``configs/tiny_cpu.yaml`` = the built-in defaults).
``--help-config`` lists every field with its default and help text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from searchrl.config import describe, load_yaml_config
from searchrl.errors import ConfigError, SearchRLError
from searchrl.training.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a search agent with RL (default: the embedded CPU demo)",
                       description="Train a search agent with PPO/GRPO. Overrides are KEY=VALUE with dotted "
                                   "keys, e.g. `searchrl train steps=10 algo.estimator=gae`.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys)")
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument("--out", help="run directory (same as out=DIR)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every config field and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, estimate memory per rank for --nproc ranks, and exit (builds nothing heavy)")
    p.add_argument("--nproc", type=int, default=1,
                   help="training processes on this machine (launches torchrun; one per GPU, or 1 thread each on CPU; "
                        "for several machines run torchrun yourself, see the README)")
    p.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2): one run per seed into OUT/seed-S, "
                   "then OUT/seeds.json with the gains (see searchrl.training.seeds)")
    p.set_defaults(func=run)


def launch(args: argparse.Namespace) -> int:
    """Re-run this command under ``torchrun --nproc-per-node N`` (single machine) and wait for it."""
    argv = ["train", *args.overrides]
    for flag in ("config", "out", "seeds"):
        if getattr(args, flag):
            argv += [f"--{flag}", str(getattr(args, flag))]
    if args.resume:
        argv.append("--resume")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "searchrl.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # CPU ranks share the cores; set it to use more
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise SearchRLError(f"the {args.nproc}-process job failed (exit status {code}; the failing rank's error "
                            "is printed above); its last checkpoint is intact: continue with --resume")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ConfigError("--nproc: must be >= 1")
    if args.dry_run:
        from searchrl.training.estimate import dry_run

        overrides = [*args.overrides, *([f"out={args.out}"] if args.out else [])]
        print(dry_run(load_yaml_config(TrainConfig, args.config, overrides), args.nproc))
        return 0
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args)
    if args.help_config:
        for name, default, help_text in describe(TrainConfig):
            print(f"{name:36s} {json.dumps(default):28s} {help_text}")
        return 0
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = load_yaml_config(TrainConfig, args.config, overrides)  # fails before any work on a bad value
    if args.seeds:
        from searchrl.training.seeds import format_seeds, parse_seeds, run_seeds

        seeds = parse_seeds(args.seeds)
        if any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides):
            raise ConfigError("give either --seeds or seed=N, not both")
        print(format_seeds(run_seeds(cfg, seeds, resume=args.resume)) + f"\nwrote {cfg.out}/seeds.json")
        return 0
    from searchrl.training.pipeline import run_training

    summary = run_training(cfg, resume=args.resume)
    if not summary:  # a rank other than 0 of a multi-process job: rank 0 reports
        return 0
    before, after = summary.get("eval_before"), summary.get("eval_after")
    print(f"\nrun directory: {cfg.out}")
    if before and after:
        print(f"held-out EM: {before['em']:.3f} before RL -> {after['em']:.3f} after {summary['steps']} steps "
              f"(searches/question {before['searches_per_question']:.2f} -> {after['searches_per_question']:.2f})")
    if summary.get("gain"):
        g = summary["gain"]
        print(f"EM gain {g['gain']:+.3f}, 95% paired interval [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] "
              f"over {g['n']} questions")
    report = f"; report: {cfg.out}/report/index.html" if cfg.report else ""
    print(f"wall time: {summary['wall_seconds']:.0f} s{report}")
    return 0
