"""The core every public entry point composes: moments over S -> normalize -> update running stats (P).

Arguments reaching here are already validated (``flexbn.functional``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import stats
from .autograd import BatchNormFunction, BatchNormFunctionNoJvp

__all__ = ["batch_norm", "batch_norm_functional"]


def batch_norm(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, *args: Any, **kwargs: Any
) -> Tensor:
    """:func:`batch_norm_functional` that writes the new running statistics into the buffers, in place."""
    y, new_mean, new_var = batch_norm_functional(x, running_mean, running_var, *args, **kwargs)
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
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Normalize ``x`` with batch statistics or with running ones: ``(output, new_running_mean,
    new_running_var)``, the buffers untouched (pure, for ``torch.func`` transforms).

    Batch statistics are taken over the segments ``seg`` of ``stats_input`` (default: ``x`` itself). The
    new running statistics are fresh tensors when batch statistics update them, else the given ones.
    """
    new_mean, new_var = running_mean, running_var
    if x.numel() == 0:
        # Empty batch: nothing to take statistics over and nothing to update. As torch, a fresh tensor of the
        # input's shape that keeps the gradient chain (zero gradients for weight and bias).
        y = x.clone() if weight is None else x * weight[0]
        return (y if bias is None else y + bias[0]), new_mean, new_var
    cdt = stats.compute_dtype(x.dtype)
    with torch.no_grad():
        if use_batch_stats:
            source = x if stats_input is None else stats_input
            m = stats.moments(source.detach(), seg)  # detach: also drops forward-mode tangents
            shift, delta, var = m
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
    # Dynamo cannot trace a Function with a custom jvp: under torch.compile, the same Function without it.
    fn = BatchNormFunctionNoJvp if torch.compiler.is_compiling() else BatchNormFunction
    y = fn.apply(x, weight, bias, stats_input, shift, delta, invstd, eps, grad_mean, grad_var, seg)
    return y, new_mean, new_var
