"""The ``reference`` backend: every operation of the core in plain torch, and the specification of the others.

The operations act on a batch ``x`` ``(N, C, *)``, its segmentation (``segments.Segments``) and the
statistics currency (``stats.Moments``: ``(G,)`` counts, ``(G, C)`` means and m2, float64 tables):

* :func:`moments` -- the currency of ``x`` per (segment, channel);
* :func:`normalize` -- ``((x - shift) - delta) * invstd * weight + bias`` from the currency;
* :func:`running_update` -- the running statistics' update from the currency (in place);
* :func:`backward_sums` -- ``sum(dy)`` and ``sum(dy * (x - mean))`` per (segment, channel), the two
  reductions of the backward (summed across processes by the core when the statistics are);
* :func:`backward` -- the gradients from those sums.

A table with one row applies to every segment (per-channel running statistics, a shared weight). Everything
here is also differentiable (:func:`backward_formula` builds double-backward graphs from it) and traceable
(``torch.compile`` and ``torch.func`` run it). The C++ kernels compute the same quantities in the same
precision (``kernels.cpp``); ``docs/gradients.md`` derives the formulas.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .plan import readable
from .segments import WHOLE, Segments
from .stats import Moments, compute_dtype, table_dtype

__all__ = [
    "backward",
    "backward_formula",
    "backward_sums",
    "forward",
    "jvp_formula",
    "memory_format",
    "moments",
    "normalize",
    "running_update",
]


# -------------------------------------------------------------------------------------------------------
# Broadcasting per-(segment, channel) tables against the input.


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def expand(t: Tensor, seg: Segments, ndim: int) -> Tensor:
    """A ``(rows, C)`` table (or ``(C,)``) broadcast against an ``ndim``-D input: per channel, or each
    sample's segment's row."""
    if t.dim() == 1 or seg.ids is None:
        return t.reshape((1, -1) + (1,) * (ndim - 2))
    picked = t.index_select(0, seg.ids)
    return picked.reshape(picked.shape + (1,) * (ndim - 2))


def keep(t: Tensor, seg: Segments) -> Tensor:
    """``t`` with masked-out elements replaced by 0 (non-finite padding cannot leak into products)."""
    kept = seg.kept
    return t if kept is None else torch.where(kept, t, 0)


def reduce(t: Tensor, seg: Segments) -> Tensor:
    """Sum an input-shaped ``t`` over each segment's kept elements: ``(G, C)``."""
    t = keep(t, seg)
    if seg.ids is None:
        return t.sum(_reduce_dims(t)).unsqueeze(0)
    per_sample = t.sum(tuple(range(2, t.dim()))) if t.dim() > 2 else t
    return per_sample.new_zeros((seg.num, t.shape[1])).index_add(0, seg.ids, per_sample)


def counts(x: Tensor, seg: Segments, dtype: torch.dtype) -> Tensor:
    """Kept elements per channel in each segment: ``(G,)``."""
    n = x.shape[0]
    if seg.mask is not None:
        per_sample = seg.mask.reshape(n, math.prod(seg.mask.shape[1:])).sum(1, dtype=dtype)
    else:
        spatial = x.numel() // max(n * x.shape[1], 1)
        per_sample = torch.full((n,), spatial, dtype=dtype, device=x.device)
    if seg.ids is None:
        return per_sample.sum().reshape(1)
    return per_sample.new_zeros(seg.num).index_add(0, seg.ids, per_sample)


def memory_format(x: Tensor) -> torch.memory_format:
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


# -------------------------------------------------------------------------------------------------------
# The currency in the compute dtype.


