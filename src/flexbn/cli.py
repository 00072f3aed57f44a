"""The ``flexbn`` command line. ``flexbn lab`` runs the built-in experiments."""

from __future__ import annotations

import argparse
import sys

from . import audit, bench
from .lab import EXPERIMENTS, SUMMARIES, run
from .lab._common import default_jobs


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
        "from the numbers), write report.md, report.html, report.json and PNG figures.\n"
        "Exit status 1 if one fails. The same seed gives the same numbers (speed's timings\n"
        "aside) whatever --jobs and the thread count: each process runs torch on one thread.",
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
        help="random seed (default: 2809, the seed of the forum post that started flexbn)",
    )
    lab.add_argument(
        "--out",
        default="flexbn-lab",
        metavar="DIR",
        help="directory for the reports (report.md, .html, .json) and the figures "
        "(default: ./flexbn-lab)",
    )
    lab.add_argument(
        "--quick",
        action="store_true",
        help="small versions of the experiments: the same conclusions, noisier numbers, a fraction "
        "of the time (measured times: docs/lab.md)",
    )
    lab.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(),
        metavar="N",
        help="worker processes for independent training runs (default: the CPU cores, at most 8, "
        f"here {default_jobs()}; 1: none)",
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
    return run(only=args.only, seed=args.seed, out=args.out, quick=args.quick, jobs=args.jobs)


def _number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
