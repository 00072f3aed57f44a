"""The ``triton`` backend: the core's operations as Triton kernels, for CUDA tensors (and for CPU tensors in
Triton's interpreter, ``TRITON_INTERPRET=1``, which is how the tests run them without a GPU).

The batch is viewed as the C++ kernels view it: ``N`` samples, ``C`` channels, ``L`` positions per sample
and channel, laid out ``NCL`` (contiguous tensors of rank >= 3) or ``NLC`` (channels_last tensors, and
``(N, C)``); the statistics set is a segmentation (``segments.Segments``: segment ids per sample, a mask
over ``(N, L)``). Three kernels, each a handful of compile-time variants (``tl.constexpr`` flags):

* ``_reduce`` -- one pass over the input. Each program takes a *unit* -- at most ``chunk`` consecutive rows
  (``(sample, position)`` pairs) of one segment, in the order of the samples sorted by segment -- and a
  block of channels, and forms either the unit's moments or the backward's sums. Moments are sums of
  deviations ``d = x - K`` from a shift ``K``, the mean of the unit's first tile that holds kept values:
  ``d`` and ``d^2`` are summed in float32 per lane over at most 128 values, then in float64, and the unit
  becomes ``(k, mean = K + s1 / k, m2 = s2 - s1^2 / k)`` -- nothing is formed as ``E[x^2] - E[x]^2``, and
  ``x - K`` is exact for values near the mean. The backward's sums are ``sum(dy)`` and
  ``sum(dy * (x - shift))`` by the same rule.
* ``_tables`` -- per block of channels, for each segment: the units combined in float64 in one exact step,
  as ``stats.combine`` does (``mean = sum k_u mean_u / N``, ``m2 = sum m2_u + k_u (mean_u - mean)^2``:
  deviations from the combined mean, no cancellation), or the sums added; the running statistics' update;
  and the per-(segment, channel) tables the next pass reads -- ``shift``, ``delta``, ``scale`` for the output,
  the coefficients of the gradients, the weight and bias gradients -- computed as ``reference`` defines
  them (``reference.tables``, ``reference._gradients``), in the compute dtype.
* ``_apply`` -- one pass writing the output ``((x - shift) - delta) * scale + bias``, or the gradients
  ``(dy - stats) * scale`` and ``-stats * scale`` with ``stats = (source - shift) * k + const`` on kept
  elements.

So a training forward is three launches (moments, tables with the running update, output), the backward
three (sums, coefficients, gradients), and the only memory kept for the backward is the flexbn core's: the
input and ``O(C)`` tables. Every reduction has a fixed order: results do not depend on timing. float16 and
bfloat16 input is read as is and accumulated in float32; float64 input in float64.

The kernels call Triton's builtins only (``tl.reduce`` with the combine function of ``tl.sum``), so that
one source runs both compiled and interpreted in one process, whichever mode Triton was imported in.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .segments import WHOLE, Segments
from .stats import Moments

__all__ = [
    "backward",
    "backward_sums",
    "forward",
    "interpreting",
    "moments",
    "normalize",
    "running_supported",
    "running_update",
    "supports",
    "why_not",
]

_SUM = tl.standard._sum_combine
"""``tl.sum``'s combine function, given to the builtin ``tl.reduce`` (``tl.sum`` itself is a jitted function,
which the interpreter cannot call unless Triton was imported in interpreter mode; it recognises this one and
sums with numpy)."""

_F64 = torch.float64
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
_PLAIN = (Tensor, torch.nn.Parameter)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_MAX_FLUSH = 128  # tiles summed per float32 lane before the lanes join a float64
_OPTIONS = {"enable_fp_fusion": False}
"""Compiler options of every launch: no fused multiply-adds, so the kernels round as ``reference`` writes
the formulas (and as the C++ kernels, built with ``-ffp-contract=off``), whatever Triton's default."""


# -------------------------------------------------------------------------------------------------------
# Kernels. Rows are (sample, position) pairs: row q is position q % L of sample q // L (of the samples
# sorted by segment in ``_reduce`` when ``SEGMENTED``). Tables are (rows, C) row-major; a ``*_step`` of 0
# makes a one-row table apply to every segment.


