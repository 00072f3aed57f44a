"""The one autograd Function: normalize with per-channel statistics, with an analytic backward.

Forward, per channel (``docs/gradients.md`` derives everything below)::

    y = (x - mean) * (invstd * weight) + bias

The statistics arrive precomputed (no graph). Two flags say whether they are functions of ``x`` for the
purpose of differentiation -- the gradient axis G:

* ``grad_mean``: gradient flows through the batch mean (``False`` = ``x.mean(dims).detach()``);
* ``grad_var``:  gradient flows through the batch variance (``False`` = ``x.var(dims).detach()``).

Both are ``False`` when the statistics are constants (running statistics in eval mode). With ``M`` the
count per channel, ``g = dy``, ``xmu = x - mean`` and ``s = invstd``::

    grad_bias   = sum(g)
    grad_weight = sum(g * xmu) * s
    grad_input  = weight * s * (g - [grad_mean] * sum(g) / M - [grad_var] * xmu * s^2 * sum(g * xmu) / M)

Only ``x``, ``weight`` and the per-channel statistics are saved; nothing of the input's size.

Double backward: when the backward itself is differentiated (``create_graph=True``), the same formula is
evaluated with autograd on, with the statistics recomputed from the saved ``x`` so that they are functions of
``x`` -- detached where the flags say, exactly as in the hand-written composition. Its derivatives are then
those of the composition ``(x - x.mean().detach?) / sqrt(x.var().detach? + eps)``, to every order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import stats


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.preserve_format


def normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor
) -> Tensor:
    """``(x - mean) * (invstd * weight) + bias`` in the compute dtype, returned in ``x``'s dtype and layout.

    Subtracting first keeps full precision when ``|mean| >> std``; the fused ``x * a + b`` form that torch's
    CPU kernel uses cancels catastrophically there.
    """
    nd = x.dim()
    scale = invstd if weight is None else invstd * weight
    y = stats.upcast(x) - stats.per_channel(mean, nd)
    y = y * stats.per_channel(scale, nd)
    if bias is not None:
        y = y + stats.per_channel(bias, nd)
    return y.to(x.dtype)


def backward_formula(
    x: Tensor,
    grad_out: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    *,
    grad_mean: bool,
    grad_var: bool,
    var_mean: Tensor | None = None,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(input, weight, bias)`` of :func:`normalize` with the statistics' gradient flags.

    ``var_mean`` is the mean inside the variance (the variance's own centring); it equals ``mean`` in value and
    differs from it only as a graph node, when the mean is detached but the variance is not.
    """
    need_input, need_weight, need_bias = needs
    nd, dims = x.dim(), stats.reduce_dims(x)
    count = stats.count_per_channel(x)
    xa, g = stats.upcast(x), grad_out.to(stats.compute_dtype(x.dtype))
    xmu = xa - stats.per_channel(mean, nd)
    sum_g = g.sum(dims) if (need_bias or (need_input and grad_mean)) else None
    sum_gxmu = (g * xmu).sum(dims) if (need_weight or (need_input and grad_var)) else None

    grad_input = None
    if need_input:
        term = g
        if grad_mean:
            term = term - stats.per_channel(sum_g / count, nd)
        if grad_var:
            xmu_v = xmu if var_mean is None else xa - stats.per_channel(var_mean, nd)
            term = term - xmu_v * stats.per_channel(invstd * invstd * sum_gxmu / count, nd)
        scale = invstd if weight is None else invstd * weight
        grad_input = (term * stats.per_channel(scale, nd)).to(x.dtype)
        grad_input = grad_input.contiguous(memory_format=_memory_format(x))
    grad_weight = sum_gxmu * invstd if (need_weight and weight is not None) else None
    grad_bias = sum_g if need_bias else None
    return grad_input, grad_weight, grad_bias


class BatchNormFunction(torch.autograd.Function):
    """``normalize`` with the analytic backward above. Arguments after ``bias`` are not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        eps: float,
        grad_mean: bool,
        grad_var: bool,
    ) -> Tensor:
        return normalize(x, weight, bias, mean, invstd)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _bias, mean, invstd, eps, grad_mean, grad_var = inputs
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.grad_mean, ctx.grad_var = eps, grad_mean, grad_var
        ctx.bias_dtype = None if _bias is None else _bias.dtype

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        grad_mean, grad_var = ctx.grad_mean, ctx.grad_var
        var_mean = None
        if torch.is_grad_enabled() and (grad_mean or grad_var):
            # Double backward: the statistics as differentiable functions of x, detached as configured.
            m, v = stats.moments(x)
            mean = m if grad_mean else m.detach()
            invstd = stats.invstd(v if grad_var else v.detach(), ctx.eps)
            var_mean = m
        gx, gw, gb = backward_formula(
            x,
            grad_out,
            weight,
            mean,
            invstd,
            grad_mean=grad_mean,
            grad_var=grad_var,
            var_mean=var_mean,
            needs=tuple(ctx.needs_input_grad[:3]),
        )
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(ctx.bias_dtype)
        return gx, gw, gb, None, None, None, None, None
