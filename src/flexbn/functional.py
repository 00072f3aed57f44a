"""The functional API: argument checking, then the core.

``flexbn.batch_norm`` takes the positional arguments of ``torch.nn.functional.batch_norm`` and behaves
identically at default options -- values, gradients, the in-place update of the running buffers, and the
exceptions raised for bad input -- and adds keyword-only options that choose where gradient flows.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from . import _core

__all__ = ["batch_norm"]

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


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    detach_mean: bool = False,
    detach_var: bool = False,
    mask: Tensor | None = None,
    groups: Tensor | None = None,
    virtual_batch_size: int | None = None,
    stats_input: Tensor | None = None,
    process_group: Any = None,
    renorm: bool = False,
    rmax: float | Tensor = 3.0,
    dmax: float | Tensor = 5.0,
) -> Tensor:
    r"""Batch normalization with a choice of gradient flow through the batch statistics and of the set they
    are computed over.

    Per channel ``c`` (dimension 1), over all other dimensions:
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``. In training the batch mean and biased variance are
    used, and ``running_mean`` / ``running_var`` (if given) are updated in place with
    ``running = (1 - momentum) * running + momentum * batch`` (the unbiased variance is stored). In eval
    (``training=False``) the running statistics are used and must be given.

    Args:
        input: ``(N, C, *)`` floating tensor; float16/bfloat16 input may come with float32 parameters and
            statistics (the output keeps the input's dtype and memory format).
        running_mean, running_var: ``(C,)`` buffers or ``None`` (only in training).
        weight, bias: optional ``(C,)`` affine parameters.
        training: use (and track) batch statistics.
        momentum: factor of the running-statistics update; a float or a 0-d tensor.
        eps: added to the variance inside the square root; must be positive in training.
        detach_mean: no gradient through the batch mean -- exactly ``input.mean(dims).detach()``.
        detach_var: no gradient through the batch variance -- exactly
            ``input.var(dims, unbiased=False).detach()``.
        mask: ``(N, *spatial)`` bool tensor, ``True`` for real elements (padded sequences): statistics over
            real elements only. Every element is normalized with them, but padded ones take part in
            nothing else -- not in the statistics, the weight and bias gradients, or the statistics'
            gradient (theirs is ``dy * weight * invstd``) -- so their values, even non-finite, never reach a
            real output or gradient. The running variance is the unbiased one over real elements.
        groups: ``(N,)`` integer tensor, a bag / segment id per sample (any ids, in any order, bags of any
            size): statistics are computed per (bag, channel) and each sample is normalized with its bag's
            (multiple-instance learning). Finding the distinct ids synchronises with the device once.
        virtual_batch_size: ghost batch norm: statistics per chunk of consecutive samples. The batch is
            split into ``N // virtual_batch_size`` chunks whose sizes differ by at most one (sample ``n`` is
            in chunk ``n * G // N``), so every chunk has at least ``virtual_batch_size`` samples and never
            one value per channel; ``N < 2 * virtual_batch_size`` is one chunk. Must be an int >= 2.
        stats_input: a tensor of the input's shape the statistics are computed from (e.g. the activations
            before dropout), then applied to ``input``. Gradient reaches ``stats_input`` through the
            statistics (as the detach flags allow) and ``input`` through the direct path only. The running
            statistics are those of ``stats_input``.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for all
            ranks) to take the training statistics over: every rank's batch, combined exactly by one
            collective in forward and one in backward, on any backend (gloo on CPU too) -- the result is
            that of this function on the concatenation of the ranks' batches, except for the weight and
            bias gradients, which stay local (``DistributedDataParallel`` averages them). Every rank must
            call it with the same configuration (checked: a ``ValueError`` on every rank). ``groups`` ids
            are global. ``None`` (default), an uninitialised ``torch.distributed``, one rank, or eval:
            this process only. Not with ``virtual_batch_size``. See :class:`flexbn.SyncBatchNorm`.
        renorm: batch renormalization (Ioffe 2017) in training: the output is
            ``((x - mean) / sqrt(var + eps) * r + d) * weight + bias`` with the corrections
            ``r = clip(sqrt(var + eps) / sqrt(running_var + eps), 1 / rmax, rmax)`` and
            ``d = clip((mean - running_mean) / sqrt(running_var + eps), -dmax, dmax)``, computed from the
            running statistics before this call updates them and carrying no gradient; gradient flows
            through the batch mean and variance as the detach flags say. Needs ``running_mean`` /
            ``running_var``; changes nothing in eval. ``rmax=1, dmax=0`` is batch norm; unclipped, the
            output is normalization by the running statistics. See ``docs/inference-statistics.md``.
        rmax, dmax: the clipping limits, ``rmax >= 1`` and ``dmax >= 0`` (``inf`` allowed): floats, or
            0-d tensors (under ``torch.compile`` a float is a constant of the graph, and a new value
            compiles a new one; a tensor's value is read at run time).

    ``mask`` combines with ``groups`` or ``virtual_batch_size`` (these two exclude each other), and all of
    them with the detach flags and ``stats_input``. With ``groups`` or ``virtual_batch_size`` the running
    statistics are updated once per call with the mean over segments of the segment means and of the
    unbiased segment variances (Keras' convention). They only select batch statistics: eval mode with
    running statistics normalizes every sample with those (and ignores ``stats_input``).

    Both detach flags only matter in training (eval statistics are constants). With both ``False`` this is
    ``torch.nn.functional.batch_norm``: gradients flow through both statistics.

    Under ``torch.compile`` (and for a ``mask`` batched by ``torch.func.vmap``) the one check that reads
    tensor values on the host is not made, so the graph does not break: that every segment selected by
    ``mask`` / ``groups`` has more than 1 value per channel (such a segment would normalize to ``bias`` and
    give a NaN running variance). ``groups`` finds its bags with ``torch.unique``, whose output size depends
    on the data: ``fullgraph=True`` captures it, otherwise it is a graph break (unless
    ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``); ``groups`` cannot be batched by
    ``vmap`` (``ValueError``).

    Raises:
        ValueError, RuntimeError, TypeError, NotImplementedError: as
            ``torch.nn.functional.batch_norm`` for the same bad input, with the same messages (wrong sizes,
            one value per channel in training, ``eps <= 0`` in training, missing running statistics in
            eval); mismatched dtypes raise a ``RuntimeError`` naming the argument. Deliberate differences:
            ``ValueError`` for input with fewer than 2 dimensions (torch raises an ``IndexError``), and
            ``TypeError`` for non-bool detach flags. ``ValueError`` for ``rmax < 1``, ``dmax < 0``, and for
            ``renorm=True`` in training without running statistics.

    Under activation checkpointing (``torch.utils.checkpoint``) the running statistics are updated once,
    by the first forward, not again when the forward is recomputed during backward (torch's
    ``batch_norm`` updates them twice, pytorch#96136).

    Example:
        >>> import torch, flexbn
        >>> x = torch.randn(8, 3, 5, requires_grad=True)
        >>> y = flexbn.batch_norm(x, None, None, training=True, detach_mean=True, detach_var=True)
        >>> mean = x.mean((0, 2), keepdim=True).detach()
        >>> var = x.var((0, 2), unbiased=False, keepdim=True).detach()
        >>> torch.allclose(y, (x - mean) / torch.sqrt(var + 1e-5), atol=1e-6)
        True
    """
    return _core.batch_norm(
        *core_arguments(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            detach_mean=detach_mean,
            detach_var=detach_var,
            mask=mask,
            groups=groups,
            virtual_batch_size=virtual_batch_size,
            stats_input=stats_input,
            process_group=process_group,
            renorm=renorm,
            rmax=rmax,
            dmax=dmax,
        )
    )


def core_arguments(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    *,
    detach_mean: bool,
    detach_var: bool,
    mask: Tensor | None,
    groups: Tensor | None,
    virtual_batch_size: int | None,
    stats_input: Tensor | None,
    process_group: Any = None,
    renorm: bool = False,
    rmax: float | Tensor = 3.0,
    dmax: float | Tensor = 5.0,
) -> tuple[Any, ...]:
    """Validate :func:`batch_norm`'s arguments and return the positional arguments of the core
    (``_core.batch_norm`` / ``_core.batch_norm_functional``, shared with ``flexbn.func``)."""
    if process_group is not None and virtual_batch_size is not None:
        raise ValueError(
            "virtual_batch_size cannot be combined with process_group: ghost batches are chunks of one "
            "process's batch (pass one of them)"
        )
    group = _core.sync.active_group(process_group) if training is True else None
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
    )
    _check_flag("detach_mean", detach_mean)
    _check_flag("detach_var", detach_var)
    seg = segments(input, groups, virtual_batch_size, mask, training=training, group=group)
    if stats_input is not None:
        _check_stats_input(stats_input, input)
    check_renorm(renorm, rmax, dmax)
    if renorm and training and (running_mean is None or running_var is None):
        raise ValueError(
            "renorm=True needs running statistics in training (its corrections compare the batch "
            "statistics with them), but got running_mean=None and running_var=None"
        )
    return (
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        float(eps),
        detach_mean,
        detach_var,
        seg,
        stats_input,
        (renorm_limit(rmax), renorm_limit(dmax)) if renorm and training else None,
    )


def check_renorm(renorm: object, rmax: object, dmax: object) -> None:
    """``renorm`` a bool; ``rmax >= 1`` and ``dmax >= 0`` real numbers (``inf`` allowed, not NaN) or 0-d
    floating tensors (their values checked where that needs no device synchronisation)."""
    _check_flag("renorm", renorm)
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


def segments(
    input: Tensor,
    groups: Tensor | None,
    virtual_batch_size: int | None,
    mask: Tensor | None,
    *,
    training: bool,
    group: Any = None,
) -> _core.stats.Segments:
    """The statistics set S as segments of the batch, validated.

    In training no segment may have a single value per channel (which needs one host synchronisation when
    ``groups`` or ``mask`` make the counts data-dependent). Out of training (running statistics) only the mask
    matters: it keeps padding out of the weight and bias gradients.
    """
    check_virtual_batch_size(virtual_batch_size)
    if groups is not None and virtual_batch_size is not None:
        raise ValueError(
            "groups and virtual_batch_size cannot be combined: both choose the samples the statistics "
            "are taken over (pass one of them)"
        )
    n = input.shape[0]
    if groups is not None:
        _check_ids_or_mask("groups", groups, input, (n,), "(N,): one segment id per sample")
        if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
            raise ValueError(
                f"groups must be an integer tensor of segment ids, but got dtype {groups.dtype}"
            )
    kept = None
    if mask is not None:
        shape = (n, *input.shape[2:])
        _check_ids_or_mask("mask", mask, input, shape, "(N, *spatial): True for real elements")
        if mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor (True = real element), but got {mask.dtype}"
            )
        kept = mask.unsqueeze(1)
    if group is not None:
        return _synced_segments(input, groups, virtual_batch_size, mask, group)
    if input.numel() == 0:  # nothing to take statistics over (the core returns early, as torch)
        return _core.stats.WHOLE
    if not training:
        return _core.stats.WHOLE if kept is None else _core.stats.Segments(mask=kept)

    ids, num, source = None, 1, "mask"
    if virtual_batch_size is not None and n // virtual_batch_size > 1:
        num = n // virtual_batch_size
        ids = torch.arange(n, device=input.device) * num // n  # chunk sizes differ by at most one
    elif groups is not None:
        if not torch.compiler.is_compiling() and _vmapped(groups):
            raise ValueError(
                "groups cannot be batched by torch.func.vmap: the number of bags is data-dependent "
                "(pass the same groups to every vmapped call, in_dims=None)"
            )
        unique, inverse = torch.unique(groups, return_inverse=True)  # the one host synchronisation
        if torch.compiler.is_compiling() or unique.numel() > 1:
            ids, num, source = inverse, unique.numel(), "groups"
    if ids is None and kept is None:
        return _core.stats.WHOLE
    counts = _core.stats.segment_counts(input, ids, num, mask)
    if (mask is not None or groups is not None) and readable(counts) and bool((counts <= 1).any()):
        least = int(counts.min().item())
        names = "mask" if groups is None else ("groups and mask" if mask is not None else source)
        raise ValueError(
            "Expected more than 1 value per channel when training in every segment of the statistics, "
            f"but a segment selected by {names} has {least} (input size {input.size()})"
        )
    return _core.stats.Segments(ids, num, counts, kept)


def _synced_segments(
    input: Tensor,
    groups: Tensor | None,
    virtual_batch_size: int | None,
    mask: Tensor | None,
    group: Any,
) -> _core.stats.Segments:
    """This rank's segments, to be combined with the other ranks' (``_core.sync``), which also checks the
    counts -- globally. Bags keep their ids (``keys``) even when this rank holds one, or none."""
    if virtual_batch_size is not None:
        raise ValueError(
            "virtual_batch_size cannot be combined with statistics across processes: ghost batches are "
            "chunks of one process's batch (use flexbn.BatchNorm1d/2d/3d, or process_group=None)"
        )
    if input.shape[1] == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    kept = None if mask is None else mask.unsqueeze(1)
    if groups is None:
        counts = None if mask is None else _core.stats.segment_counts(input, None, 1, mask)
        return _core.stats.Segments(None, 1, counts, kept, group)
    keys, ids = torch.unique(groups, return_inverse=True)
    counts = _core.stats.segment_counts(input, ids, keys.numel(), mask)
    return _core.stats.Segments(ids, keys.numel(), counts, kept, group, keys)


def readable(t: Tensor) -> bool:
    """Whether a data-dependent check may read ``t``'s values on the host: not while ``torch.compile``
    traces (it would break the graph) and not for a tensor batched by ``torch.func.vmap`` (data-dependent
    control flow). Those checks are skipped there."""
    return not torch.compiler.is_compiling() and not _vmapped(t)


def _vmapped(t: Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap`` (at any level of nested transforms)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):  # vmap / grad wrappers, outermost first
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _check_stats_input(stats_input: object, input: Tensor) -> None:
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


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, but got {type(value).__name__} ({value!r})")


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
) -> None:
    """Validate the torch-compatible arguments: what ``torch.nn.functional.batch_norm`` raises, in its order.

    torch checks in Python first (one value per channel, ``eps``), returns early for an empty input, then
    checks each given tensor's size (and that eval mode has running statistics), then the pairing of the
    running statistics, then dtypes.
    """
    if not isinstance(input, Tensor):
        raise TypeError(
            f"batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}"
        )
    if not isinstance(training, bool):
        raise TypeError(
            f"batch_norm(): argument 'training' (position 6) must be bool, not {type(training).__name__}"
        )
    if not isinstance(momentum, (Real, Tensor)):
        raise TypeError(
            "batch_norm(): argument 'momentum' (position 7) must be float, "
            f"not {type(momentum).__name__}"
        )
    if not isinstance(eps, (Real, Tensor)):
        raise TypeError(
            f"batch_norm(): argument 'eps' (position 8) must be float, not {type(eps).__name__}"
        )
    if input.dim() < 2:
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
        if t is not None and t.numel() != channels:
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
