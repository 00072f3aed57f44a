"""The core every public entry point composes: moments over S -> normalize -> update running stats (P).

Arguments reaching here are already validated (``flexbn.functional``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import renorm as _renorm
from . import stats, sync
from .autograd import BatchNormFunction, BatchNormFunctionNoJvp, normalize

__all__ = ["batch_norm", "batch_norm_functional"]


def batch_norm(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, *args: Any, **kwargs: Any
) -> Tensor:
    """:func:`batch_norm_functional` that writes the new running statistics into the buffers, in place.

    Not in a recomputation (activation checkpointing reruns the forward during backward): the first forward
    updated them already, and batch renormalization's corrections are those of the first forward
    (``renorm`` module notes).
    """
    recompute = _renorm.recomputing()
    y, new_mean, new_var = batch_norm_functional(
        x, running_mean, running_var, *args, in_place=True, **kwargs
    )
    if recompute:
        return y
    if new_mean is not running_mean and running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


def batch_norm_functional(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_batch_stats: bool,
    momentum: float | Tensor,
    eps: float,
    detach_mean: bool,
    detach_var: bool,
    seg: stats.Segments = stats.WHOLE,
    stats_input: Tensor | None = None,
    renorm: tuple[float | Tensor, float | Tensor] | None = None,
    *,
    in_place: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Normalize ``x`` with batch statistics or with running ones: ``(output, new_running_mean,
    new_running_var)``, the buffers untouched (pure, for ``torch.func`` transforms).

    Batch statistics are taken over the segments ``seg`` of ``stats_input`` (default: ``x`` itself). The
    new running statistics are fresh tensors when batch statistics update them, else the given ones.

    ``renorm=(rmax, dmax)``: batch renormalization with batch statistics and running statistics (both
    checked present by the caller), as the effective affine parameters of ``renorm.affine``. ``in_place``:
    the caller writes the new running statistics into the given buffers (:func:`batch_norm`), so a
    recomputation must reuse the first forward's corrections.
    """
    new_mean, new_var = running_mean, running_var
    if x.numel() == 0 and seg.group is None:
        # Empty batch: nothing to take statistics over and nothing to update. As torch, a fresh tensor of the
        # input's shape that keeps the gradient chain (zero gradients for weight and bias).
        y = x.clone() if weight is None else x * weight[0]
        return (y if bias is None else y + bias[0]), new_mean, new_var
    cdt = stats.compute_dtype(x.dtype)
    r_d = None
    with torch.no_grad():
        if use_batch_stats:
            source = x if stats_input is None else stats_input
            m = stats.moments(source.detach(), seg)  # detach: also drops forward-mode tangents
            if seg.group is not None:  # combined with the other ranks' moments: one collective
                flags = (detach_mean, detach_var, stats_input is not None)
                m, seg = sync.exchange(m, seg, x, eps, flags)
            shift, delta, var = m
            if renorm is not None and running_mean is not None and running_var is not None:
                args = (m.mean, var, running_mean, running_var, eps, *renorm)
                if in_place:
                    r_d = _renorm.checkpointed_corrections(
                        running_mean, *args, _renorm.recomputing()
                    )
                else:
                    r_d = _renorm.corrections(*args)
            if running_mean is not None and running_var is not None:
                new_mean, new_var = stats.new_running_stats(
                    running_mean, running_var, m.mean, var, x, seg, momentum
                )
            grad_mean, grad_var = not detach_mean, not detach_var
            if detach_mean and detach_var:
                stats_input = None  # no gradient reaches it, and the output should not require one
        else:  # running statistics, checked to be present by the caller
            shift, delta = running_mean.to(cdt), None  # type: ignore[union-attr]
            var = running_var.to(cdt)  # type: ignore[union-attr]
            grad_mean = grad_var = False
            if shift.dim() == 1:  # per-channel running statistics apply to every segment
                seg = stats.Segments(mask=seg.mask)
            stats_input = None
        invstd = stats.invstd(var, eps)
    if r_d is not None:
        weight, bias = _renorm.affine(weight, bias, *r_d)
    if _untracked(
        x, weight, bias, stats_input
    ):  # nothing to differentiate: skip autograd's machinery
        return normalize(x, weight, bias, shift, delta, invstd, seg), new_mean, new_var
    # Dynamo cannot trace a Function with a custom jvp: under torch.compile, the same Function without it.
    fn = BatchNormFunctionNoJvp if torch.compiler.is_compiling() else BatchNormFunction
    y = fn.apply(x, weight, bias, stats_input, shift, delta, invstd, eps, grad_mean, grad_var, seg)
    return y, new_mean, new_var


def _untracked(*tensors: Tensor | None) -> bool:
    """Whether no derivative of the output can be asked for: grad mode off (or no input requiring
    grad), no forward-mode AD level open, not traced, no torch.func transform."""
    if torch.compiler.is_compiling() or getattr(forward_ad, "_current_level", 0) >= 0:
        return False
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in present)
