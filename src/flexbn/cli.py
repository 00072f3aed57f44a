"""The ``flexbn`` command line. ``flexbn lab`` runs the built-in experiments."""

from __future__ import annotations

import argparse
import sys

from . import audit, bench
from .lab import EXPERIMENTS, SUMMARIES, run


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flexbn`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="flexbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    audit.add_parser(sub)
    bench.add_parser(sub)
    lab = sub.add_parser(
        "lab",
        help="run the built-in experiments and print their conclusions",
        description="Run the built-in experiments: print each one's table and conclusion (derived\n"
        "from the numbers), write report.md and PNG figures. Exit status 1 if one fails.",
        epilog="experiments:\n" + "\n".join(f"  {n:<9} {s}" for n, s in SUMMARIES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lab.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this experiment (repeatable; known: {', '.join(EXPERIMENTS)})",
    )
    lab.add_argument(
        "--seed",
        type=int,
        default=2809,
        metavar="N",
        help="random seed (default: 2809, origin.md's)",
    )
    lab.add_argument(
        "--out",
        default="flexbn-lab",
        metavar="DIR",
        help="directory for report.md and the figures (default: ./flexbn-lab)",
    )
    lab.add_argument(
        "--quick",
        action="store_true",
        help="small versions of the experiments (all of them in under a minute on 2 cores)",
    )
    args, extra = parser.parse_known_args(argv)
    # argparse cannot match `audit MODULE:FACTORY --input-shape ... ARG ...` (factory arguments after an
    # option): the audit takes the words it left over, the other commands none.
    if args.command == "audit" and not any(w.startswith("-") and not _number(w) for w in extra):
        args.factory_args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "audit":
        return audit.run_cli(args)
    if args.command == "bench":
        return bench.run_cli(args)
    return run(only=args.only, seed=args.seed, out=args.out, quick=args.quick)


def _number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
