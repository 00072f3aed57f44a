"""flexbn's performance targets, judged on the rows ``flexbn bench --json`` writes.

The targets are the project's, not a feature of the package: ``flexbn bench`` measures, this script
judges. Rows of several process runs (``--runs N``) are combined first -- the median over the runs -- and
several files are read together::

    flexbn bench --threads 1 --runs 5 --no-compile --backend cpp --json layers.json
    flexbn bench --threads 1 --runs 5 --per-call --json per-call.json
    flexbn bench --threads 1 --runs 5 --model --json models.json
    python benchmarks/targets.py layers.json per-call.json models.json [--markdown]

Exit status 0 whether or not every target is met (this is a report, not a test); 2 for unreadable input.
Each target says where it comes from: ``issue 12`` (speed, memory saved for backward, the per-call and
model rows), ``issue 17`` (peak memory), or ``bench`` for the limits set here on rows the issues asked to
measure without a number.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from flexbn import bench
from flexbn.bench import Row

TARGET_MIN_ELEMENTS = 2**20
"""The smallest input (elements) on which the layer targets are judged: below it, a call's fixed cost
(argument checks, dispatch, allocation: tens of microseconds) dominates the time, not the passes over the
data the targets are about. ``bench.SHAPES`` all have at least this many; the per-call rows have their
own targets."""


@dataclass(frozen=True)
class Target:
    """One target checked on rows, for one flexbn backend: ``worst`` is the measured value furthest from
    ``limit`` (a ratio, or for memory saved extra bytes per channel), ``where`` its configuration,
    ``spread`` the range of that value over the process runs (``""`` for one run)."""

    name: str
    source: str
    backend: str
    limit: float
    worst: float
    where: str
    met: bool
    spread: str = ""


@dataclass(frozen=True)
class _Rule:
    name: str
    source: str
    limit: float
    pick: Callable[[list[Row]], list[tuple[float, str, str]]]  # (value, where, spread)


def _elements(shape: str) -> int:
    return math.prod(int(n) for n in shape.split("x"))


def _where(r: Row) -> str:
    return f"{r.shape} {r.layout}" + ("" if r.variant == "standard" else f" {r.variant}")


def _range(r: Row) -> str:
    if r.runs < 2 or r.ratio_native_lo is None:
        return ""
    return f"{r.ratio_native_lo:.2f}-{r.ratio_native_hi:.2f}"


def _layer(rows: list[Row]) -> list[Row]:
    return [
        r for r in rows if r.pass_ in bench.PASSES and _elements(r.shape) >= TARGET_MIN_ELEMENTS
    ]


def _standard_vs_native(spatial: bool) -> Callable[[list[Row]], list[tuple[float, str, str]]]:
    """flexbn's standard path and native are timed side by side in every (shape, variant) block: the
    median over a shape's blocks is judged (a single block's ratio moves by +-30% on a busy machine)."""

    def pick(rows: list[Row]) -> list[tuple[float, str, str]]:
        ratios: dict[tuple[str, str], list[float]] = {}
        for r in _layer(rows):
            standard = r.candidate == "flexbn-standard" or (
                r.candidate == "flexbn" and r.variant == "standard"
            )
            if standard and r.metric == "time" and r.pass_ == "fwd+bwd" and r.ratio_native:
                ratios.setdefault((r.shape, r.layout), []).append(r.ratio_native)
        out = []
        for (shape, layout), values in ratios.items():
            channels_first = layout == "contiguous" and shape.count("x") > 1
            if channels_first == spatial:
                out.append((statistics.median(values), f"{shape} {layout}", ""))
        return out

    return pick


def _variants(attr: str) -> Callable[[list[Row]], list[tuple[float, str, str]]]:
    def pick(rows: list[Row]) -> list[tuple[float, str, str]]:
        return [
            (getattr(r, attr), _where(r), "")
            for r in _layer(rows)
            if r.candidate == "flexbn"
            and r.metric == "time"
            and r.pass_ == "fwd+bwd"
            and getattr(r, attr) is not None
            and (attr == "ratio_composition" or r.variant != "standard")  # 1 by definition
        ]

    return pick


def _eval(rows: list[Row]) -> list[tuple[float, str, str]]:
    """Every variant's eval mode is the same computation: the median over a shape's blocks."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in _layer(rows):
        if r.candidate == "flexbn" and r.metric == "time" and r.pass_ == "eval" and r.ratio_native:
            ratios.setdefault((r.shape, r.layout), []).append(r.ratio_native)
    return [(statistics.median(v), f"{s} {lay}", "") for (s, lay), v in ratios.items()]


