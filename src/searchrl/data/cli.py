"""``searchrl world``: generate the synthetic world (corpus, questions, summary) into a folder.

Without ``--out`` the world goes to the user cache (the folder the rest of searchrl uses for the
embedded default), and an existing complete copy is reused.

Left out: other data commands (corpus conversion is done by the loaders on the fly).
"""

from __future__ import annotations

import argparse
import json

from searchrl.errors import ConfigError


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        msg = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def register(subparsers) -> None:
    """Add the ``world`` sub-command."""
    from searchrl.data.world import DEFAULT_ENTITIES, DEFAULT_SEED

    p = subparsers.add_parser(
        "world",
        help="generate the synthetic world (fictional corpus + multi-hop questions)",
        description="Write corpus.jsonl ({id, contents}), questions.jsonl (with hop chains) and "
        "world.json into a folder. The same seed and size always give the same bytes.",
    )
    p.add_argument("--out", help="output folder (default: the user cache, reused if complete)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="random seed (default %(default)s)")  # fmt: skip
    p.add_argument("--entities", type=int, default=DEFAULT_ENTITIES,
                   help="number of entities, ~1.1 passages each (default %(default)s)")  # fmt: skip
    p.add_argument("--questions", type=int, default=None,
                   help="number of questions (default: one per entity)")  # fmt: skip
    p.add_argument("--test-fraction", type=float, default=None,
                   help="share of questions in the test split (default 0.2)")  # fmt: skip
    p.add_argument("--hop-weights", type=_weights, default=None,
                   help="relative frequency of 1,2,3-hop questions (default 0.4,0.4,0.2)",
                   metavar="W1,W2,W3")  # fmt: skip
    p.add_argument("--filler", type=float, default=None,
                   help="scale of filler text in passages, 0-1 (default 1; 0 = facts only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from searchrl.data.world import ensure_default_world, generate_world, write_world

    given = {
        "n_questions": args.questions,
        "test_fraction": args.test_fraction,
        "hop_weights": args.hop_weights,
        "filler": args.filler,
    }
    options = {k: v for k, v in given.items() if v is not None}
    if args.out:
        info = write_world(generate_world(args.seed, args.entities, **options), args.out)
        out = args.out
    else:
        if options:
            raise ConfigError("world: question options need --out (the cache holds defaults only)")
        out = ensure_default_world(args.seed, args.entities)
        info = json.loads((out / "world.json").read_text(encoding="utf-8"))
    c = info["counts"]
    print(f"world (seed {info['seed']}) in {out}: {c['passages']} passages, "
          f"{c['questions']} questions {c['splits']}, hops {c['hops']}")  # fmt: skip
    return 0
