"""flexbn's speed against torch's native batch norm and the hand-written compositions: ``flexbn bench`` as a
script (the harness and its method: ``flexbn.bench``), and the markdown tables of docs/benchmarks.md from the
rows it saved (rows of several process runs combined: the median over the runs, with their range).

    python benchmarks/speed.py [flexbn bench options]        # e.g. --shape 64x256x14x14 --json rows.json
    python benchmarks/speed.py --report rows.json [...]      # markdown tables from saved rows
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from flexbn import bench
from flexbn.bench import Row


def _load_targets():  # benchmarks/ is not a package: the script beside this one, by path
    spec = importlib.util.spec_from_file_location("targets", Path(__file__).with_name("targets.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules.setdefault("targets", module)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


targets = _load_targets()


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _xr(r: Row | None) -> str:
    """``ratio_native`` with its range over the runs, when there are several."""
    if r is None or r.ratio_native is None:
        return "-"
    if r.runs < 2 or r.ratio_native_lo is None:
        return f"{r.ratio_native:.2f}"
    return f"{r.ratio_native:.2f} ({r.ratio_native_lo:.2f}-{r.ratio_native_hi:.2f})"


def _backends(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.backend for r in rows if r.candidate == "flexbn"))


def _find(rows: Sequence[Row], **want: object) -> Row | None:
    return next((r for r in rows if all(getattr(r, k) == v for k, v in want.items())), None)


def _configs(rows: Sequence[Row]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r.shape, r.layout) for r in rows))


def _name(shape: str, layout: str) -> str:
    return f"({shape.replace('x', ',')})" + (" CL" if layout == "channels_last" else "")


def _table(head: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def standard_table(rows: Sequence[Row]) -> str:
    """Per shape: native's forward+backward milliseconds; flexbn's standard path (each backend) per pass
    and the compositions' forward+backward, as a multiple of native. flexbn's standard path and native are
    timed side by side in every (shape, variant) block: the median over the blocks is shown."""
    backends = _backends(rows)
    head = ["shape", "native fwd+bwd ms"]
    head += [f"[{b}] {p}" for b in backends for p in bench.PASSES]
    head += ["composition fwd+bwd", "compiled fwd+bwd"]
    lines = []
    for shape, layout in _configs(rows):
        rs = [r for r in rows if (r.shape, r.layout, r.metric) == (shape, layout, "time")]
        native = [r.median for r in rs if r.candidate == "native" and r.pass_ == "fwd+bwd"]
        if not native:
            continue
        cells = [_name(shape, layout), f"{statistics.median(native):.2f}"]
        for b in backends:
            for p in bench.PASSES:
                ratios = [
                    r.ratio_native
                    for r in rs
                    if r.backend == b
                    and r.pass_ == p
                    and r.ratio_native is not None
                    and (
                        r.candidate == "flexbn-standard"
                        or (r.candidate == "flexbn" and r.variant == "standard")
                    )
                ]
                cells.append(_x(statistics.median(ratios) if ratios else None))
        for cand in ("composition", "compiled"):
            r = _find(rs, candidate=cand, variant="standard", pass_="fwd+bwd")
            cells.append(_x(r and r.ratio_native))
        lines.append(cells)
    return _table(head, lines)


def memory_table(rows: Sequence[Row]) -> str:
    """Per shape: bytes saved for backward by the standard forward as a multiple of the input's, per
    candidate; and the most flexbn keeps beyond its inputs over every variant, in bytes per channel."""
    backends = _backends(rows)
    labels = [("native", "")] + [("flexbn", b) for b in backends]
    labels += [("composition", ""), ("compiled", "")]
    head = ["shape", "input MiB"] + [f"{c} [{b}]" if b else c for c, b in labels]
    head.append("flexbn, any variant: extra bytes per channel")
    lines = []
    for shape, layout in _configs(rows):
        saved = [r for r in rows if (r.shape, r.layout, r.metric) == (shape, layout, "saved")]
        std = [r for r in saved if r.variant == "standard"]
        if not std:
            continue
        cells = [_name(shape, layout), f"{std[0].input_bytes / 2**20:.1f}"]
        for cand, b in labels:
            r = _find(std, candidate=cand, backend=b)
            cells.append(_x(r and r.median / r.input_bytes))
        channels = int(shape.split("x")[1])
        extra = [(r.median - r.input_bytes) / channels for r in saved if r.candidate == "flexbn"]
        cells.append(f"{max(extra):.0f}")
        lines.append(cells)
    return _table(head, lines)


def variants_table(rows: Sequence[Row], pass_: str = "fwd+bwd") -> str:
    """Per shape and variant: flexbn (each backend) as a multiple of native, of its own standard path, of
    the eager composition and of the compiled composition."""
    backends = _backends(rows)
    columns = [
        ("x native", "ratio_native"),
        ("x standard", "ratio_standard"),
        ("x composition", "ratio_composition"),
        ("x compiled", "ratio_compiled"),
    ]
    head = ["shape", "variant"] + [f"[{b}] {name}" for b in backends for name, _ in columns]
    lines = []
    for shape, layout in _configs(rows):
        for variant in bench.VARIANTS:
            found = [
                _find(
                    rows,
                    shape=shape,
                    layout=layout,
                    variant=variant,
                    candidate="flexbn",
                    backend=b,
                    metric="time",
                    pass_=pass_,
                )
                for b in backends
            ]
            if any(found):
                cells = [_name(shape, layout), variant]
                cells += [_x(r and getattr(r, attr)) for r in found for _, attr in columns]
                lines.append(cells)
    return _table(head, lines)


def first_call_table(rows: Sequence[Row]) -> str:
    """Per shape: first training forward+backward in ms, median over the variants, per candidate."""
    labels = list(
        dict.fromkeys(
            (r.candidate, r.backend)
            for r in rows
            if r.metric == "first_call" and r.candidate != "flexbn-standard"
        )
    )
    head = ["shape"] + [f"{c} [{b}]" if b else c for c, b in labels]
    lines = []
    for shape, layout in _configs(rows):
        cells = [_name(shape, layout)]
        for cand, backend in labels:
            ms = [
                r.median
                for r in rows
                if (r.shape, r.layout, r.candidate, r.backend, r.metric, r.pass_)
                == (shape, layout, cand, backend, "first_call", "fwd+bwd")
            ]
            cells.append(f"{statistics.median(ms):.0f}" if ms else "-")
        lines.append(cells)
    return _table(head, lines)


def targets_table(rows: Sequence[Row]) -> str:
    """The project's performance targets (``benchmarks/targets.py``) per backend."""
    return targets.markdown(targets.targets(rows))


