"""The benchmark harness behind ``flexbn bench``: flexbn against torch's native batch norm and against the
hand-written composition of each variant, eager and under ``torch.compile``, side by side.

For every shape (with its memory layout) and every variant, five *candidates* compute the same thing:

* ``native`` -- ``torch.nn.functional.batch_norm`` (the standard semantics: no variant exists natively);
* ``flexbn-standard`` -- ``flexbn.batch_norm`` with no option, flexbn's standard path (for the variant
  ``standard`` itself this is the ``flexbn`` candidate);
* ``flexbn`` -- ``flexbn.batch_norm`` with the variant's option (``detach_mean=True``, ``mask=...``, ...);
* ``composition`` -- the variant written by hand in plain eager torch (:data:`COMPOSITIONS`: ``.detach()``
  on the statistics, masked sums, segment sums, a reshape into ghost batches, ...), running statistics
  updated as flexbn updates them;
* ``compiled`` -- that composition under ``torch.compile`` (``dynamic=False``).

Before anything is timed, each candidate's first training forward+backward (and first eval call) is timed
once -- the *first-call cost*, which for ``compiled`` is the compilation (Inductor's and AOTAutograd's
on-disk caches are disabled during the run, so it is a cold compile; in-process caches are not, so flexbn's
own compiled backend pays its compilations in the first block that needs them) -- and its output,
gradients and eval output (after one update of the running statistics) are compared with those of its
reference: the eager composition for the variant's candidates, torch native for flexbn's standard path
(``RuntimeError`` if they differ). The comparison is between implementations of one computation.

Passes, each timed on inputs (and upstream gradients) created outside the timed region:

* ``forward`` -- training forward with autograd recording, as in training;
* ``backward`` -- ``torch.autograd.grad`` alone, timed directly rather than as a difference: the forwards
  of a sample are run (outside the timed region) before its backwards. Not ``retain_graph=True`` on one
  forward: a compiled backward that donates its buffers refuses it;
* ``fwd+bwd`` -- training forward then ``torch.autograd.grad``;
* ``eval`` -- ``training=False`` (running statistics) under ``torch.no_grad()``.

Method: after two warm-up calls, each candidate's calls are grouped into samples of about ``sample_ms``
(one call at least); in every repeat each candidate takes one sample, in an order rotated from repeat to
repeat (interleaved: drift of a noisy machine hits all candidates alike). A row reports the median over the
repeats and the quartiles; ratios are ratios of medians within one (shape, layout, variant, pass).
Memory saved for backward is the sum of the unique storages the training forward keeps for backward:
tensors passed through ``torch.autograd.graph.saved_tensors_hooks``, plus tensors held as attributes of
custom autograd nodes (which those hooks do not see). Inputs count when they are saved. Peak memory is the
most bytes allocated at once during a training forward+backward (and during an eval call), above what was
allocated before: on the CPU from the allocation events torch's profiler records (every tensor torch
allocates; not the C++ kernels' own work tables, of O(threads x segments x C) values), on CUDA from
``torch.cuda.max_memory_allocated``.

Every row carries the device, versions, dtype, thread count, the 1-minute load average when its block was
measured, and flexbn's backend (``flexbn.get_backend()``, ``reference`` in a flexbn without backends; the
flexbn candidates can be run once per backend, see :func:`run`). On a machine shared with other work, pass
one thread (``flexbn bench --threads 1``): with more threads than idle cores, every parallel region of a
kernel waits for a descheduled thread, and a 50 us call can take 50 ms.

Clock: wall time (``time.perf_counter``) by default; ``clock="cpu"`` takes the process's CPU time
(``time.process_time``) instead, which time spent descheduled by other processes does not inflate -- the
right clock for per-call costs on a busy machine with one thread (with more, it adds up every thread's
time, waiting included).

Memory is left as users run: each call of every candidate allocates its outputs afresh from the default
allocator. glibc may return large freed blocks to the system, and the next call then takes a page fault
per 4 KiB page it writes: on a virtual machine that can cost more than the kernels and varies from run to
run, for every candidate alike (that is what users get). ``keep_freed_memory=True`` (``flexbn bench
--keep-freed-memory``) asks glibc (``mallopt``, for the whole process) to keep freed blocks of up to 32 MiB
instead, which isolates the computation. One process is one sample of that state: ``flexbn bench --runs
N`` runs N processes and reports the median and the spread over them.

Two further sets of rows: per-call costs on a small input (:data:`PER_CALL`, ``flexbn bench
--per-call``), and whole models (:func:`run_models`, ``flexbn bench --model``): a ResNet with torch's
``BatchNorm2d`` against the same model converted by ``flexbn.convert``, training steps and inference.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import flexbn
from flexbn import spec

__all__ = [
    "CANDIDATES",
    "COMPOSITIONS",
    "MODEL_SHAPES",
    "PASSES",
    "PER_CALL",
    "QUICK_SHAPES",
    "SHAPES",
    "VARIANTS",
    "Row",
    "Shape",
    "combine",
    "format_models",
    "format_table",
    "read_json",
    "resnet",
    "run",
    "run_models",
    "write_csv",
    "write_json",
]

EPS = 1e-5
MOMENTUM = 0.1
PASSES = ("forward", "backward", "fwd+bwd", "eval")
CANDIDATES = ("native", "flexbn-standard", "flexbn", "composition", "compiled")
_REFERENCES = {  # ratio column -> candidate it divides by
    "native": "native",
    "standard": "flexbn-standard",
    "composition": "composition",
    "compiled": "compiled",
}
_SAMPLE_MS = {False: 20.0, True: 1.0}  # quick -> duration of one timing sample
_REPEAT = {False: 7, True: 3}
_WARMUP = 2
GHOST_CHUNKS = 4
_NON_LEAF_GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"


# ---------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """An input size ``(N, C, *spatial)`` and its memory layout (``channels_last`` for 4-D / 5-D input).

    >>> Shape.parse("32x64x56x56:cl")
    Shape(size=(32, 64, 56, 56), channels_last=True)
    >>> Shape((4096, 1024)).name, Shape((4096, 1024)).layout
    ('4096x1024', 'contiguous')
    """

    size: tuple[int, ...]
    channels_last: bool = False

    def __post_init__(self) -> None:
        size = self.size
        if not (isinstance(size, tuple) and len(size) >= 2 and all(_is_int(s) for s in size)):
            raise ValueError(f"shape must be a tuple (N, C, *spatial) of ints, but got {size!r}")
        if any(s < 1 for s in size):
            raise ValueError(f"shape sizes must be >= 1, but got {size}")
        if self.channels_last and len(size) not in (4, 5):
            raise ValueError(
                f"channels_last needs a 4-D or 5-D shape, but got {len(size)}-D shape {size}"
            )

    @property
    def name(self) -> str:
        return "x".join(map(str, self.size))

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"32x64x56x56"`` or ``"32,64,56,56"``, with ``":cl"`` (or ``":channels_last"``) appended for
        the channels-last layout."""
        body, _, layout = text.strip().partition(":")
        if layout not in ("", "cl", "channels_last"):
            raise ValueError(
                f"shape layout must be 'cl' or 'channels_last' after ':', but got {layout!r} in {text!r}"
            )
        parts = body.replace(",", "x").split("x")
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"shape must look like '32x64x56x56' or '32,64,56,56[:cl]', but got {text!r}"
            ) from None
        return cls(size, bool(layout))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


SHAPES = (
    Shape((32, 64, 56, 56)),
    Shape((32, 64, 56, 56), channels_last=True),
    Shape((64, 256, 14, 14)),
    Shape((4096, 1024)),
    Shape((16, 128, 512)),
)
"""The default shapes: ResNet-like NCHW and channels_last, a late CNN stage, ``(N, C)``, ``(N, C, L)``."""

QUICK_SHAPES = (
    Shape((8, 16, 14, 14)),
    Shape((8, 16, 14, 14), channels_last=True),
    Shape((256, 64)),
    Shape((8, 32, 64)),
)


# ------------------------------------------------------------------------------------ compositions
# Each variant written once, by hand, in plain torch -- what a user would write without flexbn. Same
# arguments as the flexbn call (x, weight, bias, running_mean, running_var, *the variant's extra tensors);
# the running statistics are updated in place as flexbn updates them (unbiased variance, momentum 0.1).


def _dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _update(rm: Tensor, rv: Tensor, mean: Tensor, unbiased_var: Tensor) -> None:
    with torch.no_grad():
        rm.mul_(1 - MOMENTUM).add_(mean.detach().flatten(), alpha=MOMENTUM)
        rv.mul_(1 - MOMENTUM).add_(unbiased_var.detach().flatten(), alpha=MOMENTUM)


