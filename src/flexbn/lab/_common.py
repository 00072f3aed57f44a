"""What the lab's experiments share: one thread, seeding, worker processes, progress bars, figures, the
digits data, a small MLP.

Every experiment runs with torch on one thread (:func:`one_thread`): the lab's models are small, so a
second thread costs more in synchronisation than it gains, and the numbers then do not depend on the
machine's thread count (the C++ kernels and the matrix products reduce in an order that does). Training
runs that do not depend on each other (seeds, arms, rates) are *jobs* (:func:`map_jobs`): in worker
processes when ``flexbn lab`` has started some (``--jobs``), one thread each, otherwise one after the
other; each job seeds itself, so the numbers are the same either way.

The optional extras (``pip install 'flexbn[lab]'``) are imported here and nowhere else: without tqdm the
loops run without bars, without matplotlib the figures are skipped (:data:`FIGURES_MISSING` says why), and
the experiments that train on scikit-learn's digits raise :class:`MissingExtra`, which ``flexbn lab``
reports as a skipped experiment.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import multiprocessing
import os
import textwrap
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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with torch on one thread, and restore the caller's thread count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_quiet = False  # a worker process: its bars would garble the main process's


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """``items`` with a tqdm bar on stderr (only on a terminal, not in a worker; none without tqdm)."""
    if _quiet:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, leave=False, disable=None, dynamic_ncols=True)


# ------------------------------------------------------------------------------------ worker processes

_pool: concurrent.futures.ProcessPoolExecutor | None = None


def default_jobs() -> int:
    """The default number of worker processes: the CPU cores, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


def _init_worker(backend: str) -> None:
    global _quiet
    _quiet = True
    torch.set_num_threads(1)
    flexbn.set_backend(backend)


def _warm_up() -> None:
    """A worker's first task: load what the jobs need (the digits), while the lab does other work."""
    with contextlib.suppress(MissingExtra):
        _load_digits()


@contextlib.contextmanager
def worker_pool(jobs: int) -> Iterator[None]:
    """Within the block, :func:`map_jobs` runs its jobs in ``jobs`` worker processes (started now and
    warmed up in the background; one torch thread each, flexbn's current backend); with ``jobs <= 1``,
    in this process."""
    global _pool
    if jobs <= 1 or _pool is not None:
        yield
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    pool = concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(flexbn.get_backend(),)
    )
    for _ in range(jobs):
        pool.submit(_warm_up)
    _pool = pool
    try:
        yield
    finally:
        _pool = None
        pool.shutdown(wait=True, cancel_futures=True)


def map_jobs(fn: Callable[..., T], jobs: Sequence[tuple[Any, ...]], desc: str) -> list[T]:
    """``[fn(*job) for job in jobs]``, in the worker processes of :func:`worker_pool` if there are any
    (``fn`` must then be a module-level function), with a progress bar over the jobs.

    >>> map_jobs(pow, [(2, 3), (3, 2)], desc="powers")
    [8, 9]
    """
    if _pool is None or len(jobs) < 2:
        with one_thread():
            return [fn(*job) for job in progress(jobs, desc=desc, total=len(jobs))]
    futures = [_pool.submit(fn, *job) for job in jobs]
    done = concurrent.futures.as_completed(futures)
    for _ in progress(done, desc=desc, total=len(futures)):
        pass
    return [f.result() for f in futures]


def have_matplotlib() -> bool:
    """Whether figures can be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


DPI = 160
# The figures' look, applied while one is drawn (matplotlib.rc_context: restored after): sizes readable
# on a slide at DPI, light grids.
STYLE: dict[str, Any] = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.8,
    "legend.framealpha": 0.9,
}


def save_figure(
    out: Path | None,
    name: str,
    draw: Callable[[Any], None],
    *,
    ncols: int = 1,
    size: tuple[float, float] = (6.4, 3.8),
    note: str = "",
) -> tuple[Path, ...]:
    """Draw ``draw(axes)`` on a new figure of ``ncols`` axes and save it as ``out/name.png`` at
    :data:`DPI` with :data:`STYLE`; ``note`` is printed under the axes (what the reader must know to
    read them: overlapping curves, what a band is).

    Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend switch).
    Returns the path, or ``()`` when ``out`` is None or matplotlib is missing.
    """
    if out is None or not have_matplotlib():
        return ()
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, ncols, squeeze=False)[0]
        draw(axes if ncols > 1 else axes[0])
        if note:  # wrapped to the figure's width (about 12 characters per inch at this size)
            text = textwrap.fill(note, width=int(size[0] * ncols * 12), break_on_hyphens=False)
            fig.supxlabel(text, fontsize=9.5, color="0.3")
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return (path,)


def error_bars(values: Sequence[Sequence[float]]) -> tuple[list[float], list[list[float]]]:
    """Per point, the mean of its values and matplotlib's ``yerr`` spanning their range.

    >>> error_bars([(1.0, 3.0), (2.0,)])
    ([2.0, 2.0], [[1.0, 0.0], [1.0, 0.0]])
    """
    mid = [mean(v) for v in values]
    low = [max(0.0, m - min(v)) for m, v in zip(mid, values, strict=True)]  # rounding: never < 0
    high = [max(0.0, max(v) - m) for m, v in zip(mid, values, strict=True)]
    return mid, [low, high]


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