def _saved(rows: list[Row]) -> list[tuple[float, str, str]]:
    return [
        ((r.median - r.input_bytes) / int(r.shape.split("x")[1]), _where(r), "")
        for r in _layer(rows)
        if r.metric == "saved" and r.candidate == "flexbn"
    ]


def _peak(pass_: str) -> Callable[[list[Row]], list[tuple[float, str, str]]]:
    def pick(rows: list[Row]) -> list[tuple[float, str, str]]:
        return [
            (r.ratio_native, _where(r), _range(r))
            for r in rows
            if r.pass_ == pass_
            and r.metric == "peak"
            and r.candidate == "flexbn"
            and r.variant in bench.VARIANTS
            and r.variant != "stats_input"
            and r.ratio_native is not None
        ]

    return pick


def _per_call(variant: str, pass_: str) -> Callable[[list[Row]], list[tuple[float, str, str]]]:
    shapes = set(bench.PER_CALL["shapes"])

    def pick(rows: list[Row]) -> list[tuple[float, str, str]]:
        return [
            (r.ratio_native, _where(r), _range(r))
            for r in rows
            if r.shape in shapes
            and r.backend == "auto"
            and r.variant == variant
            and r.pass_ == pass_
            and r.metric == "time"
            and r.candidate == "flexbn"
            and r.ratio_native is not None
        ]

    return pick


def _spread(rows: list[Row]) -> list[tuple[float, str, str]]:
    """How far flexbn's ratio to native moves between process runs: (highest - lowest) / median."""
    return [
        (
            (r.ratio_native_hi - r.ratio_native_lo) / r.ratio_native,
            f"{_where(r)} {r.pass_}",
            _range(r),
        )
        for r in _layer(rows)
        if r.candidate == "flexbn"
        and r.metric == "time"
        and r.pass_ in ("fwd+bwd", "eval")
        and r.runs >= 2
        and r.ratio_native
        and r.ratio_native_lo is not None
        and r.ratio_native_hi is not None
    ]


def _model(pass_: str) -> Callable[[list[Row]], list[tuple[float, str, str]]]:
    def pick(rows: list[Row]) -> list[tuple[float, str, str]]:
        return [
            (r.ratio_native, f"{r.shape} {r.layout}", _range(r))
            for r in rows
            if r.variant == "resnet"
            and r.pass_ == pass_
            and r.metric == "time"
            and r.candidate == "flexbn"
            and r.ratio_native is not None
        ]

    return pick


RULES = (
    _Rule("standard fwd+bwd / native, NCHW and (N,C,L)", "issue 17", 0.6, _standard_vs_native(True)),
    _Rule(
        "standard fwd+bwd / native, channels_last and (N,C)",
        "issue 17",
        1.0,
        _standard_vs_native(False),
    ),
    _Rule("variant fwd+bwd / flexbn standard", "issue 12", 1.25, _variants("ratio_standard")),
    _Rule("variant fwd+bwd / eager composition", "issue 12", 1 / 3, _variants("ratio_composition")),
    _Rule("eval / native", "issue 17", 1.05, _eval),
    _Rule("run-to-run spread of fwd+bwd and eval / native, (max - min) / median", "issue 17", 0.15, _spread),
    _Rule("saved for backward: extra bytes per channel beyond the inputs", "issue 12", 1024.0, _saved),
    _Rule("peak memory fwd+bwd / native, every variant but stats_input", "issue 17", 1.25, _peak("fwd+bwd")),
    _Rule("peak memory eval / native, every variant but stats_input", "issue 17", 1.25, _peak("eval")),
    _Rule("per call (8,16,4,4) auto standard fwd+bwd / native", "issue 12", 1.5, _per_call("standard", "fwd+bwd")),
    _Rule("per call (8,16,4,4) auto standard eval / native", "issue 12", 1.2, _per_call("standard", "eval")),
    _Rule("per call (8,16,4,4) auto detach_var fwd+bwd / native", "bench", 2.0, _per_call("detach_var", "fwd+bwd")),
    _Rule("model training step / torch's", "issue 12", 0.95, _model("step")),
    _Rule("model inference / torch's", "issue 12", 1.0, _model("inference")),
)  # fmt: skip
"""The CPU targets, in order. The per-call limit for a variant is this script's (the rows were asked for
without a number): twice torch's cost. The spread is judged on runs of the same build in separate
processes (``flexbn bench --runs N``); with one run there is nothing to judge."""

GPU_PER_CALL_SHAPE = "8x16x14x14"
"""The small shape of the GPU check (``benchmarks/gpu_check.py``), where a call's time is its fixed cost."""


