"""The one autograd Function: normalize with per-channel statistics, with an analytic backward.

Forward, per channel (``docs/gradients.md`` derives everything below)::

    y = (x - mean) * (invstd * weight) + bias

The statistics arrive precomputed (no graph). Two flags say whether they are functions of ``x`` for the
purpose of differentiation -- the gradient axis G:

* ``grad_mean``: gradient flows through the batch mean (``False`` = ``x.mean(dims).detach()``);
* ``grad_var``:  gradient flows through the batch variance (``False`` = ``x.var(dims).detach()``).

Both are ``False`` when the statistics are constants (running statistics in eval mode). The statistics set
is a segmentation of the batch (``stats.Segments``): one segment for the whole batch, or one per bag /
ghost batch, each with its own statistics. With ``sum`` over an element's segment and channel, ``M`` that
segment's count, ``g = dy``, ``xmu = x - mean`` and ``s = invstd``::

    grad_bias   = sum over segments of sum(g)
    grad_weight = sum over segments of sum(g * xmu) * s
    grad_input  = weight * s * (g - [grad_mean] * sum(g) / M - [grad_var] * xmu * s^2 * sum(g * xmu) / M)

Only ``x``, ``weight`` and the per-segment statistics are saved; nothing of the input's size.

Double backward: when the backward itself is differentiated (``create_graph=True``), the same formula is
evaluated with autograd on, with the statistics recomputed from the saved ``x`` so that they are functions of
``x`` -- detached where the flags say, exactly as in the hand-written composition. Its derivatives are then
those of the composition ``(x - x.mean().detach?) / sqrt(x.var().detach? + eps)``, to every order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import stats, sync
from .backend import fused


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout of torch's batch-norm output for ``x``: channels-last if ``x`` is, else contiguous."""
    try:
        if not x.is_contiguous():
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
            if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
                return torch.channels_last_3d
    except RuntimeError:  # inside torch.func.vmap, only contiguous_format can be queried ("NYI")
        pass
    return torch.contiguous_format


def _scale(invstd: Tensor, weight: Tensor | None) -> Tensor:
    """``invstd * weight``: per channel, or per segment when either is."""
    return invstd if weight is None else invstd * weight


