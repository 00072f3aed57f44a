"""The ``cpp`` backend: the core's operations on hand-written C++/OpenMP kernels (``kernels.cpp``).

Each operation of ``reference`` becomes one call into the library -- one or two passes over the input --
for every statistics set (whole batch, mask, bags, ghost batches, domains) and gradient mode, in every
memory layout: contiguous input is reduced row by row, channels_last and ``(N, C)`` input with the
channels as the vector lanes. The per-(segment, channel) tables are formed inside the library from the
statistics currency, in the precision the reference uses, so a call costs little beyond its passes. The
library shares torch's OpenMP runtime (the same ``libgomp``) and uses ``torch.get_num_threads()`` threads.

The library is obtained by ``native`` (built once per machine, cached on disk). float16 and bfloat16
input is upcast to float32 first, as the reference does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import native, reference
from .native import build_info, cache_dir, library, why_not
from .segments import WHOLE, Segments
from .stats import Moments

__all__ = [
    "backward",
    "backward_sums",
    "build_info",
    "cache_dir",
    "forward",
    "library",
    "moments",
    "normalize",
    "running_update",
    "supports",
    "why_not",
]

_F64 = torch.float64
_KERNEL_DTYPES = (torch.float32, torch.float64)
GRAIN = 1 << 15
"""Values per thread below which a call takes fewer threads (torch's own grain,
``at::internal::GRAIN_SIZE``): waking a thread for a smaller share costs more than it saves, and on a
busy machine much more."""
_PLAIN = (Tensor, torch.nn.Parameter)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def supports(*tensors: Tensor | None) -> bool:
    """Whether the kernels take a call on these tensors (the input first): all on the CPU, strided, plain
    tensors or parameters (not subclasses such as fake or functorch tensors, nor lazily negated views), the
    input floating point and not empty."""
    x = tensors[0]
    if x is None or not x.is_floating_point() or x.numel() == 0:
        return False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or not t.is_cpu or t.layout is not torch.strided:
            return False
        if t.is_neg() or t.is_conj():  # lazily negated views: their memory is not their value
            return False
    return True


class _Geo:
    """The kernels' view of a batch: sizes, layout, segment ids and mask (kept alive with the call)."""

    __slots__ = ("args", "cdt", "format", "g", "layout", "x")

    def __init__(self, x: Tensor, seg: Segments) -> None:
        n, c = x.shape[0], x.shape[1]
        self.cdt = torch.float32 if x.dtype not in _KERNEL_DTYPES else x.dtype
        if x.dtype != self.cdt:
            x = x.to(self.cdt)
        if x.dim() == 2:
            layout, fmt = 1, torch.contiguous_format
            if not x.is_contiguous():
                x = x.contiguous()
        elif x.is_contiguous():
            layout, fmt = 0, torch.contiguous_format
        else:
            fmt = _CHANNELS_LAST.get(x.dim(), torch.contiguous_format)
            if fmt is not torch.contiguous_format and x.is_contiguous(memory_format=fmt):
                layout = 1
            else:
                layout, fmt, x = 0, torch.contiguous_format, x.contiguous()
        self.x, self.layout, self.format = x, layout, fmt
        length = x.numel() // (n * c) if n * c else 0
        ids = seg.ids
        if ids is not None:  # what the kernels trust: one id per sample (each id is checked there)
            if ids.dim() != 1 or ids.shape[0] != n:
                raise ValueError(f"segment ids must have shape ({n},), but got {tuple(ids.shape)}")
            if ids.dtype != torch.int64 or not ids.is_contiguous():
                ids = ids.to(torch.int64).contiguous()
        mask = seg.mask
        if mask is not None:
            if mask.numel() != n * length:
                raise ValueError(
                    f"mask must have {n * length} elements (N x spatial), but got {mask.numel()}"
                )
            mask = mask.reshape(n, length)
            if mask.dtype != torch.bool or not mask.is_contiguous():
                mask = mask.to(torch.bool).contiguous()
        self.g = 1 if ids is None else seg.num
        threads = torch.get_num_threads()
        if threads > 1:
            threads = max(1, min(threads, n * c * length // GRAIN))
        self.args = [n, c, length, layout, ids, self.g, mask, threads]

    def like(self, t: Tensor) -> Tensor:
        """``t`` in the kernels' dtype and this layout (a copy only where needed)."""
        if t.dtype != self.cdt:
            t = t.to(self.cdt)
        if not t.is_contiguous(memory_format=self.format):
            t = t.contiguous(memory_format=self.format)
        return t

    def empty(self) -> Tensor:
        return torch.empty_like(self.x, memory_format=self.format)


def _table(t: Tensor | None, dtype: torch.dtype) -> tuple[Tensor | None, int]:
    """``(table, rows)`` of a ``(C,)`` or ``(rows, C)`` parameter in ``dtype``, contiguous."""
    if t is None:
        return None, 1
    if t.dtype != dtype or not t.is_contiguous():
        t = t.to(dtype).contiguous()
    return t, (1 if t.dim() == 1 else t.shape[0])


def _f64(t: Tensor) -> Tensor:
    return t if t.dtype == _F64 and t.is_contiguous() else t.to(_F64).contiguous()


def _stats(m: Moments) -> list[Any]:
    """The currency's tables (float64, contiguous) and their row count, as the kernels take them."""
    mean = _f64(m.mean)
    return [_f64(m.count), mean, _f64(m.m2), mean.shape[0]]


def _new_tables(g: int, c: int) -> Moments:
    """Empty currency tables ``(G,)``, ``(G, C)``, ``(G, C)``."""
    return Moments(
        torch.empty(g, dtype=_F64), torch.empty(g, c, dtype=_F64), torch.empty(g, c, dtype=_F64)
    )


def _pair(sums: tuple[Tensor, Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
    return (None, None) if sums is None else (_f64(sums[0]), _f64(sums[1]))


def moments(x: Tensor, seg: Segments = WHOLE) -> Moments:
    """:func:`reference.moments` on the kernels: one read of the input."""
    geo = _Geo(x, seg)
    m = _new_tables(geo.g, x.shape[1])
    native.call("moments", geo.cdt, geo.x, *geo.args, *m)
    if not bool(torch.isfinite(m.mean).all()):
        m = reference.finite_means(geo.x, seg, m)
    return m


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    m: Moments,
    eps: float,
    seg: Segments = WHOLE,
) -> Tensor:
    """:func:`reference.normalize` on the kernels: one pass, ``((x - shift) - delta) * scale + bias``."""
    geo = _Geo(x, seg)
    w, w_rows = _table(weight, geo.cdt)
    b, b_rows = _table(bias, geo.cdt)
    y = geo.empty()
    native.call(
        "normalize_stats",
        geo.cdt,
        geo.x,
        y,
        *geo.args,
        *_stats(m),
        float(eps),
        w,
        w_rows,
        b,
        b_rows,
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)


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
    """:func:`reference.forward` in one call: the moments of ``source``, the count check, the running
    update, the normalized ``x``."""
    geo = _Geo(x, seg)
    if running is not None and not (running_supported(*running) and running[0].dtype == geo.cdt):
        y, m = forward(x, source, weight, bias, None, momentum, eps, seg, check)
        if y is not None:  # buffers of another dtype (a float16 module): updated by the reference
            reference.running_update(*running, m, momentum)
        return y, m
    m = _new_tables(geo.g, x.shape[1])
    src = geo.x if source is x else geo.like(source)
    w, w_rows = _table(weight, geo.cdt)
    b, b_rows = _table(bias, geo.cdt)
    rm = rv = per_row = None
    rows, factor = 1, 0.0
    if running is not None:
        rm, rv = running
        rows = 1 if rm.dim() == 1 else rm.shape[0]
        per_row, factor = _momentum(momentum)
    y = geo.empty()
    rc = native.call(
        "forward",
        geo.cdt,
        geo.x,
        src,
        y,
        *geo.args,
        *m,
        float(eps),
        w,
        w_rows,
        b,
        b_rows,
        rm,
        rv,
        rows,
        factor,
        per_row,
        check,
    )
    if rc == native.COUNTS:
        return None, m
    if rc == native.NONFINITE:  # inf/NaN input: torch's means, then the rest of the step
        m = reference.finite_means(src, seg, m)
        if running is not None:
            running_update(*running, m, momentum)
        return normalize(x, weight, bias, m, eps, seg), m
    return (y if y.dtype == x.dtype else y.to(x.dtype)), m


def _momentum(momentum: float | Tensor) -> tuple[Tensor | None, float]:
    """``(per-row momentum table or None, scalar momentum)``."""
    if isinstance(momentum, Tensor):
        if momentum.numel() == 1:
            return None, float(momentum)
        return momentum.to(_F64).contiguous(), 0.0
    return None, float(momentum)


def running_update(
    running_mean: Tensor, running_var: Tensor, m: Moments, momentum: float | Tensor
) -> None:
    """:func:`reference.running_update` in the library (float32/float64 buffers)."""
    per_row, factor = _momentum(momentum)
    native.call_running_update(
        running_mean, running_var, _f64(m.count), _f64(m.mean), _f64(m.m2), factor, per_row
    )


def running_supported(running_mean: Tensor, running_var: Tensor) -> bool:
    """Whether :func:`running_update` takes these buffers (same float32/float64 dtype, contiguous)."""
    return (
        running_mean.dtype in _KERNEL_DTYPES
        and running_var.dtype == running_mean.dtype
        and running_mean.is_contiguous()
        and running_var.is_contiguous()
        and supports(running_mean, running_var)
    )


def backward_sums(g: Tensor, x: Tensor, m: Moments, seg: Segments = WHOLE) -> tuple[Tensor, Tensor]:
    """:func:`reference.backward_sums` on the kernels: one read of ``dy`` and ``x``."""
    geo = _Geo(x, seg)
    gk = geo.like(g)
    mean = _f64(m.mean)
    sg = torch.empty(geo.g, x.shape[1], dtype=_F64)
    sgx = torch.empty_like(sg)
    native.call("backward_sums", geo.cdt, gk, geo.x, *geo.args, mean, mean.shape[0], sg, sgx)
    return sg, sgx


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
    """:func:`reference.backward` on the kernels: one pass writing each gradient asked for (and, without
    ``sums``, the pass of this process's sums before it, in the same call)."""
    need_input, need_weight, need_bias, need_z = needs
    geo = _Geo(x, seg)
    gk = geo.like(g)
    w, w_rows = _table(weight, geo.cdt)
    zk = None if z is None else geo.like(z)
    gx = geo.empty() if need_input else None
    gz = geo.empty() if (need_z and zk is not None and (grad_mean or grad_var)) else None
    c = x.shape[1]
    # (C,) for a (C,) parameter: the kernel writes rows * C values either way
    gw = gb = None
    if need_weight and weight is not None:
        gw = torch.empty(c if weight.dim() == 1 else (w_rows, c), dtype=geo.cdt)
    if need_bias:
        gb = torch.empty(c if bias_rows == 1 else (bias_rows, c), dtype=geo.cdt)
    tensors = [gk, geo.x, zk, gx, gz, *geo.args, *_stats(m), float(eps), w, w_rows]
    outputs = [int(grad_mean), int(grad_var), gw, gb, bias_rows]
    if sums is None:  # this process's sums, formed in the same call
        native.call("backward_local", geo.cdt, *tensors, *outputs)
    else:
        native.call("backward", geo.cdt, *tensors, *_pair(sums), *_pair(local), *outputs)
    if gx is not None and gx.dtype != x.dtype:
        gx = gx.to(x.dtype)
    if gz is not None and z is not None:
        gz = gz.to(z.dtype).contiguous(memory_format=reference.memory_format(z))
    return gx, gw, gb, gz
