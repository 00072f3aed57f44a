"""The ``flexbn`` command line: ``flexbn lab`` runs the built-in experiments."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="run the built-in experiments and print their conclusions")
    lab.add_argument(
        "--seed", type=int, default=2809, help="random seed (default: 2809, as in origin.md)"
    )
    args = parser.parse_args(argv)
    if args.command == "lab":
        from .lab import run

        return run(seed=args.seed)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
