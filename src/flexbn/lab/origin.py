"""The origin question (``shared/origin.md``): are ``mu`` and ``var`` in batch norm gradient-tracked?

The experiment of the thread, as posted: seed 2809, ``x = randn(10, 3, 4, 4)``, loss ``y.abs().sum()``, a
``BatchNorm2d(3, affine=False)`` in training mode, compared with the hand-written composition with and
without ``.detach()`` of the statistics -- and with each flexbn mode. Computed in float64 so that equal means
equal to ~1e-15.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import flexbn

from . import Result

EPS = 1e-5
MATCH = 1e-10  # float64: a difference below this is "equal"
DIMS = (0, 2, 3)


def composition(x: Tensor, detach_mean: bool, detach_var: bool) -> Tensor:
    """The thread's manual batch norm, with ``.detach()`` of each statistic as chosen."""
    mean = x.mean(DIMS, keepdim=True)
    var = x.var(DIMS, unbiased=False, keepdim=True)
    if detach_mean:
        mean = mean.detach()
    if detach_var:
        var = var.detach()
    return (x - mean) / torch.sqrt(var + EPS)


def _flexbn(detach_mean: bool, detach_var: bool) -> Callable[[Tensor], Tensor]:
    bn = flexbn.BatchNorm2d(3, affine=False, detach_mean=detach_mean, detach_var=detach_var)
    return bn.double()


# (label, the callable, the composition flags it must equal)
def _variants() -> list[tuple[str, Callable[[Tensor], Tensor], tuple[bool, bool]]]:
    return [
        ("torch.nn.BatchNorm2d", torch.nn.BatchNorm2d(3, affine=False).double(), (False, False)),
        ("flexbn.BatchNorm2d", _flexbn(False, False), (False, False)),
        ("flexbn detach_mean", _flexbn(True, False), (True, False)),
        ("flexbn detach_var", _flexbn(False, True), (False, True)),
        ("flexbn detach_mean+var", _flexbn(True, True), (True, True)),
    ]


def _output_and_grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    xg = x.clone().requires_grad_()
    y = fn(xg)
    y.abs().sum().backward()
    return y.detach(), xg.grad


def _diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


def run(seed: int = 2809) -> Result:
    """Run the experiment; the conclusion is derived from the measured differences."""
    torch.manual_seed(seed)
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64)
    refs = {
        flags: _output_and_grad(lambda t, f=flags: composition(t, *f), x)
        for flags in [(False, False), (True, False), (False, True), (True, True)]
    }
    none, both = refs[(False, False)], refs[(True, True)]
    header = (
        f"{'variant':<24}{'output vs manual':>18}{'grad vs no .detach()':>22}"
        f"{'grad vs .detach()':>19}{'grad vs own':>13}"
    )
    lines = [header, "-" * len(header)]
    found: dict[str, tuple[float, float, float]] = {}
    for label, fn, flags in _variants():
        y, g = _output_and_grad(fn, x)
        own = _diff(g, refs[flags][1])
        d_none, d_both = _diff(g, none[1]), _diff(g, both[1])
        found[label] = (d_none, d_both, max(own, _diff(y, refs[flags][0])))
        lines.append(
            f"{label:<24}{_diff(y, none[0]):>18.1e}{d_none:>22.1e}{d_both:>19.1e}{own:>13.1e}"
        )
    legend = (
        "max |difference|, float64; 'own' = the composition with the same statistics detached "
        "(flexbn's mode; none for torch)"
    )
    table = "\n".join([*lines, "", legend])

    t_none, t_both, _ = found["torch.nn.BatchNorm2d"]
    flexbn_ok = all(v[2] < MATCH for k, v in found.items() if k.startswith("flexbn"))
    if t_none < MATCH <= t_both:
        answer = (
            "mu and var are gradient-tracked tensors in torch.nn.BatchNorm2d: its gradient equals the "
            f"composition without .detach() (max diff {t_none:.0e}) and differs from the one with "
            f".detach() by up to {t_both:.2g}."
        )
    elif t_both < MATCH <= t_none:
        answer = (
            "torch.nn.BatchNorm2d treats mu and var as constants here: its gradient equals the "
            f"composition with .detach() (max diff {t_both:.0e})."
        )
    else:
        answer = (
            "torch.nn.BatchNorm2d matches neither composition (diffs "
            f"{t_none:.2g} / {t_both:.2g}) -- unexpected."
        )
    flexbn_line = (
        "flexbn gives either: its default equals torch, and detach_mean / detach_var equal the "
        "compositions with those statistics detached."
        if flexbn_ok
        else "FAILED: a flexbn mode does not equal its composition (last column)."
    )
    return Result(
        title="Are mu and var in batch norm gradient-tracked? (origin.md)",
        table=table,
        conclusion=f"{answer} {flexbn_line}",
        ok=flexbn_ok,
    )
