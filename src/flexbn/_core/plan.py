"""One validated description of a batch-norm call -- the :class:`Plan` -- built once, before anything changes.

Every entry point (``flexbn.batch_norm``, ``flexbn.func.batch_norm``, the modules, ``SyncBatchNorm``,
``DomainBatchNorm*``) validates its arguments here and hands the core a plan: which statistics (batch or
running, over which segments, from which tensor), which gradients flow through them, ``eps``, renorm limits.
A module touches ``num_batches_tracked`` and its running statistics only after its plan is built, so a
rejected call leaves its state as it was.

The torch-compatible checks raise what ``torch.nn.functional.batch_norm`` raises for the same bad input, in
its order; flexbn's options raise ``ValueError``/``TypeError`` naming the argument, the expected and the
received.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from numbers import Real
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import segments as _segments
from .segments import WHOLE, Segments

__all__ = ["Plan", "build", "check_renorm", "check_virtual_batch_size", "readable"]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TORCH_DTYPE_NAMES = {
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


_RMAX, _DMAX = 3.0, 5.0  # the default renorm limits (validated when anything else is passed)


class Plan(NamedTuple):
    """What one call computes (validated).

    ``batch``: normalize with batch statistics (else the running ones). ``seg``: the segments the statistics
    are taken over. ``counts_from``: the option whose segments may hold a single value per channel (checked
    on the counts the statistics bring, before any state changes), or ``None``. ``standard``: no flexbn
    option is in play, so torch's own batch-norm op computes exactly this call.
    """

    batch: bool
    eps: float
    detach_mean: bool = False
    detach_var: bool = False
    seg: Segments = WHOLE
    stats_input: Tensor | None = None
    renorm: tuple[float | Tensor, float | Tensor] | None = None
    counts_from: str | None = None
    standard: bool = True
    calls: int = 0  # a synchronised layer's call counter (checked against the other ranks')


_jit_tracing = torch._C._is_tracing  # torch.jit.is_tracing() less its TorchScript check


def _is_tracing() -> bool:
    """Whether ``torch.jit.trace`` records this call (never under Dynamo, which cannot trace the C query
    and folds ``torch.compiler.is_compiling()`` to a constant)."""
    return not torch.compiler.is_compiling() and _jit_tracing()


def traced_quietly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Under ``torch.jit.trace``, run ``fn`` without the tracer's warnings about Python values taken from
    traced sizes: the checks and choices made here on shapes are the trace's structure (as for any traced
    code); what a trace could not keep -- data-dependent segment counts, chunks that depend on the batch
    size, collectives -- raises instead."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not _is_tracing():
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return fn(*args, **kwargs)

    return run


@traced_quietly
def build(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    *,
    detach_mean: bool = False,
    detach_var: bool = False,
    mask: Tensor | None = None,
    groups: Tensor | None = None,
    virtual_batch_size: int | None = None,
    stats_input: Tensor | None = None,
    process_group: Any = None,
    renorm: bool = False,
    rmax: float | Tensor = _RMAX,
    dmax: float | Tensor = _DMAX,
    domain: tuple[Tensor, int] | None = None,
    calls: int = 0,
) -> Plan:
    """Validate a call and describe it. ``domain``: ``(ids, num_domains)`` of a ``DomainBatchNorm``;
    ``calls``: a synchronised layer's call counter."""
    if process_group is not None and virtual_batch_size is not None:
        raise ValueError(
            "virtual_batch_size cannot be combined with process_group: ghost batches are chunks of one "
            "process's batch (pass one of them)"
        )
    group = None
    if process_group is not None and training is True:
        from .sync import active_group

        group = active_group(process_group)
    check_inputs(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        synced=group is not None,
        rows=None if domain is None else domain[1],
    )
    if detach_mean is not False or detach_var is not False:
        check_flag("detach_mean", detach_mean)
        check_flag("detach_var", detach_var)
    defaults = type(rmax) is float and rmax == _RMAX and type(dmax) is float and dmax == _DMAX
    if renorm is not False or not defaults:
        check_renorm(renorm, rmax, dmax)
    options = (
        mask is not None
        or groups is not None
        or virtual_batch_size is not None
        or stats_input is not None
        or renorm is not False
        or domain is not None
        or group is not None
    )
    if not options:
        # The detach flags change nothing out of training (the statistics are constants there).
        standard = not training or not (detach_mean or detach_var)
        return Plan(training, float(eps), detach_mean, detach_var, standard=standard)
    seg, counts_from = _segmentation(
        input, groups, virtual_batch_size, mask, domain, training=training, group=group
    )
    if stats_input is not None:
        check_stats_input(stats_input, input)
    if renorm and training and (running_mean is None or running_var is None):
        raise ValueError(
            "renorm=True needs running statistics in training (its corrections compare the batch "
            "statistics with them), but got running_mean=None and running_var=None"
        )
    limits = (renorm_limit(rmax), renorm_limit(dmax)) if renorm and training else None
    # Out of training only a mask (padding kept out of weight and bias gradients) and per-domain
    # statistics change what is computed; the other options select batch statistics.
    standard = not training and mask is None and domain is None
    return Plan(
        training,
        float(eps),
        detach_mean,
        detach_var,
        seg,
        stats_input if training else None,
        limits,
        counts_from if training else None,
        standard=standard,
        calls=calls,
    )


