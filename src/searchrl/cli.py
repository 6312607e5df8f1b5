"""The ``searchrl`` command line: ``world | index | search | serve | eval | ask | train``.

Each command lives beside the code it drives; a module listed in ``COMMAND_MODULES`` exposes
``register(subparsers)`` which adds its sub-command(s) with ``set_defaults(func=...)``. Every
listed module must import: a missing one is an error, never a command silently left out. Errors a
user can fix (:class:`~searchrl.errors.SearchRLError`) are printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from searchrl.errors import SearchRLError

COMMAND_MODULES = [
    "searchrl.data.cli",  # world
    "searchrl.retrieval.cli",  # index, search, serve
    "searchrl.eval.cli",  # eval, ask
    "searchrl.eval.compare",  # compare
    "searchrl.training.cli",  # train
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="searchrl",
        description="Train language models to reason and call a search engine with RL (Search-R1).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except SearchRLError as e:
        print(f"searchrl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"searchrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
