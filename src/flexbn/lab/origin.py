"""The origin question: are ``mu`` and ``var`` in batch norm gradient-tracked?

A user asked on the PyTorch forum whether, in ``y = (x - mu) / sqrt(var + eps)``, batch norm's ``mu`` and
``var`` are plain numbers or gradient-tracked tensors, and posted an experiment to find out (retold in
``docs/why.md``): seed 2809, ``x = randn(10, 3, 4, 4)``, loss ``y.abs().sum()``, a
``BatchNorm2d(3, affine=False)`` in training mode, compared with the hand-written composition
``(x - mean) / sqrt(var + eps)`` with and without ``.detach()`` of the statistics. Here that experiment
runs as posted, with each flexbn mode beside it, all on the same ``x``, in float32 (the post's dtype) and
in float64, where "equal" means equal to rounding (~1e-15) and the verdict is taken.

``python -m flexbn.lab.origin`` (or ``flexbn lab --only origin``) prints the answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import flexbn

from . import Result
from ._common import save_figure

SEED = 2809
SHAPE = (10, 3, 4, 4)
EPS = 1e-5
DIMS = (0, 2, 3)
# Max |difference| below which two results are "equal", per dtype (gradients are of order 1).
TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = (torch.float32, torch.float64)
# Detach flags (mean, var) of the post's two compositions.
TRACKED, DETACHED = (False, False), (True, True)
# flexbn's modes and the composition each must equal.
MODES: dict[str, tuple[bool, bool]] = {
    "flexbn.BatchNorm2d": (False, False),
    "flexbn detach_mean": (True, False),
    "flexbn detach_var": (False, True),
    "flexbn detach_mean+var": (True, True),
}
TORCH = "torch.nn.BatchNorm2d"

Fn = Callable[[Tensor], Tensor]

ABOUT = """**Question.** In `torch.nn.BatchNorm2d`, are `mu` and `var` in `(x - mu) / sqrt(var + eps)` plain
numbers or gradient-tracked tensors? (A question asked on the PyTorch forum; flexbn's `docs/why.md` retells
it with the answer.)

