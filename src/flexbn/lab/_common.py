"""What the lab's experiments share: seeding, progress bars, figures, the digits data, a small MLP.

The optional extras (``pip install 'flexbn[lab]'``) are imported here and nowhere else: without tqdm the
loops run without bars, without matplotlib the figures are skipped (:data:`FIGURES_MISSING` says why), and
the experiments that train on scikit-learn's digits raise :class:`MissingExtra`, which ``flexbn lab``
reports as a skipped experiment.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

import flexbn

T = TypeVar("T")
EXTRA = "pip install 'flexbn[lab]'"
FIGURES_MISSING = f"figures skipped: matplotlib is not installed ({EXTRA})"


class MissingExtra(ImportError):
    """An experiment needs an optional dependency that is not installed (``flexbn[lab]``)."""


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global generator seeded, and restore the caller's generator after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """``items`` with a tqdm bar on stderr (only on a terminal; none without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, leave=False, disable=None, dynamic_ncols=True)


def have_matplotlib() -> bool:
    """Whether figures can be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_figure(
    out: Path | None,
    name: str,
    draw: Callable[[Any], None],
    *,
    ncols: int = 1,
    size: tuple[float, float] = (6.4, 3.4),
) -> tuple[Path, ...]:
    """Draw ``draw(axes)`` on a new figure of ``ncols`` axes and save it as ``out/name.png``.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend switch).
    Returns the path, or ``()`` when ``out`` is None or matplotlib is missing.
    """
    if out is None or not have_matplotlib():
        return ()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    draw(axes if ncols > 1 else axes[0])
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=90, metadata={"Software": None})
    return (path,)


def fmt_pct(x: float) -> str:
    """An accuracy in [0, 1] as a percentage with one decimal, the lab's one format for them."""
    return f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------------------------- digits


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn), pixels scaled to [0, 1], split
    into a training and a held-out part."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingExtra(f"needs scikit-learn for its data set (digits): {EXTRA}") from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    return x, torch.tensor(data.target, dtype=torch.long)


def digits(seed: int, test: int = 360) -> Digits:
    """The digits, shuffled by ``seed``, ``test`` images held out."""
    x, y = _load_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:test], order[test:]
    return Digits(x[kept], y[kept], x[held], y[held])


def iid_batches(n: int, size: int, gen: torch.Generator) -> list[Tensor]:
    """One epoch of shuffled index batches of ``size`` (the last, incomplete one dropped)."""
    order = torch.randperm(n, generator=gen)
    return [order[i : i + size] for i in range(0, n - size + 1, size)]


def class_chunks(labels: Tensor, chunk: int, gen: torch.Generator) -> list[Tensor]:
    """Indices grouped into shuffled chunks of ``chunk`` samples of one class each, in random order."""
    chunks = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        chunks += [idx[i : i + chunk] for i in range(0, len(idx) - chunk + 1, chunk)]
    order = torch.randperm(len(chunks), generator=gen).tolist()
    return [chunks[i] for i in order]


def few_class_batches(labels: Tensor, size: int, gen: torch.Generator) -> list[Tensor]:
    """One epoch of non-i.i.d. batches: each joins two random single-class chunks of ``size // 2``, so
    it holds one or two classes (like bags of multiple-instance learning)."""
    chunks = class_chunks(labels, size // 2, gen)
    return [torch.cat(chunks[i : i + 2]) for i in range(0, len(chunks) - 1, 2)]


class MLP(nn.Module):
    """64 -> hidden -> hidden -> 10 for the digits: ``Linear, flexbn.BatchNorm1d, ReLU`` twice.

    ``dropout`` sits before the second linear layer, so the second batch norm sees dropped-out
    activations (Li et al. 2019's "dropout before BN"); with ``stats_before_dropout`` that batch norm
    takes its training statistics from the same layer applied to the activations before dropout
    (``stats_input=``). ``bn_options`` go to both batch norms; ``groups`` (per-bag statistics) to both
    calls.
    """

    def __init__(
        self,
        hidden: int = 64,
        *,
        dropout: float = 0.0,
        stats_before_dropout: bool = False,
        **bn_options: Any,
    ) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, hidden), flexbn.BatchNorm1d(hidden, **bn_options)
        self.drop = nn.Dropout(dropout)
        self.fc2, self.bn2 = nn.Linear(hidden, hidden), flexbn.BatchNorm1d(hidden, **bn_options)
        self.head = nn.Linear(hidden, 10)
        self.stats_before_dropout = stats_before_dropout

    def hidden(self, x: Tensor, groups: Tensor | None = None) -> Tensor:
        """The activations entering the dropout."""
        return torch.relu(self.bn1(self.fc1(x), groups=groups))

    def second_bn_input(self, x: Tensor) -> Tensor:
        """What the second batch norm normalizes (dropout active only in training mode)."""
        return self.fc2(self.drop(self.hidden(x)))

    def forward(self, x: Tensor, groups: Tensor | None = None) -> Tensor:
        h = self.hidden(x, groups)
        z = self.fc2(self.drop(h))
        if self.stats_before_dropout and self.training:
            z = self.bn2(z, groups=groups, stats_input=self.fc2(h))
        else:
            z = self.bn2(z, groups=groups)
        return self.head(torch.relu(z))


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Eval-mode accuracy of ``model`` on ``(x, y)``; the model's mode is restored."""
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    model.train(was)
    return acc


@dataclass(frozen=True)
class Fit:
    """A training run: held-out accuracy after each epoch, and the last epoch's mean training loss."""

    accuracy: tuple[float, ...]
    train_loss: float


def fit(
    model: nn.Module,
    data: Digits,
    batches: Callable[[torch.Generator], Sequence[Tensor]],
    *,
    epochs: int,
    lr: float,
    seed: int,
    before_step: Callable[[int], None] | None = None,
    groups: Callable[[Tensor], Tensor | None] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    desc: str = "",
) -> Fit:
    """Train ``model`` with SGD (momentum 0.9) on the batches ``batches(generator)`` yields each epoch.

    ``before_step(step)`` runs before each step (a renorm schedule), ``groups(indices)`` gives the bag
    ids of a batch, ``evaluate(model)`` the held-out accuracy (default: eval-mode accuracy on the test
    split). The batch order comes from a generator seeded with ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    evaluate = evaluate or (lambda m: accuracy(m, data.x_test, data.y_test))
    accs, step, loss_sum, count = [], 0, 0.0, 0
    for _ in progress(range(epochs), desc=desc):
        model.train()
        loss_sum, count = 0.0, 0
        for idx in batches(gen):
            if before_step is not None:
                before_step(step)
            out = model(data.x_train[idx], groups=None if groups is None else groups(idx))
            loss = nn.functional.cross_entropy(out, data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            loss_sum, count = loss_sum + loss.item(), count + 1
        accs.append(evaluate(model))
    return Fit(tuple(accs), loss_sum / max(count, 1))


def mean(values: Iterable[float]) -> float:
    """The arithmetic mean (NaN for no values)."""
    v = list(values)
    return sum(v) / len(v) if v else math.nan