# -------------------------------------------------------------------------------------------------------
# The torch-compatible checks.


def check_inputs(
    input: object,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: object,
    momentum: object,
    eps: object,
    *,
    synced: bool = False,
    rows: int | None = None,
) -> None:
    """What ``torch.nn.functional.batch_norm`` raises, in its order: one value per channel and ``eps`` (its
    Python checks), nothing more for an empty input, then each given tensor's size (and running statistics
    in eval), the pairing of the running statistics, then dtypes. ``rows``: per-domain tables (a
    ``DomainBatchNorm``): running statistics ``(rows, C)``, weight and bias ``(C,)`` or ``(rows, C)``."""
    if not isinstance(input, Tensor):
        raise TypeError(
            f"batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}"
        )
    if not isinstance(training, bool):
        raise TypeError(
            f"batch_norm(): argument 'training' (position 6) must be bool, not {type(training).__name__}"
        )
    # a float first: isinstance against the abstract Real costs a microsecond
    if type(momentum) is not float and not isinstance(momentum, (Real, Tensor)):
        raise TypeError(
            "batch_norm(): argument 'momentum' (position 7) must be float, "
            f"not {type(momentum).__name__}"
        )
    if type(eps) is not float and not isinstance(eps, (Real, Tensor)):
        raise TypeError(
            f"batch_norm(): argument 'eps' (position 8) must be float, not {type(eps).__name__}"
        )
    if input.dim() < 2 and input.numel():  # an empty one: torch returns an empty tensor (below)
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    size = input.size()
    if training and not synced and math.prod(size[:1] + size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:
        return  # torch returns before any per-channel check for an empty input
    channels = input.shape[1]
    named = (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    )
    for i, (name, t) in enumerate(named):
        if t is not None and rows is not None:
            shapes = [(rows, channels)] if i < 2 else [(channels,), (rows, channels)]
            if tuple(t.shape) not in shapes:
                raise ValueError(
                    f"{name} must have shape {' or '.join(map(str, shapes))} for input with "
                    f"{channels} channels and {rows} domains, but got {tuple(t.shape)}"
                )
        elif t is not None and t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if t is None and i < 2 and not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dtype not in _FLOATING:
        name = _TORCH_DTYPE_NAMES.get(input.dtype, str(input.dtype))
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{name}'")
    for name, t in named[:2]:
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"The function 'batch_norm' is not differentiable with respect to argument '{name}'. "
                "This input cannot have requires_grad True."
            )
    param_dtype = next((t.dtype for _, t in named if t is not None), None)
    allowed = {input.dtype}
    if input.dtype in (torch.float16, torch.bfloat16) and param_dtype == torch.float32:
        allowed = {
            torch.float32
        }  # mixed precision: reduced input, float32 parameters and statistics
    for name, t in named:
        if t is not None and t.dtype not in allowed:
            raise RuntimeError(
                f"mixed dtype: {name} has dtype {t.dtype}, expected "
                f"{' or '.join(sorted(str(d) for d in allowed))} for input of dtype {input.dtype} "
                "(parameters and running statistics share the input's dtype, or are float32 for "
                "float16/bfloat16 input)"
            )


