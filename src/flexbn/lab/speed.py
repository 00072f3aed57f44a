"""Speed: flexbn's training forward+backward against torch's native batch norm, on a few shapes.

Measured with ``flexbn bench``'s harness (:func:`flexbn.bench.run`): inputs created outside the timed
region, interleaved samples of every candidate, medians; each candidate's output and gradients are first
checked against flexbn's (a ``RuntimeError`` there fails the experiment). Candidates: torch's native
``F.batch_norm``, ``flexbn.batch_norm`` (default, and with both statistics detached) and the same
computation written by hand in eager torch (the composition). ``flexbn bench`` gives the full picture
(every variant and pass, memory, ``torch.compile``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import Result
from ._common import save_figure

SHAPES, QUICK_SHAPES = ("32x64x56x56", "4096x1024", "16x128x512"), ("16x32x28x28", "1024x256")
VARIANTS = ("standard", "detach_both")
REPEAT, QUICK_REPEAT = 7, 5
SAMPLE_MS, QUICK_SAMPLE_MS = 20.0, 5.0
CANDIDATES = ("native", "flexbn", "composition")

ABOUT = f"""**Question.** What does flexbn cost against torch's native batch norm, and against writing the
variant by hand?

**Setup.** `flexbn bench`'s harness (`flexbn.bench.run`): training forward+backward in float32 on the
CPU, one thread, inputs created outside the timed region, interleaved samples ({REPEAT} repeats of
~{SAMPLE_MS:g} ms), medians; the candidates' outputs and gradients are checked against each other first
(`ok` is that check). Shapes {", ".join(f"`{s}`" for s in SHAPES)} (`--quick`:
{", ".join(f"`{s}`" for s in QUICK_SHAPES)}, {QUICK_REPEAT} repeats of ~{QUICK_SAMPLE_MS:g} ms: per-call
overhead dominates there). Candidates: torch's `F.batch_norm`, `flexbn.batch_norm` (default, and with
both statistics detached) and the same computation written by hand in eager torch. Timings vary with the
machine and its load; `flexbn bench` gives the full picture (every variant and pass, memory,
`torch.compile`)."""


@dataclass(frozen=True)
class Cell:
    """One (shape, variant, candidate): median milliseconds and the ratio to native."""

    shape: str
    variant: str
    candidate: str
    ms: float
    ratio: float


def measure(
    shapes: tuple[str, ...] = SHAPES, repeat: int = REPEAT, sample_ms: float = SAMPLE_MS
) -> tuple[list[Cell], dict[str, Any]]:
    """Time the candidates on ``shapes`` (training forward+backward, float32, CPU); the cells and the
    environment (threads, load average).

    >>> import torch
    >>> cells, env = measure(("64x8",), repeat=1, sample_ms=0.5)
    >>> sorted({c.candidate for c in cells}), env["threads"] == torch.get_num_threads()
    (['composition', 'flexbn', 'native'], True)
    """
    from flexbn import bench

    rows = bench.run(
        list(shapes),
        variants=list(VARIANTS),
        passes=["fwd+bwd"],
        repeat=repeat,
        sample_ms=sample_ms,
        compile_composition=False,
    )
    cells = [
        Cell(r.shape, r.variant, r.candidate, r.median, r.ratio_native or float("nan"))
        for r in rows
        if r.metric == "time" and r.candidate in CANDIDATES
    ]
    env = {
        "threads": rows[0].threads,
        "load": (min(r.load for r in rows), max(r.load for r in rows)),
        "device": rows[0].device,
        "backend": _resolved(next((r.backend for r in rows if r.candidate == "flexbn"), "")),
    }
    return cells, env


def _resolved(backend: str) -> str:
    """``auto`` with what it ran on the CPU: ``auto (cpp)`` or ``auto (reference)``."""
    if backend != "auto":
        return backend
    from flexbn._core.backend import cpp_available

    return f"auto ({'cpp' if cpp_available() else 'reference'})"


def _cell(cells: list[Cell], shape: str, variant: str, candidate: str) -> Cell:
    return next(
        c for c in cells if (c.shape, c.variant, c.candidate) == (shape, variant, candidate)
    )


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"


def _against_native(flex: list[float], backend: str) -> str:
    """flexbn's standard path against native, in words, from the ratios."""
    who = f"flexbn's {backend} backend" if backend else "flexbn"
    faster = sum(r < 1 for r in flex)
    if faster == len(flex):
        return f"{who} is faster than torch's native kernel on every shape"
    if faster == 0:
        return f"{who} is slower than torch's native kernel on every shape"
    return f"{who} is faster than torch's native kernel on {faster} of {len(flex)} shapes"


