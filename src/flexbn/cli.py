"""The ``flexbn`` command line. ``flexbn lab`` runs the built-in experiments."""

from __future__ import annotations

import argparse
import sys

from . import audit
from .lab import EXPERIMENTS, run


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flexbn`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="flexbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    audit.add_parser(sub)
    lab = sub.add_parser("lab", help="run the built-in experiments and print their conclusions")
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
        help="directory for report.md (default: ./flexbn-lab)",
    )
    args = parser.parse_args(argv)
    if args.command == "audit":
        return audit.run_cli(args)
    return run(only=args.only, seed=args.seed, out=args.out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
