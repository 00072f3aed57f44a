"""The ``cpp`` backend: hand-written C++/OpenMP kernels (``kernels.cpp``) for CPU tensors.

The core's three hot functions -- ``stats.moments``, ``autograd.normalize`` and
``autograd.backward_formula`` -- each become one or two passes over the input, for every statistics set
(whole batch, mask, bags, ghost batches, domains) and gradient mode, in every memory layout: contiguous
input is reduced row by row, channels_last and ``(N, C)`` input with the channels as the vector lanes.
Statistics are sums of deviations from a shift kept near each mean, merged in float64 with Chan's formulas
(``kernels.cpp`` notes, ``docs/numerics.md``): one read of the input, and no cancellation however large
the mean. The library shares torch's OpenMP runtime (the same ``libgomp``) and uses
``torch.get_num_threads()`` threads.

The library is obtained by ``native`` (built at install time, else at first use). float16 and
bfloat16 input is upcast to float32 first, as the reference does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import native, stats
from .native import build_info, cache_dir, library, why_not

# -------------------------------------------------------------------------------------------------------
# Geometry: how a tensor is laid out for the kernels.


class _Geo:
    """The kernels' view of a batch: layout, sizes, segment ids and mask (kept alive with the call)."""

    def __init__(self, x: Tensor, seg: stats.Segments) -> None:
        n, c = x.shape[0], x.shape[1]
        self.n, self.c = n, c
        self.l = x.numel() // (n * c)
        if x.dim() == 2:
            self.layout, self.format = 1, torch.contiguous_format
        elif (
            x.dim() in (4, 5)
            and not x.is_contiguous()
            and x.is_contiguous(
                memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            )
        ):
            self.layout = 1
            self.format = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        else:
            self.layout, self.format = 0, torch.contiguous_format
        self.ids = None if seg.ids is None else seg.ids.to(torch.int64).contiguous()
        self.g = 1 if seg.ids is None else int(seg.num)
        self.mask = None
        if seg.mask is not None:
            self.mask = seg.mask.reshape(n, self.l).to(torch.bool).contiguous()

    def like(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t`` in the kernels' dtype and this layout (a copy only where needed)."""
        return t.to(dtype).contiguous(memory_format=self.format)

    def args(self) -> list[Any]:
        return [
            self.n,
            self.c,
            self.l,
            self.layout,
            self.ids,
            self.g,
            self.mask,
            torch.get_num_threads(),
        ]

    def elementwise(self) -> tuple[list[Any], int]:
        """Geometry arguments for the elementwise kernels, and how many times per-channel tables must
        be tiled for them: channels-last rows of one segment and no mask are independent of their row,
        so ``k`` consecutive rows are handed over as one row of ``k * C`` values (the kernels' per-row
        work then covers at least ~1024 values)."""
        rows = self.n * self.l
        if self.layout != 1 or self.ids is not None or self.mask is not None or self.c >= _WIDE:
            return self.args(), 1
        k = max(d for d in range(1, _WIDE // self.c + 1) if rows % d == 0)
        return [rows // k, self.c * k, 1, 1, None, 1, None, torch.get_num_threads()], k

    def param(self, t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """A per-channel ``(C,)`` or per-segment ``(G, C)`` value as a contiguous ``(G, C)`` table."""
        if t is None:
            return None
        if self.g == 1 and t.dim() == 1 and t.dtype == dtype and t.is_contiguous():
            return t  # a (C,) table already is a contiguous (1, C) one
        return t.to(dtype).expand(self.g, self.c).contiguous()


_PLAIN = (Tensor, torch.nn.Parameter)
_WIDE = 1024  # values per row the elementwise kernels are given at least, where rows can be merged


def _tiled(t: Tensor | None, k: int) -> Tensor | None:
    """A ``(1, C)`` table repeated for ``k`` merged rows: ``(1, k * C)``."""
    return t if t is None or k == 1 else t.reshape(1, -1).repeat(1, k)


def supports(*tensors: Tensor) -> bool:
    """Whether the kernels take a call on these tensors (the input first): all on the CPU, strided, plain
    tensors or parameters (not subclasses such as fake or functorch tensors, nor negated views), the input
    floating point and not empty."""
    if not tensors or not tensors[0].is_floating_point() or tensors[0].numel() == 0:
        return False
    for t in tensors:
        if not t.is_cpu or type(t) not in _PLAIN or t.layout is not torch.strided:
            return False
        if t.is_neg() or t.is_conj():  # lazily negated views: their memory is not their value
            return False
    return True


# -------------------------------------------------------------------------------------------------------
# The three core functions.


def moments(x: Tensor, seg: stats.Segments = stats.WHOLE) -> stats.Moments:
    """:func:`stats.moments` on the kernels: ``shift`` is the float64 mean rounded to the compute dtype,
    ``delta`` the rounding residual."""
    cdt = stats.compute_dtype(x.dtype)
    geo = _Geo(x, seg)
    xk = geo.like(x, cdt)
    count = torch.empty(geo.g, dtype=torch.float64)
    mean = torch.empty(geo.g, geo.c, dtype=torch.float64)
    m2 = torch.empty(geo.g, geo.c, dtype=torch.float64)
    native.call("moments", cdt, xk, *geo.args(), count, mean, m2)
    shift = mean.to(cdt)
    delta = (mean - shift.double()).to(cdt)
    var = (m2 / count.clamp_min(1).unsqueeze(1)).to(cdt)
    if seg.ids is None:
        shift, delta, var = shift[0], delta[0], var[0]
    return stats.Moments(shift, delta, var)


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    shift: Tensor,
    delta: Tensor | None,
    invstd: Tensor,
    seg: stats.Segments = stats.WHOLE,
) -> Tensor:
    """:func:`autograd.normalize` on the kernels: one pass, ``((x - shift) - delta) * scale + bias``."""
    cdt = stats.compute_dtype(x.dtype)
    geo = _Geo(x, seg)
    xk = geo.like(x, cdt)
    scale = invstd if weight is None else invstd * weight
    flat, tile = geo.elementwise()
    tables = [_tiled(geo.param(t, cdt), tile) for t in (shift, delta, scale, bias)]
    y = torch.empty_like(xk, memory_format=geo.format)
    native.call("normalize", cdt, xk, y, *flat, *tables)
    return y.to(x.dtype)


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
    """:func:`autograd.backward_formula` on the kernels: one pass of sums over ``dy`` and ``x``, then one
    pass writing each gradient, ``a * dy + keep * (b * (source - shift) + d)`` with per-(segment, channel)
    coefficients formed here in float64."""
    from . import sync
    from .autograd import _memory_format

    if var_mean is not None:  # the backward is being differentiated: the reference builds the graph
        return NotImplemented
    need_input, need_weight, need_bias, need_z = needs
    cdt = stats.compute_dtype(x.dtype)
    geo = _Geo(x, seg)
    xk, gk = geo.like(x, cdt), geo.like(grad_out, cdt)
    need_stats = need_input if z is None else need_z
    need_sum_gxmu = need_weight or (need_stats and grad_var)
    need_sum_g = need_bias or (need_stats and grad_mean) or (need_sum_gxmu and delta is not None)
    synced = seg.group is not None and (grad_mean or grad_var)
    shift_t = geo.param(shift, cdt)
    sum_g = sum_gxmu = local_g = local_gxmu = None
    if need_sum_g or need_sum_gxmu or synced:
        sg = torch.empty(geo.g, geo.c, dtype=torch.float64)
        sgx = torch.empty_like(sg)
        native.call("sums", cdt, gk, xk, shift_t, *geo.args(), sg, sgx)
        if delta is not None:
            sgx = sgx - delta.double() * sg
        if seg.ids is None:
            sg, sgx = sg[0], sgx[0]
        sum_g = local_g = sg
        sum_gxmu = local_gxmu = sgx
        if synced:  # the weight and bias gradients stay local
            sum_g, sum_gxmu = sync.all_sum(seg.group, sg, sgx)

    count = seg.count(x)
    count = count.double() if isinstance(count, Tensor) else float(count)
    inv = invstd.double()
    scale = inv if weight is None else inv * weight.double()
    k = const = None
    if need_stats and grad_var:
        k = inv * inv * sum_gxmu / count
        if delta is not None:
            const = -delta.double() * k
    if need_stats and grad_mean:
        const = sum_g / count if const is None else const + sum_g / count
    b = None if k is None else geo.param(-scale * k, cdt)
    d = None if const is None else geo.param(-scale * const, cdt)
    a = geo.param(scale, cdt)

    def apply(
        a_: Tensor | None,
        u: Tensor | None,
        b_: Tensor | None,
        v: Tensor | None,
        d_: Tensor | None,
        like: Tensor,
    ) -> Tensor:
        out = torch.empty_like(xk, memory_format=geo.format)
        flat, tile = geo.elementwise()
        s_ = shift_t if b_ is not None else None
        args = [_tiled(a_, tile), u, _tiled(b_, tile), v if b_ is not None else None]
        args += [_tiled(s_, tile), _tiled(d_, tile)]
        native.call("apply", cdt, *args, out, *flat)
        return out.to(like.dtype).contiguous(memory_format=_memory_format(like))

    grad_input = grad_z = None
    if need_input:
        grad_input = apply(a, gk, b, xk, d, x) if z is None else apply(a, gk, None, None, None, x)
    if need_z and z is not None and (b is not None or d is not None):
        grad_z = apply(None, None, b, geo.like(z, cdt), d, z)
    grad_weight = grad_bias = None
    if need_weight and weight is not None:
        grad_weight = seg.total(local_gxmu * inv, per_segment=weight.dim() == 2).to(cdt)
    if need_bias:
        grad_bias = seg.total(local_g, per_segment=bias_per_segment).to(cdt)
    return grad_input, grad_weight, grad_bias, grad_z


IMPLEMENTATIONS = {
    "moments": moments,
    "normalize": normalize,
    "backward_formula": backward_formula,
}

__all__ = ["IMPLEMENTATIONS", "build_info", "cache_dir", "library", "supports", "why_not"]
