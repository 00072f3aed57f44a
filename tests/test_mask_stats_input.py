"""Statistics over the real elements of a padded batch (``mask=``) and from another tensor (``stats_input=``).

The specification (``flexbn.batch_norm``'s docstring), written out here in float64 as ``composition``: with
``m = mask.unsqueeze(1)`` and ``z`` the tensor the statistics come from (``stats_input``, default ``x``)::

    count = m.sum(dims);  mean = where(m, z, 0).sum(dims) / count
    var   = (where(m, z - mean, 0) ** 2).sum(dims) / count          (each detached as the flags say)
    y_real = (x - mean) / sqrt(var + eps) * w + b
    y_pad  = (x - mean.detach()) / sqrt(var.detach() + eps) * w.detach() + b.detach()
    y = where(m, y_real, y_pad)

Padded elements are normalized with the statistics of the real ones but are passengers: they take part in
no reduction, no parameter gradient and no statistics gradient, so their values -- even huge or non-finite --
never reach a real output or gradient. Every test compares flexbn with this composition (outputs, gradients,
second derivatives, forward-mode AD, running buffers), with ``torch.nn.functional.batch_norm`` (all-True mask,
the real elements gathered into an ``(M, C)`` batch, eval mode), or with a loop over bags / ghost batches of
the composition -- never flexbn with itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import flexbn
from conftest import MODE_ARGS, MODES, assert_close

F64, F32 = torch.float64, torch.float32
CL, CL3D, CONTIG = torch.channels_last, torch.channels_last_3d, torch.contiguous_format
C = 3
EPS = 1e-5


LAYOUTS = [
    pytest.param((6, C), CONTIG, id="NC"),
    pytest.param((4, C, 6), CONTIG, id="NCL"),
    pytest.param((3, C, 4, 5), CONTIG, id="NCHW"),
    pytest.param((3, C, 4, 5), CL, id="NCHW-channels_last"),
    pytest.param((2, C, 2, 3, 4), CONTIG, id="NCDHW"),
    pytest.param((2, C, 2, 3, 4), CL3D, id="NCDHW-channels_last_3d"),
]
LAYOUT_ARGS = ("shape", "memory_format")
SMALL_LAYOUTS = [LAYOUTS[0], LAYOUTS[1], LAYOUTS[3], LAYOUTS[4]]
AFFINE = [pytest.param(True, id="affine"), pytest.param(False, id="no_affine")]
WITH_MASK = [pytest.param(False, id="no_mask"), pytest.param(True, id="mask")]
MODULES = {
    2: flexbn.BatchNorm1d,
    3: flexbn.BatchNorm1d,
    4: flexbn.BatchNorm2d,
    5: flexbn.BatchNorm3d,
}

# torch loads its forward-AD decompositions with torch.jit.script on first use, which warns in torch 2.13
FORWARD_AD_WARNING = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


# ----------------------------------------------------------------------------------------------- helpers


def make_input(shape, memory_format=CONTIG, dtype=F64) -> Tensor:
    """A random leaf (mean 0.5, std 2: centring and scaling both matter) in ``memory_format``."""
    x = torch.randn(shape, dtype=F64) * 2 + 0.5
    return x.to(dtype).contiguous(memory_format=memory_format).requires_grad_()


def make_affine(affine: bool = True, dtype=F64) -> tuple[Tensor | None, Tensor | None]:
    """Random weight and bias (never ones/zeros, which hide affine bugs), or ``(None, None)``."""
    if not affine:
        return None, None
    w = (torch.randn(C, dtype=F64) + 1).to(dtype).requires_grad_()
    b = torch.randn(C, dtype=F64).to(dtype).requires_grad_()
    return w, b


def make_mask(shape, p: float = 0.6) -> Tensor:
    """A random ``(N, *spatial)`` mask with about ``p`` real elements, at least one real element per sample
    (with spatial dimensions; the first two samples for ``(N, C)`` input) and at least one padded one."""
    n = shape[0]
    mask = torch.rand((n, *shape[2:])) < p
    flat = mask.view(n, -1)
    if flat.shape[1] > 1:
        flat[:, 0] = True
        flat[:, -1] = False
    else:
        flat[:2] = True
        flat[-1] = False
    return mask


def as_reference(*ts: Tensor | None) -> list[Tensor | None]:
    """float64 leaf copies (same values) for the reference computation."""
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def leaves(*ts: Tensor | None) -> tuple[Tensor, ...]:
    return tuple(t for t in ts if t is not None)


def grads(out: Tensor, inputs, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    """First-order gradients; ``None`` for an input that gets none."""
    return torch.autograd.grad(out, tuple(inputs), grad_out.to(out.dtype), allow_unused=True)


def derivative(out: Tensor, inputs, grad_out: Tensor | None = None) -> tuple[Tensor, ...]:
    """``create_graph=True`` gradients, zeros for an input the output does not depend on (as in maths)."""
    inputs = tuple(inputs)
    if not out.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    return torch.autograd.grad(
        out, inputs, grad_out, create_graph=True, allow_unused=True, materialize_grads=True
    )


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _affine(y: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if w is not None:
        y = y * w.double().reshape(shape)
    if b is not None:
        y = y + b.double().reshape(shape)
    return y


def full_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """The mask as ``(N, 1, *spatial)``; all True for ``None``."""
    if mask is None:
        return torch.ones((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool)
    return mask.unsqueeze(1)


def apply_stats(x, m, mean, var, w, b, eps=EPS) -> Tensor:
    """``where(m, y_real, y_pad)``: padded elements use the statistics and parameters as constants."""
    xd = x.double()
    real = _affine((xd - mean) / torch.sqrt(var + eps), w, b)
    pad = _affine((xd - mean.detach()) / torch.sqrt(var.detach() + eps), _detach(w), _detach(b))
    return torch.where(m, real, pad)


def composition(
    x: Tensor,
    mask: Tensor | None,
    w: Tensor | None = None,
    b: Tensor | None = None,
    eps: float = EPS,
    *,
    detach_mean: bool = False,
    detach_var: bool = False,
    z: Tensor | None = None,
) -> Tensor:
    """The masked batch norm of the specification, in float64, statistics from ``z`` (default ``x``)."""
    zd = x.double() if z is None else z.double()
    m = full_mask(x, mask)
    dims = (0, *range(2, x.dim()))
    count = m.sum(dims, keepdim=True).double()
    mean = torch.where(m, zd, 0).sum(dims, keepdim=True) / count
    var = torch.where(m, zd - mean, 0).square().sum(dims, keepdim=True) / count
    if detach_mean:
        mean = mean.detach()
    if detach_var:
        var = var.detach()
    return apply_stats(x, m, mean, var, w, b, eps)


def by_segment(fn: Callable[..., Tensor], ids: Tensor, *tensors: Tensor | None) -> Tensor:
    """``fn`` applied to each segment's samples (rows with the same id, in any order), reassembled."""
    parts, order = [], []
    for g in ids.unique():
        idx = (ids == g).nonzero().flatten()
        parts.append(fn(*(None if t is None else t.index_select(0, idx) for t in tensors)))
        order.append(idx)
    return torch.cat(parts).index_select(0, torch.argsort(torch.cat(order)))


