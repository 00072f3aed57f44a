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
    error_bars,
    fit,
    fmt_pct,
    iid_batches,
    map_jobs,
    mean,
    save_figure,
    seeded,
)
from ._common import accuracy as eval_accuracy

BATCH, LR = 32, 0.05
EPOCHS, QUICK_EPOCHS = 10, 6
SEEDS, QUICK_SEEDS = 3, 1
RATES, QUICK_RATES = (0.0, 0.2, 0.5, 0.7), (0.0, 0.5)
PLAIN, RECOMPUTE, STATS_INPUT = "plain", "recompute_stats", "stats_input"
ARMS = (PLAIN, RECOMPUTE, STATS_INPUT)
# The claimed effect: at the largest rate, plain BN's variance ratio is below SHIFT, and both repairs
# bring it within REPAIRED of 1.
SHIFT, REPAIRED = 0.9, 0.1

ABOUT = f"""**Question.** Li, Chen, Hu & Yang ([2019](https://arxiv.org/abs/1801.05134)) trace the accuracy
lost when dropout precedes batch norm to a *variance shift*: dropout raises the variance of the activations
in training (the kept ones are scaled by `1 / (1 - p)`), the batch norm after it learns running statistics
of that, and at inference, with dropout off, it divides by a variance that is too large. Two repairs flexbn
offers: recompute the statistics after training with dropout off (`flexbn.recompute_stats`, precise
batch norm), or take the batch norm's statistics from the activations before dropout in the first place
(`bn(fc(dropout(h)), stats_input=fc(h))`).

**Setup.** The digits MLP with `Dropout(p)` before its second linear layer (so the second batch norm sees
dropped-out activations), batches of {BATCH}, {EPOCHS} epochs, `p` in {", ".join(map(str, RATES))},
{SEEDS} seeds (`--quick`: {QUICK_EPOCHS} epochs, `p` in {", ".join(map(str, QUICK_RATES))}, {QUICK_SEEDS}
seed). Measured: the second batch norm's *variance ratio* -- its input's variance at inference on the
held-out images over its running variance, per channel, averaged (1 = no shift) -- and held-out accuracy.
`ok` requires a plain ratio below {SHIFT} at the largest `p` and both repaired ratios within {REPAIRED} of
1."""


@dataclass(frozen=True)
class Point:
    """One (rate, arm), over seeds: the second batch norm's variance ratio (the mean over channels,
    averaged over seeds; the smallest and largest channel of any seed; each seed's) and the held-out
    accuracy (the mean over seeds; each seed's)."""

    rate: float
    arm: str
    ratio: float
    ratio_min: float
    ratio_max: float
    accuracy: float
    ratios: tuple[float, ...] = ()
    accuracies: tuple[float, ...] = ()


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


# (ratio mean over channels, min, max, held-out accuracy) of one trained model
_Measured = tuple[float, float, float, float]


def _job(rate: float, split: int, seed: int, epochs: int) -> dict[str, _Measured]:
    """One seed at one rate (a job for a worker process): the three arms' measurements."""
    data = digits(split)
    plain = train(rate, False, data, seed, epochs)
    recomputed = copy.deepcopy(plain)
    batches = [data.x_train[i : i + 256] for i in range(0, len(data.x_train), 256)]
    flexbn.recompute_stats(recomputed, batches)
    models = {
        PLAIN: plain,
        RECOMPUTE: recomputed,
        STATS_INPUT: train(rate, True, data, seed, epochs),
    }
    measured = {}
    for arm, model in models.items():
        r = _ratios(model, data)
        acc = eval_accuracy(model, data.x_test, data.y_test)
        measured[arm] = (r.mean().item(), r.min().item(), r.max().item(), acc)
    return measured


def measure(
    seed: int = 0, epochs: int = EPOCHS, rates: tuple[float, ...] = RATES, seeds: int = SEEDS
) -> list[Point]:
    """Train and measure every arm at every rate for ``seeds`` seeds (``seed``, ``seed + 10``, ...) on
    one split.

    >>> points = measure(0, epochs=1, rates=(0.5,), seeds=1)
    >>> [p.arm for p in points], all(p.ratio > 0 for p in points)
    (['plain', 'recompute_stats', 'stats_input'], True)
    """
    jobs = [(rate, seed, seed + 10 * s, epochs) for rate in rates for s in range(seeds)]
    done = map_jobs(_job, jobs, desc="dropout runs")
    points = []
    for i, rate in enumerate(rates):
        runs = done[i * seeds : (i + 1) * seeds]
        for arm in ARMS:
            m = [run[arm] for run in runs]
            points.append(
                Point(
                    rate,
                    arm,
                    ratio=mean(x[0] for x in m),
                    ratio_min=min(x[1] for x in m),
                    ratio_max=max(x[2] for x in m),
                    accuracy=mean(x[3] for x in m),
                    ratios=tuple(x[0] for x in m),
                    accuracies=tuple(x[3] for x in m),
                )
            )
    return points


def _point(points: list[Point], rate: float, arm: str) -> Point:
    return next(p for p in points if p.rate == rate and p.arm == arm)


def _seed_spread(points: list[Point]) -> float:
    """The largest difference between two seeds' accuracies at one (rate, arm)."""
    return max((max(p.accuracies) - min(p.accuracies) for p in points if p.accuracies), default=0.0)