@fused
def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    shift: Tensor,
    delta: Tensor | None,
    invstd: Tensor,
    seg: stats.Segments = stats.WHOLE,
) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` with ``mean = shift + delta``, in ``x``'s dtype and layout.

    Computed as ``((x - shift) - delta) * scale + bias``: the subtractions come first, so full precision is
    kept when ``|mean| >> std`` (``stats`` module notes), and a constant channel gives exactly ``bias``.
    Not differentiable itself (in-place on its own temporary); :class:`BatchNormFunction` differentiates it.
    """
    nd = x.dim()
    y = stats.upcast(x) - seg.expand(shift, nd)
    if delta is not None:
        y.sub_(seg.expand(delta, nd))
    y.mul_(seg.expand(_scale(invstd, weight), nd))
    if bias is not None:
        y.add_(seg.param(bias, nd))
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x))


def jvp_formula(
    x: Tensor,
    x_t: Tensor | None,
    z: Tensor | None,
    z_t: Tensor | None,
    weight: Tensor | None,
    weight_t: Tensor | None,
    bias_t: Tensor | None,
    shift: Tensor,
    delta: Tensor | None,
    invstd: Tensor,
    *,
    grad_mean: bool,
    grad_var: bool,
    seg: stats.Segments = stats.WHOLE,
) -> Tensor:
    """Forward-mode derivative (tangent of the output) of :func:`normalize` with the statistics' flags.

    The statistics come from ``z`` (``stats_input``; ``None`` means ``x``). With ``s = invstd`` and a
    tangent ``u`` of ``z``, the mean moves by ``[grad_mean] mean(u)`` and the invstd by
    ``-[grad_var] s^3 mean((z - mean) * u)``; so with ``t`` the tangent of ``x``::

        dy = weight * s * (t - [grad_mean] mean(u) - [grad_var] (x - mean) s^2 mean((z - mean) u))
             + (x - mean) * s * dweight + dbias

    Masked-out elements do not move the statistics (``mean`` is over kept elements only) and take none of
    the statistics' or the parameters' tangents: theirs is ``weight * s * t``.
    """
    nd = x.dim()
    cdt = stats.compute_dtype(x.dtype)
    count = seg.count(x)
    xmu = stats.upcast(x) - seg.expand(shift, nd)
    if delta is not None:
        xmu = xmu - seg.expand(delta, nd)
    if z is None:
        z, z_t, zmu = x, x_t, xmu
    else:
        zmu = stats.upcast(z) - seg.expand(shift, nd)
        if delta is not None:
            zmu = zmu - seg.expand(delta, nd)
    scale = seg.expand(_scale(invstd, weight), nd)
    out = torch.zeros((), dtype=cdt, device=x.device)
    stats_term = None  # the statistics' tangent contribution, before the scale
    if z_t is not None:
        u = z_t.to(cdt)
        if grad_mean:
            stats_term = seg.expand(seg.reduce(u) / count, nd)
        if grad_var:
            k = invstd * invstd * seg.reduce(seg.keep(zmu) * u) / count
            var_term = seg.keep(xmu) * seg.expand(k, nd)
            stats_term = var_term if stats_term is None else stats_term + var_term
    if x_t is not None:
        out = out + x_t.to(cdt) * scale
    if stats_term is not None:
        out = out - seg.keep(stats_term * scale)
    if weight_t is not None:
        out = out + seg.keep(xmu * seg.expand(invstd, nd) * seg.param(weight_t, nd))
    if bias_t is not None:
        out = out + seg.keep(seg.param(bias_t, nd).expand(x.shape))
    return out.expand(x.shape).to(x.dtype).contiguous(memory_format=_memory_format(x))


@fused
def backward_formula(
    x: Tensor,
    z: Tensor | None,
    grad_out: Tensor,
    weight: Tensor | None,
    shift: Tensor,
    delta: Tensor | None,
    invstd: Tensor,
    *,
    grad_mean: bool,
    grad_var: bool,
    bias_per_segment: bool = False,
    var_mean: Tensor | None = None,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, True),
    seg: stats.Segments = stats.WHOLE,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(input, weight, bias, stats_input)`` of :func:`normalize` with the statistics' flags.

    The statistics come from ``z`` (``stats_input``; ``None`` means ``x``, and the statistics' gradient then
    joins the input's). ``var_mean`` is the mean inside the variance (the variance's own centring): it
    equals the mean in value and differs from it only as a graph node, when building double-backward graphs
    with the mean detached and the variance not; ``None`` means ``shift + delta``. Masked-out elements take
    part in no sum: their outputs' gradient reaches only their own input, ``dy * weight * invstd``.
    """
    need_input, need_weight, need_bias, need_z = needs
    nd = x.dim()
    count = seg.count(x)
    xa, g = stats.upcast(x), grad_out.to(stats.compute_dtype(x.dtype))
    g_kept = seg.keep(g)
    xs = seg.keep(xa - seg.expand(shift, nd))  # x - mean, up to the per-segment delta
    need_stats = need_input if z is None else need_z
    need_sum_gxmu = need_weight or (need_stats and grad_var)
    need_sum_g = need_bias or (need_stats and grad_mean) or (need_sum_gxmu and delta is not None)
    synced = seg.group is not None and (grad_mean or grad_var)
    if synced:  # every rank adds both of its sums, whatever it needs itself
        need_sum_g = need_sum_gxmu = True
    sum_g = seg.reduce(g_kept) if need_sum_g else None
    sum_gxmu = None
    if need_sum_gxmu:
        sum_gxmu = seg.reduce(g_kept * xs)
        if delta is not None:
            sum_gxmu = sum_gxmu - delta * sum_g
    # The weight and bias gradients stay local (as with torch's SyncBatchNorm).
    local_g, local_gxmu = sum_g, sum_gxmu
    if synced:
        sum_g, sum_gxmu = sync.all_sum(seg.group, sum_g, sum_gxmu)

    # The statistics' gradient reaching their source, before the scale:
    #   stats_term = [mean] sum_g / M + [var] (z - mean) * k,  k = s^2 sum(g (x - mean)) / M
    stats_term, const = None, None
    if need_stats and grad_var:
        k = invstd * invstd * sum_gxmu / count
        if var_mean is not None:
            zc = seg.keep(stats.upcast(x if z is None else z) - seg.expand(var_mean, nd))
        elif z is None:
            zc = xs
            const = None if delta is None else -delta * k
        else:
            zc = seg.keep(stats.upcast(z) - seg.expand(shift, nd))
            const = None if delta is None else -delta * k
        stats_term = zc * seg.expand(k, nd)
    if need_stats and grad_mean:
        const = sum_g / count if const is None else const + sum_g / count
    if const is not None:
        const_term = seg.keep(seg.expand(const, nd).expand(x.shape))
        stats_term = const_term if stats_term is None else stats_term + const_term

    scale = seg.expand(_scale(invstd, weight), nd)
    layout = _memory_format(x)
    grad_input = grad_z = None
    if need_input:
        term = g if (z is not None or stats_term is None) else g - stats_term
        grad_input = term * scale
        if seg.mask is not None:
            # Masked-out outputs are passengers: the scale is a constant to them, to every order.
            grad_input = torch.where(seg.mask, grad_input, g * scale.detach())
        grad_input = grad_input.to(x.dtype).contiguous(memory_format=layout)
    if need_z and z is not None and stats_term is not None:  # else no gradient, as with .detach()
        grad_z = (-stats_term * scale).to(z.dtype).contiguous(memory_format=_memory_format(z))
    grad_weight = None
    if need_weight and weight is not None:
        grad_weight = seg.total(local_gxmu * invstd, per_segment=weight.dim() == 2)
    grad_bias = seg.total(local_g, per_segment=bias_per_segment) if need_bias else None
    return grad_input, grad_weight, grad_bias, grad_z


class BatchNormFunction(torch.autograd.Function):
    """``normalize`` with the analytic backward above. Arguments after ``stats_input`` are not
    differentiable; ``stats_input=None`` means the statistics are those of ``x``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        stats_input: Tensor | None,
        shift: Tensor,
        delta: Tensor | None,
        invstd: Tensor,
        eps: float,
        grad_mean: bool,
        grad_var: bool,
        seg: stats.Segments,
    ) -> Tensor:
        return normalize(x, weight, bias, shift, delta, invstd, seg)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, z, shift, delta, invstd, eps, grad_mean, grad_var, seg = inputs
        ctx.save_for_backward(x, weight, z, shift, delta, invstd)
        ctx.save_for_forward(x, weight, z, shift, delta, invstd)
        ctx.eps, ctx.grad_mean, ctx.grad_var, ctx.seg = eps, grad_mean, grad_var, seg
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.bias_per_segment = bias is not None and bias.dim() == 2
        ctx.bias_like = (
            None if bias is None else bias.new_empty((0,) * bias.dim())
        )  # shape rank only

    @staticmethod
    def jvp(
        ctx: Any,
        x_t: Tensor | None,
        weight_t: Tensor | None,
        bias_t: Tensor | None,
        z_t: Tensor | None,
        *_: Any,
    ) -> Tensor:
        # Tangents of the statistics arguments are ignored: the flags say how the statistics move.
        x, weight, z, shift, delta, invstd = ctx.saved_tensors
        if ctx.seg.group is not None and (ctx.grad_mean or ctx.grad_var):
            raise NotImplementedError(
                "forward-mode AD through batch statistics synchronised across processes is not supported"
            )
        return jvp_formula(
            x,
            x_t,
            z,
            z_t,
            weight,
            weight_t,
            bias_t,
            shift,
            delta,
            invstd,
            grad_mean=ctx.grad_mean,
            grad_var=ctx.grad_var,
            seg=ctx.seg,
        )

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, z, shift, delta, invstd = ctx.saved_tensors
        grad_mean, grad_var, seg = ctx.grad_mean, ctx.grad_var, ctx.seg
        var_mean = None
        if torch.is_grad_enabled() and (grad_mean or grad_var):
            if seg.group is not None:
                raise NotImplementedError(
                    "double backward through batch statistics synchronised across processes is not "
                    "supported (torch.nn.SyncBatchNorm does not support it either)"
                )
            # Double backward: the statistics as differentiable functions of their source, detached as
            # configured.
            m = stats.moments(x if z is None else z, seg)
            mean = m.mean
            shift, delta, var_mean = (mean if grad_mean else mean.detach()), None, mean
            invstd = stats.invstd(m.var if grad_var else m.var.detach(), ctx.eps)
        gx, gw, gb, gz = backward_formula(
            x,
            z,
            grad_out,
            weight,
            shift,
            delta,
            invstd,
            grad_mean=grad_mean,
            grad_var=grad_var,
            bias_per_segment=ctx.bias_per_segment,
            var_mean=var_mean,
            needs=tuple(ctx.needs_input_grad[:4]),
            seg=seg,
        )
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(ctx.bias_dtype)
        return gx, gw, gb, gz, None, None, None, None, None, None, None


class BatchNormFunctionNoJvp(BatchNormFunction):
    """:class:`BatchNormFunction` without the custom ``jvp``, for ``torch.compile``: Dynamo cannot trace a
    Function that defines one (forward-mode AD of compiled code is then unsupported)."""

    jvp = staticmethod(torch.autograd.Function.jvp)
