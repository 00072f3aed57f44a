"""Dropout before batch norm: the variance shift (Li, Chen, Hu & Yang 2019) and two repairs.

Dropout scales the kept activations by ``1 / (1 - p)``, which keeps their mean but raises their variance
in training. A batch norm after it learns running statistics of the dropped-out activations; at inference
dropout is off, the activations have a smaller variance than the running variance says, and the batch
norm squeezes them: Li et al. call the mismatch the "variance shift" and blame it for the accuracy lost
when dropout precedes batch norm.

Here: the digits MLP (``Linear, BN, ReLU, Dropout(p), Linear, BN, ReLU, Linear``) trained with SGD for each
dropout rate ``p``, and the second batch norm's *variance ratio* -- the variance of its input at
inference (eval mode, held-out data) over its running variance, per channel, averaged over channels; 1 is
no shift -- and the held-out accuracy, for

* ``plain`` -- as torch does it;
* ``recompute_stats`` -- the same trained model, its running statistics then recomputed from the training
  data with dropout off (:func:`flexbn.recompute_stats`: precise BN, the repair of Hendrycks & Gimpel);
* ``stats_input`` -- trained with the second batch norm taking its statistics from the activations
  before dropout (``bn(fc(dropout(h)), stats_input=fc(h))``), so the running statistics are those of
  dropout-free activations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import flexbn

from . import Result
from ._common import (
    MLP,
    Digits,
    digits,
    fit,
    fmt_pct,
    iid_batches,
    progress,
    save_figure,
    seeded,
)
from ._common import accuracy as eval_accuracy

BATCH, LR = 32, 0.05
EPOCHS, QUICK_EPOCHS = 15, 6
RATES, QUICK_RATES = (0.0, 0.2, 0.5, 0.7), (0.0, 0.5)
PLAIN, RECOMPUTE, STATS_INPUT = "plain", "recompute_stats", "stats_input"
ARMS = (PLAIN, RECOMPUTE, STATS_INPUT)
# The claimed effect: at the largest rate, plain BN's variance ratio is below SHIFT, and both repairs
# bring it within REPAIRED of 1.
SHIFT, REPAIRED = 0.9, 0.1


@dataclass(frozen=True)
class Point:
    """One (rate, arm): the second batch norm's variance ratio (mean over channels; min, max) and the
    held-out accuracy."""

    rate: float
    arm: str
    ratio: float
    ratio_min: float
    ratio_max: float
    accuracy: float


def _ratios(model: MLP, data: Digits) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        z = model.second_bn_input(data.x_test)
    assert model.bn2.running_var is not None
    return z.var(0) / model.bn2.running_var


def train(rate: float, stats_before_dropout: bool, data: Digits, seed: int, epochs: int) -> MLP:
    """The MLP trained with dropout ``rate`` before its second batch norm."""
    with seeded(seed):  # the initial weights and the dropout masks
        model = MLP(dropout=rate, stats_before_dropout=stats_before_dropout)
        n = len(data.x_train)
        fit(
            model,
            data,
            lambda gen: iid_batches(n, BATCH, gen),
            epochs=epochs,
            lr=LR,
            seed=seed + 1,
            evaluate=lambda m: 0.0,  # only the final accuracy is reported
            desc=f"dropout p={rate}" + (" stats_input" if stats_before_dropout else ""),
        )
    return model


def measure(seed: int = 0, epochs: int = EPOCHS, rates: tuple[float, ...] = RATES) -> list[Point]:
    """Train and measure every arm at every rate on one split.

    >>> points = measure(0, epochs=1, rates=(0.5,))
    >>> [p.arm for p in points], all(p.ratio > 0 for p in points)
    (['plain', 'recompute_stats', 'stats_input'], True)
    """
    data = digits(seed)
    points = []
    for rate in progress(rates, desc="dropout"):
        plain = train(rate, False, data, seed, epochs)
        recomputed = copy.deepcopy(plain)
        batches = [data.x_train[i : i + 256] for i in range(0, len(data.x_train), 256)]
        flexbn.recompute_stats(recomputed, batches)
        models = {
            PLAIN: plain,
            RECOMPUTE: recomputed,
            STATS_INPUT: train(rate, True, data, seed, epochs),
        }
        for arm, model in models.items():
            r = _ratios(model, data)
            acc = eval_accuracy(model, data.x_test, data.y_test)
            points.append(Point(rate, arm, r.mean().item(), r.min().item(), r.max().item(), acc))
    return points


def _point(points: list[Point], rate: float, arm: str) -> Point:
    return next(p for p in points if p.rate == rate and p.arm == arm)


def conclude(points: list[Point]) -> tuple[str, bool]:
    """The conclusion at the largest dropout rate (and the zero rate for reference), and whether the
    shift was observed (plain ratio below :data:`SHIFT`) and repaired by both (within :data:`REPAIRED`
    of 1)."""
    top = max(p.rate for p in points)
    plain, rec, pre = (_point(points, top, arm) for arm in ARMS)
    base = min(p.rate for p in points)
    ref = _point(points, base, PLAIN)
    accs = [p.accuracy for p in points if p.rate == top]
    spread = max(accs) - min(accs)
    text = (
        f"Dropout (p={top}) before batch norm shifts the variance: at inference the layer's input "
        f"variance is {plain.ratio:.2f}x its running variance (channels {plain.ratio_min:.2f}-"
        f"{plain.ratio_max:.2f}; {ref.ratio:.2f}x at p={base}), as Li et al. (2019) predict. "
        f"flexbn.recompute_stats brings it to {rec.ratio:.2f}x and statistics taken before dropout "
        f"(stats_input=) to {pre.ratio:.2f}x. Held-out accuracy: {fmt_pct(plain.accuracy)} plain, "
        f"{fmt_pct(rec.accuracy)} recomputed, {fmt_pct(pre.accuracy)} with stats_input"
    )
    if spread < 0.01:
        text += (
            " -- this small MLP's accuracy barely feels the shift (the ReLU and the last layer "
            "absorb a uniform rescaling), the variance ratio shows it."
        )
    else:
        text += "."
    ok = plain.ratio < SHIFT and all(abs(p.ratio - 1) < REPAIRED for p in (rec, pre))
    if not ok:
        text += f" FAILED: expected the plain ratio below {SHIFT} and both repairs within {REPAIRED} of 1."
    return text, ok


def table(points: list[Point]) -> str:
    """Variance ratio and accuracy per dropout rate and arm."""
    head = f"{'dropout p':>9}  " + "".join(f"{arm:>26}" for arm in ARMS)
    sub = f"{'':>9}  " + "".join(f"{'var ratio  accuracy':>26}" for _ in ARMS)
    lines = [head, sub, "-" * len(head)]
    for rate in sorted({p.rate for p in points}):
        row = f"{rate:>9.1f}  "
        for arm in ARMS:
            p = _point(points, rate, arm)
            row += f"{p.ratio:>16.3f}{fmt_pct(p.accuracy):>10}"
        lines.append(row)
    lines.append(
        "\nvar ratio: the second batch norm's input variance at inference (held-out data) over its "
        "running\nvariance, mean over channels (1 = no shift); accuracy: held-out, eval mode"
    )
    return "\n".join(lines)


def _draw(points: list[Point]) -> Any:
    def draw(axes: Any) -> None:
        ax_ratio, ax_acc = axes
        rates = sorted({p.rate for p in points})
        for arm in ARMS:
            ps = [_point(points, r, arm) for r in rates]
            ax_ratio.plot(rates, [p.ratio for p in ps], "o-", label=arm)
            ax_acc.plot(rates, [100 * p.accuracy for p in ps], "o-", label=arm)
        ax_ratio.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax_ratio.set(
            xlabel="dropout rate p",
            ylabel="inference / running variance (mean)",
            title="Variance shift at the BN after dropout",
        )
        ax_acc.set(xlabel="dropout rate p", ylabel="held-out accuracy (%)", title="Accuracy")
        ax_ratio.legend(fontsize="small")

    return draw


def run(seed: int = 0, *, quick: bool = False, out: Path | None = None) -> Result:
    """The lab experiment: :func:`measure` (two rates and fewer epochs when ``quick``), its table,
    conclusion and figure (``out/dropout.png``)."""
    points = measure(seed, QUICK_EPOCHS, QUICK_RATES) if quick else measure(seed, EPOCHS, RATES)
    conclusion, ok = conclude(points)
    return Result(
        title="Dropout before BN: the variance shift and its repairs (Li et al. 2019)",
        table=table(points),
        conclusion=conclusion,
        ok=ok,
        figures=save_figure(out, "dropout", _draw(points), ncols=2, size=(5.0, 3.4)),
        data={
            "points": [
                {
                    "rate": p.rate,
                    "arm": p.arm,
                    "ratio": p.ratio,
                    "ratio_min": p.ratio_min,
                    "ratio_max": p.ratio_max,
                    "accuracy": p.accuracy,
                }
                for p in points
            ]
        },
    )
