"""Ghost batch sizes (Hoffer, Hubara & Soudry 2017): statistics over small chunks of a large batch.

Ghost batch norm computes the statistics over "virtual" batches of ``virtual_batch_size`` consecutive
samples inside the batch, to bring back the noise of small-batch statistics, a regulariser, when the
optimiser's batch is large (Hoffer et al. report it narrows the generalisation gap of large batches).

Here: the digits MLP trained with SGD on batches of 256 for a fixed number of epochs, with
``flexbn.BatchNorm1d(virtual_batch_size=v)`` for several ``v`` (256 = plain batch norm), several seeds;
held-out accuracy in eval mode and the last epoch's training loss, which shows the added noise. Before
training, the module's output on one batch is checked against torch's batch norm applied chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import flexbn

from . import Result
from ._common import (
    MLP,
    Fit,
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

BATCH, LR = 256, 0.1
EPOCHS, QUICK_EPOCHS = 40, 20
SIZES, QUICK_SIZES = (256, 128, 64, 32, 16, 8, 4), (256, 32, 4)
SEEDS, QUICK_SEEDS = 3, 1
# The claimed effect: smaller ghost batches add noise, so the smallest size ends with at least NOISIER
# times plain batch norm's training loss. And the ghost batches must be what flexbn says (CHUNK_TOL).
NOISIER, CHUNK_TOL = 2.0, 1e-5

ABOUT = f"""**Question.** Ghost batch norm (Hoffer, Hubara & Soudry
[2017](https://arxiv.org/abs/1705.08741)) takes the statistics over small "virtual" batches inside a
large batch, to bring back the regularising noise of small-batch statistics; the paper reports it narrows
the generalisation gap of large-batch training.

**Setup.** The digits MLP, batches of {BATCH}, SGD (lr {LR}), {EPOCHS} epochs, {SEEDS} seeds, with
`flexbn.BatchNorm1d(virtual_batch_size=v)` for `v` in {", ".join(map(str, SIZES))} ({BATCH}: plain batch
norm); `--quick`: {QUICK_EPOCHS} epochs, `v` in {", ".join(map(str, QUICK_SIZES))}, {QUICK_SEEDS} seed.
Before training, the module's output is checked against torch's batch norm applied chunk by chunk. `ok`
requires that equality (within {CHUNK_TOL:.0e}) and a training loss at least {NOISIER:g}x plain batch
norm's at the smallest size."""


@dataclass(frozen=True)
class Point:
    """One ghost size: per seed, the held-out accuracy and the last epoch's mean training loss."""

    size: int
    accuracy: tuple[float, ...]
    train_loss: tuple[float, ...]


def chunk_check(size: int, seed: int = 0) -> float:
    """Max |difference| between ``flexbn.BatchNorm1d(virtual_batch_size=size)`` in training and torch's
    ``F.batch_norm`` applied to each chunk of ``size`` samples (random weight and bias), on one batch.

    >>> chunk_check(32) < 1e-5
    True
    """
    with seeded(seed):
        x = torch.randn(BATCH, 16) * 3 + 1
        bn = flexbn.BatchNorm1d(16, virtual_batch_size=size)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    with torch.no_grad():
        y = bn(x)
        ref = torch.cat(
            [
                nn.functional.batch_norm(c, None, None, bn.weight, bn.bias, training=True)
                for c in x.split(size)
            ]
        )
    return (y - ref).abs().max().item()


def measure(
    seed: int = 0, epochs: int = EPOCHS, sizes: tuple[int, ...] = SIZES, seeds: int = SEEDS
) -> list[Point]:
    """Train the MLP for every ghost size and seed (``seed``, ``seed + 10``, ...) on one split.

    >>> [p.size for p in measure(0, epochs=1, sizes=(256, 64), seeds=1)]
    [256, 64]
    """
    jobs = [(size, seed, seed + 10 * s, epochs) for size in sizes for s in range(seeds)]
    done = map_jobs(_job, jobs, desc="ghost runs")
    points = []
    for i, size in enumerate(sizes):
        fits = done[i * seeds : (i + 1) * seeds]
        points.append(
            Point(size, tuple(f.accuracy[-1] for f in fits), tuple(f.train_loss for f in fits))
        )
    return points


def _job(size: int, split: int, seed: int, epochs: int) -> Fit:
    """One training run (a job for a worker process): ghost size ``size``, the split of ``split``."""
    data = digits(split)
    n = len(data.x_train)
    with seeded(seed):
        model = MLP(virtual_batch_size=None if size >= BATCH else size)
    return fit(
        model,
        data,
        lambda gen: iid_batches(n, BATCH, gen),
        epochs=epochs,
        lr=LR,
        seed=seed + 1,
        desc=f"ghost {size}",
    )


def conclude(points: list[Point], chunk_error: float) -> tuple[str, bool]:
    """The conclusion from the final accuracies and training losses, and whether flexbn's ghost batches
    are torch's batch norm per chunk (within :data:`CHUNK_TOL`) and the smallest size trains at least
    :data:`NOISIER` times noisier than plain batch norm."""
    plain = next(p for p in points if p.size >= BATCH)
    small = min(points, key=lambda p: p.size)
    best = max(points, key=lambda p: mean(p.accuracy))
    seeds = len(plain.accuracy)
    spread = max(max(p.accuracy) - min(p.accuracy) for p in points) if seeds > 1 else None
    diff = mean(best.accuracy) - mean(plain.accuracy)
    over = f"mean of {seeds} seeds" if seeds > 1 else "one seed"
    text = (
        f"With batches of {BATCH}, held-out accuracy ranged from "
        f"{fmt_pct(min(mean(p.accuracy) for p in points))} to {fmt_pct(mean(best.accuracy))} over "
        f"ghost sizes {small.size}-{BATCH} ({over}): plain batch norm {fmt_pct(mean(plain.accuracy))}, "
        f"the best size {best.size} ({100 * diff:+.1f} points)"
    )
    if small is not best:
        text += f", the smallest {small.size} {fmt_pct(mean(small.accuracy))}"
    if spread is not None:
        text += f"; seeds differ by up to {100 * spread:.1f} points at one size"
    ratio = mean(small.train_loss) / mean(plain.train_loss)
    text += (
        f". The noise of small ghost batches shows in the training loss: {mean(small.train_loss):.3g} "
        f"at size {small.size} against {mean(plain.train_loss):.3g} for plain batch norm ({ratio:.0f}x)"
    )
    if spread is not None and abs(diff) <= spread:
        text += "; on digits the regularisation does not buy accuracy beyond the seed spread"
    text += (
        f". flexbn's ghost batches equal torch's batch norm per chunk (max diff {chunk_error:.0e})."
    )
    ok = chunk_error < CHUNK_TOL and ratio >= NOISIER
    if not ok:
        text += (
            f" FAILED: expected ghost batches equal to per-chunk batch norm within {CHUNK_TOL:.0e} and "
            f"a training loss at least {NOISIER:.0f}x plain batch norm's at the smallest size."
        )
    return text, ok


def table(points: list[Point]) -> str:
    """Held-out accuracy (mean, range over seeds) and training loss per ghost size."""
    lines = [
        f"{'ghost size':>10}{'accuracy':>10}{'range':>16}{'train loss':>12}",
        "-" * 48,
    ]
    for p in points:
        label = f"{p.size}" + (" (BN)" if p.size >= BATCH else "")
        rng = f"{fmt_pct(min(p.accuracy))}-{fmt_pct(max(p.accuracy))}"
        lines.append(
            f"{label:>10}{fmt_pct(mean(p.accuracy)):>10}{rng:>16}{mean(p.train_loss):>12.4f}"
        )
    lines.append(
        f"\nbatches of {BATCH}, {len(points[0].accuracy)} seed(s); accuracy: held-out, eval mode, "
        "after the last epoch; train loss: mean over the last epoch"
    )
    return "\n".join(lines)


def _draw(points: list[Point]) -> Any:
    def draw(axes: Any) -> None:
        ax_acc, ax_loss = axes
        sizes = [p.size for p in points]
        seeds = len(points[0].accuracy)
        for ax, values, color, what in (
            (ax_acc, [tuple(100 * a for a in p.accuracy) for p in points], "C0", "accuracy"),
            (ax_loss, [p.train_loss for p in points], "C1", "training loss"),
        ):
            mid, yerr = error_bars(values)
            ax.errorbar(
                sizes,
                mid,
                yerr=yerr,
                fmt="o-",
                capsize=3,
                color=color,
                label=f"{what}, mean of {seeds} seeds (bars: range)" if seeds > 1 else what,
            )
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.set_xlabel(f"virtual_batch_size (samples; batch {BATCH})")
            ax.legend(loc="lower left")
        low = min(100 * min(p.accuracy) for p in points)
        ax_acc.set(
            ylabel="held-out accuracy, eval mode (%)",
            ylim=(max(0.0, low - 3), 100),
            title="Held-out accuracy",
        )
        ax_loss.set(
            yscale="log",
            ylabel="training loss (cross-entropy)",
            title="Training loss, mean over the last epoch",
        )

    return draw


def run(seed: int = 0, *, quick: bool = False, out: Path | None = None) -> Result:
    """The lab experiment: :func:`measure` (three sizes, one seed, fewer epochs when ``quick``), the
    per-chunk check, table, conclusion and figure (``out/ghost.png``)."""
    sizes = QUICK_SIZES if quick else SIZES
    chunk_error = max(chunk_check(s, seed) for s in sizes if s < BATCH)
    if quick:
        points = measure(seed, QUICK_EPOCHS, sizes, QUICK_SEEDS)
    else:
        points = measure(seed, EPOCHS, sizes, SEEDS)
    conclusion, ok = conclude(points, chunk_error)
    return Result(
        title="Ghost batch sizes: accuracy vs virtual_batch_size (Hoffer et al. 2017)",
        about=ABOUT,
        table=table(points),
        conclusion=conclusion,
        ok=ok,
        figures=save_figure(
            out,
            "ghost",
            _draw(points),
            ncols=2,
            size=(5.4, 4.0),
            note=f"{BATCH} = one ghost batch: plain batch norm. Smaller ghost batches: noisier "
            "statistics, a higher training loss.",
        ),
        data={
            "chunk_error": chunk_error,
            "points": [
                {"size": p.size, "accuracy": p.accuracy, "train_loss": p.train_loss} for p in points
            ],
        },
    )