def peak_table(rows: Sequence[Row]) -> str:
    """Per shape and variant: flexbn's peak memory during a training forward+backward and an eval call,
    as a multiple of torch native's (torch's in MiB)."""
    backends = _backends(rows)
    head = ["shape", "variant", "torch fwd+bwd MiB"]
    head += [f"[{b}] {p} x native" for b in backends for p in ("fwd+bwd", "eval")]
    lines = []
    for shape, layout in _configs(rows):
        for variant in bench.VARIANTS:
            torch_peak = _find(
                rows, shape=shape, layout=layout, variant=variant, candidate="native",
                metric="peak", pass_="fwd+bwd",
            )  # fmt: skip
            if torch_peak is None:
                continue
            cells = [_name(shape, layout), variant, f"{torch_peak.median / 2**20:.1f}"]
            for b in backends:
                for p in ("fwd+bwd", "eval"):
                    r = _find(
                        rows, shape=shape, layout=layout, variant=variant, candidate="flexbn",
                        backend=b, metric="peak", pass_=p,
                    )  # fmt: skip
                    cells.append(_x(r and r.ratio_native))
            lines.append(cells)
    return _table(head, lines)


def per_call_table(rows: Sequence[Row]) -> str:
    """The per-call rows (``flexbn bench --per-call``): per variant, pass and backend, torch's and
    flexbn's microseconds per call and their ratio (with its range over the runs)."""
    shapes = set(bench.PER_CALL["shapes"])
    head = ["input", "variant", "pass", "backend", "torch us", "flexbn us", "x native (range)"]
    lines = []
    for r in rows:
        if r.shape in shapes and r.candidate == "flexbn" and r.metric == "time":
            native = _find(
                rows, shape=r.shape, layout=r.layout, variant=r.variant, pass_=r.pass_,
                candidate="native", metric="time",
            )  # fmt: skip
            lines.append(
                [
                    _name(r.shape, r.layout), r.variant, r.pass_, r.backend,
                    f"{native.median * 1e3:.1f}" if native else "-", f"{r.median * 1e3:.1f}",
                    _xr(r),
                ]
            )  # fmt: skip
    return _table(head, lines)