def conclude(points: list[Point]) -> tuple[str, bool]:
    """The conclusion at the largest dropout rate (and the zero rate for reference), and whether the
    shift was observed (plain ratio below :data:`SHIFT`) and repaired by both (within :data:`REPAIRED`
    of 1)."""
    top = max(p.rate for p in points)
    plain, rec, pre = (_point(points, top, arm) for arm in ARMS)
    base = min(p.rate for p in points)
    ref = _point(points, base, PLAIN)
    seeds = max(len(p.accuracies) for p in points)
    over = f"mean of {seeds} seeds" if seeds > 1 else "one seed"
    accs = [p.accuracy for p in points if p.rate == top]
    gap = max(accs) - min(accs)
    spread = _seed_spread(points)
    text = (
        f"Dropout (p={top}) before batch norm shifts the variance: at inference the layer's input "
        f"variance is {plain.ratio:.2f}x its running variance (channels {plain.ratio_min:.2f}-"
        f"{plain.ratio_max:.2f}; {ref.ratio:.2f}x at p={base}), as Li et al. (2019) predict. "
        f"flexbn.recompute_stats brings it to {rec.ratio:.2f}x and statistics taken before dropout "
        f"(stats_input=) to {pre.ratio:.2f}x ({over}). Held-out accuracy: {fmt_pct(plain.accuracy)} "
        f"plain, {fmt_pct(rec.accuracy)} recomputed, {fmt_pct(pre.accuracy)} with stats_input"
    )
    if seeds > 1 and gap <= spread:
        text += (
            f" -- differences within the seeds' spread ({100 * spread:.1f} points): this small MLP's "
            "accuracy barely feels the shift (the ReLU and the last layer absorb a uniform "
            "rescaling), the variance ratio shows it."
        )
    elif seeds == 1 and gap < 0.01:
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
    """Variance ratio and accuracy per dropout rate and arm (means over seeds)."""
    head = f"{'dropout p':>9}  " + "".join(f"{arm:>26}" for arm in ARMS)
    sub = f"{'':>9}  " + "".join(f"{'var ratio  accuracy':>26}" for _ in ARMS)
    lines = [head, sub, "-" * len(head)]
    for rate in sorted({p.rate for p in points}):
        row = f"{rate:>9.1f}  "
        for arm in ARMS:
            p = _point(points, rate, arm)
            row += f"{p.ratio:>16.3f}{fmt_pct(p.accuracy):>10}"
        lines.append(row)
    seeds = max(len(p.accuracies) for p in points)
    lines.append(
        "\nvar ratio: the second batch norm's input variance at inference (held-out data) over its "
        "running\nvariance, mean over channels (1 = no shift); accuracy: held-out, eval mode; "
        + (f"means of {seeds} seeds" if seeds > 1 else "one seed")
    )
    return "\n".join(lines)


def _draw(points: list[Point]) -> Any:
    def draw(axes: Any) -> None:
        ax_ratio, ax_acc = axes
        rates = sorted({p.rate for p in points})
        dodge = 0.012 * (max(rates) - min(rates) or 1)
        for i, (arm, marker) in enumerate(zip(ARMS, "osD", strict=True)):
            ps = [_point(points, r, arm) for r in rates]
            xs = [r + (i - 1) * dodge for r in rates]
            for ax, values in (
                (ax_ratio, [p.ratios or (p.ratio,) for p in ps]),
                (ax_acc, [tuple(100 * a for a in (p.accuracies or (p.accuracy,))) for p in ps]),
            ):
                mid, yerr = error_bars(values)
                ax.errorbar(
                    xs,
                    mid,
                    yerr=yerr,
                    fmt=f"{marker}-",
                    capsize=3,
                    markersize=5,
                    label=arm,
                )
        ax_ratio.axhline(1.0, color="black", linewidth=0.9, linestyle=":", label="no shift")
        ax_ratio.set(
            xlabel="dropout rate p",
            ylabel="inference variance / running variance",
            title="Variance shift at the BN after dropout",
        )
        ax_acc.set(
            xlabel="dropout rate p",
            ylabel="held-out accuracy (%)",
            title="Held-out accuracy, eval mode",
        )
        for ax in axes:
            ax.set_xticks(rates)
            ax.legend(loc="lower left")

    return draw


def run(seed: int = 0, *, quick: bool = False, out: Path | None = None) -> Result:
    """The lab experiment: :func:`measure` (two rates and fewer epochs when ``quick``), its table,
    conclusion and figure (``out/dropout.png``)."""
    if quick:
        points = measure(seed, QUICK_EPOCHS, QUICK_RATES, QUICK_SEEDS)
    else:
        points = measure(seed, EPOCHS, RATES, SEEDS)
    conclusion, ok = conclude(points)
    seeds = max(len(p.accuracies) for p in points)
    return Result(
        title="Dropout before BN: the variance shift and its repairs (Li et al. 2019)",
        about=ABOUT,
        table=table(points),
        conclusion=conclusion,
        ok=ok,
        figures=save_figure(
            out,
            "dropout",
            _draw(points),
            ncols=2,
            size=(5.4, 4.0),
            note=(
                f"markers: mean of {seeds} seeds; bars: range over the seeds (ratio: mean over "
                "channels); markers shifted sideways to keep the arms apart"
                if seeds > 1
                else "one seed (--quick): no spread; markers shifted sideways to keep the arms apart"
            ),
        ),
        data={
            "points": [
                {
                    "rate": p.rate,
                    "arm": p.arm,
                    "ratio": p.ratio,
                    "ratio_min": p.ratio_min,
                    "ratio_max": p.ratio_max,
                    "accuracy": p.accuracy,
                    "ratios": p.ratios,
                    "accuracies": p.accuracies,
                }
                for p in points
            ]
        },
    )
