"""Non-i.i.d. batches (Ioffe 2017, section 4.3): batches of one or two classes, like bags of instances.

Batch norm trains with the statistics of each batch and predicts with the running (population)
statistics. When every batch holds only one or two classes -- the batches of multiple-instance learning,
where a bag's instances share a source -- a batch's statistics carry its classes, the network learns to
rely on them, and eval mode, which no longer has them, loses accuracy. Ioffe (2017, section 4.3) saw
ImageNet accuracy fall from 78.3% to 67.0% with batches of 16 classes x 2 images, and batch
renormalization restore it (78.5%).

Here: a 64-64-64-10 MLP with two ``flexbn.BatchNorm1d`` on scikit-learn's digits (8x8 images, no
download), batches of 16 joining two single-class chunks of 8 (so one or two classes), SGD; held-out
accuracy in eval mode after every epoch for

* ``i.i.d. batches`` -- shuffled batches of 16, the baseline;
* ``plain BN`` -- the few-class batches, batch norm as torch's;
* ``batch renorm`` -- the same batches, ``renorm=True, momentum=0.01`` with Ioffe's schedule compressed to
  the run (:func:`flexbn.renorm_schedule`: plain BN for the first 10% of steps, ``rmax`` 1 -> 3 and
  ``dmax`` 0 -> 5 by the middle);
* ``per-bag statistics`` -- each training batch is one bag, and the held-out set is cut into bags built
  the same way and normalized per bag in one call (``groups=`` bag ids, ``track_running_stats=False``):
  the statistics of multiple-instance learning, consistent between training and test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import flexbn

from . import Result
from ._common import (
    MLP,
    Digits,
    digits,
    few_class_batches,
    fit,
    fmt_pct,
    iid_batches,
    map_jobs,
    mean,
    save_figure,
    seeded,
)

BATCH, LR = 16, 0.05
EPOCHS, QUICK_EPOCHS = 12, 6
SEEDS, QUICK_SEEDS = 3, 1
LAST = 3  # epochs averaged for the final accuracy (the curves are noisy)
IID, PLAIN, RENORM, BAGS = "i.i.d. batches", "plain BN", "batch renorm", "per-bag statistics"
ARMS = (IID, PLAIN, RENORM, BAGS)
# The claimed effect: few-class batches cost plain BN at least DROP of accuracy against i.i.d. batches,
# and batch renorm recovers at least RECOVER of that gap.
DROP, RECOVER = 0.02, 0.5

ABOUT = f"""**Question.** What happens to batch norm when each batch holds only one or two classes -- the
batches of multiple-instance learning, where a bag's instances share a source? Ioffe
([2017](https://arxiv.org/abs/1702.03275), §4.3): with ImageNet batches of 16 classes × 2 images, batch
norm's validation accuracy fell from 78.3% to 67.0%, and batch renormalization restored it (78.5%). A
batch's statistics then carry its classes; the network learns to use them; eval mode, with running
statistics, does not have them.

**Setup.** An MLP 64-64-64-10 (`Linear, flexbn.BatchNorm1d, ReLU` twice) on scikit-learn's 8×8 digits,
SGD (lr {LR}, momentum 0.9), batches of {BATCH}, {EPOCHS} epochs, {SEEDS} seeds (`--quick`:
{QUICK_EPOCHS} epochs, {QUICK_SEEDS} seed); held-out accuracy in eval mode after every epoch (the table:
the mean of the last {LAST} epochs). Four arms:

* **{IID}** -- shuffled batches, the baseline;
* **{PLAIN}** -- each batch joins two random single-class chunks of {BATCH // 2} (one or two classes);
* **{RENORM}** -- the same batches, `renorm=True, momentum=0.01`, with the paper's schedule compressed
  to the run (`flexbn.renorm_schedule` / `flexbn.set_renorm_limits`: plain batch norm for the first 10%
  of the steps, then `rmax` 1 → 3 and `dmax` 0 → 5 by the middle);
* **{BAGS}** -- each batch is one bag; held-out images are cut into bags built the same way and
  normalized per bag in one eval call (`groups=` bag ids, `track_running_stats=False`): the statistics
  multiple-instance models use, consistent between training and test.

`ok` requires a loss of at least {100 * DROP:.0f} points for plain batch norm and a recovery of at least
{100 * RECOVER:.0f}% of it by batch renorm."""


def _bag_ids(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.long)


def _per_bag_accuracy(data: Digits, seed: int) -> Callable[[nn.Module], float]:
    """Held-out accuracy with the held-out set cut into bags like the training batches, each normalized
    with its own statistics: one eval-mode call with ``groups=`` bag ids."""
    bags = few_class_batches(data.y_test, BATCH, torch.Generator().manual_seed(seed))
    idx = torch.cat(bags)
    ids = torch.cat([torch.full((len(b),), i) for i, b in enumerate(bags)])

    def evaluate(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            pred = model(data.x_test[idx], groups=ids).argmax(1)
        return (pred == data.y_test[idx]).double().mean().item()

    return evaluate


def train(arm: str, data: Digits, seed: int, epochs: int) -> tuple[float, ...]:
    """Held-out accuracy after each epoch of one arm (a label of :data:`ARMS`)."""
    options: dict[str, Any] = {}
    if arm == RENORM:
        options = {"renorm": True, "momentum": 0.01}
    elif arm == BAGS:
        options = {"track_running_stats": False}
    with seeded(seed):
        model = MLP(**options)
    n = len(data.x_train)
    steps = epochs * (n // BATCH)
    schedule = {"warmup": steps // 10, "rmax_at": steps // 2, "dmax_at": steps // 2}

    def renorm_limits(step: int) -> None:
        flexbn.set_renorm_limits(model, *flexbn.renorm_schedule(step, **schedule))

    def batches(gen: torch.Generator) -> list[Tensor]:
        if arm == IID:
            return iid_batches(n, BATCH, gen)
        return few_class_batches(data.y_train, BATCH, gen)

    result = fit(
        model,
        data,
        batches,
        epochs=epochs,
        lr=LR,
        seed=seed + 1,
        before_step=renorm_limits if arm == RENORM else None,
        groups=(lambda idx: _bag_ids(len(idx))) if arm == BAGS else None,
        evaluate=_per_bag_accuracy(data, seed + 2) if arm == BAGS else None,
        desc=f"nonid: {arm}",
    )
    return result.accuracy


@dataclass(frozen=True)
class Measurement:
    """Accuracy curves per arm and seed: ``curves[arm][i][epoch]``."""

    curves: dict[str, tuple[tuple[float, ...], ...]]

    def final(self, arm: str) -> tuple[float, ...]:
        """Per seed, the mean accuracy of the last :data:`LAST` epochs."""
        return tuple(mean(c[-LAST:]) for c in self.curves[arm])

    def score(self, arm: str) -> float:
        """The final accuracy averaged over seeds."""
        return mean(self.final(arm))


def _job(arm: str, split: int, seed: int, epochs: int) -> tuple[float, ...]:
    """One training run (a job for a worker process): the split of ``split``, the run's ``seed``."""
    return train(arm, digits(split), seed, epochs)


def measure(seed: int = 0, epochs: int = EPOCHS, seeds: int = SEEDS) -> Measurement:
    """Train every arm for ``seeds`` seeds (``seed``, ``seed + 10``, ...) on the same split.

    >>> m = measure(0, epochs=1, seeds=1)
    >>> sorted(m.curves) == sorted(ARMS), all(0 <= a <= 1 for a in m.final("plain BN"))
    (True, True)
    """
    jobs = [(arm, seed, seed + 10 * s, epochs) for s in range(seeds) for arm in ARMS]
    done = map_jobs(_job, jobs, desc="nonid runs")
    curves: dict[str, list[tuple[float, ...]]] = {arm: [] for arm in ARMS}
    for (arm, *_), curve in zip(jobs, done, strict=True):
        curves[arm].append(curve)
    return Measurement({arm: tuple(c) for arm, c in curves.items()})


def _spread(values: tuple[float, ...]) -> str:
    if len(values) == 1:
        return fmt_pct(values[0])
    return f"{fmt_pct(mean(values))} ({fmt_pct(min(values))}-{fmt_pct(max(values))})"


def conclude(m: Measurement) -> tuple[str, bool]:
    """The conclusion from the final accuracies, and whether the claimed effect was observed: plain BN
    loses at least :data:`DROP` on few-class batches and batch renorm recovers at least :data:`RECOVER`
    of the loss."""
    iid, plain, renorm, bags = (m.score(a) for a in ARMS)
    gap = iid - plain
    recovered = (renorm - plain) / gap if gap > 0 else float("nan")
    n = len(m.curves[IID])
    over = f"mean of the last {LAST} epochs" + (f", {n} seeds" if n > 1 else "")
    text = (
        f"Batches of one or two classes cost plain batch norm {100 * gap:.1f} points of held-out "
        f"accuracy in eval mode ({fmt_pct(plain)} against {fmt_pct(iid)} with i.i.d. batches; {over}); "
        f"batch renorm on the same batches reached {fmt_pct(renorm)}"
    )
    text += f", recovering {100 * recovered:.0f}% of the gap" if gap > 0 else ""
    verdict = (
        "helps" if bags > plain + DROP / 2 else "does not help" if bags < plain else "barely helps"
    )
    text += (
        f". Per-bag statistics (groups=, the bags' own statistics in training and at test) "
        f"{verdict} here: {fmt_pct(bags)}"
    )
    if bags < plain:
        text += ", since a bag of one class normalized by its own mean loses what tells its class"
    text += "."
    ok = gap >= DROP and recovered >= RECOVER
    if not ok:
        text += (
            f" FAILED: expected plain BN to lose at least {100 * DROP:.0f} points and batch renorm "
            f"to recover at least {100 * RECOVER:.0f}% of them."
        )
    return text, ok


def table(m: Measurement) -> str:
    """Final held-out accuracy per arm (mean of the last epochs; per seed when several)."""
    n = len(m.curves[IID])
    w = 22
    head = f"{'batches / statistics':<{w}}{'accuracy':>10}"
    head += "".join(f"{f'seed {i + 1}':>10}" for i in range(n)) if n > 1 else ""
    lines = [head, "-" * len(head)]
    for arm in ARMS:
        row = f"{arm:<{w}}{fmt_pct(m.score(arm)):>10}"
        row += "".join(f"{fmt_pct(a):>10}" for a in m.final(arm)) if n > 1 else ""
        lines.append(row)
    epochs = len(m.curves[IID][0])
    lines.append(
        f"\nheld-out accuracy in eval mode, mean of the last {LAST} of {epochs} epochs; MLP on digits, "
        f"batches of {BATCH}"
    )
    return "\n".join(lines)


def _draw(m: Measurement) -> Any:
    def draw(ax: Any) -> None:
        from matplotlib.patches import Patch

        seeds = len(m.curves[IID])
        for arm, marker in zip(ARMS, "osD^", strict=True):
            curves = m.curves[arm]
            epochs = range(1, len(curves[0]) + 1)
            avg = [mean(c[e] for c in curves) for e in range(len(curves[0]))]
            (line,) = ax.plot(epochs, [100 * a for a in avg], f"{marker}-", markersize=4, label=arm)
            if seeds > 1:
                lo = [100 * min(c[e] for c in curves) for e in range(len(curves[0]))]
                hi = [100 * max(c[e] for c in curves) for e in range(len(curves[0]))]
                ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        handles, _ = ax.get_legend_handles_labels()
        if seeds > 1:
            handles.append(Patch(color="0.5", alpha=0.3, label=f"range over {seeds} seeds"))
        ax.set(
            xlabel="epoch",
            ylabel="held-out accuracy, eval mode (%)",
            ylim=(0, 100),
            title=f"Batches of one or two classes (digits MLP, batches of {BATCH})",
        )
        ax.legend(handles=handles, loc="lower right")

    return draw


def run(seed: int = 0, *, quick: bool = False, out: Path | None = None) -> Result:
    """The lab experiment: :func:`measure` (one seed and fewer epochs when ``quick``), its table,
    conclusion and figure (``out/nonid.png``)."""
    m = measure(seed, QUICK_EPOCHS, QUICK_SEEDS) if quick else measure(seed, EPOCHS, SEEDS)
    conclusion, ok = conclude(m)
    return Result(
        title="Non-i.i.d. batches: plain BN vs batch renorm vs per-bag statistics (Ioffe 2017)",
        about=ABOUT,
        table=table(m),
        conclusion=conclusion,
        ok=ok,
        figures=save_figure(
            out,
            "nonid",
            _draw(m),
            size=(8.0, 5.0),
            note=(
                f"Lines: mean over {len(m.curves[IID])} seeds; shaded bands: the range (lowest to "
                "highest seed) at each epoch."
                if len(m.curves[IID]) > 1
                else "One seed (--quick): no spread shown."
            ),
        ),
        data={
            "accuracy": {arm: m.score(arm) for arm in ARMS},
            "per_seed": {arm: m.final(arm) for arm in ARMS},
            "curves": m.curves,
        },
    )