def _gpu_per_call(rows: list[Row]) -> list[tuple[float, str, str]]:
    return [
        (r.ratio_native, _where(r), _range(r))
        for r in rows
        if r.shape == GPU_PER_CALL_SHAPE
        and r.candidate == "flexbn"
        and r.metric == "time"
        and r.pass_ in ("fwd+bwd", "eval")
        and r.ratio_native is not None
    ]


GPU_RULES = (
    _Rule("variant fwd+bwd / torch's standard path (cuDNN)", "issue 15", 1.25, _variants("ratio_native")),
    _Rule(
        "standard fwd+bwd / native (auto runs torch's op)",
        "issue 15",
        1.05,
        lambda rows: _standard_vs_native(True)(rows) + _standard_vs_native(False)(rows),
    ),
    _Rule(f"per call ({GPU_PER_CALL_SHAPE}) fwd+bwd and eval / native", "issue 15", 1.5, _gpu_per_call),
    _Rule("saved for backward: extra bytes per channel beyond the inputs", "issue 15", 1024.0, _saved),
)  # fmt: skip
"""The GPU targets (rows of ``flexbn.bench.run(device="cuda")``, as ``benchmarks/gpu_check.py`` writes)."""


def targets(rows: Iterable[Row], rules: Sequence[_Rule] = RULES) -> list[Target]:
    """Check every target of ``rules`` (:data:`RULES`, or :data:`GPU_RULES` for CUDA rows) on ``rows``
    (combined over runs), per flexbn backend; targets without rows are left out.

    >>> targets([])
    []
    """
    combined = bench.combine(list(rows))
    found: list[Target] = []
    for backend in dict.fromkeys(r.backend for r in combined if r.candidate == "flexbn"):
        mine = [r for r in combined if r.backend == backend]  # flexbn's rows carry their ratios
        for rule in rules:
            picked = rule.pick(mine)
            if picked:
                worst, where, spread = max(picked)
                found.append(
                    Target(
                        rule.name,
                        rule.source,
                        backend,
                        rule.limit,
                        worst,
                        where,
                        worst <= rule.limit,
                        spread,
                    )
                )
    return found


def small_shapes(rows: Iterable[Row]) -> list[str]:
    """The layer shapes left out of the layer targets (under :data:`TARGET_MIN_ELEMENTS` elements, and
    not the per-call input, which has targets of its own)."""
    per_call = set(bench.PER_CALL["shapes"])
    return list(
        dict.fromkeys(
            f"{r.shape}{' cl' if r.layout == 'channels_last' else ''}"
            for r in rows
            if r.pass_ in bench.PASSES
            and _elements(r.shape) < TARGET_MIN_ELEMENTS
            and r.shape not in per_call
        )
    )


def format_targets(found: Sequence[Target]) -> str:
    """One line per target: met or not, the backend, the limit, the worst value (with its range over the
    runs) and where.

    >>> t = Target("eval / native", "issue 12", "cpp", 1.1, 1.3, "8x3 contiguous", False)
    >>> print(format_targets([t]))
    NOT MET  [cpp] eval / native (issue 12): worst 1.30 (limit 1.10) at 8x3 contiguous
    """
    return "\n".join(
        f"{'met    ' if t.met else 'NOT MET'}  [{t.backend}] {t.name} ({t.source}): worst "
        f"{t.worst:.2f}{f' (runs {t.spread})' if t.spread else ''} (limit {t.limit:.2f}) at {t.where}"
        for t in found
    )


def markdown(found: Sequence[Target]) -> str:
    """The targets as a markdown table (docs/benchmarks.md)."""
    head = "| target | source | backend | limit | worst measured | range over runs | where | met |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for t in found:
        lines.append(
            f"| {t.name} | {t.source} | {t.backend} | {t.limit:.2f} | {t.worst:.2f} | "
            f"{t.spread or '-'} | {t.where} | {'yes' if t.met else '**no**'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="rows written by flexbn bench --json")
    parser.add_argument("--markdown", action="store_true", help="a markdown table")
    args = parser.parse_args(argv)
    try:
        rows = [r for path in args.json for r in bench.read_json(path)]
    except (OSError, ValueError, TypeError) as e:
        print(f"targets: cannot read the rows: {e}", file=sys.stderr)
        return 2
    found = targets(rows)
    print(markdown(found) if args.markdown else format_targets(found) or "no target has rows")
    small = small_shapes(rows)
    if small:
        print(
            f"(layer targets not judged on {', '.join(small)}: under {TARGET_MIN_ELEMENTS:,} "
            "elements, per-call overhead dominates)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
