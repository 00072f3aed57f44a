"""Built-in experiments (``flexbn lab``): each answers one question about batch statistics with numbers.

An experiment is a function ``(seed) -> Result``, registered in :data:`EXPERIMENTS` under its name (import
its module lazily inside the registered function, as ``_origin`` does). ``run`` executes the selected ones,
prints each table and conclusion, and writes ``report.md`` when given a directory.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


@dataclass(frozen=True)
class Result:
    """What an experiment found: a plain-text table, a one-line conclusion derived from it, and whether
    flexbn behaved as specified (``ok=False`` makes ``flexbn lab`` exit non-zero)."""

    title: str
    table: str
    conclusion: str
    ok: bool


def _origin(seed: int) -> Result:
    from . import origin

    return origin.run(seed)


EXPERIMENTS: dict[str, Callable[[int], Result]] = {"origin": _origin}


def run(
    only: list[str] | None = None,
    seed: int = 2809,
    out: str | Path | None = None,
    stream: TextIO | None = None,
) -> int:
    """Run the experiments named in ``only`` (default: all), print them to ``stream`` (default: stdout),
    and write ``out/report.md`` unless ``out`` is ``None``.

    Returns the exit status: 0 if every experiment is ``ok``, 1 otherwise, 2 for an unknown name.

    >>> import io
    >>> run(only=["nope"], stream=io.StringIO())
    2
    """
    stream = stream or sys.stdout
    names = only or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(
            f"flexbn lab: unknown experiment {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(EXPERIMENTS)}",
            file=sys.stderr,
        )
        return 2
    results = {name: EXPERIMENTS[name](seed) for name in names}
    for name, r in results.items():
        conclusion = textwrap.fill(r.conclusion, width=100, break_on_hyphens=False)
        print(f"== {name}: {r.title}\n\n{r.table}\n\n{conclusion}\n", file=stream)
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        report = path / "report.md"
        report.write_text(_report(results, seed), encoding="utf-8")
        print(f"report written to {report}", file=stream)
    failed = [n for n, r in results.items() if not r.ok]
    if failed:
        print(f"flexbn lab: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _report(results: dict[str, Result], seed: int) -> str:
    import torch

    from flexbn import __version__

    parts = [f"# flexbn lab\n\nSeed {seed}; flexbn {__version__}, torch {torch.__version__}.\n"]
    for name, r in results.items():
        status = "" if r.ok else " — **FAILED**"
        parts.append(f"## {r.title} (`{name}`){status}\n\n```\n{r.table}\n```\n\n{r.conclusion}\n")
    return "\n".join(parts)