def conclude(cells: list[Cell], env: dict[str, Any]) -> str:
    """The conclusion: flexbn's and the composition's time as multiples of torch's native kernel."""
    shapes = list(dict.fromkeys(c.shape for c in cells))

    def ratios(variant: str, candidate: str) -> list[float]:
        return [_cell(cells, s, variant, candidate).ratio for s in shapes]

    load = env["load"]
    flex, comp = ratios("standard", "flexbn"), ratios("standard", "composition")
    faster = sum(f < c for f, c in zip(flex, comp, strict=True))
    if faster == len(shapes):
        versus = "faster than the composition on every shape"
    elif faster == 0:
        versus = "and no faster than the composition here"
    else:
        versus = f"faster than the composition on {faster} of {len(shapes)} shapes"
    text = (
        f"Training forward+backward, float32 on {env['device']} with {env['threads']} threads, as a "
        f"multiple of torch's native batch norm on {', '.join(shapes)}: flexbn "
        f"{_range(flex)}, flexbn with both statistics detached "
        f"{_range(ratios('detach_both', 'flexbn'))}, the hand-written composition {_range(comp)} "
        f"(detached: {_range(ratios('detach_both', 'composition'))}); outputs and gradients of all "
        f"candidates agree. {_against_native(flex, env.get('backend', ''))}, {versus}."
    )
    cores = os.cpu_count() or 1
    if load[1] > cores:
        text += (
            f" The machine was busy (load average {load[0]:.1f}-{load[1]:.1f} on {cores} cores): "
            "these timings are noisy."
        )
    return text


def table(cells: list[Cell]) -> str:
    """Median milliseconds per candidate, and ratios to native."""
    w = 14
    head = f"{'shape':<{w}}{'variant':<13}" + "".join(f"{c + ' ms':>16}" for c in CANDIDATES)
    head += "".join(f"{'x native ' + c:>{len(c) + 11}}" for c in CANDIDATES[1:])
    lines = [head, "-" * len(head)]
    for shape in dict.fromkeys(c.shape for c in cells):
        for variant in VARIANTS:
            row = f"{shape:<{w}}{variant:<13}"
            row += "".join(f"{_cell(cells, shape, variant, c).ms:>16.3f}" for c in CANDIDATES)
            row += "".join(
                f"{_cell(cells, shape, variant, c).ratio:>{len(c) + 11}.2f}" for c in CANDIDATES[1:]
            )
            lines.append(row)
    lines.append(
        "\ntraining forward+backward, median of interleaved samples; native = torch.nn.functional."
        "batch_norm\n(for detach_both, native computes the standard gradient: the reference cost)"
    )
    return "\n".join(lines)


def _draw(cells: list[Cell]) -> Any:
    def draw(ax: Any) -> None:
        shapes = list(dict.fromkeys(c.shape for c in cells))
        bars = [
            ("flexbn", "standard", "flexbn"),
            ("flexbn", "detach_both", "flexbn, both statistics detached"),
            ("composition", "standard", "hand composition"),
            ("composition", "detach_both", "hand composition, detached"),
        ]
        width = 0.8 / len(bars)
        for i, (candidate, variant, label) in enumerate(bars):
            xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(shapes))]
            values = [_cell(cells, s, variant, candidate).ratio for s in shapes]
            drawn = ax.bar(xs, values, width=width, label=label)
            ax.bar_label(drawn, fmt="%.2f", fontsize=8.5, padding=2)
        ax.axhline(1.0, color="black", linewidth=1, linestyle=":", label="torch native = 1")
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set(
            xlabel="input shape (N x C x ...), float32",
            ylabel="time / torch native's (lower is faster)",
            title="Training forward+backward on the CPU, one thread",
        )
        ax.set_ylim(0, 1.15 * max(c.ratio for c in cells))
        ax.legend(loc="upper left")

    return draw


def run(seed: int = 0, *, quick: bool = False, out: Path | None = None) -> Result:
    """The lab experiment (``seed`` is unused: the timings are what they are). ``ok`` is whether every
    candidate's output and gradients matched (the harness checks before timing)."""
    del seed
    title = "Speed: flexbn vs torch's native batch norm (training forward+backward)"
    try:
        if quick:
            cells, env = measure(QUICK_SHAPES, QUICK_REPEAT, QUICK_SAMPLE_MS)
        else:
            cells, env = measure(SHAPES, REPEAT, SAMPLE_MS)
    except RuntimeError as err:  # a candidate's result differed from flexbn's
        return Result(title, str(err), f"FAILED: {err}", ok=False, about=ABOUT)
    return Result(
        title=title,
        about=ABOUT,
        table=table(cells),
        conclusion=conclude(cells, env),
        ok=True,
        figures=save_figure(
            out,
            "speed",
            _draw(cells),
            size=(9.0, 5.0),
            note=f"Medians of interleaved samples on {env['device']}, {env['threads']} thread(s), "
            f"load average {env['load'][0]:.1f}-{env['load'][1]:.1f}; flexbn's backend: "
            f"{env['backend']}.",
        ),
        data={
            "environment": env,
            "cells": [
                {
                    "shape": c.shape,
                    "variant": c.variant,
                    "candidate": c.candidate,
                    "ms": c.ms,
                    "ratio": c.ratio,
                }
                for c in cells
            ],
        },
    )
