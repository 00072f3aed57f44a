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
custom autograd nodes (which those hooks do not see). Inputs count when they are saved. On CUDA the peak
of ``torch.cuda.max_memory_allocated`` during a forward+backward, above what was allocated before, is
reported as well.

Every row carries the device, versions, dtype, thread count, the 1-minute load average when its block was
measured, and flexbn's backend (``flexbn.get_backend()``, ``reference`` in a flexbn without backends; the
flexbn candidates can be run once per backend, see :func:`run`). On a machine shared with other work, pass
one thread (``flexbn bench --threads 1``): with more threads than idle cores, every parallel region of a
kernel waits for a descheduled thread, and a 50 us call can take 50 ms.

Freed memory: each call of every candidate allocates its outputs afresh. glibc returns large freed blocks
to the operating system, so the next call takes a page fault for every 4 KiB page it writes; on a virtual
machine that can cost more than the kernels themselves and varies from run to run (here 6 to 26 ms for one
32x64x56x56 forward+backward). By default :func:`run` asks glibc (``mallopt``) to keep freed blocks of up
to 32 MiB in the process, as a long training process reaches anyway, so that the timings measure the
computation; ``keep_freed_memory=False`` (``flexbn bench --os-memory``) leaves the allocator as it is.
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

__all__ = [
    "CANDIDATES",
    "COMPOSITIONS",
    "PASSES",
    "QUICK_SHAPES",
    "SHAPES",
    "VARIANTS",
    "Row",
    "Shape",
    "Target",
    "format_table",
    "format_targets",
    "read_json",
    "run",
    "targets",
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
    r, d = _renorm_corrections(mean, var, _per_channel(rm, x), _per_channel(rv, x), rmax, dmax)
    n = x.numel() // x.shape[1]
    _update(rm, rv, mean, var * (n / (n - 1)))
    y = (x - mean) / torch.sqrt(var + EPS) * r + d
    return y * _per_channel(w, x) + _per_channel(b, x)


@torch.compiler.disable
def _renorm_corrections(
    mean: Tensor, var: Tensor, rm: Tensor, rv: Tensor, rmax: float, dmax: float
) -> tuple[Tensor, Tensor]:
    """``r`` and ``d`` from the running statistics before the update. Outside any compiled graph: inside
    one, AOTAutograd recomputes them in the backward from the buffers *after* the in-place update, which
    gives wrong gradients (pytorch/pytorch#197039; flexbn reads the buffers through an opaque op)."""
    with torch.no_grad():
        sigma = torch.sqrt(rv + EPS)
        r = (torch.sqrt(var + EPS) / sigma).clamp(1 / rmax, rmax)
        d = ((mean - rm) / sigma).clamp(-dmax, dmax)
    return r, d


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

    ``metric`` is ``"time"`` (``unit="ms"``, the pass's duration), ``"first_call"`` (ms of the first call,
    compilation included; pass ``fwd+bwd`` or ``eval``), ``"saved"`` (bytes saved for backward by the
    training forward; pass ``forward``) or ``"peak"`` (CUDA only: peak bytes allocated during a
    forward+backward above those allocated before; pass ``fwd+bwd``). ``median``, ``q1`` and ``q3`` are
    over ``samples`` repeats (one sample: all three equal). ``ratio_X`` is ``median`` divided by the median
    of candidate X for the same shape, layout, variant, pass, metric (and backend, for flexbn's standard
    path); ``None`` when X was not measured. ``input_bytes`` counts the tensors the variant takes as input
    (``x``, and ``mask``, ``groups`` or ``stats_input``).
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

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _kernel_build() -> str:
    """How this process got flexbn's C++ kernels (the ``cpp`` backend's one-time cost), if it used them."""
    try:
        from flexbn._core import kernels
    except ImportError:  # a flexbn without the cpp backend
        return ""
    info = kernels.build_info()
    if not info:
        return ""
    how = "loaded from the cache" if info["cached"] else f"built in {info['seconds']:.1f} s"
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


def _peak_bytes(cand: _Candidate, dy: Tensor, device: torch.device) -> int:
    """CUDA: peak bytes allocated during a training forward+backward, above those allocated before."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.autograd.grad(cand.train(), cand.wrt, dy)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


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
            start = time.perf_counter()
            for y in ys:
                torch.autograd.grad(y, cand.wrt, dy)
            cfg.sync()
            return (time.perf_counter() - start) * 1e3 / inner

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
        start = time.perf_counter()
        for _ in range(inner):
            step()
        cfg.sync()
        return (time.perf_counter() - start) * 1e3 / inner

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
        timers, inner = [], []
        for cand in cands:
            cand.setup()
            timers.append(_sampler(cand, pass_, dy, cfg))
            warm = min(timers[-1](1) for _ in range(_WARMUP))
            inner.append(max(1, math.ceil(cfg.sample_ms / max(warm, 1e-3))))
        for r in range(cfg.repeat):
            for i in range(len(cands)):
                k = (i + r) % len(cands)
                cands[k].setup()
                key = (cands[k].name, cands[k].backend, pass_)
                samples.setdefault(key, []).append(timers[k](inner[k]))
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
    keep_freed_memory: bool = True,
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
        keep_freed_memory: keep freed blocks in the process (glibc only; the module notes say why).

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
            env=_environment(device),
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
        if cfg.device.type == "cuda":
            peak = _peak_bytes(cand, t["dy"], cfg.device)
            values[("peak", "fwd+bwd", cand.name, cand.backend)] = [float(peak)]
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


def _quartiles(samples: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q3


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
    "flexbn is faster); eval x nat: the same in eval mode; saved: memory saved for backward over the\n"
    "input's bytes; cl: channels_last. Every pass, first calls, memory per candidate: --wide; every\n"
    "row: --csv PATH or --json PATH ('-': stdout)."
)


def _shape_label(r: Row) -> str:
    return r.shape + (" cl" if r.layout == "channels_last" else "")


def format_compact(rows: Sequence[Row]) -> str:
    """One line per (shape, layout, variant, flexbn backend): flexbn's training forward+backward time (or
    the first pass measured) and its ratios to every reference, its eval time against native and the
    memory it saves for backward; then what the columns mean. At most :data:`COMPACT_WIDTH` columns.

    >>> format_compact([]).splitlines()[1].split()[:4]
    ['shape', 'variant', 'backend', 'ms']
    """
    flex = [r for r in rows if r.candidate == "flexbn"]
    measured = {r.pass_ for r in flex if r.metric == "time"}
    main = next((p for p in ("fwd+bwd", "forward", "backward", "eval") if p in measured), "fwd+bwd")
    compiled = any(r.ratio_compiled is not None for r in flex if r.metric == "time")
    columns = [("ms", 9), ("x native", 8), ("x std", 6), ("x eager", 7)]
    columns += [("x compiled", 10)] if compiled else []
    columns += [("eval x nat", 10)] if "eval" in measured and main != "eval" else []
    columns += [("saved", 6)] if any(r.metric == "saved" for r in flex) else []
    head = f"{'shape':<15} {'variant':<11} {'backend':<9} " + " ".join(
        f"{name:>{w}}" for name, w in columns
    )
    lines = [f"{main} (training forward+backward)" if main == "fwd+bwd" else main, head]
    lines.append("-" * len(head))
    cells: dict[tuple[str, str, str, str], dict[str, Row]] = {}
    for r in flex:
        key = (_shape_label(r), r.variant, r.backend, "")
        cells.setdefault(key, {})[f"{r.metric} {r.pass_}"] = r
    for (shape, variant, backend, _), got in cells.items():
        t, e, m = got.get(f"time {main}"), got.get("time eval"), got.get("saved forward")
        values = {
            "ms": _fmt(t and t.median, ".3f"),
            "x native": _fmt(t and t.ratio_native),
            "x std": _fmt(t and t.ratio_standard),
            "x eager": _fmt(t and t.ratio_composition),
            "x compiled": _fmt(t and t.ratio_compiled),
            "eval x nat": _fmt(e and e.ratio_native),
            "saved": _fmt(m and m.median / m.input_bytes),
        }
        lines.append(
            f"{shape:<15} {variant:<11} {backend:<9} "
            + " ".join(f"{values[name]:>{w}}" for name, w in columns)
        )
    return "\n".join([*lines, "", _COMPACT_LEGEND])


def _label(r: Row) -> str:
    return (
        r.candidate if not r.backend or r.backend == "reference" else f"{r.candidate}@{r.backend}"
    )


@dataclass(frozen=True)
class Target:
    """One of the issue's performance targets checked on rows, for one flexbn backend: ``worst`` is the
    measured value furthest from ``limit`` (a ratio, or for memory extra bytes per channel), ``where``
    its configuration."""

    name: str
    backend: str
    limit: float
    worst: float
    where: str
    met: bool


def targets(rows: Sequence[Row]) -> list[Target]:
    """Check the issue's targets on ``rows``, per flexbn backend (training forward+backward unless said):

    * standard path <= 0.7x native on channels-first input with spatial dimensions (NCHW, ``(N, C, L)``),
      <= 1.0x on channels_last and ``(N, C)``;
    * every variant <= 1.25x flexbn's standard path, and >= 3x faster than its eager hand composition
      (ratio <= 1/3);
    * eval <= 1.1x native;
    * memory saved for backward <= the inputs + O(C), O(C) read as at most 1 KiB per channel.

    flexbn's standard path and native are timed side by side in every (shape, variant) block, and every
    variant's eval mode is the same computation: for those two targets the median over a shape's blocks
    is compared (a single block's ratio moves by +-30% on a busy machine). Targets without rows are left
    out.

    >>> targets([])
    []
    """
    found: list[Target] = []
    for backend in dict.fromkeys(r.backend for r in rows if r.candidate == "flexbn"):
        flex = [r for r in rows if r.backend == backend and r.candidate.startswith("flexbn")]
        found += _targets(flex, backend)
    return found


def _targets(flex: list[Row], backend: str) -> list[Target]:
    found: list[Target] = []

    def check(name: str, limit: float, picked: list[tuple[float, str]]) -> None:
        if picked:
            worst, where = max(picked)
            found.append(Target(name, backend, limit, worst, where, worst <= limit))

    def per_shape(rs: list[Row], pass_: str) -> dict[tuple[str, str], float]:
        ratios: dict[tuple[str, str], list[float]] = {}
        for r in rs:
            if r.metric == "time" and r.pass_ == pass_ and r.ratio_native is not None:
                ratios.setdefault((r.shape, r.layout), []).append(r.ratio_native)
        return {k: statistics.median(v) for k, v in ratios.items()}

    standard = [r for r in flex if r.candidate == "flexbn-standard" or r.variant == "standard"]
    std = per_shape(standard, "fwd+bwd")
    nchw: list[tuple[float, str]] = []
    other: list[tuple[float, str]] = []
    for (shape, layout), v in std.items():
        spatial = layout == "contiguous" and shape.count("x") > 1
        (nchw if spatial else other).append((v, f"{shape} {layout}"))
    check("standard fwd+bwd / native, NCHW and (N,C,L)", 0.7, nchw)
    check("standard fwd+bwd / native, channels_last and (N,C)", 1.0, other)
    variants = [r for r in flex if r.candidate == "flexbn" and r.metric == "time"]
    fwd_bwd = [r for r in variants if r.pass_ == "fwd+bwd"]
    for name, limit, attr in (
        ("variant fwd+bwd / flexbn standard", 1.25, "ratio_standard"),
        ("variant fwd+bwd / eager composition", 1 / 3, "ratio_composition"),
    ):
        picked = [
            (getattr(r, attr), f"{r.shape} {r.layout} {r.variant}")
            for r in fwd_bwd
            if attr == "ratio_composition" or r.variant != "standard"  # 1 by definition
        ]
        check(name, limit, [(v, where) for v, where in picked if v is not None])
    evals = per_shape([r for r in flex if r.metric == "time"], "eval")
    check("eval / native", 1.1, [(v, f"{s} {lay}") for (s, lay), v in evals.items()])
    saved = [
        (
            (r.median - r.input_bytes) / int(r.shape.split("x")[1]),
            f"{r.shape} {r.layout} {r.variant}",
        )
        for r in flex
        if r.metric == "saved" and r.candidate == "flexbn"
    ]
    check("saved for backward: extra bytes per channel beyond the inputs", 1024.0, saved)
    return found


TARGET_MIN_ELEMENTS = 2**20
"""The smallest input (elements) on which the targets are judged: below it, a call's fixed cost (argument
checks, dispatch, allocation: tens of microseconds) dominates the time, not the passes over the data the
targets are about. :data:`SHAPES` all have at least this many; :data:`QUICK_SHAPES` none."""


def judged(rows: Sequence[Row]) -> tuple[list[Row], list[str]]:
    """The rows whose shape is large enough for the targets (:data:`TARGET_MIN_ELEMENTS`), and the names
    of the shapes left out.

    >>> judged([])
    ([], [])
    """
    kept: list[Row] = []
    small: dict[str, None] = {}
    for r in rows:
        if math.prod(int(n) for n in r.shape.split("x")) >= TARGET_MIN_ELEMENTS:
            kept.append(r)
        else:
            small[_shape_label(r)] = None
    return kept, list(small)


def format_targets(found: Sequence[Target]) -> str:
    """One line per target: met or not, the backend, the limit, the worst value and where.

    >>> print(format_targets([Target("eval / native", "reference", 1.1, 1.3, "8x3 contiguous", False)]))
    NOT MET  [reference] eval / native: worst 1.30 (limit 1.10) at 8x3 contiguous
    """
    return "\n".join(
        f"{'met    ' if t.met else 'NOT MET'}  [{t.backend}] {t.name}: worst {t.worst:.2f} "
        f"(limit {t.limit:.2f}) at {t.where}"
        for t in found
    )


# ------------------------------------------------------------------------------- command line


def add_arguments(parser: Any) -> None:
    """The options of ``flexbn bench``, added to an ``argparse`` parser."""
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help="a smoke run: tiny shapes, 3 short repeats, no compile, no verdict on the targets "
        "(seconds; per-call overhead dominates such shapes)",
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
        choices=list(PASSES),
        metavar="PASS",
        help=f"a pass (repeatable; default all: {', '.join(PASSES)})",
    )
    add(
        "--backend",
        dest="backends",
        action="append",
        metavar="NAME",
        help="a flexbn backend to time flexbn with (repeatable; default: the current one)",
    )
    add("--repeat", type=int, metavar="N", help="interleaved samples per candidate (7; quick 3)")
    add("--threads", type=int, metavar="N", help="torch threads for the run (default: torch's)")
    add("--json", metavar="PATH", help="write the rows as JSON ('-': to stdout, tables to stderr)")
    add("--csv", metavar="PATH", help="write the rows as CSV ('-': to stdout, tables to stderr)")
    add(
        "--wide",
        action="store_true",
        help="every pass, first-call costs and memory per candidate (about 140 columns)",
    )
    add("--no-compile", action="store_true", help="do not time the composition under torch.compile")
    add(
        "--os-memory",
        action="store_true",
        help="let glibc return freed memory to the system (default: keep it; page faults otherwise "
        "dominate on virtual machines)",
    )
    add("--device", default="cpu", help="torch device (default: cpu)")


def add_parser(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to ``flexbn``'s ``argparse`` subparsers."""
    add_arguments(
        subparsers.add_parser(
            "bench",
            help="time flexbn against torch native and hand compositions (ratios side by side)",
            description="Time flexbn against torch's native batch norm and each variant's hand-written\n"
            "composition (eager and under torch.compile), side by side; print the ratios and whether\n"
            "flexbn's performance targets are met (on shapes of at least 2^20 elements), write the\n"
            "rows. The method: the module notes of flexbn.bench.",
            epilog="variants:\n"
            + "\n".join(f"  {name:<12} {v.description}" for name, v in VARIANTS.items()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )


QUICK_NOTE = (
    "flexbn bench --quick: a smoke run. Tiny shapes, 3 short samples, no torch.compile: it checks that\n"
    "every candidate runs and agrees with its reference. Per-call overhead dominates such shapes, so the\n"
    "times say little about speed, and the targets are not judged. For measurements: flexbn bench\n"
    "(the default shapes; --threads 1 on a busy machine)."
)


def _targets_report(rows: Sequence[Row], *, quick: bool) -> str:
    """The targets on the rows they apply to, or why they are not judged."""
    kept, small = judged(rows)
    found = targets(kept)
    if quick or not found:
        if quick:
            why = "a smoke run (--quick)"
        elif small:
            why = (
                f"every shape is under {TARGET_MIN_ELEMENTS:,} elements, where per-call overhead "
                "dominates"
            )
        else:
            return ""
        return f"\ntargets: not judged -- {why}. Run flexbn bench (default shapes) to check them."
    lines = ["", "targets (training forward+backward unless named):", format_targets(found)]
    if small:
        lines.append(
            f"(not judged on {', '.join(small)}: under {TARGET_MIN_ELEMENTS:,} elements, per-call "
            "overhead dominates)"
        )
    return "\n".join(lines)


def run_cli(args: Any) -> int:
    """Run ``flexbn bench`` with parsed ``args``: print the tables and the targets, write the rows; return
    the exit status (2 for bad arguments)."""
    threads = torch.get_num_threads()
    out = sys.stderr if "-" in (args.json, args.csv) else sys.stdout
    if args.quick:
        print(QUICK_NOTE, file=out, flush=True)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, but got {args.threads}")
            torch.set_num_threads(args.threads)
        rows = run(
            shapes=args.shape,
            variants=args.variant,
            passes=tuple(args.passes or PASSES),
            repeat=args.repeat,
            quick=args.quick,
            compile_composition=not args.no_compile,
            keep_freed_memory=not args.os_memory,
            device=args.device,
            backends=args.backends,
            progress=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr),
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
        print(
            f"device={r.device}, dtype={r.dtype}, threads={r.threads}, load (1 min)="
            f"{min(loads)}-{max(loads)}\ntorch={r.torch}, flexbn={r.flexbn}, python={r.python}",
            file=out,
        )
    print(format_table(rows, wide=args.wide), file=out)
    report = _targets_report(rows, quick=args.quick)
    if report:
        print(report, file=out)
    if args.json:
        write_json(rows, args.json)
    if args.csv:
        write_csv(rows, args.csv)
    return 0