# -------------------------------------------------------------------------------------------------------
# flexbn's options.


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, but got {type(value).__name__} ({value!r})")


def check_renorm(renorm: object, rmax: object, dmax: object) -> None:
    """``renorm`` a bool; ``rmax >= 1`` and ``dmax >= 0`` real numbers (``inf`` allowed, not NaN) or 0-d
    floating tensors (their values checked where that needs no device synchronisation)."""
    check_flag("renorm", renorm)
    for name, value, least in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        if isinstance(value, Tensor):
            if value.dim() != 0 or not value.dtype.is_floating_point:
                raise TypeError(
                    f"{name} must be a float or a 0-d floating tensor, but got a tensor of shape "
                    f"{tuple(value.shape)} and dtype {value.dtype}"
                )
            if value.device.type != "cpu" or not readable(value):
                continue
        elif not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a float, but got {type(value).__name__} ({value!r})")
        if not value >= least:  # also NaN
            raise ValueError(
                f"{name} must be a float >= {least:g} (inf allowed), but got {value!r}"
            )


def renorm_limit(value: float | Tensor) -> float | Tensor:
    """A validated limit for the core: a float, or the 0-d tensor as it is (read inside the graph)."""
    return value if isinstance(value, Tensor) else float(value)


def check_virtual_batch_size(value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 2):
        raise ValueError(f"virtual_batch_size must be None or an int >= 2, but got {value!r}")


def check_stats_input(stats_input: object, input: Tensor) -> None:
    if not isinstance(stats_input, Tensor):
        raise TypeError(f"stats_input must be a Tensor, not {type(stats_input).__name__}")
    if stats_input.shape != input.shape:
        raise ValueError(
            f"stats_input must have the input's shape {tuple(input.shape)}, but got "
            f"{tuple(stats_input.shape)}"
        )
    if stats_input.dtype != input.dtype or stats_input.device != input.device:
        raise ValueError(
            f"stats_input must have the input's dtype and device ({input.dtype}, {input.device}), but "
            f"got ({stats_input.dtype}, {stats_input.device})"
        )


def _check_ids_or_mask(
    name: str, t: object, input: Tensor, shape: tuple[int, ...], what: str
) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, not {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{name} must have shape {shape} ({what}), but got shape {tuple(t.shape)} for input of "
            f"shape {tuple(input.shape)}"
        )
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}")


def _check_ids(name: str, ids: object, input: Tensor) -> None:
    n = input.shape[0]
    _check_ids_or_mask(name, ids, input, (n,), "(N,): one id per sample")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:  # type: ignore[union-attr]
        raise ValueError(f"{name} must be an integer tensor of ids, but got dtype {ids.dtype}")  # type: ignore[union-attr]