def moments_cdt(x: Tensor, seg: Segments, count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(shift, delta, var)`` ``(G, C)`` in the compute dtype: the mean as ``shift + delta`` and the biased
    variance, by the corrected two-pass algorithm (``stats`` module notes). Differentiable: with autograd
    recording, they are functions of ``x`` with the exact derivatives of the mean and variance. ``count``
    ``(G, 1)`` in the compute dtype, clamped to >= 1."""
    xa = keep(x.to(compute_dtype(x.dtype)), seg)
    nd = x.dim()
    shift = reduce(xa, seg) / count
    xs = keep(xa - expand(shift, seg, nd), seg)
    delta = reduce(xs, seg) / count
    # Pairwise summation of squares; torch.linalg.vector_norm would avoid the temporary but accumulates
    # float32 naively (1e-5 relative error at 256k elements) and is not differentiable at 0.
    var = (reduce(xs.square(), seg) / count - delta * delta).clamp_min(0)
    return shift, delta, var


def tables(m: Moments, eps: float, cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(shift, delta, invstd)`` in the compute dtype from the currency."""
    shift = m.mean.to(cdt)
    delta = (m.mean - shift.to(m.mean.dtype)).to(cdt)
    return shift, delta, torch.rsqrt(m.var.to(cdt) + eps)


# -------------------------------------------------------------------------------------------------------
# The operations.


def moments(x: Tensor, seg: Segments = WHOLE) -> Moments:
    """The currency of ``x`` per (segment, channel) (no gradient)."""
    tdt = table_dtype(x.device)
    count = counts(x, seg, tdt)
    shift, delta, var = moments_cdt(
        x, seg, count.clamp_min(1).unsqueeze(1).to(compute_dtype(x.dtype))
    )
    mean = shift.to(tdt) + delta.to(tdt)
    m = Moments(count, mean, var.to(tdt) * count.unsqueeze(1))
    if readable(mean) and not bool(torch.isfinite(mean).all()):
        m = finite_means(x, seg, m)
    return m


def finite_means(x: Tensor, seg: Segments, m: Moments) -> Moments:
    """``m`` with each mean that is not finite replaced by the plain ``sum / count`` of its values, as
    torch computes it: ``+inf`` where the values hold ``+inf`` alone, NaN where they hold NaN or both
    infinities (a shifted sum gives NaN for both). The variance stays NaN, as torch's."""
    plain = reduce(x.to(m.mean.dtype), seg) / m.count.clamp_min(1).unsqueeze(1)
    return m._replace(mean=torch.where(torch.isfinite(m.mean), m.mean, plain))


def _scale(invstd: Tensor, weight: Tensor | None) -> Tensor:
    """``invstd * weight``: per channel, or per segment when either is."""
    return invstd if weight is None else invstd * weight


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    m: Moments,
    eps: float,
    seg: Segments = WHOLE,
) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` in ``x``'s dtype and layout, computed as
    ``((x - shift) - delta) * scale + bias``: the subtractions come first, so full precision is kept when
    ``|mean| >> std``, and a constant channel gives exactly ``bias``."""
    cdt, nd = compute_dtype(x.dtype), x.dim()
    shift, delta, invstd = tables(m, eps, cdt)
    y = x.to(cdt) - expand(shift, seg, nd)  # a fresh tensor: the rest in place, no more temporaries
    y.sub_(expand(delta, seg, nd))
    y.mul_(expand(_scale(invstd, _as_cdt(weight, cdt)), seg, nd))
    if bias is not None:
        y.add_(expand(_as_cdt(bias, cdt), seg, nd))
    return y.to(x.dtype).contiguous(memory_format=memory_format(x))


def _as_cdt(t: Tensor | None, cdt: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(cdt)


def new_running_stats(
    running_mean: Tensor, running_var: Tensor, m: Moments, momentum: float | Tensor
) -> tuple[Tensor, Tensor]:
    """The updated running statistics as fresh tensors: ``running <- (1 - momentum) * running + momentum *
    batch``, with the unbiased variance ``m2 / (count - 1)``.

    Buffers with one row per segment (per-domain) are updated where the segment has elements, with
    ``momentum`` one value or ``(G, 1)``; per-channel buffers with several segments receive the mean over
    segments of the segment means and unbiased variances (Keras' convention for ghost batches), once.
    ``momentum`` may be a tensor (the cumulative average of ``momentum=None``): no host synchronisation.
    """
    per_segment = running_mean.dim() == 2
    # A segment of one value gives 0 / 0 (NaN, as torch); an empty one (a domain absent from the batch) is
    # left out below.
    unbiased = m.m2 / (m.count.unsqueeze(1).clamp_min(1) - 1)
    mean = m.mean
    if not per_segment:
        mean, unbiased = mean.mean(0), unbiased.mean(0)
    new_mean = momentum * mean + (1 - momentum) * running_mean
    new_var = momentum * unbiased + (1 - momentum) * running_var
    if per_segment:
        present = m.count.unsqueeze(1) > 0
        new_mean = torch.where(present, new_mean, running_mean)
        new_var = torch.where(present, new_var, running_var)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)


def running_update(
    running_mean: Tensor, running_var: Tensor, m: Moments, momentum: float | Tensor
) -> None:
    """:func:`new_running_stats` written into the buffers."""
    new_mean, new_var = new_running_stats(running_mean, running_var, m, momentum)
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)


def forward(
    x: Tensor,
    source: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running: tuple[Tensor, Tensor] | None,
    momentum: float | Tensor,
    eps: float,
    seg: Segments,
    check: int,
) -> tuple[Tensor | None, Moments]:
    """One training forward: the moments of ``source`` (``x``, or ``stats_input``), then -- unless ``check``
    finds a segment of at most one value (``1``: any segment; ``2``: any segment that has values), when the
    output is ``None`` and nothing else happens -- the running statistics' update and the normalized
    ``x``."""
    m = moments(source, seg)
    if check and readable(m.count):  # (no data to check in fake, functional or batched tensors)
        lonely = (m.count <= 1) & (m.count > 0) if check == 2 else m.count <= 1
        if bool(lonely.any()):
            return None, m
    if running is not None:
        running_update(*running, m, momentum)
    return normalize(x, weight, bias, m, eps, seg), m


def _sums(
    g: Tensor, x: Tensor, shift: Tensor, delta: Tensor | None, seg: Segments
) -> tuple[Tensor, Tensor]:
    """``sum(g)`` and ``sum(g * (x - shift - delta))`` per (segment, channel), in the compute dtype."""
    cdt = compute_dtype(x.dtype)
    g_kept = keep(g.to(cdt), seg)
    xs = keep(x.to(cdt) - expand(shift, seg, x.dim()), seg)
    sum_g = reduce(g_kept, seg)
    sum_gxmu = reduce(g_kept * xs, seg)
    if delta is not None:
        sum_gxmu = sum_gxmu - delta * sum_g
    return sum_g, sum_gxmu


def backward_sums(g: Tensor, x: Tensor, m: Moments, seg: Segments = WHOLE) -> tuple[Tensor, Tensor]:
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per (segment, channel), as tables."""
    cdt = compute_dtype(x.dtype)
    shift = m.mean.to(cdt)
    delta = (m.mean - shift.to(m.mean.dtype)).to(cdt)
    sum_g, sum_gxmu = _sums(g, x, shift, delta, seg)
    return sum_g.to(m.mean.dtype), sum_gxmu.to(m.mean.dtype)


def _gradients(
    g: Tensor,
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    shift: Tensor,
    delta: Tensor | None,
    invstd: Tensor,
    count: Tensor,
    sums: tuple[Tensor, Tensor],
    local: tuple[Tensor, Tensor],
    *,
    grad_mean: bool,
    grad_var: bool,
    var_mean: Tensor | None,
    needs: tuple[bool, bool, bool, bool],
    bias_rows: int,
    seg: Segments,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The gradients ``(input, weight, bias, stats_input)`` from the sums, in the compute dtype.

    With ``s = invstd``, ``M`` the segment's count, ``xmu = x - mean``::

        grad_input = weight * s * (g - [grad_mean] sum(g) / M - [grad_var] xmu * s^2 * sum(g * xmu) / M)

    the statistics' part going to ``z`` (``stats_input``) instead when it is given; masked-out elements take
    only their own ``g * weight * s``. ``var_mean`` is the mean inside the variance (double backward with
    the mean detached and the variance not: equal in value, a different graph node).
    """
    need_input, need_weight, need_bias, need_z = needs
    nd, cdt = x.dim(), compute_dtype(x.dtype)
    gc = g.to(cdt)
    sum_g, sum_gxmu = sums
    need_stats = need_input if z is None else need_z
    stats_term = const = None
    if need_stats and grad_var:
        k = invstd * invstd * sum_gxmu / count
        if var_mean is not None:
            source = x if z is None else z
            zc = keep(source.to(cdt) - expand(var_mean, seg, nd), seg)
        else:
            zc = keep((x if z is None else z).to(cdt) - expand(shift, seg, nd), seg)
            const = None if delta is None else -delta * k
        stats_term = zc * expand(k, seg, nd)
    if need_stats and grad_mean:
        const = sum_g / count if const is None else const + sum_g / count
    if const is not None:
        const_term = keep(expand(const, seg, nd).expand(x.shape), seg)
        stats_term = const_term if stats_term is None else stats_term + const_term

    scale = expand(_scale(invstd, _as_cdt(weight, cdt)), seg, nd)
    grad_input = grad_z = None
    if need_input:
        term = gc if (z is not None or stats_term is None) else gc - stats_term
        grad_input = term * scale
        if seg.kept is not None:
            # Masked-out outputs are passengers: the scale is a constant to them, to every order.
            grad_input = torch.where(seg.kept, grad_input, gc * scale.detach())
        grad_input = grad_input.to(x.dtype).contiguous(memory_format=memory_format(x))
    if need_z and z is not None and stats_term is not None:  # else no gradient, as with .detach()
        grad_z = (-stats_term * scale).to(z.dtype).contiguous(memory_format=memory_format(z))
    local_g, local_gxmu = local
    grad_weight = grad_bias = None
    if need_weight and weight is not None:
        grad_weight = local_gxmu * invstd
        if weight.dim() == 1 or weight.shape[0] == 1:
            grad_weight = grad_weight.sum(0).reshape(weight.shape)
    if need_bias:
        grad_bias = local_g if bias_rows != 1 else local_g.sum(0)
    return grad_input, grad_weight, grad_bias, grad_z


def backward(
    g: Tensor,
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    m: Moments,
    eps: float,
    seg: Segments,
    sums: tuple[Tensor, Tensor] | None,
    local: tuple[Tensor, Tensor] | None,
    *,
    grad_mean: bool,
    grad_var: bool,
    needs: tuple[bool, bool, bool, bool],
    bias_rows: int = 1,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The gradients ``(input, weight, bias, stats_input)`` of :func:`normalize` from the sums of
    :func:`backward_sums` added across processes (``sums``), weight and bias gradients from ``local`` (this
    process's sums), as tables (``(C,)`` unless the parameter is per segment) in the compute dtype.
    ``sums=None``: one process -- its sums are formed here, where a gradient asked for needs them."""
    cdt = compute_dtype(x.dtype)
    shift, delta, invstd = tables(m, eps, cdt)
    count = m.count.clamp_min(1).unsqueeze(1).to(cdt)
    if sums is None:  # this process's sums, where a gradient asked for needs them
        need_input, need_weight, need_bias, need_z = needs
        stats = (need_input if z is None else need_z) and (grad_mean or grad_var)
        if stats or need_weight or need_bias:
            sums = local = _sums(g, x, shift, delta, seg)
    gx, gw, gb, gz = _gradients(
        g,
        x,
        z,
        weight,
        shift,
        delta,
        invstd,
        count,
        _in(sums, cdt),
        _in(local, cdt),
        grad_mean=grad_mean,
        grad_var=grad_var,
        var_mean=None,
        needs=needs,
        bias_rows=bias_rows,
        seg=seg,
    )
    return gx, gw, gb, gz


def _in(sums: tuple[Tensor, Tensor] | None, cdt: torch.dtype) -> tuple[Any, Any]:
    return (None, None) if sums is None else (sums[0].to(cdt), sums[1].to(cdt))


def backward_formula(
    g: Tensor,
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    eps: float,
    seg: Segments,
    *,
    grad_mean: bool,
    grad_var: bool,
    needs: tuple[bool, bool, bool, bool],
    bias_rows: int = 1,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The backward as a differentiable function of ``x`` (and ``z``): the statistics recomputed from their
    source with autograd recording, detached as the flags say -- exactly the hand composition
    ``(x - x.mean().detach?) / sqrt(x.var().detach? + eps)``, to every order (double backward)."""
    source = x if z is None else z
    cdt = compute_dtype(x.dtype)
    count = counts(source, seg, cdt).clamp_min(1).unsqueeze(1)
    shift, delta, var = moments_cdt(source, seg, count)
    mean = shift + delta
    stat_mean = mean if grad_mean else mean.detach()
    invstd = torch.rsqrt((var if grad_var else var.detach()) + eps)
    sums = _sums(g, x, stat_mean, None, seg)
    gx, gw, gb, gz = _gradients(
        g,
        x,
        z,
        weight,
        stat_mean,
        None,
        invstd,
        count,
        sums,
        sums,
        grad_mean=grad_mean,
        grad_var=grad_var,
        var_mean=mean,
        needs=needs,
        bias_rows=bias_rows,
        seg=seg,
    )
    return gx, gw, gb, gz


def jvp_formula(
    x: Tensor,
    x_t: Tensor | None,
    z: Tensor | None,
    z_t: Tensor | None,
    weight: Tensor | None,
    weight_t: Tensor | None,
    bias_t: Tensor | None,
    m: Moments,
    eps: float,
    *,
    grad_mean: bool,
    grad_var: bool,
    seg: Segments = WHOLE,
    stats_t: tuple[Tensor | None, Tensor | None] | None = None,
) -> Tensor:
    """Forward-mode derivative (tangent of the output) of :func:`normalize` with the statistics' flags.

    The statistics come from ``z`` (``stats_input``; ``None`` means ``x``). With ``s = invstd`` and a
    tangent ``u`` of ``z``, the mean moves by ``[grad_mean] mean(u)`` and the invstd by
    ``-[grad_var] s^3 mean((z - mean) * u)``; so with ``t`` the tangent of ``x``::

        dy = weight * s * (t - [grad_mean] mean(u) - [grad_var] (x - mean) s^2 mean((z - mean) u))
             + (x - mean) * s * dweight + dbias

    Masked-out elements do not move the statistics and take none of their tangents: theirs is
    ``weight * s * t``. ``stats_t``: tangents ``(mean_t, m2_t)`` of the tables themselves when they are
    running statistics (eval), which move the output by ``-weight * s * (mean_t + (x - mean) s^2 var_t / 2)``.
    """
    nd, cdt = x.dim(), compute_dtype(x.dtype)
    shift, delta, invstd = tables(m, eps, cdt)
    count = m.count.clamp_min(1).unsqueeze(1).to(cdt)
    xmu = x.to(cdt) - expand(shift, seg, nd) - expand(delta, seg, nd)
    if z is None:
        z, z_t, zmu = x, x_t, xmu
    else:
        zmu = z.to(cdt) - expand(shift, seg, nd) - expand(delta, seg, nd)
    scale = expand(_scale(invstd, _as_cdt(weight, cdt)), seg, nd)
    out = torch.zeros((), dtype=cdt, device=x.device)
    stats_term = None
    if z_t is not None:
        u = z_t.to(cdt)
        if grad_mean:
            stats_term = expand(reduce(u, seg) / count, seg, nd)
        if grad_var:
            k = invstd * invstd * reduce(keep(zmu, seg) * u, seg) / count
            var_term = keep(xmu, seg) * expand(k, seg, nd)
            stats_term = var_term if stats_term is None else stats_term + var_term
    if x_t is not None:
        out = out + x_t.to(cdt) * scale
    if stats_term is not None:
        out = out - keep(stats_term * scale, seg)
    if weight_t is not None:
        out = out + keep(xmu * expand(invstd, seg, nd) * expand(weight_t.to(cdt), seg, nd), seg)
    if bias_t is not None:
        out = out + keep(expand(bias_t.to(cdt), seg, nd).expand(x.shape), seg)
    if stats_t is not None:
        mean_t, m2_t = stats_t
        moved = torch.zeros((), dtype=cdt, device=x.device)
        if mean_t is not None:
            moved = moved + expand(mean_t.to(cdt), seg, nd)
        if m2_t is not None:
            var_t = m2_t.to(cdt) / count
            moved = moved + xmu * expand(invstd * invstd * var_t / 2, seg, nd)
        out = out - keep(moved * scale, seg)
    return out.expand(x.shape).to(x.dtype).contiguous(memory_format=memory_format(x))