def compose_standard(
    x: Tensor,
    w: Tensor,
    b: Tensor,
    rm: Tensor,
    rv: Tensor,
    *,
    detach_mean: bool = False,
    detach_var: bool = False,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * w + b`` over the batch, the statistics ``.detach()``-ed as asked."""
    var, mean = torch.var_mean(x, _dims(x), correction=0, keepdim=True)
    n = x.numel() // x.shape[1]
    _update(rm, rv, mean, var * (n / (n - 1)))
    if detach_mean:
        mean = mean.detach()
    if detach_var:
        var = var.detach()
    return (x - mean) / torch.sqrt(var + EPS) * _per_channel(w, x) + _per_channel(b, x)


def compose_mask(x: Tensor, w: Tensor, b: Tensor, rm: Tensor, rv: Tensor, mask: Tensor) -> Tensor:
    """Statistics over the real elements (masked sums); padded elements are normalized with them but take
    part in nothing else (no gradient to the statistics, weight or bias)."""
    m = mask.unsqueeze(1)
    dims = _dims(x)
    count = m.sum(dims, keepdim=True)
    mean = torch.where(m, x, 0).sum(dims, keepdim=True) / count
    var = torch.where(m, (x - mean).square(), 0).sum(dims, keepdim=True) / count
    _update(rm, rv, mean, var * count / (count - 1))
    invstd = torch.rsqrt(var + EPS)
    w, b = _per_channel(w, x), _per_channel(b, x)
    real = (x - mean) * invstd * w + b
    padded = (x - mean.detach()) * invstd.detach() * w.detach() + b.detach()
    return torch.where(m, real, padded)


def compose_groups(
    x: Tensor, w: Tensor, b: Tensor, rm: Tensor, rv: Tensor, groups: Tensor
) -> Tensor:
    """Statistics per bag of samples (``groups``: a bag id per sample), with segment sums."""
    keys, ids = torch.unique(groups, return_inverse=True)
    num, c = keys.numel(), x.shape[1]
    spatial = tuple(range(2, x.dim()))
    per_sample = x.sum(spatial) if spatial else x  # (N, C)
    samples = x.new_zeros(num, 1).index_add(0, ids, x.new_ones(x.shape[0], 1))
    count = samples * (x.numel() // (x.shape[0] * c))  # elements per channel in each bag
    mean = x.new_zeros(num, c).index_add(0, ids, per_sample) / count
    centred = x - mean[ids].reshape(x.shape[:2] + (1,) * len(spatial))
    sq = centred.square()
    var = x.new_zeros(num, c).index_add(0, ids, sq.sum(spatial) if spatial else sq) / count
    _update(rm, rv, mean.mean(0), (var * count / (count - 1)).mean(0))
    invstd = torch.rsqrt(var + EPS)[ids].reshape(centred.shape[:2] + (1,) * len(spatial))
    return centred * invstd * _per_channel(w, x) + _per_channel(b, x)


def compose_ghost(
    x: Tensor, w: Tensor, b: Tensor, rm: Tensor, rv: Tensor, virtual_batch_size: int
) -> Tensor:
    """Ghost batch norm: statistics per chunk of ``virtual_batch_size`` consecutive samples, by a reshape
    into ``(chunks, virtual_batch_size, C, *spatial)`` (``N`` a multiple of ``virtual_batch_size``)."""
    chunks = x.shape[0] // virtual_batch_size
    xs = x.reshape(chunks, x.shape[0] // chunks, *x.shape[1:])
    dims = (1, *range(3, xs.dim()))
    var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
    n = xs.numel() // (chunks * x.shape[1])
    _update(rm, rv, mean.flatten(1).mean(0), (var * (n / (n - 1))).flatten(1).mean(0))
    y = ((xs - mean) / torch.sqrt(var + EPS)).reshape(x.shape)
    return y * _per_channel(w, x) + _per_channel(b, x)


def compose_stats_input(
    x: Tensor, w: Tensor, b: Tensor, rm: Tensor, rv: Tensor, stats_input: Tensor
) -> Tensor:
    """Normalize ``x`` with the statistics of another tensor (e.g. the activations before dropout)."""
    var, mean = torch.var_mean(stats_input, _dims(x), correction=0, keepdim=True)
    n = x.numel() // x.shape[1]
    _update(rm, rv, mean, var * (n / (n - 1)))
    return (x - mean) / torch.sqrt(var + EPS) * _per_channel(w, x) + _per_channel(b, x)


def compose_renorm(
    x: Tensor, w: Tensor, b: Tensor, rm: Tensor, rv: Tensor, rmax: float = 3.0, dmax: float = 5.0
) -> Tensor:
    """Batch renormalization (Ioffe 2017): the batch statistics corrected towards the running ones (before
    this step's update) by ``r`` and ``d``, which carry no gradient."""
    var, mean = torch.var_mean(x, _dims(x), correction=0, keepdim=True)
    r, d = _renorm_corrections(mean, var, _per_channel(rm, x), _per_channel(rv, x), EPS, rmax, dmax)
    n = x.numel() // x.shape[1]
    _update(rm, rv, mean, var * (n / (n - 1)))
    y = (x - mean) / torch.sqrt(var + EPS) * r + d
    return y * _per_channel(w, x) + _per_channel(b, x)


# ``r`` and ``d`` from the running statistics before the update (flexbn.spec's formula), outside any
# compiled graph: inside one, AOTAutograd recomputes them in the backward from the buffers *after* the
# in-place update, which gives wrong gradients (pytorch/pytorch#197039; flexbn reads the buffers through an
# opaque op).
_renorm_corrections = torch.compiler.disable(spec.renorm_corrections)


def compose_eval(x: Tensor, w: Tensor, b: Tensor, rm: Tensor, rv: Tensor) -> Tensor:
    """Eval mode (every variant): normalize with the running statistics."""
    invstd = torch.rsqrt(_per_channel(rv, x) + EPS)
    return (x - _per_channel(rm, x)) * invstd * _per_channel(w, x) + _per_channel(b, x)


# ------------------------------------------------------------------------------------------ variants


@dataclass(frozen=True)
class _Variant:
    """A variant: flexbn's options for it, and its hand composition. ``extra`` names the keyword of
    ``flexbn.batch_norm`` that takes the variant's extra input, which is also the composition's last
    argument."""

    description: str
    composition: Callable[..., Tensor]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: str | None = None


VARIANTS: dict[str, _Variant] = {
    "standard": _Variant("batch statistics, gradient through both", compose_standard),
    "detach_mean": _Variant(
        "no gradient through the batch mean",
        functools.partial(compose_standard, detach_mean=True),
        {"detach_mean": True},
    ),
    "detach_var": _Variant(
        "no gradient through the batch variance",
        functools.partial(compose_standard, detach_var=True),
        {"detach_var": True},
    ),
    "detach_both": _Variant(
        "statistics are constants",
        functools.partial(compose_standard, detach_mean=True, detach_var=True),
        {"detach_mean": True, "detach_var": True},
    ),
    "mask": _Variant("statistics over a random 90% of the positions", compose_mask, extra="mask"),
    "groups": _Variant(
        "statistics per bag: 8 bags of N // 8 samples (N // 2 bags if N < 16), random ids",
        compose_groups,
        extra="groups",
    ),
    "ghost": _Variant(
        "ghost batch norm: 4 chunks, virtual_batch_size=N // 4",
        compose_ghost,
        extra="virtual_batch_size",
    ),
    "stats_input": _Variant(
        "statistics from another tensor (gradient to both)",
        compose_stats_input,
        extra="stats_input",
    ),
    "renorm": _Variant(
        "batch renormalization, rmax=3, dmax=5 (the modules' renorm=True)",
        compose_renorm,
        {"renorm": True},
    ),
}
"""The variants, by name."""

COMPOSITIONS: dict[str, Callable[..., Tensor]] = {k: v.composition for k, v in VARIANTS.items()}
"""The hand composition of each variant, called ``(x, weight, bias, running_mean, running_var)`` and, for
the variants with an extra input, that input (``mask``, ``groups``, ``virtual_batch_size``,
``stats_input``: what ``flexbn.batch_norm`` takes); :func:`compose_eval` is every variant's eval mode."""


def _check_variant(name: str, shape: Shape) -> None:
    n = shape.size[0]
    if name == "ghost" and (n % GHOST_CHUNKS or n < 2 * GHOST_CHUNKS):
        raise ValueError(
            f"variant 'ghost' needs a batch size N divisible by {GHOST_CHUNKS} and >= "
            f"{2 * GHOST_CHUNKS} ({GHOST_CHUNKS} ghost batches), but shape {shape.name} has N={n} "
            "(leave 'ghost' out of the variants)"
        )
    if name == "groups" and n < 4:
        raise ValueError(
            f"variant 'groups' needs N >= 4 (2 bags of 2), but shape {shape.name} has N={n}"
        )


# ------------------------------------------------------------------------------------------------ rows


@dataclass(frozen=True)
class Row:
    """One measurement: a candidate's metric for one (shape, layout, variant, pass).

    ``metric`` is ``"time"`` (``unit="ms"``, the pass's duration, on ``clock``), ``"first_call"`` (ms of
    the first call, compilation included; pass ``fwd+bwd`` or ``eval``), ``"saved"`` (bytes saved for
    backward by the training forward; pass ``forward``) or ``"peak"`` (peak bytes allocated during a
    forward+backward, pass ``fwd+bwd``, or an eval call, pass ``eval``, above those allocated before).
    ``median``, ``q1`` and ``q3`` are over ``samples`` repeats (one sample: all three equal). ``ratio_X``
    is ``median`` divided by the median of candidate X for the same shape, layout, variant, pass, metric
    (and backend, for flexbn's standard path); ``None`` when X was not measured. ``input_bytes`` counts the
    tensors the variant takes as input (``x``, and ``mask``, ``groups`` or ``stats_input``). ``run``
    numbers the process that measured the row (``flexbn bench --runs N``: 0 to N - 1). Rows combined over
    runs (:func:`combine`) hold the median over the runs in ``median`` and every ratio, the lowest and
    highest run's median in ``q1`` and ``q3``, and the lowest and highest ``ratio_native`` in
    ``ratio_native_lo`` and ``ratio_native_hi``; ``runs`` says how many.

    Model rows (:func:`run_models`): ``variant`` is the model's name, ``pass_`` ``"step"`` (a training
    step: forward, loss, backward, optimizer step) or ``"inference"``, ``candidate`` ``"native"`` (torch's
    ``BatchNorm2d``) or ``"flexbn"`` (converted), ``shape`` the input's.
    """

    shape: str
    layout: str
    variant: str
    pass_: str
    metric: str
    candidate: str
    backend: str
    unit: str
    median: float
    q1: float
    q3: float
    samples: int
    input_bytes: int
    ratio_native: float | None
    ratio_standard: float | None
    ratio_composition: float | None
    ratio_compiled: float | None
    device: str
    dtype: str
    threads: int
    load: float
    torch: str
    flexbn: str
    python: str
    clock: str = "wall"
    run: int = 0
    runs: int = 1
    ratio_native_lo: float | None = None
    ratio_native_hi: float | None = None

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict[str, Any]:
        """The row as a flat dict (``pass_`` written ``pass``)."""
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        return d


_FIELDS = [("pass" if f.name == "pass_" else f.name) for f in dataclasses.fields(Row)]


@contextlib.contextmanager
def _output(path: str | os.PathLike[str], newline: str | None = None) -> Iterator[Any]:
    """The file at ``path`` opened for writing, or standard output for ``"-"``."""
    if str(path) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(path, "w", encoding="utf-8", newline=newline) as f:
        yield f


def write_json(rows: Sequence[Row], path: str | os.PathLike[str]) -> None:
    """Write ``rows`` as a JSON list of flat objects (:meth:`Row.as_dict`); ``"-"``: standard output.

    >>> import json, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.json"
    >>> write_json([], path); json.loads(path.read_text())
    []
    """
    with _output(path) as f:
        json.dump([r.as_dict() for r in rows], f, indent=1)
        f.write("\n")


def read_json(path: str | os.PathLike[str]) -> list[Row]:
    """The rows :func:`write_json` wrote.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.json"
    >>> write_json([], path); read_json(path)
    []
    """
    with open(path, encoding="utf-8") as f:
        return [
            Row(**{("pass_" if k == "pass" else k): v for k, v in d.items()}) for d in json.load(f)
        ]


def write_csv(rows: Sequence[Row], path: str | os.PathLike[str]) -> None:
    """Write ``rows`` as CSV with a header line (empty cells for ``None``); ``"-"``: standard output.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.csv"
    >>> write_csv([], path); path.read_text().split(",")[:4]
    ['shape', 'layout', 'variant', 'pass']
    """
    with _output(path, newline="") as f:
        out = csv.DictWriter(f, fieldnames=_FIELDS)
        out.writeheader()
        for r in rows:
            out.writerow(r.as_dict())


def combine(rows: Sequence[Row]) -> list[Row]:
    """One row per measurement over process runs (the rows of several ``run`` numbers): the median over
    the runs of each run's median and ratios, with the lowest and highest run (see :class:`Row`). Rows
    of one run come back with their ratio range set to their ratio.

    >>> combine([])
    []
    """
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        key = (r.shape, r.layout, r.variant, r.pass_, r.metric, r.candidate, r.backend)
        groups.setdefault(key, []).append(r)
    out = []
    for group in groups.values():

        def mid(attr: str, group: list[Row] = group) -> float | None:
            values = [getattr(r, attr) for r in group if getattr(r, attr) is not None]
            return statistics.median(values) if values else None

        medians = [r.median for r in group]
        natives = [r.ratio_native for r in group if r.ratio_native is not None]
        out.append(
            dataclasses.replace(
                group[0],
                median=statistics.median(medians),
                q1=min(medians) if len(group) > 1 else group[0].q1,
                q3=max(medians) if len(group) > 1 else group[0].q3,
                samples=sum(r.samples for r in group),
                ratio_native=mid("ratio_native"),
                ratio_standard=mid("ratio_standard"),
                ratio_composition=mid("ratio_composition"),
                ratio_compiled=mid("ratio_compiled"),
                load=max(r.load for r in group),
                runs=len(group),
                ratio_native_lo=min(natives) if natives else None,
                ratio_native_hi=max(natives) if natives else None,
            )
        )
    return out


# ------------------------------------------------------------------------------------------ the run


@dataclass
class _Candidate:
    name: str
    backend: str  # flexbn's backend for flexbn's candidates, "" for the others
    train: Callable[[], Tensor]  # a training forward
    eval: Callable[[], Tensor]
    wrt: tuple[Tensor, ...]  # what the gradients are taken with respect to
    setup: Callable[[], None] = lambda: None  # before each timed chunk: selects flexbn's backend


@dataclass(frozen=True)
class _Config:
    passes: tuple[str, ...]
    repeat: int
    compile: bool
    device: torch.device
    dtype: torch.dtype
    backends: tuple[tuple[str, Callable[[], None]], ...]
    sample_ms: float
    seed: int
    env: dict[str, Any]
    clock: Callable[[], float] = time.perf_counter

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _kernel_build() -> str:
    """How this process got flexbn's C++ kernels (the ``cpp`` backend's one-time cost), if it used them."""
    try:
        from flexbn._core import kernels
    except ImportError:  # a flexbn without the cpp backend
        return ""
    info = kernels.build_info()
    if not info:
        return ""
    how = {"shipped": "shipped with flexbn", "cached": "loaded from the cache"}.get(
        info["origin"], f"built in {info['seconds']:.1f} s"
    )
    return f"cpp kernels: {how} ({info['path']})"


def _keep_freed_memory() -> bool:
    """Ask glibc to serve blocks of up to 32 MiB from the heap and not to return freed memory to the
    system; False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(
            libc.mallopt(m_trim_threshold, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False


def _environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "flexbn": flexbn.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return float("nan")


def _backends(backends: Sequence[str] | None) -> tuple[tuple[str, Callable[[], None]], ...]:
    """(name, select) per flexbn backend to run: the current one, or each of ``backends``."""
    if backends is None:
        get = getattr(flexbn, "get_backend", None)
        return ((str(get()) if callable(get) else "reference", lambda: None),)
    set_backend = getattr(flexbn, "set_backend", None)
    if set_backend is None:
        raise ValueError(
            f"backends={list(backends)!r} needs flexbn.set_backend, which this flexbn "
            f"({flexbn.__version__}) does not have; pass backends=None"
        )
    for b in backends:
        set_backend(b)  # raises for an unknown or unavailable backend, before anything runs
    return tuple((str(b), functools.partial(set_backend, b)) for b in backends)


def _saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the unique storages a training forward keeps for backward: those passed to the
    saved-tensor hooks, and tensors held as attributes of custom autograd nodes (``ctx.attr = t``), which
    bypass the hooks."""
    seen: dict[tuple[str, int], int] = {}

    def add(t: Any, depth: int = 0) -> Any:
        if isinstance(t, Tensor):
            st = t.untyped_storage()
            if st.nbytes():
                seen[(str(t.device), st.data_ptr())] = st.nbytes()
        elif isinstance(t, (tuple, list)) and depth < 3:  # e.g. flexbn's segments
            for item in t:
                add(item, depth + 1)
        return t

    with torch.autograd.graph.saved_tensors_hooks(add, lambda t: t):
        y = fn()
    stack, visited = [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            add(value)
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(seen.values())


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """The most bytes allocated at once while ``fn`` runs (its results freed when it returns), above those
    allocated before: on CUDA from the allocator's statistics, on the CPU from the allocation and free
    events of torch's profiler (``None`` where the profiler does not give them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto logs its start and stop on the file descriptor
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    try:
        events = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
            if e.name() == "[memory]"
        ]
    except AttributeError:  # another torch's profiler: no peak rather than a wrong one
        return None
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null (what C++ code prints there), restored after."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, Tensor) else 0


def _inputs(shape: Shape, variant: str, cfg: _Config) -> dict[str, Any]:
    """The block's tensors, from a generator of its own (the global random state is left alone)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    c = shape.size[1]

    def make(size: tuple[int, ...], kind: str = "randn") -> Tensor:
        t = torch.randn(size, generator=gen) if kind == "randn" else torch.rand(size, generator=gen)
        return t.to(cfg.device, cfg.dtype)

    x = make(shape.size)
    if shape.channels_last:
        fmt = torch.channels_last if len(shape.size) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    n = shape.size[0]
    extras: tuple[Any, ...] = ()
    if variant == "mask":
        extras = (make((n, *shape.size[2:]), "rand") < 0.9,)
    elif variant == "groups":
        extras = ((torch.randperm(n, generator=gen) % min(8, n // 2)).to(cfg.device),)
    elif variant == "ghost":
        extras = (n // GHOST_CHUNKS,)
    elif variant == "stats_input":
        extras = (torch.empty_like(x).copy_(make(shape.size)).requires_grad_(),)
    return {
        "x": x.requires_grad_(),
        "w": (make((c,), "rand") + 0.5).requires_grad_(),
        "b": make((c,)).requires_grad_(),
        "rm": make((c,)) * 0.1,
        "rv": make((c,), "rand") + 0.5,
        "dy": torch.empty_like(x).copy_(make(shape.size)),
        "extras": extras,
    }


def _candidates(variant: str, t: dict[str, Any], cfg: _Config) -> list[_Candidate]:
    """native, flexbn's standard path and the variant (per backend), the composition, compiled."""
    x, w, b, extras = t["x"], t["w"], t["b"], t["extras"]
    spec = VARIANTS[variant]
    options = dict(spec.options, **({spec.extra: extras[0]} if spec.extra else {}))
    wrt = (x, w, b)
    wrt_variant = wrt + tuple(e for e in extras if isinstance(e, Tensor) and e.requires_grad)

    def make(name: str, train: Callable, evaluate: Callable, grads: tuple, backend="", setup=None):
        rm, rv = t["rm"].clone(), t["rv"].clone()  # each candidate updates buffers of its own
        return _Candidate(
            name,
            backend,
            lambda: train(x, w, b, rm, rv),
            lambda: evaluate(x, w, b, rm, rv),
            grads,
            setup or (lambda: None),
        )

    def native(x, w, b, rm, rv, training=True):
        return F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)

    def flex(opts: dict[str, Any], training: bool) -> Callable[..., Tensor]:
        return lambda x, w, b, rm, rv: flexbn.batch_norm(
            x, rm, rv, w, b, training, MOMENTUM, EPS, **opts
        )

    out = [make("native", native, functools.partial(native, training=False), wrt)]
    for backend, setup in cfg.backends:
        if variant != "standard":
            out.append(
                make("flexbn-standard", flex({}, True), flex({}, False), wrt, backend, setup)
            )
        out.append(
            make("flexbn", flex(options, True), flex(options, False), wrt_variant, backend, setup)
        )
    compositions = [("composition", spec.composition, compose_eval)]
    if cfg.compile:
        train, evaluate = (
            torch.compile(_fresh(f), dynamic=False) for f in (spec.composition, compose_eval)
        )
        compositions.append(("compiled", train, evaluate))
    for name, train, evaluate in compositions:
        out.append(make(name, lambda *a, f=train: f(*a, *extras), evaluate, wrt_variant))
    return out


def _fresh(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` with a code object of its own, hence Dynamo caches of its own: each (shape, variant) compiles
    its composition from scratch (a true first call, no recompile limit reached) without
    ``torch._dynamo.reset()``, which would also drop what flexbn itself compiled."""
    if isinstance(fn, functools.partial):
        return functools.partial(_fresh(fn.func), *fn.args, **fn.keywords)
    new = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def _sampler(cand: _Candidate, pass_: str, dy: Tensor, cfg: _Config) -> Callable[[int], float]:
    """A function timing ``inner`` calls of the pass: milliseconds per call."""
    if pass_ == "backward":

        def backward(inner: int) -> float:
            ys = [cand.train() for _ in range(inner)]  # forwards outside the timed region
            cfg.sync()
            start = cfg.clock()
            for y in ys:
                torch.autograd.grad(y, cand.wrt, dy)
            cfg.sync()
            return (cfg.clock() - start) * 1e3 / inner

        return backward

    def step() -> object:
        if pass_ == "forward":
            return cand.train()
        if pass_ == "fwd+bwd":
            return torch.autograd.grad(cand.train(), cand.wrt, dy)
        with torch.no_grad():
            return cand.eval()

    def timed(inner: int) -> float:
        cfg.sync()
        start = cfg.clock()
        for _ in range(inner):
            step()
        cfg.sync()
        return (cfg.clock() - start) * 1e3 / inner

    return timed


def _agree(name: str, got: Sequence[Tensor], want: Sequence[Tensor], what: str) -> None:
    tol = {torch.float64: 1e-9, torch.float32: 1e-3}.get(want[0].dtype, 5e-2)
    for i, (g, r) in enumerate(zip(got, want, strict=True)):
        err = (g.double() - r.double()).abs().max().item() / max(r.double().abs().max().item(), 1.0)
        if not err <= tol:  # also NaN
            raise RuntimeError(
                f"{name} differs from its reference ({what}, tensor {i}): relative error {err:.2e} > "
                f"{tol:g}; the benchmark would compare different computations"
            )


def _first_calls(cands: list[_Candidate], dy: Tensor, cfg: _Config) -> dict[tuple, float]:
    """Time each candidate's first training forward+backward (and eval call), and check it computes what
    its reference computes: the eager composition for the variant's candidates, torch native for flexbn's
    standard path -- outputs, gradients, and the eval output after one update of the running
    statistics."""
    first: dict[tuple, float] = {}
    results: dict[tuple[str, str], tuple[Tensor, ...]] = {}
    for cand in cands:
        cand.setup()
        cfg.sync()
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # Dynamo reads .grad of non-leaf tensors passed across a graph break (renorm, groups)
                warnings.filterwarnings("ignore", _NON_LEAF_GRAD, UserWarning)
                y = cand.train()
                grads = torch.autograd.grad(y, cand.wrt, dy)
            cfg.sync()
        except Exception as e:
            if cand.name != "compiled":
                raise
            raise RuntimeError(
                f"torch.compile of the composition failed ({type(e).__name__}: {e}); run without "
                "compiling it (compile_composition=False, flexbn bench --no-compile)"
            ) from e
        first[(cand.name, cand.backend, "fwd+bwd")] = (time.perf_counter() - start) * 1e3
        results[(cand.name, cand.backend)] = (y.detach(), *grads)
        if "eval" in cfg.passes:
            start = time.perf_counter()
            with torch.no_grad():
                ye = cand.eval()
            cfg.sync()
            first[(cand.name, cand.backend, "eval")] = (time.perf_counter() - start) * 1e3
            results[(cand.name, cand.backend)] += (ye,)
    for cand in cands:
        ref = "native" if cand.name == "flexbn-standard" else "composition"
        if cand.name not in ("native", "composition"):
            what = "outputs and gradients" + (", eval output" if "eval" in cfg.passes else "")
            got = results[(cand.name, cand.backend)]
            _agree(f"{cand.name} ({cand.backend or 'torch'})", got, results[(ref, "")], what)
    return first


def _measure(
    cands: list[_Candidate], dy: Tensor, cfg: _Config
) -> dict[tuple[str, str, str], list[float]]:
    """Interleaved samples per (candidate, backend, pass): warm up, size each candidate's samples to
    about ``sample_ms``, then one sample per candidate per repeat in a rotating order."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    for pass_ in cfg.passes:
        timers = [_sampler(cand, pass_, dy, cfg) for cand in cands]
        setups = [cand.setup for cand in cands]
        for cand, s in zip(cands, _interleave(timers, setups, cfg), strict=True):
            samples[(cand.name, cand.backend, pass_)] = s
    return samples


def _interleave(
    timers: Sequence[Callable[[int], float]],
    setups: Sequence[Callable[[], None]],
    cfg: _Config,
) -> list[list[float]]:
    """Samples of each timer (called with a number of calls, returning ms per call), interleaved: after
    warm-up calls each timer's samples are sized to about ``cfg.sample_ms``, then every repeat takes one
    sample of each, in an order rotated from repeat to repeat."""
    inner = []
    for timer, setup in zip(timers, setups, strict=True):
        setup()
        warm = min(timer(1) for _ in range(_WARMUP))
        inner.append(max(1, math.ceil(cfg.sample_ms / max(warm, 1e-3))))
    samples: list[list[float]] = [[] for _ in timers]
    for r in range(cfg.repeat):
        for i in range(len(timers)):
            k = (i + r) % len(timers)
            setups[k]()
            samples[k].append(timers[k](inner[k]))
    return samples


@contextlib.contextmanager
def _cold_compile(enabled: bool) -> Iterator[None]:
    """Disable Inductor's and AOTAutograd's on-disk caches, so first calls measure a cold compile."""
    with contextlib.ExitStack() as stack:
        if enabled:
            import torch._functorch.config as functorch_config
            import torch._inductor.config as inductor_config

            if hasattr(inductor_config, "fx_graph_cache"):
                stack.enter_context(inductor_config.patch(fx_graph_cache=False))
            if hasattr(functorch_config, "enable_autograd_cache"):
                stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        yield


def run(
    shapes: Sequence[Shape | str] | None = None,
    variants: Sequence[str] | None = None,
    passes: Sequence[str] = PASSES,
    repeat: int | None = None,
    quick: bool = False,
    compile_composition: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    backends: Sequence[str] | None = None,
    sample_ms: float | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    keep_freed_memory: bool = False,
    clock: str = "wall",
) -> list[Row]:
    """Benchmark every variant against torch native, flexbn's standard path and the variant's hand
    composition (eager and compiled); return the rows (the module notes give the method).

    Args:
        shapes: :class:`Shape` objects or strings for :meth:`Shape.parse`; default :data:`SHAPES`
            (:data:`QUICK_SHAPES` with ``quick``).
        variants: names from :data:`VARIANTS` (default: all).
        passes: a subset of :data:`PASSES`.
        repeat: interleaved samples per candidate and pass (default 7; 3 with ``quick``).
        quick: small shapes, 3 repeats, samples of ~1 ms, no compilation: a smoke run.
        compile_composition: also time the composition under ``torch.compile`` (off with ``quick``),
            compiled afresh for every (shape, variant).
        device, dtype: where and in what the inputs, parameters and buffers are created.
        backends: flexbn backends to run flexbn's candidates with, each inside every repeat (needs
            ``flexbn.set_backend``); default: the current one only.
        sample_ms: duration of one timing sample (default 20 ms; 1 ms with ``quick``).
        seed: random seed of the inputs (a generator of the run's own).
        progress: called with one line per (shape, variant) as it starts.
        keep_freed_memory: ask glibc to keep freed blocks of up to 32 MiB in the process, for the rest
            of the process (the module notes say when that helps); default: the allocator as it is.
        clock: ``"wall"`` or ``"cpu"`` (the process's CPU time; see the module notes).

    Every candidate's first call is checked against its reference (``RuntimeError`` if they differ).

    Example:
        >>> rows = run(["16x4"], variants=["detach_var"], passes=["fwd+bwd"], quick=True)
        >>> flex = next(r for r in rows if r.candidate == "flexbn" and r.metric == "time")
        >>> native = next(r for r in rows if r.candidate == "native" and r.metric == "time")
        >>> flex.variant, flex.pass_, flex.unit, flex.ratio_native == flex.median / native.median
        ('detach_var', 'fwd+bwd', 'ms', True)
    """
    shape_list = [_as_shape(s) for s in (shapes or (QUICK_SHAPES if quick else SHAPES))]
    variant_list = list(VARIANTS) if variants is None else list(variants)
    for v in variant_list:
        if v not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, but got {v!r}")
    if not passes or any(p not in PASSES for p in passes):
        raise ValueError(f"passes must be a non-empty subset of {list(PASSES)}, but got {passes!r}")
    repeat = _REPEAT[quick] if repeat is None else repeat
    if not _is_int(repeat) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, but got {repeat!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, but got {dtype!r}")
    if clock not in _CLOCKS:
        raise ValueError(f"clock must be one of {list(_CLOCKS)}, but got {clock!r}")
    for shape in shape_list:
        for v in variant_list:
            _check_variant(v, shape)
    device = torch.device(device)
    if keep_freed_memory:
        _keep_freed_memory()
    get_backend = getattr(flexbn, "get_backend", None)
    previous = get_backend() if backends is not None and callable(get_backend) else None
    rows: list[Row] = []
    try:
        cfg = _Config(
            passes=tuple(passes),
            repeat=repeat,
            compile=compile_composition and not quick,
            device=device,
            dtype=dtype,
            backends=_backends(backends),
            sample_ms=_SAMPLE_MS[quick] if sample_ms is None else float(sample_ms),
            seed=seed,
            env={**_environment(device), "clock": clock},
            clock=_CLOCKS[clock],
        )
        with _cold_compile(cfg.compile):
            for shape in shape_list:
                for variant in variant_list:
                    if progress is not None:
                        progress(f"{shape.name} {shape.layout} {variant}")
                    rows += _block(shape, variant, cfg)
    finally:
        if previous is not None:
            flexbn.set_backend(previous)  # type: ignore[attr-defined]
    return rows


def _as_shape(s: Shape | str) -> Shape:
    if isinstance(s, Shape):
        return s
    if isinstance(s, str):
        return Shape.parse(s)
    raise TypeError(f"shapes must hold Shape objects or strings like '32x64x56x56', not {s!r}")


def _block(shape: Shape, variant: str, cfg: _Config) -> list[Row]:
    """All the rows of one (shape, variant)."""
    load = _load()
    t = _inputs(shape, variant, cfg)
    cands = _candidates(variant, t, cfg)
    input_bytes = _nbytes(t["x"]) + sum(_nbytes(e) for e in t["extras"])

    values: dict[tuple[str, str, str, str], list[float]] = {}  # (metric, pass, candidate, backend)
    for (name, backend, pass_), ms in _first_calls(cands, t["dy"], cfg).items():
        values[("first_call", pass_, name, backend)] = [ms]
    for cand in cands:
        cand.setup()
        values[("saved", "forward", cand.name, cand.backend)] = [float(_saved_bytes(cand.train))]
        for pass_, fn in _peak_passes(cand, t["dy"], cfg):
            peak = _peak_bytes(fn, cfg.device)
            if peak is not None:
                values[("peak", pass_, cand.name, cand.backend)] = [float(peak)]
    for (name, backend, pass_), s in _measure(cands, t["dy"], cfg).items():
        values[("time", pass_, name, backend)] = s

    medians = {k: statistics.median(s) for k, s in values.items()}

    def ratio(key: tuple[str, str, str, str], column: str) -> float | None:
        metric, pass_, _, backend = key
        ref = _REFERENCES[column]
        if ref == "flexbn-standard" and variant == "standard":
            ref = "flexbn"
        if ref.startswith("flexbn"):  # the same backend's; for the other candidates the first's
            base = medians.get((metric, pass_, ref, backend or cfg.backends[0][0]))
        else:
            base = medians.get((metric, pass_, ref, ""))
        return medians[key] / base if base else None

    rows = []
    for key, s in values.items():
        metric, pass_, name, backend = key
        q1, q3 = (s[0], s[0]) if len(s) == 1 else _quartiles(s)
        rows.append(
            Row(
                shape=shape.name,
                layout=shape.layout,
                variant=variant,
                pass_=pass_,
                metric=metric,
                candidate=name,
                backend=backend,
                unit="ms" if metric in ("time", "first_call") else "bytes",
                median=medians[key],
                q1=q1,
                q3=q3,
                samples=len(s),
                input_bytes=input_bytes,
                ratio_native=ratio(key, "native"),
                ratio_standard=ratio(key, "standard"),
                ratio_composition=ratio(key, "composition"),
                ratio_compiled=ratio(key, "compiled"),
                dtype=str(cfg.dtype).removeprefix("torch."),
                load=load,
                **cfg.env,
            )
        )
    return rows


def _peak_passes(
    cand: _Candidate, dy: Tensor, cfg: _Config
) -> list[tuple[str, Callable[[], object]]]:
    """The calls whose peak memory is measured: a training forward+backward, and an eval call."""

    def train() -> None:
        torch.autograd.grad(cand.train(), cand.wrt, dy)

    def evaluate() -> None:
        with torch.no_grad():
            cand.eval()

    calls = [("fwd+bwd", train)]
    return [*calls, ("eval", evaluate)] if "eval" in cfg.passes else calls


def _quartiles(samples: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q3


# ------------------------------------------------------------------------------------------- models


class BasicBlock(torch.nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convolutions with batch norm, in-place ReLU, and the shortcut
    added in place (``out += identity``)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: torch.nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def resnet(
    widths: Sequence[int] = (16, 32, 64), blocks: int = 2, classes: int = 10
) -> torch.nn.Module:
    """A ResNet of :class:`BasicBlock` stages (the CIFAR ResNets of He et al.: a 3x3 stem, stages of
    ``widths`` channels, each after the first halving the resolution, global pooling, a linear layer),
    with torch's ``BatchNorm2d``. The default has 15 batch-norm layers.

    >>> model = resnet()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    15
    """
    nn = torch.nn
    layers: list[torch.nn.Module] = [
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    inplanes = widths[0]
    for i, planes in enumerate(widths):
        for j in range(blocks):
            layers.append(BasicBlock(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
            inplanes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, classes)]
    return nn.Sequential(*layers)


MODEL_SHAPES = (
    Shape((16, 3, 64, 64)),
    Shape((16, 3, 64, 64), channels_last=True),
    Shape((16, 3, 32, 32)),
    Shape((16, 3, 32, 32), channels_last=True),
)
"""The inputs of :func:`run_models`: batch 16 at 64x64 and 32x32, NCHW and channels_last."""
MODEL_PASSES = ("step", "inference")


@dataclass
class _Model:
    name: str  # "native" or "flexbn"
    backend: str
    model: torch.nn.Module
    step: Callable[[], Tensor]  # one training step; returns the loss
    infer: Callable[[], Tensor]
    setup: Callable[[], None]


def _models(shape: Shape, cfg: _Config) -> tuple[list[_Model], Tensor]:
    """The torch model and, per flexbn backend, the same model converted by ``flexbn.convert`` (same
    initial weights), each with an SGD optimizer of its own; and the input."""
    import copy

    gen = torch.Generator().manual_seed(cfg.seed)
    torch_rng = torch.get_rng_state()
    torch.manual_seed(cfg.seed)  # the model's initial weights
    try:
        base = resnet().to(cfg.device, cfg.dtype)
    finally:
        torch.set_rng_state(torch_rng)
    fmt = torch.channels_last if shape.channels_last else torch.contiguous_format
    base = base.to(memory_format=fmt)
    x = (
        torch.randn(shape.size, generator=gen)
        .to(cfg.device, cfg.dtype)
        .contiguous(memory_format=fmt)
    )
    labels = torch.randint(0, 10, (shape.size[0],), generator=gen).to(cfg.device)

    def make(name: str, model: torch.nn.Module, backend: str, setup: Callable[[], None]) -> _Model:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> Tensor:
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            return loss.detach()

        def infer() -> Tensor:
            model.eval()
            with torch.no_grad():
                return model(x)

        return _Model(name, backend, model, step, infer, setup)

    out = [make("native", base, "", lambda: None)]
    for backend, setup in cfg.backends:
        out.append(make("flexbn", flexbn.convert(copy.deepcopy(base)), backend, setup))
    return out, x


def _check_models(models: list[_Model], x: Tensor) -> None:
    """The converted models compute what torch's does: training-mode output and every parameter's
    gradient on one batch, compared in float64 on copies (in float32 a deep network's rounding differs by
    more than any tolerance that would still catch a wrong computation); ``RuntimeError`` if not."""
    import copy

    results = []
    for m in models:
        m.setup()
        model = copy.deepcopy(m.model).double().train()
        y = model(x.double())
        grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
        results.append((y.detach(), *grads))
    for m, got in zip(models[1:], results[1:], strict=True):
        _agree(f"model {m.name} ({m.backend})", got, results[0], "output and gradients")


def run_models(
    shapes: Sequence[Shape | str] | None = None,
    passes: Sequence[str] = MODEL_PASSES,
    repeat: int = 7,
    *,
    backends: Sequence[str] | None = None,
    sample_ms: float = 200.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    clock: str = "wall",
    keep_freed_memory: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """A ResNet (:func:`resnet`) with torch's ``BatchNorm2d`` against the same model converted by
    ``flexbn.convert``, side by side: training steps (forward, cross-entropy loss, backward, SGD step with
    momentum) and inference (eval mode, no gradients), interleaved as in :func:`run`, after checking that
    both compute the same output and gradients. Rows as :class:`Row` (``variant="resnet"``, passes
    ``"step"`` and ``"inference"``, metrics ``time`` and ``peak``; ``ratio_native`` against torch's
    model).

    >>> rows = run_models(["2x3x16x16"], passes=["inference"], repeat=1, sample_ms=1.0)
    >>> sorted({(r.candidate, r.metric) for r in rows})
    [('flexbn', 'peak'), ('flexbn', 'time'), ('native', 'peak'), ('native', 'time')]
    """
    shape_list = [_as_shape(s) for s in (shapes or MODEL_SHAPES)]
    if not passes or any(p not in MODEL_PASSES for p in passes):
        raise ValueError(
            f"passes must be a non-empty subset of {list(MODEL_PASSES)}, got {passes!r}"
        )
    if not _is_int(repeat) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, but got {repeat!r}")
    if clock not in _CLOCKS:
        raise ValueError(f"clock must be one of {list(_CLOCKS)}, but got {clock!r}")
    for shape in shape_list:
        if len(shape.size) != 4 or shape.size[1] != 3:
            raise ValueError(f"model inputs are (N, 3, H, W) images, but got {shape.name}")
    device = torch.device(device)
    if keep_freed_memory:
        _keep_freed_memory()
    get_backend = getattr(flexbn, "get_backend", None)
    previous = get_backend() if backends is not None and callable(get_backend) else None
    rows: list[Row] = []
    try:
        cfg = _Config(
            passes=tuple(passes),
            repeat=repeat,
            compile=False,
            device=device,
            dtype=dtype,
            backends=_backends(backends),
            sample_ms=float(sample_ms),
            seed=seed,
            env={**_environment(device), "clock": clock},
            clock=_CLOCKS[clock],
        )
        for shape in shape_list:
            if progress is not None:
                progress(f"resnet {shape.name} {shape.layout}")
            rows += _model_block(shape, cfg)
    finally:
        if previous is not None:
            flexbn.set_backend(previous)  # type: ignore[attr-defined]
    return rows


def _model_block(shape: Shape, cfg: _Config) -> list[Row]:
    load = _load()
    models, x = _models(shape, cfg)
    _check_models(models, x)
    values: dict[tuple[str, str, str, str], list[float]] = {}
    for m in models:
        m.setup()
        for pass_ in cfg.passes:
            call = m.step if pass_ == "step" else m.infer
            peak = _peak_bytes(call, cfg.device)
            if peak is not None:
                values[("peak", pass_, m.name, m.backend)] = [float(peak)]
    for pass_ in cfg.passes:

        def timer(m: _Model, pass_: str = pass_) -> Callable[[int], float]:
            call = m.step if pass_ == "step" else m.infer

            def timed(inner: int) -> float:
                cfg.sync()
                start = cfg.clock()
                for _ in range(inner):
                    call()
                cfg.sync()
                return (cfg.clock() - start) * 1e3 / inner

            return timed

        samples = _interleave([timer(m) for m in models], [m.setup for m in models], cfg)
        for m, s in zip(models, samples, strict=True):
            values[("time", pass_, m.name, m.backend)] = s
    medians = {k: statistics.median(v) for k, v in values.items()}
    rows = []
    for (metric, pass_, name, backend), s in values.items():
        native = medians.get((metric, pass_, "native", ""))
        q1, q3 = (s[0], s[0]) if len(s) == 1 else _quartiles(s)
        median = medians[(metric, pass_, name, backend)]
        rows.append(
            Row(
                shape=shape.name,
                layout=shape.layout,
                variant="resnet",
                pass_=pass_,
                metric=metric,
                candidate=name,
                backend=backend,
                unit="ms" if metric == "time" else "bytes",
                median=median,
                q1=q1,
                q3=q3,
                samples=len(s),
                input_bytes=_nbytes(x),
                ratio_native=median / native if native else None,
                ratio_standard=None,
                ratio_composition=None,
                ratio_compiled=None,
                dtype=str(cfg.dtype).removeprefix("torch."),
                load=load,
                **cfg.env,
            )
        )
    return rows


# ----------------------------------------------------------------------------------------- reports


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: Sequence[Row], *, wide: bool = False) -> str:
    """The rows as a readable table: by default :func:`format_compact` (fits 100 columns); ``wide``: every
    pass of flexbn as ratios to every reference side by side (``x native`` etc.: flexbn's median divided
    by that candidate's; below 1 flexbn is faster), then memory saved for backward and first-call cost per
    candidate.

    >>> format_table([], wide=True).split()[:6]
    ['shape', 'layout', 'variant', 'pass', 'backend', 'flexbn']
    """
    if not wide:
        return format_compact(rows)
    head = (
        f"{'shape':<16} {'layout':<13} {'variant':<12} {'pass':<9} {'backend':<10} "
        f"{'flexbn ms':>10} {'IQR ms':>8} {'x native':>9} {'x standard':>11} {'x composition':>14} "
        f"{'x compiled':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.metric == "time" and r.candidate == "flexbn":
            lines.append(
                f"{r.shape:<16} {r.layout:<13} {r.variant:<12} {r.pass_:<9} {r.backend:<10} "
                f"{r.median:>10.3f} {r.iqr:>8.3f} {_fmt(r.ratio_native):>9} "
                f"{_fmt(r.ratio_standard):>11} {_fmt(r.ratio_composition):>14} "
                f"{_fmt(r.ratio_compiled):>11}"
            )
    # memory and first calls: one line per (shape, layout, variant), a column per candidate
    blocks: dict[tuple[str, str, str], dict[tuple[str, str, str], Row]] = {}
    for r in rows:
        if r.metric != "time":
            key = (r.shape, r.layout, r.variant)
            blocks.setdefault(key, {})[(r.metric, r.pass_, _label(r))] = r
    if blocks:
        labels = list(dict.fromkeys(_label(r) for r in rows if r.metric == "saved"))
        lines += [
            "",
            "memory saved for backward, as a multiple of the input's bytes (input MiB); "
            "first call, training forward+backward (ms):",
        ]
        head2 = f"{'shape':<16} {'layout':<13} {'variant':<12} {'input MiB':>9} " + " ".join(
            f"{'saved ' + lab:>{max(len(lab) + 6, 9)}}" for lab in labels
        )
        head2 += " " + " ".join(f"{'1st ' + lab:>{max(len(lab) + 4, 9)}}" for lab in labels)
        lines += [head2, "-" * len(head2)]
        for (shape, layout, variant), cells in blocks.items():
            some = next(iter(cells.values()))
            line = f"{shape:<16} {layout:<13} {variant:<12} {some.input_bytes / 2**20:>9.2f} "
            saved = [cells.get(("saved", "forward", lab)) for lab in labels]
            line += " ".join(
                f"{_fmt(None if s is None else s.median / s.input_bytes):>{max(len(lab) + 6, 9)}}"
                for s, lab in zip(saved, labels, strict=True)
            )
            first = [cells.get(("first_call", "fwd+bwd", lab)) for lab in labels]
            line += " " + " ".join(
                f"{_fmt(None if f is None else f.median, '.1f'):>{max(len(lab) + 4, 9)}}"
                for f, lab in zip(first, labels, strict=True)
            )
            lines.append(line)
    return "\n".join(lines)


COMPACT_WIDTH = 100
_COMPACT_LEGEND = (
    "x native, x std, x eager, x compiled: flexbn's median time over that of torch native, flexbn's\n"
    "standard path, the variant's hand composition in eager torch and under torch.compile (below 1:\n"
    "flexbn is faster); eval x nat: the same in eval mode; spread: half the range of x native over the\n"
    "process runs (--runs), in percent; cl: channels_last. Every pass, first calls, memory per\n"
    "candidate: --wide; every row: --csv PATH or --json PATH ('-': stdout)."
)
_MEMORY_LEGEND = (
    "saved: memory saved for backward over the input's bytes; peak: the most bytes allocated at once\n"
    "during a training forward+backward (eval: an eval call) over torch native's, and torch's in MiB."
)


def _shape_label(r: Row) -> str:
    return r.shape + (" cl" if r.layout == "channels_last" else "")


def _spread(r: Row | None) -> str:
    """Half the range of ``ratio_native`` over the runs, in percent of it (``-`` for one run)."""
    if r is None or r.runs < 2 or r.ratio_native_lo is None or not r.ratio_native:
        return "-"
    half = (r.ratio_native_hi - r.ratio_native_lo) / 2 / r.ratio_native  # type: ignore[operator]
    return f"±{100 * half:.0f}%"


def _cells(rows: Sequence[Row], candidate: str = "flexbn") -> dict[tuple[str, str, str], dict]:
    """``candidate``'s rows by (shape label, variant, backend), then by ``"metric pass"``."""
    cells: dict[tuple[str, str, str], dict[str, Row]] = {}
    for r in rows:
        if r.candidate == candidate:
            cells.setdefault((_shape_label(r), r.variant, r.backend), {})[
                f"{r.metric} {r.pass_}"
            ] = r
    return cells


def _line(head: tuple[str, str, str], columns: list[tuple[str, int]], values: dict) -> str:
    shape, variant, backend = head
    return f"{shape:<15} {variant:<11} {backend:<9} " + " ".join(
        f"{values[name]:>{w}}" for name, w in columns
    )


def _header(columns: list[tuple[str, int]]) -> str:
    return f"{'shape':<15} {'variant':<11} {'backend':<9} " + " ".join(
        f"{name:>{w}}" for name, w in columns
    )


def format_compact(rows: Sequence[Row]) -> str:
    """One line per (shape, layout, variant, flexbn backend): flexbn's training forward+backward time (or
    the first pass measured) and its ratios to every reference, its eval time against native; rows of
    several process runs are combined first (:func:`combine`), with the spread over the runs. Then
    memory: saved for backward and peak against native. At most :data:`COMPACT_WIDTH` columns.

    >>> format_compact([]).splitlines()[1].split()[:4]
    ['shape', 'variant', 'backend', 'ms']
    """
    rows = combine(rows)
    flex = [r for r in rows if r.candidate == "flexbn" and r.pass_ in PASSES]
    measured = {r.pass_ for r in flex if r.metric == "time"}
    main = next((p for p in ("fwd+bwd", "forward", "backward", "eval") if p in measured), "fwd+bwd")
    compiled = any(r.ratio_compiled is not None for r in flex if r.metric == "time")
    runs = any(r.runs > 1 for r in flex)
    columns = [("ms", 9), ("x native", 8), ("x std", 6), ("x eager", 7)]
    columns += [("x compiled", 10)] if compiled else []
    columns += [("eval x nat", 10)] if "eval" in measured and main != "eval" else []
    columns += [("spread", 6)] if runs else []
    head = _header(columns)
    title = f"{main} (training forward+backward)" if main == "fwd+bwd" else main
    lines = [title + (", median of the runs" if runs else ""), head, "-" * len(head)]
    cells = _cells(flex)
    for key, got in cells.items():
        t, e = got.get(f"time {main}"), got.get("time eval")
        values = {
            "ms": _fmt(t and t.median, ".3f"),
            "x native": _fmt(t and t.ratio_native),
            "x std": _fmt(t and t.ratio_standard),
            "x eager": _fmt(t and t.ratio_composition),
            "x compiled": _fmt(t and t.ratio_compiled),
            "eval x nat": _fmt(e and e.ratio_native),
            "spread": _spread(t),
        }
        lines.append(_line(key, columns, values))
    lines += ["", _COMPACT_LEGEND]
    memory = _format_memory(flex, rows)
    return "\n".join(lines + (["", memory] if memory else []))


def _format_memory(flex: list[Row], rows: list[Row]) -> str:
    peaks = {p for r in flex if r.metric == "peak" for p in (r.pass_,)}
    if not peaks and not any(r.metric == "saved" for r in flex):
        return ""
    columns = [("saved", 6), ("peak x nat", 10), ("torch MiB", 9)]
    columns += [("eval peak x nat", 15)] if "eval" in peaks else []
    head = _header(columns)
    lines = ["memory", head, "-" * len(head)]
    native = _cells(rows, "native")
    for key, got in _cells(flex).items():
        m, p, pe = got.get("saved forward"), got.get("peak fwd+bwd"), got.get("peak eval")
        theirs = native.get((key[0], key[1], ""), {}).get("peak fwd+bwd")
        values = {
            "saved": _fmt(m and m.median / m.input_bytes),
            "peak x nat": _fmt(p and p.ratio_native),
            "torch MiB": _fmt(theirs and theirs.median / 2**20, ".2f"),
            "eval peak x nat": _fmt(pe and pe.ratio_native),
        }
        lines.append(_line(key, columns, values))
    return "\n".join([*lines, "", _MEMORY_LEGEND])


def format_models(rows: Sequence[Row]) -> str:
    """One line per (input, layout, pass, flexbn backend) of :func:`run_models`' rows (combined over
    runs): torch's model and flexbn's in ms, their ratio with its spread over the runs, and the ratio of
    their peak memory.

    >>> format_models([]).splitlines()[0].split()[:3]
    ['input', 'pass', 'backend']
    """
    rows = combine(rows)
    head = (
        f"{'input':<18} {'pass':<10} {'backend':<9} {'torch ms':>9} {'flexbn ms':>9} "
        f"{'x native':>8} {'spread':>6} {'peak x nat':>10}"
    )
    lines = [head, "-" * len(head)]
    found: dict[tuple[str, str, str], dict[str, Row]] = {}
    for r in rows:
        if r.pass_ in MODEL_PASSES and r.candidate == "flexbn":
            found.setdefault((_shape_label(r), r.pass_, r.backend), {})[r.metric] = r
    natives = {
        (_shape_label(r), r.pass_): r
        for r in rows
        if r.pass_ in MODEL_PASSES and r.candidate == "native" and r.metric == "time"
    }
    for (shape, pass_, backend), got in found.items():
        t, p, n = got.get("time"), got.get("peak"), natives.get((shape, pass_))
        lines.append(
            f"{shape:<18} {pass_:<10} {backend:<9} {_fmt(n and n.median, '.1f'):>9} "
            f"{_fmt(t and t.median, '.1f'):>9} {_fmt(t and t.ratio_native):>8} {_spread(t):>6} "
            f"{_fmt(p and p.ratio_native):>10}"
        )
    return "\n".join(lines)


def _label(r: Row) -> str:
    return (
        r.candidate if not r.backend or r.backend == "reference" else f"{r.candidate}@{r.backend}"
    )


# ------------------------------------------------------------------------------- command line

PER_CALL = {
    "shapes": ("8x16x4x4",),
    "variants": ("standard", "detach_var"),
    "passes": ("fwd+bwd", "eval"),
    "backends": ("auto", "cpp"),
    "clock": "cpu",
}
"""``flexbn bench --per-call``: a small input, where a call's fixed cost is most of its time, the
standard path and one variant, training forward+backward and eval, under ``auto`` (torch's own batch
norm where it computes the same) and explicit ``cpp``, timed in CPU time."""


def add_arguments(parser: Any) -> None:
    """The options of ``flexbn bench``, added to an ``argparse`` parser."""
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help="a smoke run: tiny shapes, 3 short repeats, no compile (seconds; per-call overhead "
        "dominates such shapes)",
    )
    add(
        "--per-call",
        action="store_true",
        help="per-call costs: a (8,16,4,4) input, standard and detach_var, fwd+bwd and eval, "
        "backends auto and cpp, CPU time",
    )
    add(
        "--model",
        action="store_true",
        help="a ResNet with torch's BatchNorm2d against the same model converted by flexbn.convert: "
        "training steps and inference, batch 16 at 64x64 and 32x32, NCHW and channels_last",
    )
    add(
        "--shape",
        action="append",
        metavar="SHAPE",
        help="an input shape: 32x64x56x56, or 32,64,56,56:cl for channels_last (repeatable; "
        "default: five shapes of 1M to 6.4M elements)",
    )
    add(
        "--variant",
        action="append",
        choices=list(VARIANTS),
        metavar="NAME",
        help=f"a variant (repeatable; default all: {', '.join(VARIANTS)})",
    )
    add(
        "--pass",
        dest="passes",
        action="append",
        choices=[*PASSES, *MODEL_PASSES],
        metavar="PASS",
        help=f"a pass (repeatable; default all: {', '.join(PASSES)}; with --model: "
        f"{', '.join(MODEL_PASSES)})",
    )
    add(
        "--backend",
        dest="backends",
        action="append",
        metavar="NAME",
        help="a flexbn backend to time flexbn with (repeatable; default: the current one)",
    )
    add("--repeat", type=int, metavar="N", help="interleaved samples per candidate (7; quick 3)")
    add(
        "--runs",
        type=int,
        default=1,
        metavar="N",
        help="run the benchmark in N processes, one after the other, and report the median and the "
        "spread over them (default 1: this process)",
    )
    add("--threads", type=int, metavar="N", help="torch threads for the run (default: torch's)")
    add(
        "--clock",
        choices=list(_CLOCKS),
        help="wall: elapsed time (default); cpu: the process's CPU time (one thread on a busy machine)",
    )
    add("--json", metavar="PATH", help="write the rows as JSON ('-': to stdout, tables to stderr)")
    add("--csv", metavar="PATH", help="write the rows as CSV ('-': to stdout, tables to stderr)")
    add(
        "--wide",
        action="store_true",
        help="every pass, first-call costs and memory per candidate (about 140 columns)",
    )
    add("--no-compile", action="store_true", help="do not time the composition under torch.compile")
    add(
        "--keep-freed-memory",
        action="store_true",
        help="ask glibc (mallopt) to keep freed blocks of up to 32 MiB in the process: fewer page "
        "faults, steadier times, but not the allocator users run with (default: as it is)",
    )
    add("--device", default="cpu", help="torch device (default: cpu)")


def add_parser(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to ``flexbn``'s ``argparse`` subparsers."""
    add_arguments(
        subparsers.add_parser(
            "bench",
            help="time flexbn against torch native and hand compositions (ratios side by side)",
            description="Time flexbn against torch's native batch norm and each variant's hand-written\n"
            "composition (eager and under torch.compile), side by side, after checking that they\n"
            "compute the same thing; print the ratios and memory, write the rows. --per-call: the\n"
            "fixed cost of a call; --model: a whole ResNet. The method: the module notes of\n"
            "flexbn.bench.",
            epilog="variants:\n"
            + "\n".join(f"  {name:<12} {v.description}" for name, v in VARIANTS.items()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )


QUICK_NOTE = (
    "flexbn bench --quick: a smoke run. Tiny shapes, 3 short samples, no torch.compile: it checks that\n"
    "every candidate runs and agrees with its reference. Per-call overhead dominates such shapes, so the\n"
    "times say little about speed. For measurements: flexbn bench (the default shapes; --threads 1 on\n"
    "a busy machine; --runs 5 for the spread between processes)."
)


def _settings(args: Any) -> dict[str, Any]:
    """``args`` with the --per-call preset applied (explicit options win)."""
    preset: dict[str, Any] = dict(PER_CALL) if args.per_call else {}
    if preset and not _cpp_available():
        preset["backends"] = ("auto",)
    return {
        "shapes": args.shape or preset.get("shapes"),
        "variants": args.variant or preset.get("variants"),
        "passes": args.passes or preset.get("passes"),
        "backends": args.backends or preset.get("backends"),
        "clock": args.clock or preset.get("clock", "wall"),
        "compile": not (args.no_compile or args.per_call),
    }


def _cpp_available() -> bool:
    try:
        from flexbn._core.backend import cpp_available
    except ImportError:
        return False
    return cpp_available()


def _child_argv(args: Any) -> list[str]:
    """The options of this command for one process of ``--runs`` (without --runs and the outputs)."""
    argv = ["bench"]
    flags = ("quick", "per_call", "model", "wide", "no_compile", "keep_freed_memory")
    argv += [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f)]
    for name, values in (
        ("--shape", args.shape),
        ("--variant", args.variant),
        ("--pass", args.passes),
        ("--backend", args.backends),
    ):
        for v in values or ():
            argv += [name, v]
    for name, value in (
        ("--repeat", args.repeat),
        ("--threads", args.threads),
        ("--clock", args.clock),
        ("--device", args.device),
    ):
        if value is not None:
            argv += [name, str(value)]
    return argv


def _runs(args: Any, out: Any) -> list[Row]:
    """``args.runs`` processes of this command, one after the other; their rows, numbered by run."""
    import subprocess
    import tempfile

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            print(f"run {i + 1} of {args.runs}", file=sys.stderr, flush=True)
            path = os.path.join(tmp, f"run{i}.json")
            cmd = [sys.executable, "-m", "flexbn", *_child_argv(args), "--json", path]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"run {i + 1} failed (exit status {done.returncode})")
            rows += [dataclasses.replace(r, run=i) for r in read_json(path)]
    return rows


def run_cli(args: Any) -> int:
    """Run ``flexbn bench`` with parsed ``args``: print the tables, write the rows; return the exit status
    (2 for bad arguments)."""
    threads = torch.get_num_threads()
    out = sys.stderr if "-" in (args.json, args.csv) else sys.stdout
    if args.quick:
        print(QUICK_NOTE, file=out, flush=True)
    settings = _settings(args)
    try:
        if args.runs < 1:
            raise ValueError(f"--runs must be >= 1, but got {args.runs}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, but got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.model and args.per_call:
            raise ValueError("--model and --per-call are separate benchmarks (pass one of them)")
        progress = lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr)  # noqa: E731
        if args.runs > 1:
            rows = _runs(args, out)
        elif args.model:
            rows = run_models(
                settings["shapes"],
                passes=tuple(settings["passes"] or MODEL_PASSES),
                repeat=args.repeat or 7,
                backends=settings["backends"],
                device=args.device,
                clock=settings["clock"],
                keep_freed_memory=args.keep_freed_memory,
                progress=progress,
            )
        else:
            rows = run(
                shapes=settings["shapes"],
                variants=settings["variants"],
                passes=tuple(settings["passes"] or PASSES),
                repeat=args.repeat,
                quick=args.quick,
                compile_composition=settings["compile"],
                keep_freed_memory=args.keep_freed_memory,
                device=args.device,
                backends=settings["backends"],
                progress=progress,
                clock=settings["clock"],
            )
    except (ValueError, TypeError) as e:
        print(f"flexbn bench: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    if rows:
        r, loads = rows[0], [x.load for x in rows]
        built = _kernel_build()
        if built:
            print(built, file=out)
        runs = f", {args.runs} processes" if args.runs > 1 else ""
        print(
            f"device={r.device}, dtype={r.dtype}, threads={r.threads}, clock={r.clock}{runs}, "
            f"load (1 min)={min(loads)}-{max(loads)}\n"
            f"torch={r.torch}, flexbn={r.flexbn}, python={r.python}",
            file=out,
        )
    if args.model:
        print(format_models(rows), file=out)
    else:
        print(format_table(rows, wide=args.wide), file=out)
    if args.json:
        write_json(rows, args.json)
    if args.csv:
        write_csv(rows, args.csv)
    return 0