def _segmentation(
    input: Tensor,
    groups: Tensor | None,
    virtual_batch_size: int | None,
    mask: Tensor | None,
    domain: tuple[Tensor, int] | None,
    *,
    training: bool,
    group: Any,
) -> tuple[Segments, str | None]:
    """The statistics set as segments of the batch, validated, and the option whose segments may hold a
    single value per channel (checked on the statistics' counts, where that may read the device)."""
    check_virtual_batch_size(virtual_batch_size)
    if groups is not None and virtual_batch_size is not None:
        raise ValueError(
            "groups and virtual_batch_size cannot be combined: both choose the samples the statistics "
            "are taken over (pass one of them)"
        )
    if groups is not None:
        _check_ids("groups", groups, input)
    if mask is not None:
        shape = (input.shape[0], *input.shape[2:])
        _check_ids_or_mask("mask", mask, input, shape, "(N, *spatial): True for real elements")
        if mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor (True = real element), but got {mask.dtype}"
            )
    if domain is not None:
        ids, num = domain
        _check_domain(ids, num, input)
        return Segments(ids.long(), num, mask), ("domain" if training else None)
    if group is not None:
        return _synced(input, groups, virtual_batch_size, mask, group), None
    if input.numel() == 0:  # nothing to take statistics over (the core returns early, as torch)
        return WHOLE, None
    if not training:
        return Segments(mask=mask), None
    compiling = torch.compiler.is_compiling()
    if virtual_batch_size is not None:
        if torch.jit.is_tracing():
            raise ValueError(
                "virtual_batch_size cannot be recorded by torch.jit.trace in training: the chunks depend "
                "on the batch size, which a trace would keep (trace in eval mode, or use torch.export)"
            )
        ids, num = _segments.chunks(input.shape[0], virtual_batch_size, input.device)
        if ids is not None or mask is not None:
            return Segments(ids, num, mask), ("mask" if mask is not None else None)
        return WHOLE, None
    if groups is not None:
        if not compiling and _vmapped(groups):
            raise ValueError(
                "groups cannot be batched by torch.func.vmap: the number of bags is data-dependent "
                "(pass the same groups to every vmapped call, in_dims=None)"
            )
        if torch.jit.is_tracing():
            raise ValueError(
                "groups cannot be recorded by torch.jit.trace: the number of bags is data-dependent, "
                "and a trace would keep the traced batch's (use torch.export or torch.compile)"
            )
        ids, num, _ = _segments.from_groups(groups, compiling=compiling)
        source = "groups and mask" if mask is not None else "groups"
        return Segments(ids, num, mask), source
    return Segments(mask=mask), "mask"


def _check_domain(domain: object, num: int, input: Tensor) -> None:
    n = input.shape[0]
    if not isinstance(domain, Tensor) or tuple(domain.shape) != (n,):
        got = tuple(domain.shape) if isinstance(domain, Tensor) else type(domain).__name__
        raise ValueError(f"domain must be an (N,) = ({n},) tensor of domain ids, but got {got}")
    if domain.dtype.is_floating_point or domain.dtype.is_complex or domain.dtype == torch.bool:
        raise ValueError(f"domain must be an integer tensor, but got dtype {domain.dtype}")
    if domain.device != input.device:
        raise ValueError(f"domain is on {domain.device} but input is on {input.device}")
    if n and readable(domain) and bool(((domain < 0) | (domain >= num)).any()):
        raise ValueError(
            f"domain ids must be in [0, num_domains) = [0, {num}), but got "
            f"min {int(domain.min())} and max {int(domain.max())}"
        )


def _synced(
    input: Tensor,
    groups: Tensor | None,
    virtual_batch_size: int | None,
    mask: Tensor | None,
    group: Any,
) -> Segments:
    """This rank's segments, to be combined with the other ranks' (``sync``), which also checks the
    counts -- globally. Bags keep their ids (``keys``) even when this rank holds one, or none."""
    if virtual_batch_size is not None:
        raise ValueError(
            "virtual_batch_size cannot be combined with statistics across processes: ghost batches are "
            "chunks of one process's batch (use flexbn.BatchNorm1d/2d/3d, or process_group=None)"
        )
    if input.shape[1] == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    if torch.jit.is_tracing():
        raise ValueError(
            "statistics across processes cannot be recorded by torch.jit.trace (collectives); trace "
            "the model with local batch norm (process_group=None) or in eval mode"
        )
    if groups is None:
        return Segments(None, 1, mask, group)
    keys, ids = torch.unique(groups, return_inverse=True)
    return Segments(ids, keys.numel(), mask, group, keys)


_PLAIN = (Tensor, torch.nn.Parameter)


def readable(t: Tensor) -> bool:
    """Whether a data-dependent check may read ``t``'s values on the host: a plain tensor (not a fake,
    functional or batched one: no data, or data-dependent control flow), and not while ``torch.compile``
    or ``torch.jit.trace`` records (it would break the graph or be baked into it). Those checks are
    skipped there."""
    return (
        type(t) in _PLAIN
        and t.device.type != "meta"
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._functorch.is_legacy_batchedtensor(t)
        and not _vmapped(t)
    )


def _vmapped(t: Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap`` (at any level of nested transforms)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):  # vmap / grad wrappers, outermost first
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False