def _reduce(
    x_ptr,  # the statistics' source (MODE 0) or the input (MODE 1)
    g_ptr,  # MODE 1: the upstream gradient
    mean_ptr,  # MODE 1: the currency's mean (rows, C), float64
    perm_ptr,  # SEGMENTED: the samples sorted by segment (N,)
    mask_ptr,  # MASKED: (N, L), uint8
    start_ptr,  # SEGMENTED: first sorted sample of each segment, (G + 1,)
    ustart_ptr,  # SEGMENTED: first unit of each segment, (G + 1,)
    useg_ptr,  # SEGMENTED: the segment of each unit, (U,)
    n_out,  # MODE 0: elements per unit (U,), float64
    a_out,  # MODE 0: mean per unit; MODE 1: sum(dy) -- (U, C), float64
    b_out,  # MODE 0: m2 per unit; MODE 1: sum(dy * (x - shift)) -- (U, C), float64
    C,
    L,
    NL,
    chunk,
    mean_step,
    MODE: tl.constexpr,  # 0: moments, 1: the backward's sums
    SEGMENTED: tl.constexpr,
    MASKED: tl.constexpr,
    NLC: tl.constexpr,
    CDT: tl.constexpr,  # accumulation dtype: float32, or float64 for float64 input
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    pc = tl.program_id(1)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    if SEGMENTED:
        s = tl.load(useg_ptr + u)
        hi = tl.load(start_ptr + s + 1) * L
        q0 = tl.load(start_ptr + s) * L + (u - tl.load(ustart_ptr + s)) * chunk
    else:
        s = u * 0
        hi = s + NL
        q0 = u * chunk
    q1 = tl.minimum(q0 + chunk, hi)  # an empty unit (past its segment's end) has q1 <= q0

    a1 = tl.full([BLOCK_R, BLOCK_C], 0.0, CDT)
    a2 = tl.full([BLOCK_R, BLOCK_C], 0.0, CDT)
    lanes = tl.full([BLOCK_R], 0, tl.int32)  # kept rows per lane
    shift = tl.full([BLOCK_C], 0.0, CDT)
    found = tl.full([], 0, tl.int32)  # MODE 0: the shift has been taken
    if MODE == 1:
        shift = tl.load(mean_ptr + (s * mean_step) * C + c, mask=cm, other=0.0).to(CDT)
    for q in range(q0, q1, BLOCK_R):
        r = q + tl.arange(0, BLOCK_R)
        valid = r < q1
        p = r // L
        pos = r - p * L
        n = tl.load(perm_ptr + p, mask=valid, other=0) if SEGMENTED else p
        if MASKED:
            kept = valid & (tl.load(mask_ptr + n * L + pos, mask=valid, other=0) != 0)
        else:
            kept = valid
        if NLC:
            off = (n * L + pos)[:, None] * C + c[None, :]
        else:
            off = (n * C)[:, None] * L + c[None, :] * L + pos[:, None]
        take = kept[:, None] & cm[None, :]
        xv = tl.load(x_ptr + off, mask=take, other=0.0).to(CDT)
        if MODE == 0:
            if found == 0:  # the shift: the mean of the first tile holding kept values
                k = tl.reduce(kept.to(tl.int32), 0, _SUM)
                shift = tl.reduce(xv, 0, _SUM) / tl.maximum(k, 1).to(CDT)
                found = (k > 0).to(tl.int32)
            d = tl.where(take, xv - shift[None, :], 0.0)
            a1 += d
            a2 += d * d
        else:
            gv = tl.load(g_ptr + off, mask=take, other=0.0).to(CDT)
            a1 += gv
            a2 += gv * tl.where(take, xv - shift[None, :], 0.0)
        lanes += kept.to(tl.int32)
    s1 = tl.reduce(a1.to(tl.float64), 0, _SUM)
    s2 = tl.reduce(a2.to(tl.float64), 0, _SUM)
    if MODE == 0:
        count = tl.reduce(lanes, 0, _SUM).to(tl.float64)
        inv = 1.0 / tl.maximum(count, 1.0)
        tl.store(n_out + u, count, mask=pc == 0)
        tl.store(a_out + u * C + c, shift.to(tl.float64) + s1 * inv, mask=cm)
        tl.store(b_out + u * C + c, tl.maximum(s2 - s1 * s1 * inv, 0.0), mask=cm)
    else:
        tl.store(a_out + u * C + c, s1, mask=cm)
        tl.store(b_out + u * C + c, s2, mask=cm)


def _tables(
    un_ptr,  # MERGE 1: elements per unit (U,)
    ua_ptr,  # MERGE: per unit, mean (1) or sum(dy) (2) -- (U, C)
    ub_ptr,  # MERGE: per unit, m2 (1) or sum(dy * (x - shift)) (2)
    ustart_ptr,  # MERGE and SEGMENTED: first unit of each segment (R + 1,)
    U,
    n_ptr,  # the currency: count (rows,), mean and m2 (rows, C), float64; written by MERGE 1, else read
    mean_ptr,
    m2_ptr,
    m_step,
    sg_ptr,  # sum(dy) and sum(dy * (x - mean)) (rows, C), float64: written by MERGE 2, read by OUT 2
    sgx_ptr,
    lg_ptr,  # this process's sums (weight and bias gradients), when not those just merged
    lgx_ptr,
    s_step,
    rm_ptr,  # RUNNING: running mean and variance, (C,) (1) or (R, C) (2)
    rv_ptr,
    mom_ptr,  # MOMENTUM 1, 2: the momentum tensor, one value or one per row
    mom_hi,  # MOMENTUM 0: the momentum as float32 hi + lo (Triton passes floats as float32)
    mom_lo,
    w_ptr,
    w_step,
    shift_ptr,  # OUT: tables (R, C) in the compute dtype
    delta_ptr,
    scale_ptr,
    k_ptr,
    const_ptr,
    gw_ptr,  # GW: weight gradient, (C,) (1) or (R, C) (2)
    gb_ptr,  # GB: bias gradient, likewise
    eps_hi,
    eps_lo,
    R,
    C,
    MERGE: tl.constexpr,  # 0: read the currency; 1: combine units' moments; 2: add units' sums
    SEGMENTED: tl.constexpr,
    RUNNING: tl.constexpr,  # 0: none; 1: per-channel buffers; 2: one row per segment
    MOMENTUM: tl.constexpr,
    BUF: tl.constexpr,  # the running buffers' dtype
    NARROW: tl.constexpr,  # ... float16 or bfloat16
    OUT: tl.constexpr,  # 0: none; 1: the output's tables; 2: the gradients' coefficients
    GRAD_MEAN: tl.constexpr,  # OUT 2: the statistics' term, through the mean / the variance
    GRAD_VAR: tl.constexpr,
    HAS_W: tl.constexpr,
    GW: tl.constexpr,
    GB: tl.constexpr,
    CDT: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pc = tl.program_id(0)
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    zero = tl.full(
        [], 0.0, tl.float64
    )  # (float arguments: float32 scalars compiled, floats interpreted)
    eps = ((eps_hi + zero) + eps_lo).to(CDT)  # float32: eps rounded to float32, as torch adds it
    mom = (mom_hi + zero) + mom_lo
    if MOMENTUM == 1:
        mom = tl.load(mom_ptr).to(tl.float64)
    mean_sum = tl.full([BLOCK_C], 0.0, tl.float64)  # RUNNING 1: over rows
    var_sum = tl.full([BLOCK_C], 0.0, tl.float64)
    gw_sum = tl.full([BLOCK_C], 0.0, CDT)
    gb_sum = tl.full([BLOCK_C], 0.0, CDT)
    for r in range(R):
        row = r * C + c
        mrow = (r * m_step) * C + c
        if MERGE != 0:
            if SEGMENTED:
                u0 = tl.load(ustart_ptr + r)
                u1 = tl.load(ustart_ptr + r + 1)
            else:
                u0 = r * 0
                u1 = u0 + U
        if MERGE == 1:
            n_acc = tl.full([BLOCK_U], 0.0, tl.float64)
            s_acc = tl.full([BLOCK_U, BLOCK_C], 0.0, tl.float64)
            for v in range(u0, u1, BLOCK_U):
                uu = v + tl.arange(0, BLOCK_U)
                um = uu < u1
                nu = tl.load(un_ptr + uu, mask=um, other=0.0)
                mu = tl.load(
                    ua_ptr + uu[:, None] * C + c[None, :], mask=um[:, None] & cm[None, :], other=0.0
                )
                n_acc += nu
                s_acc += nu[:, None] * mu
            count = tl.reduce(n_acc, 0, _SUM)
            mean = tl.reduce(s_acc, 0, _SUM) / tl.maximum(count, 1.0)
            q_acc = tl.full([BLOCK_U, BLOCK_C], 0.0, tl.float64)
            for v in range(u0, u1, BLOCK_U):
                uu = v + tl.arange(0, BLOCK_U)
                um = uu < u1
                take = um[:, None] & cm[None, :]
                nu = tl.load(un_ptr + uu, mask=um, other=0.0)
                mu = tl.load(ua_ptr + uu[:, None] * C + c[None, :], mask=take, other=0.0)
                qu = tl.load(ub_ptr + uu[:, None] * C + c[None, :], mask=take, other=0.0)
                dev = tl.where(take, mu - mean[None, :], 0.0)
                q_acc += qu + nu[:, None] * dev * dev
            m2 = tl.reduce(q_acc, 0, _SUM)
            tl.store(n_ptr + r, count, mask=pc == 0)
            tl.store(mean_ptr + row, mean, mask=cm)
            tl.store(m2_ptr + row, m2, mask=cm)
        else:
            count = tl.load(n_ptr + r * m_step).to(tl.float64)
            mean = tl.load(mean_ptr + mrow, mask=cm, other=0.0).to(tl.float64)
            m2 = tl.load(m2_ptr + mrow, mask=cm, other=0.0).to(tl.float64)
        # reference.tables: the mean as shift + delta, invstd = rsqrt(var + eps) in the compute dtype
        shift = mean.to(CDT)
        delta = (mean - shift.to(tl.float64)).to(CDT)
        var = (m2 / tl.maximum(count, 1.0)).to(CDT)
        invstd = (1.0 / tl.sqrt((var + eps).to(tl.float64))).to(CDT)  # correctly rounded
        if HAS_W:
            scale = invstd * tl.load(w_ptr + (r * w_step) * C + c, mask=cm, other=0.0).to(CDT)
        else:
            scale = invstd
        if MERGE == 2:
            g_acc = tl.full([BLOCK_U, BLOCK_C], 0.0, tl.float64)
            x_acc = tl.full([BLOCK_U, BLOCK_C], 0.0, tl.float64)
            for v in range(u0, u1, BLOCK_U):
                uu = v + tl.arange(0, BLOCK_U)
                take = (uu < u1)[:, None] & cm[None, :]
                g_acc += tl.load(ua_ptr + uu[:, None] * C + c[None, :], mask=take, other=0.0)
                x_acc += tl.load(ub_ptr + uu[:, None] * C + c[None, :], mask=take, other=0.0)
            sum_g = tl.reduce(g_acc, 0, _SUM)
            sum_gx = tl.reduce(x_acc, 0, _SUM) - delta.to(tl.float64) * sum_g  # about the mean
            tl.store(sg_ptr + row, sum_g, mask=cm)
            tl.store(sgx_ptr + row, sum_gx, mask=cm)
        if RUNNING != 0:  # reference.new_running_stats
            unbiased = m2 / (tl.maximum(count, 1.0) - 1.0)  # 0 / 0 = NaN for one value, as torch
            if RUNNING == 2:
                if MOMENTUM == 2:
                    mom = tl.load(mom_ptr + r).to(tl.float64)
                old_mean = tl.load(rm_ptr + row, mask=cm, other=0.0).to(tl.float64)
                old_var = tl.load(rv_ptr + row, mask=cm, other=0.0).to(tl.float64)
                new_mean = tl.where(count > 0, mom * mean + (1.0 - mom) * old_mean, old_mean)
                new_var = tl.where(count > 0, mom * unbiased + (1.0 - mom) * old_var, old_var)
                if NARROW:  # float64 -> float32 -> float16 / bfloat16
                    new_mean = new_mean.to(tl.float32)
                    new_var = new_var.to(tl.float32)
                tl.store(rm_ptr + row, new_mean.to(BUF), mask=cm)
                tl.store(rv_ptr + row, new_var.to(BUF), mask=cm)
            else:
                mean_sum += mean
                var_sum += unbiased
        if OUT == 1:
            tl.store(shift_ptr + row, shift, mask=cm)
            tl.store(delta_ptr + row, delta, mask=cm)
            tl.store(scale_ptr + row, scale, mask=cm)
        if OUT == 2:  # reference._gradients, in the compute dtype
            cnt = tl.maximum(count, 1.0).to(CDT)
            k = tl.full([BLOCK_C], 0.0, CDT)
            const = tl.full([BLOCK_C], 0.0, CDT)
            if GRAD_VAR:
                if MERGE == 2:
                    sgx = sum_gx.to(CDT)
                else:
                    sgx = tl.load(sgx_ptr + (r * s_step) * C + c, mask=cm, other=0.0).to(CDT)
                k = invstd * invstd * sgx / cnt
                const = -delta * k
            if GRAD_MEAN:
                if MERGE == 2:
                    sg = sum_g.to(CDT)
                else:
                    sg = tl.load(sg_ptr + (r * s_step) * C + c, mask=cm, other=0.0).to(CDT)
                const = const + sg / cnt
            tl.store(shift_ptr + row, shift, mask=cm)
            tl.store(scale_ptr + row, scale, mask=cm)
            tl.store(k_ptr + row, k, mask=cm)
            tl.store(const_ptr + row, const, mask=cm)
            if GW != 0:
                if MERGE == 2:
                    local_gx = sum_gx.to(CDT)
                else:
                    local_gx = tl.load(lgx_ptr + (r * s_step) * C + c, mask=cm, other=0.0).to(CDT)
                if GW == 1:
                    gw_sum += local_gx * invstd
                else:
                    tl.store(gw_ptr + row, local_gx * invstd, mask=cm)
            if GB != 0:
                if MERGE == 2:
                    local_g = sum_g.to(CDT)
                else:
                    local_g = tl.load(lg_ptr + (r * s_step) * C + c, mask=cm, other=0.0).to(CDT)
                if GB == 1:
                    gb_sum += local_g
                else:
                    tl.store(gb_ptr + row, local_g, mask=cm)
    if (
        RUNNING == 1
    ):  # per-channel buffers: the mean over segments of the means and unbiased variances
        old_mean = tl.load(rm_ptr + c, mask=cm, other=0.0).to(tl.float64)
        old_var = tl.load(rv_ptr + c, mask=cm, other=0.0).to(tl.float64)
        new_mean = mom * (mean_sum / R) + (1.0 - mom) * old_mean
        new_var = mom * (var_sum / R) + (1.0 - mom) * old_var
        if NARROW:
            new_mean = new_mean.to(tl.float32)
            new_var = new_var.to(tl.float32)
        tl.store(rm_ptr + c, new_mean.to(BUF), mask=cm)
        tl.store(rv_ptr + c, new_var.to(BUF), mask=cm)
    if GW == 1:
        tl.store(gw_ptr + c, gw_sum, mask=cm)
    if GB == 1:
        tl.store(gb_ptr + c, gb_sum, mask=cm)


def _apply(
    x_ptr,  # MODE 0: the input; MODE 1: the statistics' source (the input, or stats_input)
    g_ptr,  # MODE 1: the upstream gradient
    y_ptr,  # MODE 0: the output; MODE 1: the input's gradient
    gz_ptr,  # MODE 1: the statistics' source's gradient (stats_input)
    ids_ptr,
    mask_ptr,
    shift_ptr,
    delta_ptr,
    scale_ptr,
    k_ptr,
    const_ptr,
    b_ptr,
    C,
    L,
    NL,
    t_step,
    b_step,
    MODE: tl.constexpr,  # 0: the output; 1: the gradients
    SEGMENTED: tl.constexpr,  # tables picked per sample's segment
    MASKED: tl.constexpr,
    NLC: tl.constexpr,
    HAS_B: tl.constexpr,
    STATS: tl.constexpr,  # MODE 1: the statistics' term is present
    GX: tl.constexpr,  # MODE 1: 0 none; 1 (dy - stats) * scale; 2 dy * scale (statistics from z)
    GZ: tl.constexpr,
    CDT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = r < NL
    cm = c < C
    n = r // L
    pos = r - n * L
    if NLC:
        off = r[:, None] * C + c[None, :]
    else:
        off = (n * C)[:, None] * L + c[None, :] * L + pos[:, None]
    take = valid[:, None] & cm[None, :]
    if SEGMENTED:
        seg = tl.load(ids_ptr + n, mask=valid, other=0)
        trow = (seg * t_step)[:, None] * C + c[None, :]
        brow = (seg * b_step)[:, None] * C + c[None, :]
        shift = tl.load(shift_ptr + trow, mask=take, other=0.0)
        scale = tl.load(scale_ptr + trow, mask=take, other=0.0)
    else:
        trow = c[None, :]
        brow = c[None, :]
        shift = tl.load(shift_ptr + trow, mask=cm[None, :], other=0.0)
        scale = tl.load(scale_ptr + trow, mask=cm[None, :], other=0.0)
    xv = tl.load(x_ptr + off, mask=take, other=0.0).to(CDT)
    if MODE == 0:
        delta = tl.load(delta_ptr + trow, mask=take, other=0.0)
        y = ((xv - shift) - delta) * scale
        if HAS_B:
            y = y + tl.load(b_ptr + brow, mask=take, other=0.0).to(CDT)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=take)
    else:
        gv = tl.load(g_ptr + off, mask=take, other=0.0).to(CDT)
        stats = tl.full([BLOCK_R, BLOCK_C], 0.0, CDT)
        if STATS:
            k = tl.load(k_ptr + trow, mask=take, other=0.0)
            const = tl.load(const_ptr + trow, mask=take, other=0.0)
            stats = (xv - shift) * k + const
            if MASKED:  # masked-out elements take only their own dy * scale
                kept = tl.load(mask_ptr + n * L + pos, mask=valid, other=0) != 0
                stats = tl.where(kept[:, None], stats, 0.0)
        if GX == 1:
            tl.store(y_ptr + off, ((gv - stats) * scale).to(y_ptr.dtype.element_ty), mask=take)
        if GX == 2:
            tl.store(y_ptr + off, (gv * scale).to(y_ptr.dtype.element_ty), mask=take)
        if GZ:
            tl.store(gz_ptr + off, (-stats * scale).to(gz_ptr.dtype.element_ty), mask=take)


# -------------------------------------------------------------------------------------------------------
# Where the kernels run.


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``): CPU tensors are taken, and
    CUDA tensors are interpreted too (copied to the host and back, as Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpreted(device: torch.device) -> bool:
    return device.type == "cpu" or interpreting()


def why_not(device: torch.device) -> str:
    """Why the kernels cannot run on ``device`` here (``""``: they can)."""
    if device.type == "cuda":
        return ""
    if device.type == "cpu":
        if interpreting():
            return ""
        return (
            "the Triton kernels run on CUDA tensors; CPU tensors only in Triton's interpreter "
            "(TRITON_INTERPRET=1, slow: for testing)"
        )
    return f"the Triton kernels run on CUDA tensors, not on {device.type}"


def supports(*tensors: Tensor | None) -> bool:
    """Whether the kernels take a call on these tensors (the input first): plain strided tensors or
    parameters (not subclasses such as fake or functorch tensors, nor lazily negated views) on the input's
    device, the input of a floating dtype and not empty."""
    x = tensors[0]
    if x is None or x.dtype not in _DTYPES or x.numel() == 0:
        return False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or t.layout is not torch.strided or t.device != x.device:
            return False
        if t.is_neg() or t.is_conj():
            return False
    return True


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any, Any]:
    """The three kernels, compiled by Triton (per configuration, at first use) or interpreted."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        wrap = triton.JITFunction
    return wrap(_reduce), wrap(_tables), wrap(_apply)


@contextlib.contextmanager
def _quiet(interpret: bool) -> Iterator[None]:
    """The interpreter computes with numpy, which warns where the kernels divide by zero on purpose (the
    NaN running variance of a one-value segment, as torch's) or in masked-out lanes."""
    if not interpret:
        yield
        return
    import numpy as np

    with np.errstate(all="ignore"):
        yield


class _Launch(NamedTuple):
    interpret: bool
    block_r: int
    block_c: int
    chunk: int
    block_u: int


def _pow2_at_most(v: float) -> int:
    return 1 << max(0, math.floor(math.log2(v))) if v >= 1 else 1


def _launch(interpret: bool, nlc: bool, rows: int, channels: int) -> _Launch:
    """Tile sizes: NCL reads one channel's rows (contiguous runs of ``L``) per program, NLC a block of
    channels (contiguous) per row; units of rows large enough to keep the partial tables small, small
    enough to give the GPU a few programs per multiprocessor. In the interpreter, small tiles: each
    program is a numpy step, and the tests cross every tile, unit and channel-block boundary."""
    if interpret:
        block_c, block_r, target, block_u = (min(4, triton.next_power_of_2(channels)), 8, 8, 2)
        if not nlc:
            block_c, block_r = 1, 16
    else:
        block_u, target = 64, 512
        if nlc:
            block_c = min(64, triton.next_power_of_2(channels))
            block_r = max(16, 4096 // block_c)
        else:  # one channel per program (several past the grid's 65535 channel blocks)
            block_c, block_r = triton.next_power_of_2(triton.cdiv(channels, 65535)), 1024
    per_unit = rows * triton.cdiv(channels, block_c) / (target * block_r)
    chunk = block_r * min(_MAX_FLUSH, _pow2_at_most(per_unit))
    return _Launch(interpret, block_r, block_c, chunk, block_u)


# -------------------------------------------------------------------------------------------------------
# The geometry of one call.


class _Geo:
    """The kernels' view of a batch: ``N, C, L``, the layout, the segment ids and mask, the launch."""

    __slots__ = ("c", "fmt", "g", "ids", "launch", "length", "mask", "n", "nlc", "x")

    def __init__(self, x: Tensor, seg: Segments) -> None:
        n, c = x.shape[0], x.shape[1]
        length = x.numel() // (n * c)
        fmt = torch.contiguous_format
        if x.dim() == 2 or length == 1:
            nlc = True
            if not x.is_contiguous():
                x = x.contiguous()
        elif x.is_contiguous():
            nlc = False
        else:
            cl = _CHANNELS_LAST.get(x.dim())
            if cl is not None and x.is_contiguous(memory_format=cl):
                nlc, fmt = True, cl
            else:
                nlc, x = False, x.contiguous()
        self.x, self.nlc, self.fmt = x, nlc, fmt
        self.n, self.c, self.length = n, c, length
        ids = seg.ids
        if ids is not None:
            if ids.dim() != 1 or ids.shape[0] != n:
                raise ValueError(f"segment ids must have shape ({n},), but got {tuple(ids.shape)}")
            ids = ids.to(device=x.device, dtype=torch.int64).contiguous()
        mask = seg.mask
        if mask is not None:
            if mask.numel() != n * length:
                raise ValueError(
                    f"mask must have {n * length} elements (N x spatial), but got {mask.numel()}"
                )
            mask = mask.reshape(n, length).to(device=x.device, dtype=torch.bool).contiguous()
            mask = mask.view(torch.uint8)
        self.ids, self.mask = ids, mask
        self.g = 1 if ids is None else seg.num
        self.launch = _launch(_interpreted(x.device), nlc, n * length, c)

    @property
    def cdt(self) -> Any:
        return tl.float64 if self.x.dtype == torch.float64 else tl.float32

    @property
    def torch_cdt(self) -> torch.dtype:
        return torch.float64 if self.x.dtype == torch.float64 else torch.float32

    def like(self, t: Tensor) -> Tensor:
        """``t`` (of the input's shape) in this layout: a copy only where needed."""
        if t.device != self.x.device:
            raise ValueError(f"expected a tensor on {self.x.device}, but got one on {t.device}")
        if self.nlc and self.fmt is torch.contiguous_format:
            return t if t.is_contiguous() else t.contiguous()
        return (
            t if t.is_contiguous(memory_format=self.fmt) else t.contiguous(memory_format=self.fmt)
        )

    def empty(self, dtype: torch.dtype) -> Tensor:
        return torch.empty(self.x.shape, dtype=dtype, device=self.x.device, memory_format=self.fmt)


class _Units(NamedTuple):
    """The rows split into units of at most ``chunk`` rows, each inside one segment."""

    count: int  # units (some may be empty)
    perm: Tensor | None  # samples sorted by segment
    start: Tensor | None  # first sorted sample of each segment (G + 1,)
    ustart: Tensor | None  # first unit of each segment (G + 1,)
    useg: Tensor | None  # segment of each unit (U,)


def _units(geo: _Geo) -> _Units:
    chunk, rows = geo.launch.chunk, geo.n * geo.length
    if geo.ids is None:
        return _Units(triton.cdiv(rows, chunk), None, None, None, None)
    # Sorted by segment, a segment's rows are consecutive; each segment is cut into its own units. The
    # count of units is bounded without reading the ids on the host (no synchronisation).
    ids, g = geo.ids, geo.g
    perm = torch.argsort(ids, stable=True)
    per_segment = torch.zeros(g, dtype=torch.int64, device=ids.device)  # (not bincount: it reads
    per_segment.index_add_(0, ids, torch.ones_like(ids))  # its output size on the host)
    zero = per_segment.new_zeros(1)
    start = torch.cat([zero, per_segment.cumsum(0)])
    units = (per_segment * geo.length + (chunk - 1)).div_(chunk, rounding_mode="floor")
    ustart = torch.cat([zero, units.cumsum(0)])
    count = triton.cdiv(rows, chunk) + g
    useg = torch.searchsorted(
        ustart[1:], torch.arange(count, device=ids.device), right=True
    ).clamp_max_(g - 1)
    return _Units(count, perm, start, ustart, useg)


def _reduce_pass(
    geo: _Geo, mode: int, x: Tensor, g: Tensor | None = None, mean: Tensor | None = None
) -> tuple[_Units, Tensor | None, Tensor, Tensor]:
    """``_reduce`` over the batch: the units and their tables."""
    units = _units(geo)
    lc = geo.launch
    dev, c = geo.x.device, geo.c
    n_out = torch.empty(units.count, dtype=_F64, device=dev) if mode == 0 else None
    a_out = torch.empty(units.count, c, dtype=_F64, device=dev)
    b_out = torch.empty_like(a_out)
    kernel = _kernels(lc.interpret)[0]
    grid = (units.count, triton.cdiv(c, lc.block_c))
    with _quiet(lc.interpret):
        kernel[grid](
            x,
            g,
            mean,
            units.perm,
            geo.mask,
            units.start,
            units.ustart,
            units.useg,
            n_out,
            a_out,
            b_out,
            c,
            geo.length,
            geo.n * geo.length,
            lc.chunk,
            0 if mean is None or mean.shape[0] == 1 else 1,
            MODE=mode,
            SEGMENTED=geo.ids is not None,
            MASKED=geo.mask is not None,
            NLC=geo.nlc,
            CDT=geo.cdt,
            BLOCK_R=lc.block_r,
            BLOCK_C=lc.block_c,
            **_OPTIONS,
        )
    return units, n_out, a_out, b_out


def _float32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _split(v: float) -> tuple[float, float]:
    """``v`` as two float32 values whose float64 sum is ``v`` to 48 bits (Triton passes floats as float32)."""
    hi = _float32(v)
    return hi, _float32(v - hi)


def _rows(t: Tensor | None) -> int:
    return 1 if t is None or t.dim() == 1 else t.shape[0]


def _step(t: Tensor | None) -> int:
    return int(_rows(t) > 1)


def _f64(t: Tensor, device: torch.device) -> Tensor:
    if t.dtype != _F64 or t.device != device or not t.is_contiguous():
        t = t.to(device=device, dtype=_F64).contiguous()
    return t


def _table(t: Tensor | None) -> Tensor | None:
    """A ``(C,)`` or ``(rows, C)`` parameter as the kernels read it (contiguous, any floating dtype)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _tables_pass(
    device: torch.device,
    launch: _Launch,
    cdt: Any,
    rows: int,
    channels: int,
    *,
    merge: int = 0,
    units: _Units | None = None,
    parts: tuple[Tensor | None, Tensor, Tensor] | None = None,
    m: Moments,
    sums: tuple[Tensor, Tensor] | None = None,
    local: tuple[Tensor, Tensor] | None = None,
    running: tuple[Tensor, Tensor] | None = None,
    momentum: float | Tensor = 0.0,
    weight: Tensor | None = None,
    eps: float = 0.0,
    out: int = 0,
    grad_mean: bool = False,
    grad_var: bool = False,
    gw_mode: int = 0,
    gb_mode: int = 0,
) -> dict[str, Tensor]:
    """``_tables`` for ``rows`` rows: writes ``m`` (``merge=1``) or ``sums`` (``merge=2``) in place, updates
    ``running``, and returns the tables asked for by ``out`` and the weight/bias gradients."""
    tdt = torch.float64 if cdt == tl.float64 else torch.float32
    made: dict[str, Tensor] = {}

    def table(name: str, shape: tuple[int, ...]) -> Tensor:
        made[name] = torch.empty(shape, dtype=tdt, device=device)
        return made[name]

    names = {1: ("shift", "delta", "scale"), 2: ("shift", "scale", "k", "const")}.get(out, ())
    outs = {name: table(name, (rows, channels)) for name in names}
    gw = None if gw_mode == 0 else table("gw", (channels,) if gw_mode == 1 else (rows, channels))
    gb = None if gb_mode == 0 else table("gb", (channels,) if gb_mode == 1 else (rows, channels))
    run, mom_tensor, mom_mode, buf = 0, None, 0, tl.float32
    mom_hi = mom_lo = 0.0
    if running is not None:
        run = 2 if running[0].dim() == 2 else 1
        buf = _TL[running[0].dtype]
        if isinstance(momentum, Tensor):
            mom_tensor = _f64(momentum.reshape(-1), device)
            mom_mode = 1 if mom_tensor.numel() == 1 else 2
        else:
            mom_hi, mom_lo = _split(float(momentum))
    eps_hi, eps_lo = _split(float(eps))
    un, ua, ub = parts if parts is not None else (None, None, None)
    sg, sgx = sums if sums is not None else (None, None)
    lg, lgx = local if local is not None else (None, None)
    segmented = units is not None and units.ustart is not None
    kernel = _kernels(launch.interpret)[1]
    block_c = min(16, triton.next_power_of_2(channels))
    with _quiet(launch.interpret):
        kernel[(triton.cdiv(channels, block_c),)](
            un,
            ua,
            ub,
            units.ustart if segmented else None,  # type: ignore[union-attr]
            0 if units is None else units.count,
            m.count,
            m.mean,
            m.m2,
            _step(m.mean),
            sg,
            sgx,
            lg,
            lgx,
            _step(sg if sg is not None else lg),
            running[0] if running is not None else None,
            running[1] if running is not None else None,
            mom_tensor,
            mom_hi,
            mom_lo,
            weight,
            _step(weight),
            outs.get("shift"),
            outs.get("delta"),
            outs.get("scale"),
            outs.get("k"),
            outs.get("const"),
            gw,
            gb,
            eps_hi,
            eps_lo,
            rows,
            channels,
            MERGE=merge,
            SEGMENTED=segmented,
            RUNNING=run,
            MOMENTUM=mom_mode,
            BUF=buf,
            NARROW=buf in (tl.float16, tl.bfloat16),
            OUT=out,
            GRAD_MEAN=grad_mean,
            GRAD_VAR=grad_var,
            HAS_W=weight is not None,
            GW=gw_mode,
            GB=gb_mode,
            CDT=cdt,
            BLOCK_U=launch.block_u,
            BLOCK_C=block_c,
            **_OPTIONS,
        )
    return made


def _apply_pass(
    geo: _Geo,
    mode: int,
    tables: dict[str, Tensor],
    *,
    source: Tensor,
    out: Tensor | None,
    g: Tensor | None = None,
    gz: Tensor | None = None,
    bias: Tensor | None = None,
    stats: bool = False,
    gx_mode: int = 0,
) -> None:
    lc = geo.launch
    rows = tables["shift"].shape[0]
    segmented = geo.ids is not None and (rows > 1 or _rows(bias) > 1)
    grid = (triton.cdiv(geo.n * geo.length, lc.block_r), triton.cdiv(geo.c, lc.block_c))
    kernel = _kernels(lc.interpret)[2]
    with _quiet(lc.interpret):
        kernel[grid](
            source,
            g,
            out,
            gz,
            geo.ids if segmented else None,
            geo.mask if (mode == 1 and stats) else None,
            tables["shift"],
            tables.get("delta"),
            tables["scale"],
            tables.get("k"),
            tables.get("const"),
            bias,
            geo.c,
            geo.length,
            geo.n * geo.length,
            int(rows > 1),
            _step(bias),
            MODE=mode,
            SEGMENTED=segmented,
            MASKED=geo.mask is not None and mode == 1 and stats,
            NLC=geo.nlc,
            HAS_B=bias is not None,
            STATS=stats,
            GX=gx_mode,
            GZ=gz is not None,
            CDT=geo.cdt,
            BLOCK_R=lc.block_r,
            BLOCK_C=lc.block_c,
            **_OPTIONS,
        )


# -------------------------------------------------------------------------------------------------------
# The operations (``reference`` specifies each).


def _new_moments(rows: int, channels: int, device: torch.device) -> Moments:
    return Moments(
        torch.empty(rows, dtype=_F64, device=device),
        torch.empty(rows, channels, dtype=_F64, device=device),
        torch.empty(rows, channels, dtype=_F64, device=device),
    )


def _currency(m: Moments, device: torch.device) -> Moments:
    return Moments(_f64(m.count, device), _f64(m.mean, device), _f64(m.m2, device))


def moments(x: Tensor, seg: Segments = WHOLE) -> Moments:
    """:func:`reference.moments` on the kernels: one read of the input."""
    geo = _Geo(x, seg)
    units, *parts = _reduce_pass(geo, 0, geo.x)
    m = _new_moments(geo.g, geo.c, geo.x.device)
    _tables_pass(
        geo.x.device, geo.launch, geo.cdt, geo.g, geo.c, merge=1, units=units, parts=parts, m=m
    )  # type: ignore[arg-type]
    return m


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    m: Moments,
    eps: float,
    seg: Segments = WHOLE,
) -> Tensor:
    """:func:`reference.normalize` on the kernels: the tables, then one pass."""
    geo = _Geo(x, seg)
    weight, bias = _table(weight), _table(bias)
    m = _currency(m, geo.x.device)
    rows = max(_rows(m.mean), _rows(weight))
    t = _tables_pass(
        geo.x.device, geo.launch, geo.cdt, rows, geo.c, m=m, weight=weight, eps=eps, out=1
    )
    y = geo.empty(x.dtype)
    _apply_pass(geo, 0, t, source=geo.x, out=y, bias=bias)
    return y


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
    """:func:`reference.forward` in three launches: the moments of ``source``; their combination with the
    running update and the output's tables; the output. With ``check``, the counts are read on the host
    (one synchronisation) between the combination and anything that changes state."""
    geo = _Geo(x, seg)
    dev = geo.x.device
    weight, bias = _table(weight), _table(bias)
    if running is not None and not (
        running_supported(*running) and running[0].device == geo.x.device
    ):
        y, m = forward(x, source, weight, bias, None, momentum, eps, seg, check)
        if y is not None:  # buffers the kernels do not write (another device, non-contiguous)
            reference.running_update(*running, m, momentum)
        return y, m
    src = geo.x if source is x else geo.like(source)
    units, *parts = _reduce_pass(geo, 0, src)
    m = _new_moments(geo.g, geo.c, dev)
    rows = max(geo.g, _rows(weight))
    common = dict(m=m, weight=weight, eps=eps, momentum=momentum)
    if check:
        _tables_pass(dev, geo.launch, geo.cdt, geo.g, geo.c, merge=1, units=units, parts=parts, m=m)  # type: ignore[arg-type]
        lonely = (m.count <= 1) & (m.count > 0) if check == 2 else m.count <= 1
        if bool(lonely.any()):
            return None, m
        t = _tables_pass(dev, geo.launch, geo.cdt, rows, geo.c, running=running, out=1, **common)  # type: ignore[arg-type]
    else:
        t = _tables_pass(
            dev,
            geo.launch,
            geo.cdt,
            rows,
            geo.c,
            merge=1,
            units=units,
            parts=parts,  # type: ignore[arg-type]
            running=running,
            out=1,
            **common,  # type: ignore[arg-type]
        )
    y = geo.empty(x.dtype)
    _apply_pass(geo, 0, t, source=geo.x, out=y, bias=bias)
    return y, m


def running_supported(running_mean: Tensor, running_var: Tensor) -> bool:
    """Whether :func:`running_update` takes these buffers (same floating dtype, contiguous, a device the
    kernels run on)."""
    return (
        running_mean.dtype in _DTYPES
        and running_var.dtype == running_mean.dtype
        and running_mean.is_contiguous()
        and running_var.is_contiguous()
        and supports(running_mean, running_var)
        and why_not(running_mean.device) == ""
    )


def running_update(
    running_mean: Tensor, running_var: Tensor, m: Moments, momentum: float | Tensor
) -> None:
    """:func:`reference.running_update` in one launch."""
    device = running_mean.device
    c = running_mean.shape[-1]
    m = _currency(m, device)
    launch = _launch(_interpreted(device), True, 1, c)
    _tables_pass(
        device,
        launch,
        tl.float64,
        m.mean.shape[0],
        c,
        m=m,
        running=(running_mean, running_var),
        momentum=momentum,
    )


def backward_sums(g: Tensor, x: Tensor, m: Moments, seg: Segments = WHOLE) -> tuple[Tensor, Tensor]:
    """:func:`reference.backward_sums` on the kernels: one read of ``dy`` and ``x``."""
    geo = _Geo(x, seg)
    dev = geo.x.device
    m = _currency(m, dev)
    units, _, *parts = _reduce_pass(geo, 1, geo.x, geo.like(g), m.mean)
    sg = torch.empty(geo.g, geo.c, dtype=_F64, device=dev)
    sgx = torch.empty_like(sg)
    _tables_pass(
        dev,
        geo.launch,
        geo.cdt,
        geo.g,
        geo.c,
        merge=2,
        units=units,
        parts=(None, *parts),
        m=m,
        sums=(sg, sgx),  # type: ignore[arg-type]
    )
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
    """:func:`reference.backward` on the kernels: the coefficients (after this process's sums, in the same
    launch, when ``sums`` is ``None`` and a gradient asked for needs them), then one pass writing each
    gradient asked for."""
    need_input, need_weight, need_bias, need_z = needs
    geo = _Geo(x, seg)
    dev = geo.x.device
    m = _currency(m, dev)
    weight = _table(weight)
    gk = geo.like(g)
    zk = None if z is None else geo.like(z)
    stats = (need_input if z is None else need_z) and (grad_mean or grad_var)
    gw_mode = 0 if not (need_weight and weight is not None) else (1 if _rows(weight) == 1 else 2)
    gb_mode = 0 if not need_bias else (1 if bias_rows == 1 else 2)
    rows = max(_rows(m.mean), _rows(weight), geo.g if (stats or gw_mode or gb_mode) else 1)
    coefficients = dict(
        m=m,
        weight=weight,
        eps=eps,
        out=2,
        grad_mean=stats and grad_mean,
        grad_var=stats and grad_var,
        gw_mode=gw_mode,
        gb_mode=gb_mode,
    )
    if sums is None and (stats or gw_mode or gb_mode):  # this process's sums, then the coefficients
        units, _, *parts = _reduce_pass(geo, 1, geo.x, gk, m.mean)
        sg = torch.empty(geo.g, geo.c, dtype=_F64, device=dev)
        sums = (sg, torch.empty_like(sg))
        t = _tables_pass(
            dev,
            geo.launch,
            geo.cdt,
            rows,
            geo.c,
            merge=2,
            units=units,
            parts=(None, *parts),
            sums=sums,
            **coefficients,  # type: ignore[arg-type]
        )
    else:
        sums = None if sums is None else (_f64(sums[0], dev), _f64(sums[1], dev))
        local = None if local is None else (_f64(local[0], dev), _f64(local[1], dev))
        t = _tables_pass(
            dev,
            geo.launch,
            geo.cdt,
            rows,
            geo.c,
            sums=sums,
            local=local,  # type: ignore[arg-type]
            **coefficients,  # type: ignore[arg-type]
        )
    gx = gz = None
    if need_input:
        gx = geo.empty(x.dtype)
    if need_z and zk is not None and stats:
        gz = geo.empty(z.dtype)  # type: ignore[union-attr]
    if gx is not None or gz is not None:
        gx_mode = 0 if gx is None else (1 if (stats and zk is None) else 2)
        src = geo.x if zk is None else zk
        _apply_pass(geo, 1, t, source=src, out=gx, g=gk, gz=gz, stats=stats, gx_mode=gx_mode)
    if gz is not None and z is not None:
        gz = gz.contiguous(memory_format=reference.memory_format(z))
    gw, gb = t.get("gw"), t.get("gb")
    if gw is not None and weight is not None and gw_mode == 1:
        gw = gw.reshape(weight.shape)
    return gx, gw, gb, gz
