"""Built-in experiments (``flexbn lab``): each answers one question about batch statistics with numbers.

An experiment is a module of this package with a function ``run(seed, *, quick=False, out=None) ->
Result``, registered under its module's name with a one-line summary in :data:`SUMMARIES` (its module is
imported only when it runs; :data:`EXPERIMENTS` maps the names to the calls, each run with torch on one
thread, restored after). ``quick`` makes it small; ``out`` is the directory for its PNG figures (``None``:
no figures). :func:`run` executes the selected ones, prints each table, conclusion and figure path, and
writes ``report.json``, ``report.md`` and ``report.html`` embedding the figures when given a directory.

The same seed gives the same numbers (except ``speed``'s timings) whatever the machine's thread count
and ``jobs``: every experiment runs on one thread, and the independent training runs it hands to worker
processes seed themselves.

The optional extras (``pip install 'flexbn[lab]'``: matplotlib, scikit-learn, tqdm) are optional here too:
without matplotlib the figures are skipped with a note, without scikit-learn the experiments on its digits
data are skipped with a note, without tqdm there are no progress bars.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO


@dataclass(frozen=True)
class Result:
    """What an experiment found: a plain-text table, a one-line conclusion derived from it, and whether
    flexbn behaved as specified and the claimed effect was observed (``ok=False`` makes ``flexbn lab``
    exit non-zero); the PNG figures it wrote, and the numbers the conclusion quotes (``data``)."""

    title: str
    table: str
    conclusion: str
    ok: bool
    figures: tuple[Path, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)
    about: str = ""
    """The question and the setup, in Markdown (for the reports); the same for every run."""


class Experiment(Protocol):
    """The signature of a registered experiment."""

    def __call__(self, seed: int, *, quick: bool = False, out: Path | None = None) -> Result: ...


def _lazy(module: str) -> Experiment:
    """The experiment ``flexbn.lab.<module>.run``, imported when called."""

    def experiment(seed: int, *, quick: bool = False, out: Path | None = None) -> Result:
        from ._common import one_thread

        with one_thread():
            result: Result = importlib.import_module(f"{__name__}.{module}").run(
                seed, quick=quick, out=out
            )
        return result

    experiment.__name__ = experiment.__qualname__ = module
    return experiment


# Each experiment's name (its module's) and one line on what it shows; the lab runs them in this order.
SUMMARIES: dict[str, str] = {
    "origin": "are mu and var gradient-tracked in torch's batch norm? flexbn gives either",
    "detach": "detached mean: the bias grows without bound while the loss stays fixed",
    "nonid": "batches of one or two classes: plain BN vs batch renorm vs per-bag statistics",
    "dropout": "dropout before BN: the variance shift, repaired by recompute_stats or stats_input",
    "ghost": "ghost batch sizes: accuracy and training loss vs virtual_batch_size",
    "ddp": "data-parallel training with flexbn.SyncBatchNorm over gloo equals one process",
    "speed": "training forward+backward time of flexbn vs torch's native batch norm",
}
EXPERIMENTS: dict[str, Experiment] = {name: _lazy(name) for name in SUMMARIES}
# The experiments that hand training runs to worker processes (``jobs``).
USES_WORKERS = frozenset({"nonid", "dropout", "ghost"})


def run(
    only: list[str] | None = None,
    seed: int = 2809,
    out: str | Path | None = None,
    stream: TextIO | None = None,
    *,
    quick: bool = False,
    jobs: int = 1,
) -> int:
    """Run the experiments named in ``only`` (default: all, in :data:`EXPERIMENTS`' order; a name given
    twice runs once), print them to ``stream`` (default: stdout), and write ``out/report.json``,
    ``out/report.md``, ``out/report.html`` and the figures ``out/*.png`` unless ``out`` is ``None``.
    ``quick``: the small versions. ``jobs``: worker processes for the independent training runs (1: all
    in this process); the numbers do not depend on it.

    Returns the exit status: 0 if every experiment that ran is ``ok``, 1 otherwise, 2 for an unknown
    name or a bad ``jobs``. An experiment whose optional dependency is missing is skipped with a note
    (stderr and report). Progress goes to stderr: a line as each experiment starts, and bars on a
    terminal (with tqdm).

    >>> import io
    >>> run(only=["nope"], stream=io.StringIO())
    2
    """
    stream = stream or sys.stdout
    names = list(dict.fromkeys(only or EXPERIMENTS))
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(
            f"flexbn lab: unknown experiment {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(EXPERIMENTS)}",
            file=sys.stderr,
        )
        return 2
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        print(f"flexbn lab: --jobs must be an integer >= 1, but got {jobs!r}", file=sys.stderr)
        return 2
    from ._common import FIGURES_MISSING, MissingExtra, have_matplotlib, worker_pool

    path = None if out is None else Path(out)
    notes = [] if path is None or have_matplotlib() else [FIGURES_MISSING]
    for note in notes:
        print(f"flexbn lab: {note}", file=sys.stderr)
    results: dict[str, Result] = {}
    seconds: dict[str, float] = {}
    load_before = _load()
    start = time.perf_counter()
    jobs = jobs if USES_WORKERS.intersection(names) else 1  # no worker started for nothing
    with worker_pool(jobs):
        for i, name in enumerate(names, 1):
            print(f"flexbn lab: [{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                r = EXPERIMENTS[name](seed, quick=quick, out=path)
            except MissingExtra as err:  # an optional dependency (flexbn[lab]) is missing
                notes.append(f"skipped {name}: it {err}")
                print(f"flexbn lab: {notes[-1]}", file=sys.stderr)
                continue
            results[name] = r
            seconds[name] = time.perf_counter() - t0
            conclusion = textwrap.fill(r.conclusion, width=100, break_on_hyphens=False)
            print(
                f"== {name}: {r.title} ({seconds[name]:.1f} s)\n\n{r.table}\n\n{conclusion}\n",
                file=stream,
                flush=True,
            )
            for fig in r.figures:
                print(f"figure: {fig}", file=stream)
            if r.figures:
                print(file=stream)
    total = time.perf_counter() - start
    if path is not None:
        from .report import Report, write

        report = Report(
            seed=seed,
            quick=quick,
            results=results,
            seconds=seconds,
            total=total,
            jobs=jobs,
            notes=tuple(notes),
            environment=_environment(load_before),
        )
        written = write(report, path)
        print(
            f"report written to {written[1]} and {written[2].name} ({total:.1f} s in all)",
            file=stream,
        )
    failed = [n for n, r in results.items() if not r.ok]
    if failed:
        print(f"flexbn lab: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return float("nan")


def _environment(load_before: float) -> dict[str, Any]:
    """Versions, machine and load average (before and after) of a run, for the report."""
    import torch

    from flexbn import __version__, get_backend

    from ..bench import _cpu_name

    return {
        "flexbn": __version__,
        "torch": torch.__version__,
        "backend": get_backend(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load": (load_before, _load()),
    }