**Setup.** The experiment posted with the question: seed 2809, `x = randn(10, 3, 4, 4)`, loss
`y.abs().sum()`, `BatchNorm2d(3, affine=False)` in training mode against the hand composition with and
without `.detach()` of the statistics; beside it each flexbn mode against the composition detaching what it
detaches. In float32 (the post's dtype) and float64, where "equal" means equal to rounding. `ok` requires
every flexbn mode to equal its composition; torch's behaviour is reported, whatever it is."""


def composition(x: Tensor, detach_mean: bool = False, detach_var: bool = False) -> Tensor:
    """The post's manual batch norm ``(x - mean) / sqrt(var + eps)``, with ``.detach()`` of each
    statistic as chosen (biased variance over all dimensions but the channel one).

    >>> x = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[6.0]]]])  # (N=2, C=2, 1, 1)
    >>> composition(x, detach_mean=True).flatten()
    tensor([-1.0000, -1.0000,  1.0000,  1.0000])
    """
    mean = x.mean(DIMS, keepdim=True)
    var = x.var(DIMS, unbiased=False, keepdim=True)
    if detach_mean:
        mean = mean.detach()
    if detach_var:
        var = var.detach()
    return (x - mean) / torch.sqrt(var + EPS)


def _composition(flags: tuple[bool, bool]) -> Fn:
    return lambda x: composition(x, *flags)


def _flexbn(flags: tuple[bool, bool], dtype: torch.dtype) -> Fn:
    mean, var = flags
    return flexbn.BatchNorm2d(3, affine=False, detach_mean=mean, detach_var=var, dtype=dtype)


def _variants(dtype: torch.dtype) -> list[tuple[str, Fn, tuple[bool, bool] | None]]:
    """(label, the function, the detach flags of the composition it must equal -- ``None``: no claim)."""
    return [
        ("manual, no .detach()", _composition(TRACKED), None),
        ("manual, .detach()", _composition(DETACHED), None),
        (TORCH, torch.nn.BatchNorm2d(3, affine=False, dtype=dtype), None),
        *((label, _flexbn(flags, dtype), flags) for label, flags in MODES.items()),
    ]


def _output_and_grad(fn: Fn, x: Tensor) -> tuple[Tensor, Tensor]:
    xg = x.clone().requires_grad_()
    y = fn(xg)
    y.abs().sum().backward()
    assert xg.grad is not None
    return y.detach(), xg.grad


def _diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


@dataclass(frozen=True)
class Row:
    """One variant's max |differences| from the compositions."""

    label: str
    output: float  # output vs the composition (all compositions have the same output)
    grad_tracked: float  # input gradient vs the composition without .detach()
    grad_detached: float  # input gradient vs the composition with .detach() of mean and var
    own: (
        float | None
    )  # flexbn modes: max of output and gradient diffs vs the mode's own composition


@dataclass(frozen=True)
class Measurement:
    """The experiment in one dtype."""

    dtype: torch.dtype
    tolerance: float
    rows: tuple[Row, ...]

    def row(self, label: str) -> Row:
        """The row of the variant called ``label``."""
        return next(r for r in self.rows if r.label == label)

    @property
    def failures(self) -> list[str]:
        """flexbn modes that do not equal their composition (NaN counts as unequal)."""
        return [r.label for r in self.rows if r.own is not None and not r.own <= self.tolerance]


def measure(seed: int = SEED, dtype: torch.dtype = torch.float64) -> Measurement:
    """Run every variant on the post's ``x`` (converted to ``dtype``) and measure it against the
    compositions.

    >>> m = measure(dtype=torch.float64)
    >>> m.row("torch.nn.BatchNorm2d").grad_tracked < m.tolerance, m.failures
    (True, [])
    """
    torch.manual_seed(seed)
    x = torch.randn(*SHAPE).to(dtype)  # the post's float32 x, the same values in every dtype
    refs = {
        flags: _output_and_grad(_composition(flags), x)
        for flags in {TRACKED, DETACHED, *MODES.values()}
    }
    rows = []
    for label, fn, flags in _variants(dtype):
        y, g = _output_and_grad(fn, x)
        own = None if flags is None else max(_diff(y, refs[flags][0]), _diff(g, refs[flags][1]))
        rows.append(
            Row(
                label,
                _diff(y, refs[TRACKED][0]),
                _diff(g, refs[TRACKED][1]),
                _diff(g, refs[DETACHED][1]),
                own,
            )
        )
    return Measurement(dtype, TOLERANCE[dtype], tuple(rows))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def table(m: Measurement) -> str:
    """The measurement as aligned plain text: one row per variant, max |difference| per column."""
    note = "the post's dtype" if m.dtype == torch.float32 else "exact to rounding"
    w = (24, 11, 15, 12, 15)
    lines = [
        f"in {_dtype_name(m.dtype)} ({note}), max |difference|:",
        f"{'':<{w[0]}}{'output vs':>{w[1]}}{'grad vs':>{w[2]}}{'grad vs':>{w[3]}}{'own mode':>{w[4]}}",
        f"{'variant':<{w[0]}}{'manual':>{w[1]}}{'no .detach()':>{w[2]}}{'.detach()':>{w[3]}}"
        f"{'(out, grad)':>{w[4]}}",
        "-" * (sum(w) + 3),
    ]
    for r in m.rows:
        own = ""
        if r.own is not None:
            own = f"{r.own:>{w[4]}.1e} " + ("ok" if r.own <= m.tolerance else "FAIL")
        lines.append(
            f"{r.label:<{w[0]}}{r.output:>{w[1]}.1e}{r.grad_tracked:>{w[2]}.1e}"
            f"{r.grad_detached:>{w[3]}.1e}{own}"
        )
    return "\n".join(lines)


def _verdict(m: Measurement) -> str:
    """What torch's gradient says in ``m``: 'tracked', 'detached', 'both' (indistinguishable) or
    'neither'."""
    r = m.row(TORCH)
    tracked, detached = r.grad_tracked <= m.tolerance, r.grad_detached <= m.tolerance
    return {
        (True, False): "tracked",
        (False, True): "detached",
        (True, True): "both",
        (False, False): "neither",
    }[tracked, detached]


def conclude(measurements: list[Measurement]) -> tuple[str, bool]:
    """The one-line answer derived from the numbers, and whether every flexbn mode equals its
    composition. The verdict on torch is the last (most precise) measurement's; a disagreement between
    dtypes is reported."""
    final = measurements[-1]
    r, tol, name = final.row(TORCH), final.tolerance, _dtype_name(final.dtype)
    verdict = _verdict(final)
    agreeing = [m for m in reversed(measurements) if _verdict(m) == verdict]

    def matched(column: str) -> str:
        return ", ".join(
            f"{getattr(m.row(TORCH), column):.0e} in {_dtype_name(m.dtype)}" for m in agreeing
        )

    if verdict == "tracked":
        answer = (
            f"{TORCH} back-propagates through mu and var (they are gradient-tracked tensors): its "
            f"input gradient equals the composition without .detach() (max diff "
            f"{matched('grad_tracked')}) and differs from the one with .detach() by up to {r.grad_detached:.2g}."
        )
    elif verdict == "detached":
        answer = (
            f"{TORCH} treats mu and var as constants: its input gradient equals the composition "
            f"with .detach() (max diff {matched('grad_detached')}) and differs from the one "
            f"without by up to {r.grad_tracked:.2g}."
        )
    elif verdict == "both":
        answer = (
            f"This input cannot tell: both compositions give {TORCH}'s gradient within {tol:.0e} "
            f"in {name} (diffs {r.grad_tracked:.0e} / {r.grad_detached:.0e}); try another --seed."
        )
    else:
        answer = (
            f"{TORCH}'s input gradient matches neither composition in {name} (max diff "
            f"{r.grad_tracked:.2g} without .detach(), {r.grad_detached:.2g} with) -- unexpected."
        )
    others = [
        _dtype_name(m.dtype) for m in measurements[:-1] if _verdict(m) not in (verdict, "both")
    ]
    if others:
        answer += f" ({', '.join(others)} disagrees: see its table.)"
    failed = [f"{label} in {_dtype_name(m.dtype)}" for m in measurements for label in m.failures]
    if failed:
        verb = "does" if len(failed) == 1 else "do"
        return f"{answer} FAILED: {'; '.join(failed)} {verb} not equal its composition.", False
    tols = ", ".join(f"{m.tolerance:.0e} in {_dtype_name(m.dtype)}" for m in measurements)
    return (
        f"{answer} flexbn gives either: its default equals the composition without .detach(), "
        f"detach_mean / detach_var the compositions with those statistics detached (within {tols}).",
        True,
    )


LEGEND = (
    "max |difference| over all elements; 'manual' = the post's composition (x - mean) / sqrt(var + eps);\n"
    "'no .detach()' / '.detach()' = with mean and var tracked / detached; 'own mode' = against the\n"
    "composition detaching what that flexbn mode detaches (ok: within {tols})."
)


def _draw(m: Measurement) -> Any:
    """Bars: each variant's input-gradient difference from the two compositions (log scale)."""

    def draw(ax: Any) -> None:
        floor = m.tolerance * 1e-7  # an exact 0 drawn at the bottom of the log axis
        xs = range(len(m.rows))
        for shift, column, label, color in (
            (-0.2, "grad_tracked", "vs the composition without .detach()", "C0"),
            (0.2, "grad_detached", "vs the composition with .detach()", "C1"),
        ):
            values = [max(getattr(r, column), floor) for r in m.rows]
            ax.bar([x + shift for x in xs], values, width=0.4, label=label, color=color)
        ax.axhline(
            m.tolerance,
            color="black",
            linewidth=1,
            linestyle=":",
            label=f"'equal' threshold ({m.tolerance:.0e})",
        )
        ax.set_xticks(list(xs), [r.label for r in m.rows], rotation=25, ha="right")
        ax.set(
            yscale="log",
            ylim=(floor / 3, 1e3),
            ylabel="max |input-gradient difference|",
            title=f"Input gradient of each variant against the two compositions ({_dtype_name(m.dtype)})",
        )
        ax.legend(loc="upper left", ncols=3, fontsize=9.5)

    return draw


def run(seed: int = SEED, *, quick: bool = False, out: Path | None = None) -> Result:
    """The experiment as a lab :class:`~flexbn.lab.Result`: float32 and float64 tables, the conclusion,
    and the float64 gradient differences as a figure (``out/origin.png``). ``quick`` changes nothing (it
    takes a fraction of a second)."""
    measurements = [measure(seed, dtype) for dtype in DTYPES]
    conclusion, ok = conclude(measurements)
    tols = ", ".join(f"{m.tolerance:.0e} in {_dtype_name(m.dtype)}" for m in measurements)
    text = "\n\n".join([*map(table, measurements), LEGEND.format(tols=tols)])
    return Result(
        title="Are mu and var in batch norm gradient-tracked? (the question behind flexbn)",
        about=ABOUT,
        table=text,
        conclusion=conclusion,
        ok=ok,
        figures=save_figure(
            out,
            "origin",
            _draw(measurements[-1]),
            size=(9.0, 5.0),
            note="A short bar is a match (below the threshold, to rounding); an exact 0 is drawn at "
            f"{TOLERANCE[torch.float64] * 1e-7:.0e}. Dimensionless: gradients are of order 1.",
        ),
        data={
            _dtype_name(m.dtype): {
                r.label: {
                    "output": r.output,
                    "grad_tracked": r.grad_tracked,
                    "grad_detached": r.grad_detached,
                    "own": r.own,
                }
                for r in m.rows
            }
            for m in measurements
        },
    )


def main(seed: int = SEED) -> int:
    """Answer the origin question on the spot: print the tables and the conclusion; return 0 if every
    flexbn mode equals its composition, else 1."""
    from . import run as run_lab

    return run_lab(only=["origin"], seed=seed, out=None)


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