def masked_moments(z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """float64 per-channel mean and unbiased variance of ``z``'s real elements."""
    zd = z.detach().double()
    m = full_mask(zd, mask)
    dims = (0, *range(2, zd.dim()))
    count = m.sum(dims).double().flatten()
    mean = torch.where(m, zd, 0).sum(dims) / count
    centred = torch.where(m, zd - mean.reshape((1, -1) + (1,) * (zd.dim() - 2)), 0)
    return mean, centred.square().sum(dims) / (count - 1)


def segment_moments(z: Tensor, mask: Tensor | None, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Keras' convention: the mean over segments of the segment means and unbiased variances."""
    per = [
        masked_moments(z[ids == g], None if mask is None else mask[ids == g]) for g in ids.unique()
    ]
    return torch.stack([p[0] for p in per]).mean(0), torch.stack([p[1] for p in per]).mean(0)


def running_update(rm: Tensor, rv: Tensor, mean: Tensor, var: Tensor, momentum: float):
    return (1 - momentum) * rm.double() + momentum * mean, (
        1 - momentum
    ) * rv.double() + momentum * var


def chunk_ids(n: int, virtual_batch_size: int) -> Tensor:
    """The documented ghost-batch rule: ``N // vbs`` chunks, sample ``n`` in chunk ``n * G // N``."""
    g = max(n // virtual_batch_size, 1)
    return torch.arange(n) * g // n


def jvp(f: Callable[..., Tensor], primals, tangents) -> tuple[Tensor, Tensor | None]:
    with fwAD.dual_level():
        duals = [
            None if p is None else fwAD.make_dual(p, t)
            for p, t in zip(primals, tangents, strict=True)
        ]
        primal, tangent = fwAD.unpack_dual(f(*duals))
        return primal, tangent


def real_positions(mask: Tensor, shape) -> Tensor:
    return mask.unsqueeze(1).expand(shape)


# ======================================================================================= mask: first order


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_mask_first_order_matches_composition(
    detach_mean, detach_var, shape, memory_format, affine
):
    """Output and the input, weight and bias gradients (upstream gradient non-zero at padded positions too)
    equal the float64 masked composition."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    x = make_input(shape, memory_format)
    w, b = make_affine(affine)
    mask = make_mask(shape)
    gy = torch.randn(shape, dtype=F64)
    y = flexbn.batch_norm(x, None, None, w, b, True, mask=mask, **flags)
    got = grads(y, leaves(x, w, b), gy)

    xr, wr, br = as_reference(x, w, b)
    yr = composition(xr, mask, wr, br, **flags)
    want = grads(yr, leaves(xr, wr, br), gy)

    assert y.is_contiguous(memory_format=memory_format)
    assert got[0].is_contiguous(memory_format=memory_format)
    assert_close(y, yr, msg="output")
    assert len(got) == len(want) == (3 if affine else 1)
    for name, g, r in zip(("input", "weight", "bias"), got, want, strict=False):
        assert_close(g, r, msg=f"grad {name}")


@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
def test_mask_equals_torch_on_the_gathered_real_elements(shape, memory_format):
    """An independent reference: the real elements gathered into an ``(M, C)`` batch and normalized by
    ``torch.nn.functional.batch_norm`` -- outputs, gradients (upstream gradient only at real positions) and
    running buffers."""
    x = make_input(shape, memory_format)
    w, b = make_affine()
    mask = make_mask(shape)
    rm, rv = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    g_real = torch.randn(int(mask.sum()), C, dtype=F64)

    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.3, EPS, mask=mask)
    y_real = y.movedim(1, -1)[mask]
    got = grads(y_real, (x, w, b), g_real)
    yt = F.batch_norm(x.movedim(1, -1)[mask], rm_t, rv_t, w, b, True, 0.3, EPS)
    want = grads(yt, (x, w, b), g_real)

    assert_close(y_real, yt, msg="output at real positions")
    for name, g, r in zip(("input", "weight", "bias"), got, want, strict=True):
        assert_close(g, r, msg=f"grad {name}")
    assert_close(rm, rm_t, msg="running_mean")
    assert_close(rv, rv_t, msg="running_var")


@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
def test_all_true_mask_equals_no_mask_and_torch(shape, memory_format):
    """An all-True mask is no mask: torch's output, gradients and running buffers."""
    x = make_input(shape, memory_format)
    w, b = make_affine()
    mask = torch.ones((shape[0], *shape[2:]), dtype=torch.bool)
    rm, rv = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    gy = torch.randn(shape, dtype=F64)
    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.3, EPS, mask=mask)
    yt = F.batch_norm(x, rm_t, rv_t, w, b, True, 0.3, EPS)
    assert_close(y, yt, msg="output")
    for name, g, r in zip(
        ("input", "weight", "bias"), grads(y, (x, w, b), gy), grads(yt, (x, w, b), gy), strict=True
    ):
        assert_close(g, r, msg=f"grad {name}")
    assert_close(rm, rm_t, msg="running_mean")
    assert_close(rv, rv_t, msg="running_var")


@pytest.mark.parametrize(
    "mask_layout",
    [pytest.param("contiguous", id="mask-contiguous"), pytest.param("transposed", id="mask-view")],
)
def test_mask_float32_channels_last(mask_layout):
    """float32 channels-last input, with a contiguous mask or a non-contiguous view: the float64 composition
    within float32 tolerance, in the input's dtype and layout."""
    shape = (3, C, 4, 5)
    x = make_input(shape, CL, torch.float32)
    w, b = make_affine(True, torch.float32)
    mask = make_mask(shape)
    if mask_layout == "transposed":
        mask = mask.transpose(1, 2).contiguous().transpose(1, 2)
        assert not mask.is_contiguous()
    gy = torch.randn(shape, dtype=F64)
    y = flexbn.batch_norm(x, None, None, w, b, True, mask=mask)
    got = grads(y, (x, w, b), gy)
    xr, wr, br = as_reference(x, w, b)
    yr = composition(xr, mask, wr, br)
    want = grads(yr, (xr, wr, br), gy)
    assert y.dtype == torch.float32
    assert y.is_contiguous(memory_format=CL)
    assert_close(y, yr, dtype=torch.float32)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        assert_close(g, r, dtype=torch.float32)


# ============================================================================ mask: higher order, forward AD


@pytest.mark.parametrize(LAYOUT_ARGS, SMALL_LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_mask_double_backward_matches_composition(detach_mean, detach_var, shape, memory_format):
    """Second derivatives of ``<grad_input, v> + |grad_weight|^2 + <grad_bias, vb>`` wrt input, weight, bias
    and the upstream gradient."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    x = make_input(shape, memory_format)
    w, b = make_affine()
    mask = make_mask(shape)
    gy = torch.randn(shape, dtype=F64, requires_grad=True)
    v, vb = torch.randn(shape, dtype=F64), torch.randn(C, dtype=F64)

    def second(f, x, w, b):
        gx, gw, gb = derivative(f(x, w, b), (x, w, b), gy)
        s = (gx * v).sum() + gw.square().sum() + (gb * vb).sum()
        return derivative(s, (x, w, b, gy))

    def fb(x, w, b):
        return flexbn.batch_norm(x, None, None, w, b, True, mask=mask, **flags)

    def ref(x, w, b):
        return composition(x, mask, w, b, **flags)

    got = second(fb, x, w, b)
    want = second(ref, *as_reference(x, w, b))
    for name, g, r in zip(("input", "weight", "bias", "grad_out"), got, want, strict=True):
        assert_close(g, r, msg=f"second derivative wrt {name}")


@pytest.mark.filterwarnings(FORWARD_AD_WARNING)
@pytest.mark.parametrize(LAYOUT_ARGS, SMALL_LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_mask_forward_ad_matches_composition(detach_mean, detach_var, shape, memory_format):
    """Forward-mode AD with tangents on input, weight and bias."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    x = make_input(shape, memory_format)
    w, b = make_affine()
    mask = make_mask(shape)
    primals = (x.detach(), w.detach(), b.detach())
    tangents = tuple(torch.randn_like(p) for p in primals)
    y, ty = jvp(
        lambda x, w, b: flexbn.batch_norm(x, None, None, w, b, True, mask=mask, **flags),
        primals,
        tangents,
    )
    yr, tyr = jvp(lambda x, w, b: composition(x, mask, w, b, **flags), primals, tangents)
    assert_close(y, yr, msg="primal")
    assert tyr is not None
    assert_close(ty, tyr, msg="tangent")


# ================================================================================== mask: padding values

FILLS = [
    pytest.param(1e30, id="1e30"),
    pytest.param(-1e300, id="-1e300"),
    pytest.param(math.inf, id="inf"),
    pytest.param(-math.inf, id="-inf"),
    pytest.param(math.nan, id="nan"),
]
UPSTREAM = [
    pytest.param(True, id="dy_zero_at_padding"),
    pytest.param(False, id="dy_nonzero_at_padding"),
]


def padded(clean: Tensor, mask: Tensor, fill: float) -> Tensor:
    """``clean`` with every padded element replaced by ``fill``, as a fresh leaf."""
    return torch.where(mask.unsqueeze(1), clean.detach(), fill).requires_grad_()


PADDED_LAYOUTS = [
    pytest.param((4, C, 6), CONTIG, id="NCL"),
    pytest.param((4, C, 2, 3), CL, id="NCHW-channels_last"),  # the kernels' row layout
    pytest.param((12, C), CONTIG, id="NC"),
]


@pytest.mark.parametrize("zero_at_padding", UPSTREAM)
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
@pytest.mark.parametrize(("shape", "memory_format"), PADDED_LAYOUTS)
def test_padding_values_never_reach_real_outputs_or_gradients(
    shape, memory_format, detach_mean, detach_var, fill, zero_at_padding
):
    """Huge or non-finite padding: the real outputs, the whole input gradient (at padded positions
    ``dy * w * invstd``, whatever the padded value), the weight and bias gradients and the running buffers
    are those of the composition on finite padding, and finite; padded outputs are the composition's."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    clean = make_input(shape)
    mask = make_mask(shape)
    x = padded(clean, mask, fill).detach().contiguous(memory_format=memory_format).requires_grad_()
    w, b = make_affine()
    gy = torch.randn(shape, dtype=F64)
    if zero_at_padding:
        gy = torch.where(mask.unsqueeze(1), gy, 0)
    rm, rv = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.5, EPS, mask=mask, **flags)
    gx, gw, gb = grads(y, (x, w, b), gy)

    xr, wr, br = as_reference(clean, w, b)
    yr = composition(xr, mask, wr, br, **flags)
    gxr, gwr, gbr = grads(yr, (xr, wr, br), gy)
    real = real_positions(mask, shape)
    assert_close(y[real], yr[real], msg="real outputs")
    with torch.no_grad():
        assert_close(y, composition(x, mask, w, b), msg="every output, padding included")
    for name, g, r in (("input", gx, gxr), ("weight", gw, gwr), ("bias", gb, gbr)):
        assert torch.isfinite(g).all(), f"grad {name} not finite"
        assert_close(g, r, msg=f"grad {name}")
    mean, var = masked_moments(clean, mask)
    want_rm, want_rv = running_update(torch.zeros(C), torch.ones(C), mean, var, 0.5)
    assert_close(rm, want_rm, msg="running_mean")
    assert_close(rv, want_rv, msg="running_var")


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_stats_input_padding_values_never_reach_real_outputs_or_gradients(
    detach_mean, detach_var, fill
):
    """Non-finite padding in both ``input`` and ``stats_input``: real outputs and every gradient (input,
    stats_input, weight, bias) and the running buffers are the composition's on finite padding."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    shape = (4, C, 6)
    clean_x, clean_z = make_input(shape), make_input(shape)
    mask = make_mask(shape)
    x, z = padded(clean_x, mask, fill), padded(clean_z, mask, fill)
    w, b = make_affine()
    gy = torch.randn(shape, dtype=F64)
    rm, rv = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.5, EPS, mask=mask, stats_input=z, **flags)
    got = grads(y, (x, z, w, b), gy)

    xr, zr, wr, br = as_reference(clean_x, clean_z, w, b)
    yr = composition(xr, mask, wr, br, z=zr, **flags)
    want = grads(yr, (xr, zr, wr, br), gy)
    real = real_positions(mask, shape)
    assert_close(y[real], yr[real], msg="real outputs")
    for name, g, r in zip(("input", "stats_input", "weight", "bias"), got, want, strict=True):
        assert g is None or torch.isfinite(g).all(), f"grad {name} not finite"
        assert_close(g, r, msg=f"grad {name}")
    mean, var = masked_moments(clean_z, mask)
    want_rm, want_rv = running_update(torch.zeros(C), torch.ones(C), mean, var, 0.5)
    assert_close(rm, want_rm, msg="running_mean")
    assert_close(rv, want_rv, msg="running_var")


@pytest.mark.filterwarnings(FORWARD_AD_WARNING)
@pytest.mark.parametrize(
    "fill", [pytest.param(math.inf, id="inf"), pytest.param(math.nan, id="nan")]
)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_non_finite_padding_in_second_derivatives_and_forward_ad(detach_mean, detach_var, fill):
    """The double backward (``<grad_input, v> + |grad_weight|^2``, wrt input and weight) and the forward-mode
    tangent are the composition's on finite padding: padding reaches no derivative of any order."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    shape = (4, C, 5)
    clean = make_input(shape)
    mask = make_mask(shape)
    x = padded(clean, mask, fill)
    w, b = make_affine()
    gy, v = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)

    def second(f, x, w, b):
        gx, gw = derivative(f(x, w, b), (x, w), gy)
        return derivative((gx * v).sum() + gw.square().sum(), (x, w))

    def fb(x, w, b):
        return flexbn.batch_norm(x, None, None, w, b, True, mask=mask, **flags)

    def ref(x, w, b):
        return composition(x, mask, w, b, **flags)

    for name, g, r in zip(
        ("input", "weight"),
        second(fb, x, w, b),
        second(ref, *as_reference(clean, w, b)),
        strict=True,
    ):
        assert torch.isfinite(g).all(), f"second derivative wrt {name} not finite"
        assert_close(g, r, msg=f"second derivative wrt {name}")

    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    y, ty = jvp(fb, (x.detach(), w.detach(), b.detach()), tangents)
    yr, tyr = jvp(ref, (clean.detach(), w.detach(), b.detach()), tangents)
    real = real_positions(mask, shape)
    assert_close(y[real], yr[real], msg="primal at real positions")
    assert torch.isfinite(ty).all(), "tangent not finite"
    assert_close(ty, tyr, msg="tangent")


# ========================================================================== mask: running stats, eval, API


@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
def test_mask_running_stats_are_masked_mean_and_unbiased_variance(shape, memory_format):
    """After a masked step the buffers hold the momentum update with the float64 mean and the unbiased
    variance (count = real elements per channel) of the real elements."""
    x = make_input(shape, memory_format)
    mask = make_mask(shape)
    rm0, rv0 = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    flexbn.batch_norm(x, rm, rv, None, None, True, 0.3, EPS, mask=mask)
    mean, var = masked_moments(x, mask)
    want_rm, want_rv = running_update(rm0, rv0, mean, var, 0.3)
    assert_close(rm, want_rm, msg="running_mean")
    assert_close(rv, want_rv, msg="running_var")
    # non-vacuous: the padding would have moved the statistics
    assert (x.detach().mean((0, *range(2, x.dim()))) - mean).abs().max() > 1e-3


EVAL_MASKS = [
    pytest.param("random", id="random_mask"),
    pytest.param("all_false", id="all_padding"),
]


@pytest.mark.parametrize(
    "fill", [pytest.param(None, id="finite"), pytest.param(math.nan, id="nan")]
)
@pytest.mark.parametrize("mask_kind", EVAL_MASKS)
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
def test_mask_in_eval_uses_running_stats(shape, memory_format, mask_kind, fill):
    """Eval with running statistics: every element normalized with them (torch's eval output and input
    gradient), the weight and bias gradients summed over real elements only (the composition), running
    buffers untouched; an all-padding mask is allowed in eval."""
    clean = make_input(shape, memory_format)
    mask = (
        make_mask(shape)
        if mask_kind == "random"
        else torch.zeros((shape[0], *shape[2:]), dtype=torch.bool)
    )
    x = clean if fill is None else padded(clean, mask, fill)
    w, b = make_affine()
    rm, rv = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    gy = torch.randn(shape, dtype=F64)
    y = flexbn.batch_norm(x, rm, rv, w, b, False, 0.3, EPS, mask=mask)
    gx, gw, gb = grads(y, (x, w, b), gy)

    yt = F.batch_norm(x, rm.clone(), rv.clone(), w, b, False, 0.3, EPS)
    (gxt,) = grads(yt, (x,), gy)
    assert_close(y, yt, msg="output (eval normalization everywhere)")
    assert_close(gx, gxt, msg="grad input")

    xr, wr, br = as_reference(clean, w, b)
    nd = len(shape)
    per_channel = (1, -1) + (1,) * (nd - 2)
    yr = apply_stats(
        xr, mask.unsqueeze(1), rm.reshape(per_channel), rv.reshape(per_channel), wr, br
    )
    _, gwr, gbr = grads(yr, (xr, wr, br), gy)
    assert_close(gw, gwr, msg="grad weight")
    assert_close(gb, gbr, msg="grad bias")
    if mask_kind == "all_false":
        assert_close(gw, torch.zeros(C, dtype=F64))
        assert_close(gb, torch.zeros(C, dtype=F64))
    assert torch.equal(rm, rm0)
    assert torch.equal(rv, rv0)

    # second order: d/d(x, w) of <grad_input, v> + |grad_weight|^2
    v = torch.randn(shape, dtype=F64)

    def second(y, x, w):
        gx, gw = derivative(y, (x, w), gy)
        return derivative((gx * v).sum() + gw.square().sum(), (x, w))

    y = flexbn.batch_norm(x, rm, rv, w, b, False, 0.3, EPS, mask=mask)
    yr = apply_stats(
        xr, mask.unsqueeze(1), rm.reshape(per_channel), rv.reshape(per_channel), wr, br
    )
    for name, g, r in zip(("input", "weight"), second(y, x, w), second(yr, xr, wr), strict=True):
        assert_close(g, r, msg=f"second derivative wrt {name}")


@pytest.mark.parametrize(MODE_ARGS, MODES)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((6, C), id="1d-NC"),
        pytest.param((4, C, 5), id="1d-NCL"),
        pytest.param((3, C, 3, 4), id="2d"),
        pytest.param((2, C, 2, 3, 3), id="3d"),
    ],
)
def test_module_mask(shape, detach_mean, detach_var):
    """``bn(x, mask=m)``: training output, gradients and buffers (momentum 0.1, ``num_batches_tracked``),
    then eval output equal to torch's eval normalization with those buffers."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    bn = MODULES[len(shape)](C, dtype=F64, **flags)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(C) + 1)
        bn.bias.copy_(torch.randn(C))
    x = make_input(shape)
    mask = make_mask(shape)
    gy = torch.randn(shape, dtype=F64)
    y = bn(x, mask=mask)
    got = grads(y, (x, bn.weight, bn.bias), gy)
    xr, wr, br = as_reference(x, bn.weight, bn.bias)
    yr = composition(xr, mask, wr, br, **flags)
    want = grads(yr, (xr, wr, br), gy)
    assert_close(y, yr, msg="output")
    for g, r in zip(got, want, strict=True):
        assert_close(g, r)
    mean, var = masked_moments(x, mask)
    want_rm, want_rv = running_update(torch.zeros(C), torch.ones(C), mean, var, 0.1)
    assert_close(bn.running_mean, want_rm)
    assert_close(bn.running_var, want_rv)
    assert int(bn.num_batches_tracked) == 1

    bn.eval()
    x2 = make_input(shape)
    y2 = bn(x2, mask=make_mask(shape))
    want2 = F.batch_norm(x2, want_rm, want_rv, bn.weight, bn.bias, False, 0.1, bn.eps)
    assert_close(y2, want2, msg="eval output")


# ============================================================================ mask + groups / ghost batches

GROUPS = torch.tensor([5, 2, 5, 9, 2, 9, 5, 2])  # unsorted, arbitrary ids, bags of size 3, 3, 2


@pytest.mark.parametrize(
    "use_stats_input", [pytest.param(False, id="x"), pytest.param(True, id="stats_input")]
)
@pytest.mark.parametrize(
    LAYOUT_ARGS,
    [
        pytest.param((8, C, 5), CONTIG, id="NCL"),
        pytest.param((8, C, 2, 3), CL, id="NCHW-channels_last"),
    ],
)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_mask_with_groups_matches_loop_over_bags(
    detach_mean, detach_var, shape, memory_format, use_stats_input
):
    """Per-bag masked statistics: a loop over bags of the masked composition -- output, every gradient --
    and running buffers updated with the mean over bags of the masked means and unbiased variances."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    x = make_input(shape, memory_format)
    z = make_input(shape, memory_format) if use_stats_input else None
    w, b = make_affine()
    mask = make_mask(shape)
    gy = torch.randn(shape, dtype=F64)
    rm, rv = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = flexbn.batch_norm(
        x, rm, rv, w, b, True, 0.4, EPS, mask=mask, groups=GROUPS, stats_input=z, **flags
    )
    got = grads(y, leaves(x, z, w, b), gy)

    xr, zr, wr, br = as_reference(x, z, w, b)
    yr = by_segment(lambda x, m, z: composition(x, m, wr, br, z=z, **flags), GROUPS, xr, mask, zr)
    want = grads(yr, leaves(xr, zr, wr, br), gy)
    assert_close(y, yr, msg="output")
    for g, r in zip(got, want, strict=True):
        assert_close(g, r)
    mean, var = segment_moments(x if z is None else z, mask, GROUPS)
    want_rm, want_rv = running_update(rm0, rv0, mean, var, 0.4)
    assert_close(rm, want_rm, msg="running_mean")
    assert_close(rv, want_rv, msg="running_var")


@pytest.mark.parametrize(
    ("n", "virtual_batch_size"),
    [
        pytest.param(8, 2, id="N8-vbs2"),
        pytest.param(7, 3, id="N7-vbs3-uneven"),
        pytest.param(5, 2, id="N5-vbs2-uneven"),
        pytest.param(5, 3, id="N5-vbs3-one_chunk"),
    ],
)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_mask_with_virtual_batch_size_matches_loop_over_chunks(
    detach_mean, detach_var, n, virtual_batch_size
):
    """Ghost batches of consecutive samples (sample ``n`` in chunk ``n * G // N``) with masked statistics:
    a loop over chunks of the masked composition, and the Keras running-statistics convention."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    shape = (n, C, 4)
    x = make_input(shape)
    w, b = make_affine()
    mask = make_mask(shape)
    gy = torch.randn(shape, dtype=F64)
    rm, rv = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
    y = flexbn.batch_norm(
        x, rm, rv, w, b, True, 0.4, EPS, mask=mask, virtual_batch_size=virtual_batch_size, **flags
    )
    got = grads(y, (x, w, b), gy)
    ids = chunk_ids(n, virtual_batch_size)
    xr, wr, br = as_reference(x, w, b)
    yr = by_segment(lambda x, m: composition(x, m, wr, br, **flags), ids, xr, mask)
    want = grads(yr, (xr, wr, br), gy)
    assert_close(y, yr, msg="output")
    for g, r in zip(got, want, strict=True):
        assert_close(g, r)
    mean, var = segment_moments(x, mask, ids)
    want_rm, want_rv = running_update(torch.zeros(C), torch.ones(C), mean, var, 0.4)
    assert_close(rm, want_rm, msg="running_mean")
    assert_close(rv, want_rv, msg="running_var")


def test_module_mask_with_groups_and_virtual_batch_size():
    """The module API: ``bn(x, mask=m, groups=g)`` and a ghost-batch module with ``mask=`` equal the loops."""
    shape = (8, C, 4)
    x = make_input(shape)
    mask = make_mask(shape)
    gy = torch.randn(shape, dtype=F64)
    for kwargs, ids, extra in (
        ({}, GROUPS, {"groups": GROUPS}),
        ({"virtual_batch_size": 3}, chunk_ids(8, 3), {}),
    ):
        bn = flexbn.BatchNorm1d(C, dtype=F64, track_running_stats=False, **kwargs)
        y = bn(x, mask=mask, **extra)
        (gx,) = grads(y, (x,), gy)
        (xr,) = as_reference(x)
        yr = by_segment(lambda x, m: composition(x, m), ids, xr, mask)
        (gxr,) = grads(yr, (xr,), gy)
        assert_close(y, yr)
        assert_close(gx, gxr)


SEGMENTATIONS = [
    pytest.param("groups", id="groups"),
    pytest.param("virtual_batch_size", id="virtual_batch_size=3"),
]


@pytest.mark.filterwarnings(FORWARD_AD_WARNING)
@pytest.mark.parametrize("segmentation", SEGMENTATIONS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_mask_segments_and_stats_input_higher_order(detach_mean, detach_var, segmentation):
    """mask + bags / ghost batches + stats_input, to second order (``<gx, v> + <gz, vz> + |gw|^2`` wrt
    input, stats_input, weight and upstream gradient) and in forward mode: the loop over segments."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    shape = (8, C, 5)
    x, z = make_input(shape), make_input(shape)
    w, b = make_affine()
    mask = make_mask(shape)
    if segmentation == "groups":
        ids, kw = GROUPS, {"groups": GROUPS}
    else:
        ids, kw = chunk_ids(8, 3), {"virtual_batch_size": 3}
    gy = torch.randn(shape, dtype=F64, requires_grad=True)
    v, vz = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)

    def fb(x, z, w, b):
        return flexbn.batch_norm(x, None, None, w, b, True, mask=mask, stats_input=z, **kw, **flags)

    def ref(x, z, w, b):
        return by_segment(lambda x, m, z: composition(x, m, w, b, z=z, **flags), ids, x, mask, z)

    def second(f, x, z, w, b):
        gx, gz, gw = derivative(f(x, z, w, b), (x, z, w), gy)
        s = (gx * v).sum() + (gz * vz).sum() + gw.square().sum()
        return derivative(s, (x, z, w, gy))

    got = second(fb, x, z, w, b)
    want = second(ref, *as_reference(x, z, w, b))
    for name, g, r in zip(("input", "stats_input", "weight", "grad_out"), got, want, strict=True):
        assert_close(g, r, msg=f"second derivative wrt {name}")

    primals = tuple(t.detach() for t in (x, z, w, b))
    tangents = tuple(torch.randn_like(p) for p in primals)
    y, ty = jvp(fb, primals, tangents)
    yr, tyr = jvp(ref, primals, tangents)
    assert_close(y, yr, msg="primal")
    assert_close(ty, tyr, msg="tangent")


@pytest.mark.filterwarnings(FORWARD_AD_WARNING)
def test_mask_and_stats_input_under_torch_func():
    """``torch.func`` transforms over the masked batch norm with ``stats_input``: the Hessian of a cubic loss
    wrt the input (forward-over-reverse), the Jacobian wrt stats_input (``jacfwd``) and ``vmap`` over a
    stack of inputs equal the composition's."""
    shape = (4, C, 5)
    x, z = make_input(shape).detach(), make_input(shape).detach()
    w, b = (t.detach() for t in make_affine())
    mask = make_mask(shape)
    t = torch.randn(shape, dtype=F64)

    def fb(x, z):
        return flexbn.batch_norm(x, None, None, w, b, True, mask=mask, stats_input=z)

    def ref(x, z):
        return composition(x, mask, w, b, z=z)

    def cubic(f):
        return lambda x: (t * f(x, z) ** 3).sum()

    assert_close(torch.func.hessian(cubic(fb))(x), torch.func.hessian(cubic(ref))(x), msg="hessian")
    assert_close(
        torch.func.jacfwd(fb, argnums=1)(x, z),
        torch.func.jacfwd(ref, argnums=1)(x, z),
        msg="jacfwd",
    )
    xs, zs = torch.randn(3, *shape, dtype=F64), torch.randn(3, *shape, dtype=F64)
    want = torch.stack([ref(a, c) for a, c in zip(xs, zs, strict=True)])
    assert_close(torch.vmap(fb)(xs, zs), want, msg="vmap")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_mask_and_stats_input_reduced_precision(dtype):
    """float16/bfloat16 input and stats_input with float32 parameters and buffers: the float64
    composition within the dtype's tolerance, gradients in each tensor's dtype."""
    shape = (4, C, 6)
    x, z = make_input(shape, dtype=dtype), make_input(shape, dtype=dtype)
    w, b = make_affine(True, torch.float32)
    mask = make_mask(shape)
    rm, rv = torch.zeros(C), torch.ones(C)
    gy = torch.randn(shape, dtype=F64)
    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.5, EPS, mask=mask, stats_input=z)
    got = grads(y, (x, z, w, b), gy)
    xr, zr, wr, br = as_reference(x, z, w, b)
    yr = composition(xr, mask, wr, br, z=zr)
    want = grads(yr, (xr, zr, wr, br), gy)
    assert y.dtype == dtype
    assert_close(y, yr, dtype=dtype, msg="output")
    for name, g, r, d in zip(
        ("input", "stats_input", "weight", "bias"), got, want, (dtype, dtype, F32, F32), strict=True
    ):
        assert g.dtype == d, f"grad {name} dtype"
        # weight/bias gradients are sums over the batch of reduced-precision terms
        assert_close(g, r, dtype=dtype, msg=f"grad {name}")
    mean, var = masked_moments(z, mask)
    want_rm, want_rv = running_update(torch.zeros(C), torch.ones(C), mean, var, 0.5)
    assert_close(rm, want_rm, dtype=dtype, msg="running_mean")
    assert_close(rv, want_rv, dtype=dtype, msg="running_var")


# ============================================================================================ stats_input


@pytest.mark.parametrize("with_mask", WITH_MASK)
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_stats_input_first_order_matches_composition(
    detach_mean, detach_var, shape, memory_format, with_mask
):
    """Statistics of ``stats_input`` applied to ``input``: output and the gradients of input (direct path
    only), stats_input (through the statistics; none when both are detached), weight and bias."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    x, z = make_input(shape, memory_format), make_input(shape, memory_format) * 0.5 - 1
    z = z.detach().requires_grad_()
    w, b = make_affine()
    mask = make_mask(shape) if with_mask else None
    gy = torch.randn(shape, dtype=F64)
    y = flexbn.batch_norm(x, None, None, w, b, True, mask=mask, stats_input=z, **flags)
    got = grads(y, (x, z, w, b), gy)

    xr, zr, wr, br = as_reference(x, z, w, b)
    yr = composition(xr, mask, wr, br, z=zr, **flags)
    want = grads(yr, (xr, zr, wr, br), gy)

    assert y.is_contiguous(memory_format=memory_format)
    assert_close(y, yr, msg="output")
    for name, g, r in zip(("input", "stats_input", "weight", "bias"), got, want, strict=True):
        assert_close(g, r, msg=f"grad {name}")
    if detach_mean and detach_var:
        assert got[1] is None, "stats_input must get no gradient when both statistics are detached"
    else:
        assert got[1].is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("with_mask", WITH_MASK)
@pytest.mark.parametrize(LAYOUT_ARGS, SMALL_LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_stats_input_double_backward_matches_composition(
    detach_mean, detach_var, shape, memory_format, with_mask
):
    """Second derivatives of ``<gx, v> + <gz, vz> + |gw|^2`` wrt input, stats_input, weight and the upstream
    gradient."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    x, z = make_input(shape, memory_format), make_input(shape, memory_format)
    w, b = make_affine()
    mask = make_mask(shape) if with_mask else None
    gy = torch.randn(shape, dtype=F64, requires_grad=True)
    v, vz = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)

    def second(f, x, z, w, b):
        gx, gz, gw = derivative(f(x, z, w, b), (x, z, w), gy)
        s = (gx * v).sum() + (gz * vz).sum() + gw.square().sum()
        return derivative(s, (x, z, w, gy))

    def fb(x, z, w, b):
        return flexbn.batch_norm(x, None, None, w, b, True, mask=mask, stats_input=z, **flags)

    def ref(x, z, w, b):
        return composition(x, mask, w, b, z=z, **flags)

    got = second(fb, x, z, w, b)
    want = second(ref, *as_reference(x, z, w, b))
    for name, g, r in zip(("input", "stats_input", "weight", "grad_out"), got, want, strict=True):
        assert_close(g, r, msg=f"second derivative wrt {name}")


@pytest.mark.filterwarnings(FORWARD_AD_WARNING)
@pytest.mark.parametrize("with_mask", WITH_MASK)
@pytest.mark.parametrize(LAYOUT_ARGS, SMALL_LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_stats_input_forward_ad_matches_composition(
    detach_mean, detach_var, shape, memory_format, with_mask
):
    """Forward-mode AD with tangents on input, stats_input, weight and bias."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    x, z = make_input(shape, memory_format), make_input(shape, memory_format)
    w, b = make_affine()
    mask = make_mask(shape) if with_mask else None
    primals = tuple(t.detach() for t in (x, z, w, b))
    tangents = tuple(torch.randn_like(p) for p in primals)
    y, ty = jvp(
        lambda x, z, w, b: flexbn.batch_norm(
            x, None, None, w, b, True, mask=mask, stats_input=z, **flags
        ),
        primals,
        tangents,
    )
    yr, tyr = jvp(lambda x, z, w, b: composition(x, mask, w, b, z=z, **flags), primals, tangents)
    assert_close(y, yr, msg="primal")
    assert_close(ty, tyr, msg="tangent")


@pytest.mark.parametrize("with_mask", WITH_MASK)
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
def test_stats_input_running_stats_are_those_of_stats_input(shape, memory_format, with_mask):
    x, z = make_input(shape, memory_format), make_input(shape, memory_format) * 3 - 2
    mask = make_mask(shape) if with_mask else None
    rm0, rv0 = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    flexbn.batch_norm(x, rm, rv, None, None, True, 0.3, EPS, mask=mask, stats_input=z)
    mean, var = masked_moments(z, mask)
    want_rm, want_rv = running_update(rm0, rv0, mean, var, 0.3)
    assert_close(rm, want_rm, msg="running_mean")
    assert_close(rv, want_rv, msg="running_var")


@pytest.mark.filterwarnings(FORWARD_AD_WARNING)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_stats_input_is_input_equals_no_stats_input(detach_mean, detach_var):
    """``stats_input=x`` (the same tensor object) is plain batch norm: the composition's value, gradients,
    double backward and forward-mode tangent; torch's in full mode."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    shape = (4, C, 5)
    x = make_input(shape)
    w, b = make_affine()
    gy = torch.randn(shape, dtype=F64, requires_grad=True)
    v = torch.randn(shape, dtype=F64)

    def fb(x, w, b):
        return flexbn.batch_norm(x, None, None, w, b, True, stats_input=x, **flags)

    def ref(x, w, b):
        return composition(x, None, w, b, **flags)

    def run(f, x, w, b):
        y = f(x, w, b)
        gx, gw, gb = derivative(y, (x, w, b), gy)
        return (y, gx, gw, gb, *derivative((gx * v).sum() + gw.square().sum(), (x, w, gy)))

    names = ("output", "grad input", "grad weight", "grad bias", "d2 input", "d2 weight", "d2 gy")
    for name, g, r in zip(names, run(fb, x, w, b), run(ref, *as_reference(x, w, b)), strict=True):
        assert_close(g, r, msg=name)
    if not (detach_mean or detach_var):
        torch_run = run(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), x, w, b)
        for name, g, r in zip(names, run(fb, x, w, b), torch_run, strict=True):
            assert_close(g, r, msg=f"{name} (torch)")

    primals = (x.detach(), w.detach(), b.detach())
    tangents = tuple(torch.randn_like(p) for p in primals)
    with fwAD.dual_level():
        xd, wd, bd = (fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True))
        ty = fwAD.unpack_dual(fb(xd, wd, bd)).tangent  # the same dual object twice
    _, tyr = jvp(ref, primals, tangents)
    assert_close(ty, tyr, msg="tangent")


@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_batch_norm_on_pre_dropout_statistics(detach_mean, detach_var):
    """The use case: ``h = lin(inp)``, ``y = bn(dropout(h), stats_input=h)`` in a tiny model. The output and
    the gradients wrt ``h``, the linear weight, the input and the BN parameters equal the composition with
    the same dropout mask; and they differ from BN on the dropped-out statistics (non-vacuous)."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    torch.manual_seed(1)
    lin = torch.nn.Linear(5, C, dtype=F64)
    bn = flexbn.BatchNorm1d(C, dtype=F64, **flags)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(C) + 1)
        bn.bias.copy_(torch.randn(C))
    drop = torch.nn.Dropout(0.5)
    inp = torch.randn(16, 5, dtype=F64, requires_grad=True)
    target = torch.randn(16, C, dtype=F64)

    torch.manual_seed(7)
    h = lin(inp)
    y = bn(drop(h), stats_input=h)
    loss = ((y - target) ** 2).sum()
    got = torch.autograd.grad(loss, (h, inp, lin.weight, lin.bias, bn.weight, bn.bias))

    wr, br = as_reference(bn.weight, bn.bias)
    lw, lb, inp_r = as_reference(lin.weight, lin.bias, inp)
    torch.manual_seed(7)
    hr = F.linear(inp_r, lw, lb)
    dropped = F.dropout(hr, 0.5, training=True)
    yr = composition(dropped, None, wr, br, z=hr, **flags)
    loss_r = ((yr - target) ** 2).sum()
    want = torch.autograd.grad(loss_r, (hr, inp_r, lw, lb, wr, br))

    assert (dropped == 0).any(), "dropout must have dropped something"
    assert_close(y, yr, msg="output")
    names = ("h", "input", "linear weight", "linear bias", "bn weight", "bn bias")
    for name, g, r in zip(names, got, want, strict=True):
        assert_close(g, r, msg=f"grad {name}")
    assert_close(bn.running_mean, 0.1 * hr.detach().mean(0), msg="running_mean: statistics of h")
    assert (yr - composition(dropped, None, wr, br, **flags)).abs().max() > 0.1


@pytest.mark.parametrize("requires", ["input_only", "stats_input_only"])
def test_stats_input_other_layout_and_partial_requires_grad(requires):
    """``stats_input`` channels-last while ``input`` is contiguous; only one of them requiring grad: the
    other gets the composition's gradient, in its own layout."""
    shape = (3, C, 4, 5)
    x = make_input(shape).requires_grad_(requires == "input_only")
    z = make_input(shape, CL).requires_grad_(requires == "stats_input_only")
    gy = torch.randn(shape, dtype=F64)
    y = flexbn.batch_norm(x, None, None, None, None, True, stats_input=z)
    leaf = x if requires == "input_only" else z
    (g,) = grads(y, (leaf,), gy)
    xr, zr = as_reference(x, z)
    yr = composition(xr, None, z=zr)
    (gr,) = grads(yr, (xr if requires == "input_only" else zr,), gy)
    assert_close(y, yr)
    assert_close(g, gr)
    assert y.is_contiguous()
    if requires == "stats_input_only":
        assert g.is_contiguous(memory_format=CL)


def test_stats_input_is_ignored_in_eval():
    """Documented: eval mode with running statistics normalizes with those and ignores ``stats_input`` (no
    gradient reaches it)."""
    shape = (4, C, 5)
    x, z = make_input(shape), make_input(shape)
    w, b = make_affine()
    rm, rv = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    gy = torch.randn(shape, dtype=F64)
    y = flexbn.batch_norm(x, rm, rv, w, b, False, stats_input=z)
    yt = F.batch_norm(x, rm, rv, w, b, False)
    assert_close(y, yt)
    got = grads(y, (x, z, w, b), gy)
    want = grads(yt, (x, z, w, b), gy)
    for g, r in zip(got, want, strict=True):
        assert_close(g, r)
    assert got[1] is None


# ================================================================================================= errors


@dataclass(frozen=True)
class Bad:
    shape: tuple[int, ...]
    kwargs: Callable[[Tensor], dict[str, Any]]  # input -> bad keyword arguments
    exc: type[Exception]
    match: str
    training: bool = True
    api: str = "functional"


def bad(id: str, shape, kwargs, exc, match, **kw) -> Any:
    return pytest.param(Bad(shape, kwargs, exc, match, **kw), id=id)


B = torch.bool
MASK_SHAPE = r"mask must have shape \({}\)"
MASK_DTYPE = r"mask must be a bool tensor .* but got torch\.{}"
ONE_REAL = r"segment selected by {} has {}"
STATS_SHAPE = r"stats_input must have the input's shape"

ERRORS = [
    # mask: type, shape, dtype, device
    bad("mask-list", (4, C, 5), lambda x: {"mask": [[True] * 5] * 4}, TypeError, "mask must be a Tensor, not list"),
    bad("mask-int", (4, C), lambda x: {"mask": 1}, TypeError, "mask must be a Tensor, not int"),
    bad("mask-(N,)-for-NCL", (4, C, 5), lambda x: torch.ones(4, dtype=B), ValueError, MASK_SHAPE.format("4, 5")),
    bad("mask-with-channel-dim", (4, C, 5), lambda x: torch.ones(4, C, 5, dtype=B), ValueError, MASK_SHAPE.format("4, 5")),
    bad("mask-keepdim-channel", (4, C, 5), lambda x: torch.ones(4, 1, 5, dtype=B), ValueError, MASK_SHAPE.format("4, 5")),
    bad("mask-(N,1)-for-NC", (4, C), lambda x: torch.ones(4, 1, dtype=B), ValueError, MASK_SHAPE.format("4,")),
    bad("mask-wrong-N", (4, C, 5), lambda x: torch.ones(3, 5, dtype=B), ValueError, MASK_SHAPE.format("4, 5")),
    bad("mask-transposed-HW", (2, C, 4, 5), lambda x: torch.ones(2, 5, 4, dtype=B), ValueError, MASK_SHAPE.format("2, 4, 5")),
    bad("mask-wrong-shape-eval", (4, C, 5), lambda x: torch.ones(4, 6, dtype=B), ValueError, MASK_SHAPE.format("4, 5"), training=False),
    bad("mask-uint8", (4, C, 5), lambda x: torch.ones(4, 5, dtype=torch.uint8), ValueError, MASK_DTYPE.format("uint8")),
    bad("mask-int64", (4, C, 5), lambda x: torch.ones(4, 5, dtype=torch.long), ValueError, MASK_DTYPE.format("int64")),
    bad("mask-float", (4, C, 5), lambda x: torch.ones(4, 5), ValueError, MASK_DTYPE.format("float32")),
    bad("mask-float-eval", (4, C, 5), lambda x: torch.ones(4, 5), ValueError, MASK_DTYPE.format("float32"), training=False),
    bad("mask-meta-device", (4, C, 5), lambda x: torch.ones(4, 5, dtype=B, device="meta"), ValueError, "mask is on meta"),
    # mask: one real value or none per channel in a segment, in training
    bad("mask-all-false", (4, C, 5), lambda x: torch.zeros(4, 5, dtype=B), ValueError, ONE_REAL.format("mask", 0)),
    bad("mask-one-true", (4, C, 5), lambda x: one_true((4, 5)), ValueError, ONE_REAL.format("mask", 1)),
    bad("mask-one-true-NC", (4, C), lambda x: one_true((4,)), ValueError, ONE_REAL.format("mask", 1)),
    bad("mask-one-true-NCHW", (2, C, 3, 3), lambda x: one_true((2, 3, 3)), ValueError, ONE_REAL.format("mask", 1)),
    bad("mask-one-true-in-a-bag", (4, C, 3), lambda x: {"mask": bag_with_one_real(), "groups": torch.tensor([0, 1, 0, 1])}, ValueError, ONE_REAL.format("groups and mask", 1)),
    bad("mask-empty-bag", (4, C, 3), lambda x: {"mask": torch.tensor([[True] * 3, [False] * 3, [True] * 3, [False] * 3]), "groups": torch.tensor([0, 1, 0, 1])}, ValueError, ONE_REAL.format("groups and mask", 0)),
    bad("mask-one-true-in-a-ghost-batch", (4, C, 3), lambda x: {"mask": ghost_batch_with_one_real(), "virtual_batch_size": 2}, ValueError, ONE_REAL.format("mask", 1)),
    bad("module-mask-all-false", (4, C, 5), lambda x: torch.zeros(4, 5, dtype=B), ValueError, ONE_REAL.format("mask", 0), api="module"),
    bad("module-mask-wrong-shape", (4, C, 5), lambda x: torch.ones(4, dtype=B), ValueError, MASK_SHAPE.format("4, 5"), api="module"),
    # stats_input: type, shape, dtype, device
    bad("stats_input-list", (4, C), lambda x: {"stats_input": x.tolist()}, TypeError, "stats_input must be a Tensor, not list"),
    bad("stats_input-float", (4, C), lambda x: {"stats_input": 1.0}, TypeError, "stats_input must be a Tensor, not float"),
    bad("stats_input-shape", (4, C, 5), lambda x: {"stats_input": x[:, :, :4]}, ValueError, STATS_SHAPE),
    bad("stats_input-transposed", (4, C, 5), lambda x: {"stats_input": x.transpose(0, 2)}, ValueError, STATS_SHAPE),
    bad("stats_input-one-sample-short", (4, C), lambda x: {"stats_input": x[:3]}, ValueError, STATS_SHAPE),
    bad("stats_input-float32", (4, C, 5), lambda x: {"stats_input": x.float()}, ValueError, "stats_input must have the input's dtype"),
    bad("stats_input-meta-device", (4, C, 5), lambda x: {"stats_input": x.to("meta")}, ValueError, "stats_input must have the input's dtype and device"),
    bad("module-stats_input-shape", (4, C, 5), lambda x: {"stats_input": x[:2]}, ValueError, STATS_SHAPE, api="module"),
]  # fmt: skip


def one_true(shape) -> Tensor:
    mask = torch.zeros(shape, dtype=B)
    mask.view(-1)[0] = True
    return mask


def bag_with_one_real() -> Tensor:
    """Samples 0 and 2 (bag 0, first ghost batch) have 1 real element between them; 1 and 3 have six."""
    return torch.tensor([[True, False, False], [True] * 3, [False] * 3, [True] * 3])


def ghost_batch_with_one_real() -> Tensor:
    """Samples 0 and 1 (the first ghost batch of 2) have 1 real element between them; 2 and 3 have six."""
    return torch.tensor([[True, False, False], [False] * 3, [True] * 3, [True] * 3])


@pytest.mark.parametrize("case", ERRORS)
def test_bad_mask_or_stats_input_raises_naming_the_argument(case: Bad):
    x = torch.randn(case.shape, dtype=F64)
    kwargs = case.kwargs(x)
    if isinstance(kwargs, Tensor):
        kwargs = {"mask": kwargs}
    rm, rv = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
    if case.api == "module":
        bn = MODULES[len(case.shape)](C, dtype=F64).train(case.training)
        rm, rv = bn.running_mean, bn.running_var
        call = lambda: bn(x, **kwargs)  # noqa: E731
    else:
        call = lambda: flexbn.batch_norm(x, rm, rv, None, None, case.training, **kwargs)  # noqa: E731
    with pytest.raises(case.exc, match=case.match):
        call()
    assert torch.equal(rm, torch.zeros(C, dtype=F64)), "a failed call must not touch the buffers"
    assert torch.equal(rv, torch.ones(C, dtype=F64))


# ===================================================================================== property (hypothesis)


@dataclass(frozen=True)
class Example:
    shape: tuple[int, ...]
    channels_last: bool
    affine: bool
    detach_mean: bool
    detach_var: bool
    p_real: float
    stats_input: bool
    bags: int  # 0: no groups
    eps: float
    seed: int


@st.composite
def examples(draw: st.DrawFn) -> Example:
    dim = draw(st.integers(2, 5))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=dim - 2, max_size=dim - 2)))
    n = draw(st.integers(2, 6))
    bags = draw(st.integers(2, 3)) if math.prod(spatial) >= 2 and draw(st.booleans()) else 0
    return Example(
        shape=(n, draw(st.integers(1, 3)), *spatial),
        channels_last=dim >= 4 and draw(st.booleans()),
        affine=draw(st.booleans()),
        detach_mean=draw(st.booleans()),
        detach_var=draw(st.booleans()),
        p_real=draw(st.sampled_from([0.2, 0.5, 0.9, 1.0])),
        stats_input=draw(st.booleans()),
        bags=bags,
        eps=draw(st.sampled_from([1e-5, 1e-2])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def random_mask(e: Example, gen: torch.Generator, ids: Tensor | None) -> Tensor:
    """At least two real elements per channel in every segment: two forced positions per bag (a bag
    then has >= 2 spatial positions), or the first two samples' first positions."""
    n = e.shape[0]
    mask = torch.rand((n, *e.shape[2:]), generator=gen) < e.p_real
    flat = mask.view(n, -1)
    if ids is None:
        flat[:2, 0] = True
    else:
        for g in ids.unique():
            flat[int((ids == g).nonzero()[0]), :2] = True
    return mask


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(e=examples())
def test_property_matches_masked_composition(e: Example):
    """Any shape, mask, mode, bag layout and optional ``stats_input``: the float64 (per-bag) masked
    composition's output, gradients (input, stats_input, weight, bias) and running buffers."""
    gen = torch.Generator().manual_seed(e.seed)
    nd, c = len(e.shape), e.shape[1]
    fmt = (CL if nd == 4 else CL3D) if e.channels_last else CONTIG

    def rand(*size):
        return torch.randn(size, generator=gen, dtype=F64)

    x = (rand(*e.shape) * 2 + 0.5).contiguous(memory_format=fmt).requires_grad_()
    z = (
        (rand(*e.shape) - 1).contiguous(memory_format=fmt).requires_grad_()
        if e.stats_input
        else None
    )
    w = (rand(c) + 1).requires_grad_() if e.affine else None
    b = rand(c).requires_grad_() if e.affine else None
    ids = torch.randint(0, e.bags, (e.shape[0],), generator=gen) if e.bags else None
    mask = random_mask(e, gen, ids)
    gy = rand(*e.shape)
    rm, rv = rand(c), rand(c).abs() + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    flags = {"detach_mean": e.detach_mean, "detach_var": e.detach_var}

    y = flexbn.batch_norm(
        x, rm, rv, w, b, True, 0.2, e.eps, mask=mask, groups=ids, stats_input=z, **flags
    )
    got = grads(y, leaves(x, z, w, b), gy)

    xr, zr, wr, br = as_reference(x, z, w, b)

    def ref(x, m, z):
        return composition(x, m, wr, br, e.eps, z=z, **flags)

    yr = ref(xr, mask, zr) if ids is None else by_segment(ref, ids, xr, mask, zr)
    want = grads(yr, leaves(xr, zr, wr, br), gy)
    assert_close(y, yr, msg="output")
    for g, r in zip(got, want, strict=True):
        assert_close(g, r)
    source = x if z is None else z
    if ids is None or ids.unique().numel() == 1:
        mean, var = masked_moments(source, mask)
    else:
        mean, var = segment_moments(source, mask, ids)
    want_rm, want_rv = running_update(rm0, rv0, mean, var, 0.2)
    assert_close(rm, want_rm, msg="running_mean")
    assert_close(rv, want_rv, msg="running_var")


def test_both_detached_stats_input_only_output_does_not_require_grad():
    """As with ``.detach()`` of both statistics: nothing in the output depends differentiably on z."""
    z = torch.randn(4, 3, 5, requires_grad=True)
    x = torch.randn(4, 3, 5)
    y = flexbn.batch_norm(
        x, None, None, None, None, True, stats_input=z, detach_mean=True, detach_var=True
    )
    assert not y.requires_grad
    y_mean_tracked = flexbn.batch_norm(
        x, None, None, None, None, True, stats_input=z, detach_var=True
    )
    assert y_mean_tracked.requires_grad
