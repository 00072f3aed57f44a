"""Detached statistics (Ioffe & Szegedy 2015, section 2): why the gradient must go through the mean.

The paper's example: a layer adds a learned bias, ``x = u + b``, and is normalized by subtracting the mean,
``x - E[x]``. If the gradient step ignores that ``E[x]`` depends on ``b``, then ``b`` receives a gradient,
but the update and the change in ``E[x]`` cancel: the output and the loss do not move, the same gradient
comes back at the next step, and "b will grow indefinitely while the loss remains fixed".

Here: a fixed batch ``u`` (64 samples, 8 channels), a learned ``b``, ``flexbn.BatchNorm1d(8,
affine=False)`` and a squared error to a fixed target, trained by full-batch gradient descent on ``b`` alone
-- with each flexbn gradient mode, and torch's ``BatchNorm1d`` for reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import flexbn

from . import Result
from ._common import progress, save_figure, seeded

SAMPLES, CHANNELS, LR = 64, 8, 1.0
STEPS, QUICK_STEPS = 400, 100
TORCH = "torch.nn.BatchNorm1d"
# label -> (detach_mean, detach_var) of a flexbn.BatchNorm1d; None: torch's module.
MODES: dict[str, tuple[bool, bool] | None] = {
    TORCH: None,
    "flexbn default": (False, False),
    "flexbn detach_var": (False, True),
    "flexbn detach_mean": (True, False),
    "flexbn detach_mean+var": (True, True),
}
# Ratios deciding the verdict: |b| "stays" if it moves by less than STAY of its start; it "grows" if it ends
# more than GROW times its start; the loss is "fixed" if it moves by less than FIXED (relative).
STAY, GROW, FIXED = 1e-4, 10.0, 1e-5

ABOUT = f"""**Question.** Why must the gradient go through the batch mean? Ioffe & Szegedy
([2015](https://arxiv.org/abs/1502.03167), §2): with a layer `x = u + b` normalized by `x - E[x]`, a
gradient step that ignores how `E[x]` depends on `b` changes `b`, but the normalization cancels the change;
the loss does not move, the same gradient comes back, and "b will grow indefinitely while the loss remains
fixed".

**Setup.** A fixed batch `u` ({SAMPLES} × {CHANNELS}), a learned bias `b`, `BatchNorm1d({CHANNELS},
affine=False)` and a squared error to a fixed target whose per-channel means are not zero; {STEPS}
full-batch gradient-descent steps (learning rate {LR:g}; `--quick`: {QUICK_STEPS}) on `b` alone, from the
same start, for torch's `BatchNorm1d` and each flexbn mode. `ok` requires no movement of `b` with the mean
attached, growth beyond {GROW:g}x with it detached, and a fixed loss throughout."""


@dataclass(frozen=True)
class Run:
    """One mode's trajectory: |b| and the loss before each step, and the last gradient on ``b``."""

    label: str
    b_norm: tuple[float, ...]
    loss: tuple[float, ...]
    last_grad: float

    @property
    def b_change(self) -> float:
        """max |b_t - b_0|-norm relative to |b_0| (over the steps)."""
        return max(abs(v - self.b_norm[0]) for v in self.b_norm) / self.b_norm[0]

    @property
    def growth(self) -> float:
        """|b| at the end over |b| at the start."""
        return self.b_norm[-1] / self.b_norm[0]

    @property
    def loss_change(self) -> float:
        """max |loss_t - loss_0| relative to loss_0."""
        return max(abs(v - self.loss[0]) for v in self.loss) / self.loss[0]


def _bn(flags: tuple[bool, bool] | None) -> nn.Module:
    if flags is None:
        return nn.BatchNorm1d(CHANNELS, affine=False)
    return flexbn.BatchNorm1d(CHANNELS, affine=False, detach_mean=flags[0], detach_var=flags[1])


def measure(seed: int = 0, steps: int = STEPS) -> list[Run]:
    """Train ``b`` for ``steps`` full-batch gradient-descent steps in every mode of :data:`MODES`, from
    the same ``u``, target and initial ``b``.

    >>> runs = {r.label: r for r in measure(0, steps=3)}
    >>> runs["flexbn default"].b_change < 1e-6 < runs["flexbn detach_mean"].b_change
    True
    """
    with seeded(seed):
        u = torch.randn(SAMPLES, CHANNELS) * 2 + 1
        target = torch.randn(SAMPLES, CHANNELS) + torch.randn(CHANNELS)  # per-channel means != 0
        b0 = torch.randn(CHANNELS) * 0.1
    runs = []
    for label, flags in progress(MODES.items(), desc="detach", total=len(MODES)):
        b = nn.Parameter(b0.clone())
        bn = _bn(flags)
        opt = torch.optim.SGD([b], lr=LR)
        norms, losses = [], []
        for _ in range(steps):
            loss = (bn(u + b) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            norms.append(b.detach().norm().item())
            losses.append(loss.item())
            opt.step()
        assert b.grad is not None
        runs.append(Run(label, tuple(norms), tuple(losses), b.grad.abs().max().item()))
    return runs


def _expect_growth(label: str) -> bool:
    flags = MODES[label]
    return flags is not None and flags[0]


def conclude(runs: list[Run]) -> tuple[str, bool]:
    """The conclusion derived from the trajectories, and whether every mode did what the paper (and
    flexbn's specification) says: |b| stays with the mean's gradient, grows with the mean detached, and the
    loss is fixed throughout."""
    by = {r.label: r for r in runs}
    stay = [r for r in runs if not _expect_growth(r.label)]
    grow = [r for r in runs if _expect_growth(r.label)]
    wrong = [r.label for r in stay if not r.b_change < STAY]
    wrong += [r.label for r in grow if not r.growth > GROW]
    moved = [r.label for r in runs if not r.loss_change < FIXED]
    steps = len(runs[0].b_norm)
    dm = by["flexbn detach_mean"]
    per_step = (dm.b_norm[-1] - dm.b_norm[0]) / (steps - 1)
    default = by["flexbn default"]
    text = (
        f"With the mean detached, gradient descent grew |b| from {dm.b_norm[0]:.3g} to "
        f"{dm.b_norm[-1]:.3g} in {steps} steps ({dm.growth:.0f}x, about {per_step:.3g} per step, "
        f"without bound) while the loss stayed at {dm.loss[0]:.4g} (relative change at most "
        f"{max(r.loss_change for r in runs):.0e}), as Ioffe & Szegedy (2015, section 2) describe; with the "
        f"gradient through the mean (flexbn's default, as {TORCH}) the gradient on b is zero to rounding "
        f"(last {default.last_grad:.0e}) and |b| stayed at {default.b_norm[0]:.3g} (relative change "
        f"{max(r.b_change for r in stay):.0e}); detaching only the variance leaves b alone too."
    )
    if wrong or moved:
        problems = [f"{label}: |b| did not behave as expected" for label in wrong]
        problems += [f"{label}: the loss moved" for label in moved]
        return f"{text} FAILED: {'; '.join(problems)}.", False
    return text, True


def table(runs: list[Run]) -> str:
    """|b| and the loss at the start and end of each mode's run."""
    w = 24
    lines = [
        f"{'mode':<{w}}{'|b| start':>10}{'|b| end':>11}{'growth':>9}{'loss start':>12}{'loss end':>12}"
        f"{'last |grad b|':>15}",
        "-" * (w + 69),
    ]
    for r in runs:
        lines.append(
            f"{r.label:<{w}}{r.b_norm[0]:>10.4g}{r.b_norm[-1]:>11.4g}{r.growth:>8.3g}x"
            f"{r.loss[0]:>12.6g}{r.loss[-1]:>12.6g}{r.last_grad:>15.1e}"
        )
    return "\n".join(lines)


# How each mode is drawn: the modes that behave alike overlap exactly, so each is drawn narrower than
# the one before it, on top of it, with its own dash pattern -- every curve stays visible.
_STYLES: dict[str, dict[str, Any]] = {
    TORCH: {"color": "0.6", "linewidth": 7.0, "linestyle": "-"},
    "flexbn default": {"color": "C0", "linewidth": 4.0, "linestyle": "-"},
    "flexbn detach_var": {"color": "C2", "linewidth": 1.8, "linestyle": (0, (4, 2))},
    "flexbn detach_mean": {"color": "C1", "linewidth": 5.0, "linestyle": "-"},
    "flexbn detach_mean+var": {"color": "C3", "linewidth": 1.8, "linestyle": (0, (4, 2))},
}


def _draw(runs: list[Run]) -> Any:
    def draw(axes: Any) -> None:
        ax_b, ax_loss = axes
        for r in runs:
            style = _STYLES.get(r.label, {})
            ax_b.plot(r.b_norm, label=r.label, solid_capstyle="butt", **style)
            ax_loss.plot(r.loss, label=r.label, solid_capstyle="butt", **style)
        steps = len(runs[0].b_norm)
        at = int(steps * 0.6)
        for detached in (True, False):
            group = [r for r in runs if _expect_growth(r.label) == detached]
            if group:
                text = "mean detached" if detached else "gradient through the mean"
                ax_b.annotate(
                    f"{text}: {len(group)} curves",
                    (at, group[0].b_norm[at]),
                    xytext=(6, -14 if detached else 8),
                    textcoords="offset points",
                    ha="left",
                    fontsize=10,
                )
        top = 1.5 * max(max(r.loss) for r in runs)
        ax_b.set(xlabel="gradient step", ylabel="|b| (Euclidean norm)", title="The learned bias b")
        ax_loss.set(
            xlabel="gradient step",
            ylabel="loss (mean squared error)",
            ylim=(0, top),
            title="The loss",
        )
        ax_b.legend(loc="upper left")
        change = max(r.loss_change for r in runs)
        ax_loss.annotate(
            f"all {len(runs)} modes (styles as on the left):\nloss {runs[0].loss[0]:.4g}, relative "
            f"change at most {change:.0e}",
            (0.5, 0.3),
            xycoords="axes fraction",
            ha="center",
            fontsize=10,
        )

    return draw


def run(seed: int = 0, *, quick: bool = False, out: Path | None = None) -> Result:
    """The lab experiment: :func:`measure`, its table, conclusion and figure (``out/detach.png``)."""
    runs = measure(seed, QUICK_STEPS if quick else STEPS)
    conclusion, ok = conclude(runs)
    data = {
        r.label: {
            "b_start": r.b_norm[0],
            "b_end": r.b_norm[-1],
            "growth": r.growth,
            "b_change": r.b_change,
            "loss_start": r.loss[0],
            "loss_change": r.loss_change,
            "last_grad": r.last_grad,
        }
        for r in runs
    }
    return Result(
        title="Detached statistics: the bias that grows while the loss stays (Ioffe & Szegedy 2015)",
        about=ABOUT,
        table=table(runs),
        conclusion=conclusion,
        ok=ok,
        figures=save_figure(
            out,
            "detach",
            _draw(runs),
            ncols=2,
            size=(5.4, 4.0),
            note="Curves that coincide are drawn one on another, each narrower and dashed: "
            "|b| rises for the two modes that detach the mean and stays flat for the other three; "
            "the loss is the same flat line for all five.",
        ),
        data={"steps": len(runs[0].b_norm), "modes": data},
    )