def model_table(rows: Sequence[Row]) -> str:
    """The model rows (``flexbn bench --model``): per input, pass and backend, torch's and flexbn's
    milliseconds, their ratio (with its range over the runs) and the ratio of their peak memory."""
    head = [
        "input",
        "pass",
        "backend",
        "torch ms",
        "flexbn ms",
        "x native (range)",
        "peak x native",
    ]
    lines = []
    for r in rows:
        if r.variant == "resnet" and r.candidate == "flexbn" and r.metric == "time":
            native = _find(rows, shape=r.shape, layout=r.layout, variant="resnet", pass_=r.pass_,
                           candidate="native", metric="time")  # fmt: skip
            peak = _find(rows, shape=r.shape, layout=r.layout, variant="resnet", pass_=r.pass_,
                         candidate="flexbn", backend=r.backend, metric="peak")  # fmt: skip
            lines.append(
                [
                    _name(r.shape, r.layout), r.pass_, r.backend,
                    f"{native.median:.1f}" if native else "-", f"{r.median:.1f}", _xr(r),
                    _x(peak and peak.ratio_native),
                ]
            )  # fmt: skip
    return _table(head, lines)


def report(rows: Sequence[Row]) -> str:
    rows = bench.combine(rows)
    r = rows[0]
    loads = [x.load for x in rows]
    runs = max(x.runs for x in rows)
    meta = (
        f"{r.device}, {r.threads} threads, {r.dtype}, torch {r.torch}, flexbn {r.flexbn}, "
        f"Python {r.python}; 1-minute load average while measuring {min(loads):.1f}-{max(loads):.1f}"
        + (f"; median of {runs} process runs" if runs > 1 else "")
    )
    sections = [meta]
    per_call = set(bench.PER_CALL["shapes"])
    layer = [x for x in rows if x.pass_ in bench.PASSES and x.shape not in per_call]
    if layer:
        sections += [
            "Standard path, as a multiple of torch native (lower is better; median over the blocks):",
            standard_table(layer),
            "Memory saved for backward, standard path, as a multiple of the input:",
            memory_table(layer),
            "Peak memory, as a multiple of torch native's:",
            peak_table(layer),
            "Variants, training forward+backward:",
            variants_table(layer),
            "Variants, eval:",
            variants_table(layer, "eval"),
            "First call (ms, training forward+backward, median over the variants):",
            first_call_table(layer),
        ]
    if any(x.shape in per_call and x.pass_ in bench.PASSES for x in rows):
        sections += ["Per call:", per_call_table(rows)]
    if any(x.variant == "resnet" for x in rows):
        sections += ["Models:", model_table(rows)]
    sections += ["Targets:", targets_table(rows)]
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="print the markdown tables of rows saved with --json (several files are merged)",
    )
    args = parser.parse_args(argv)
    if args.report:
        rows = [r for path in args.report for r in bench.read_json(path)]
        print(report(rows))
        return 0
    return bench.run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
