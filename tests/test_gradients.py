"""Gradients: every gradient-flow mode equals its hand-written composition, to every derivative order.

The specification (``flexbn.batch_norm``'s docstring): in training, ``detach_mean=True`` is exactly
``x.mean(dims).detach()`` and ``detach_var=True`` exactly ``x.var(dims, unbiased=False).detach()``; with both
``False`` it is ``torch.nn.functional.batch_norm``. ``conftest.manual_batch_norm`` writes those compositions
out in float64, and every test here compares flexbn with it -- output, gradients of input, weight and bias
(random weight, bias and upstream gradient), and second derivatives -- or with torch for the full mode.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

import flexbn
from conftest import MODE_ARGS, MODES, assert_close, manual_batch_norm

CL, CL3D, CONTIG = torch.channels_last, torch.channels_last_3d, torch.contiguous_format
C = 3


LAYOUTS = [
    pytest.param((8, C), CONTIG, id="NC"),
    pytest.param((4, C, 5), CONTIG, id="NCL"),
    pytest.param((2, C, 4, 5), CONTIG, id="NCHW"),
    pytest.param((2, C, 4, 5), CL, id="NCHW-channels_last"),
    pytest.param((2, C, 2, 3, 2), CONTIG, id="NCDHW"),
    pytest.param((2, C, 2, 3, 2), CL3D, id="NCDHW-channels_last_3d"),
]
LAYOUT_ARGS = ("shape", "memory_format")
# A few layouts for the more expensive (double-backward) tests.
SMALL_LAYOUTS = [LAYOUTS[0], LAYOUTS[1], LAYOUTS[3]]

AFFINE = [pytest.param(True, id="affine"), pytest.param(False, id="no_affine")]
MODULES = {
    2: flexbn.BatchNorm1d,
    3: flexbn.BatchNorm1d,
    4: flexbn.BatchNorm2d,
    5: flexbn.BatchNorm3d,
}


# ----------------------------------------------------------------------------------------------- helpers


def make_input(shape, memory_format=CONTIG, dtype=torch.float64) -> Tensor:
    """A random leaf (mean 0.5, std 2: centring and scaling both matter) in ``memory_format``."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    return x.to(dtype).contiguous(memory_format=memory_format).requires_grad_()


def make_affine(affine: bool, dtype=torch.float64) -> tuple[Tensor | None, Tensor | None]:
    """Random weight and bias (never ones/zeros, which hide affine bugs), or ``(None, None)``."""
    if not affine:
        return None, None
    w = (torch.randn(C, dtype=torch.float64) + 1).to(dtype).requires_grad_()
    b = torch.randn(C, dtype=torch.float64).to(dtype).requires_grad_()
    return w, b


def as_reference(*ts: Tensor | None) -> list[Tensor | None]:
    """float64 leaf copies (same values) for the reference computation."""
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def leaves(*ts: Tensor | None) -> tuple[Tensor, ...]:
    return tuple(t for t in ts if t is not None)


def grads(out: Tensor, inputs: tuple[Tensor, ...], grad_out: Tensor, **kw) -> tuple[Tensor, ...]:
    return torch.autograd.grad(out, inputs, grad_out.to(out.dtype), **kw)


def derivative(out: Tensor, inputs: tuple[Tensor, ...], grad_out: Tensor | None = None):
    """``torch.autograd.grad`` with ``create_graph=True`` where an input the output does not depend on (or an
    output that depends on no input: the derivative of a constant) gets a zero gradient, as in maths."""
    if not out.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    return torch.autograd.grad(
        out, inputs, grad_out, create_graph=True, allow_unused=True, materialize_grads=True
    )


def flexbn_functional(detach_mean: bool, detach_var: bool) -> Callable[..., Tensor]:
    def f(x, w, b):
        return flexbn.batch_norm(
            x, None, None, w, b, True, detach_mean=detach_mean, detach_var=detach_var
        )

    return f


def flexbn_module(x: Tensor, w, b, detach_mean: bool, detach_var: bool) -> tuple[Tensor, tuple]:
    """The module's output for ``x`` with weight/bias set to ``w``/``b``; returns (output, parameters)."""
    affine = w is not None
    bn = MODULES[x.dim()](C, affine=affine, detach_mean=detach_mean, detach_var=detach_var)
    bn = bn.to(x.dtype)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    return bn(x), leaves(bn.weight, bn.bias) if affine else ()


def manual(detach_mean: bool, detach_var: bool) -> Callable[..., Tensor]:
    def f(x, w, b):
        return manual_batch_norm(x, w, b, detach_mean=detach_mean, detach_var=detach_var)

    return f


# ----------------------------------------------------------------------------------- first order


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_first_order_matches_composition(
    detach_mean, detach_var, shape, memory_format, affine, dtype, api
):
    """Output and the gradients of input, weight and bias equal the float64 hand composition."""
    x = make_input(shape, memory_format, dtype)
    w, b = make_affine(affine, dtype)
    gy = torch.randn(shape, dtype=torch.float64)
    if api == "functional":
        y = flexbn_functional(detach_mean, detach_var)(x, w, b)
        params = leaves(w, b)
    else:
        y, params = flexbn_module(x, w, b, detach_mean, detach_var)
    got = grads(y, (x, *params), gy)

    xr, wr, br = as_reference(x, w, b)
    yr = manual(detach_mean, detach_var)(xr, wr, br)
    want = grads(yr, leaves(xr, wr, br), gy)

    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=memory_format)
    assert got[0].is_contiguous(memory_format=memory_format)
    assert_close(y, yr, dtype=dtype, msg="output")
    assert len(got) == len(want) == (3 if affine else 1)
    for name, g, r in zip(("input", "weight", "bias"), got, want, strict=False):
        assert g.dtype == dtype
        assert_close(g, r, dtype=dtype, msg=f"grad {name}")


@pytest.mark.parametrize(MODE_ARGS, MODES[1:])
def test_detached_gradients_differ_from_full(detach_mean, detach_var):
    """Negative check: each detached mode's input gradient is far from the full mode's (not vacuous)."""
    x = make_input((8, C, 5))
    gy = torch.randn(x.shape, dtype=torch.float64)
    (g_full,) = grads(flexbn_functional(False, False)(x, None, None), (x,), gy)
    (g_det,) = grads(flexbn_functional(detach_mean, detach_var)(x, None, None), (x,), gy)
    assert (g_full - g_det).abs().max() > 0.05


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
def test_full_mode_matches_torch(shape, memory_format, affine, dtype, training):
    """Default options: torch.nn.functional.batch_norm's output, gradients and running buffers."""
    x = make_input(shape, memory_format, dtype)
    w, b = make_affine(affine, dtype)
    rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    gy = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format)
    y = flexbn.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-4)
    yt = F.batch_norm(x, rm_t, rv_t, w, b, training, 0.3, 1e-4)
    got, want = grads(y, leaves(x, w, b), gy), grads(yt, leaves(x, w, b), gy)
    assert_close(y, yt, msg="output")
    for g, r in zip(got, want, strict=True):
        assert_close(g, r)
    assert_close(rm, rm_t, msg="running_mean")
    assert_close(rv, rv_t, msg="running_var")


# ------------------------------------------------------------------------- gradcheck / gradgradcheck

GRADCHECK_SHAPES = [
    pytest.param((4, 2), id="NC"),
    pytest.param((3, 2, 3), id="NCL"),
    pytest.param((2, 2, 2, 3), id="NCHW"),
]


def _gradcheck_inputs(shape, affine):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    if not affine:
        return (x,)
    w = (torch.randn(shape[1], dtype=torch.float64) + 1).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES)
def test_gradcheck_and_gradgradcheck_full_mode_training(shape, affine):
    inputs = _gradcheck_inputs(shape, affine)

    def f(x, w=None, b=None):
        return flexbn.batch_norm(x, None, None, w, b, True, 0.1, 1e-3)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize(MODE_ARGS, MODES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES)
def test_gradcheck_and_gradgradcheck_eval(shape, affine, detach_mean, detach_var):
    """Eval mode (running statistics are constants): every mode is a smooth function with exact derivatives."""
    inputs = _gradcheck_inputs(shape, affine)
    rm = torch.randn(shape[1], dtype=torch.float64)
    rv = torch.rand(shape[1], dtype=torch.float64) + 0.5

    def f(x, w=None, b=None):
        return flexbn.batch_norm(
            x, rm, rv, w, b, False, 0.1, 1e-3, detach_mean=detach_mean, detach_var=detach_var
        )

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize(MODE_ARGS, MODES)
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES)
def test_gradcheck_of_backward_wrt_upstream_grad_and_weight(shape, detach_mean, detach_var):
    """Every mode: the backward, as a function of (upstream gradient, weight) at fixed x, is smooth and its
    autograd derivatives (the double backward wrt grad_out and weight) match finite differences."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(shape[1], dtype=torch.float64) + 1).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64)

    def backward(gy, w):
        y = flexbn.batch_norm(
            x, None, None, w, b, True, detach_mean=detach_mean, detach_var=detach_var
        )
        return torch.autograd.grad(y, (x, w), gy, create_graph=True)

    assert torch.autograd.gradcheck(backward, (gy, w))


@pytest.mark.parametrize(MODE_ARGS, MODES[1:])
def test_detached_modes_are_not_gradients_of_their_forward(detach_mean, detach_var):
    """Documents the specification: a detached statistic is treated as a constant by every derivative, so
    gradcheck/gradgradcheck wrt x (finite differences of the forward) fail -- for the hand composition and
    for flexbn alike. Equality with the composition is what the other tests check."""
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    for f in (manual(detach_mean, detach_var), flexbn_functional(detach_mean, detach_var)):
        g = lambda x, f=f: f(x, None, None)  # noqa: E731
        assert not torch.autograd.gradcheck(g, (x,), raise_exception=False)
        assert not torch.autograd.gradgradcheck(g, (x,), raise_exception=False)


# ------------------------------------------------------------------------------------ double backward


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(LAYOUT_ARGS, SMALL_LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_double_backward_matches_composition(detach_mean, detach_var, shape, memory_format, affine):
    """Second derivatives of ``<grad_input, v> + <grad_weight, vw> + <grad_bias, vb>`` wrt input, weight,
    bias and the upstream gradient equal the hand composition's (float64)."""
    x = make_input(shape, memory_format)
    w, b = make_affine(affine)
    gy = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn(shape, dtype=torch.float64)
    vw, vb = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)

    def second(f, x, w, b):
        y = f(x, w, b)
        first = derivative(y, leaves(x, w, b), gy)
        s = (first[0] * v).sum()
        if affine:
            s = s + (first[1] * vw).sum() + (first[2] * vb).sum()
        return derivative(s, (*leaves(x, w, b), gy))

    got = second(flexbn_functional(detach_mean, detach_var), x, w, b)
    want = second(manual(detach_mean, detach_var), *as_reference(x, w, b))
    names = ["input", *(["weight", "bias"] if affine else []), "grad_out"]
    for name, g, r in zip(names, got, want, strict=True):
        assert_close(g, r, msg=f"second derivative wrt {name}")


LOSSES = {
    # y.sum(): in full mode its input gradient is identically 0 (the sum identity), in detached modes not.
    "sum": lambda y, t: y.sum(),
    "cubic": lambda y, t: (t * y**3).sum() / 3,
}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(LAYOUT_ARGS, SMALL_LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_gradient_penalty_matches_composition(
    detach_mean, detach_var, shape, memory_format, affine, loss
):
    """A gradient penalty ``|d loss/dx|^2 + |d loss/dw|^2`` (``create_graph=True``) and its gradients."""
    x = make_input(shape, memory_format)
    w, b = make_affine(affine)
    t = torch.randn(shape, dtype=torch.float64)

    def penalty(f, x, w, b):
        y = f(x, w, b)
        first = derivative(LOSSES[loss](y, t), leaves(x, w, b))
        p = sum(g.square().sum() for g in first[:2])
        return p, derivative(p, leaves(x, w, b))

    p, got = penalty(flexbn_functional(detach_mean, detach_var), x, w, b)
    pr, want = penalty(manual(detach_mean, detach_var), *as_reference(x, w, b))
    assert_close(p, pr, msg="penalty")
    for g, r in zip(got, want, strict=True):
        assert_close(g, r)


@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_third_derivative_matches_composition(detach_mean, detach_var):
    """To every order: d/dx of <d/dx <grad_input, v>, u> equals the composition's."""
    x = make_input((4, C, 3))
    w, b = make_affine(True)
    gy, v, u = (torch.randn(x.shape, dtype=torch.float64) for _ in range(3))

    def third(f, x, w, b):
        y = f(x, w, b)
        (g1,) = derivative(y, (x,), gy)
        (g2,) = derivative((g1 * v).sum(), (x,))
        return derivative((g2 * u).sum(), (x, w))

    got = third(flexbn_functional(detach_mean, detach_var), x, w, b)
    want = third(manual(detach_mean, detach_var), *as_reference(x, w, b))
    for g, r in zip(got, want, strict=True):
        assert_close(g, r)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(LAYOUT_ARGS, SMALL_LAYOUTS)
def test_full_mode_double_backward_matches_torch(shape, memory_format, affine):
    x = make_input(shape, memory_format)
    w, b = make_affine(affine)
    gy = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn(shape, dtype=torch.float64)

    def second(f):
        y = f(x, None, None, w, b, True)
        first = derivative(y, leaves(x, w, b), gy)
        s = sum((g * (v if g.dim() > 1 else 1.5)).sum() for g in first)
        return derivative(s, (*leaves(x, w, b), gy))

    for g, r in zip(second(flexbn.batch_norm), second(F.batch_norm), strict=True):
        assert_close(g, r)


# torch loads its forward-AD decompositions with torch.jit.script on first use, which warns in torch 2.13
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_forward_mode_ad_matches_composition(detach_mean, detach_var):
    """Forward-mode AD (``torch.autograd.forward_ad``, which ``torch.func.jvp``, ``jacfwd`` and ``hessian``
    use): torch's batch norm supports it (``batch_norm_jvp``); a detached statistic carries no tangent."""
    x = make_input((4, C, 3))
    w, b = make_affine(True)
    primals = (x.detach(), w.detach(), b.detach())
    tangents = tuple(torch.randn_like(t) for t in primals)

    def jvp(f):
        with fwAD.dual_level():
            out = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
            primal, tangent = fwAD.unpack_dual(out)
            return primal, tangent

    y, ty = jvp(flexbn_functional(detach_mean, detach_var))
    yr, tyr = jvp(manual(detach_mean, detach_var))
    assert_close(y, yr)
    assert tyr is not None
    assert_close(ty, tyr)


# ----------------------------------------------------------------------------- identities (papers §12)


# (mode, sum(grad_input) vanishes, sum(x * grad_input) vanishes)
IDENTITIES = [
    pytest.param(False, False, True, True, id="full"),
    pytest.param(True, False, False, False, id="detach_mean"),
    pytest.param(False, True, True, False, id="detach_var"),
    pytest.param(True, True, False, False, id="detach_both"),
]


@pytest.mark.parametrize("shape", [(32, 5), (4, 5, 8)], ids=["NC", "NCL"])
@pytest.mark.parametrize(("detach_mean", "detach_var", "sum_zero", "xsum_zero"), IDENTITIES)
def test_gradient_identities(detach_mean, detach_var, sum_zero, xsum_zero, shape):
    """Batch norm's gradient identities: the full gradient is orthogonal to 1 and to x per channel;
    detaching the mean breaks both identities, detaching the variance only the second. The second identity is exact only for
    ``eps = 0`` (it says the output is invariant to scaling x); ``eps = 1e-12`` keeps it below 1e-9."""
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    w = torch.randn(shape[1], dtype=torch.float64) + 1
    b = torch.randn(shape[1], dtype=torch.float64)
    gy = torch.randn(shape, dtype=torch.float64)
    y = flexbn.batch_norm(
        x, None, None, w, b, True, eps=1e-12, detach_mean=detach_mean, detach_var=detach_var
    )
    (gx,) = torch.autograd.grad(y, x, gy)
    dims = (0, *range(2, x.dim()))
    s1 = gx.sum(dims).abs().max().item()
    s2 = (x * gx).sum(dims).abs().max().item()
    assert (s1 < 1e-9) == sum_zero, f"max |sum grad_input| = {s1}"
    assert (s2 < 1e-9) == xsum_zero, f"max |sum x * grad_input| = {s2}"
    if not sum_zero:
        assert s1 > 0.1
    if not xsum_zero:
        assert s2 > 0.1


# ------------------------------------------------------------------------------------------ eval mode


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_eval_uses_running_stats_as_constants(detach_mean, detach_var, shape, memory_format, api):
    """Eval: the flags change nothing; ``grad_input = dy * weight / sqrt(rv + eps)``; the running buffers
    are neither updated nor reached by gradient."""
    eps = 1e-3
    x = make_input(shape, memory_format)
    w, b = make_affine(True)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    gy = torch.randn(shape, dtype=torch.float64)
    if api == "functional":
        y = flexbn.batch_norm(
            x, rm, rv, w, b, False, 0.1, eps, detach_mean=detach_mean, detach_var=detach_var
        )
        params = (w, b)
    else:
        bn = MODULES[x.dim()](C, eps=eps, detach_mean=detach_mean, detach_var=detach_var).double()
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
        rm, rv = bn.running_mean, bn.running_var
        y = bn.eval()(x)
        params = (bn.weight, bn.bias)
    gx, gw, gb = grads(y, (x, *params), gy)

    shp = (1, C) + (1,) * (x.dim() - 2)
    s = (rv0 + eps).rsqrt().reshape(shp)
    xhat = (x.detach() - rm0.reshape(shp)) * s
    dims = (0, *range(2, x.dim()))
    assert_close(y, xhat * w.detach().reshape(shp) + b.detach().reshape(shp), msg="output")
    assert_close(gx, gy * w.detach().reshape(shp) * s, msg="grad input")
    assert_close(gw, (gy * xhat).sum(dims), msg="grad weight")
    assert_close(gb, gy.sum(dims), msg="grad bias")
    assert torch.equal(rm, rm0)
    assert torch.equal(rv, rv0)
    assert not rm.requires_grad
    assert not rv.requires_grad
    assert rm.grad is None
    assert rv.grad is None


# --------------------------------------------------------------------------------------------- memory


class SavedTensors:
    """Records the tensors autograd saves while active (``torch.autograd.graph.saved_tensors_hooks``)."""

    def __init__(self) -> None:
        self.saved: list[Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        self.saved.append(t)
        return t

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def assert_saves_only_input_and_per_channel(saved: list[Tensor], x: Tensor) -> None:
    big = [t for t in saved if t.numel() > x.shape[1]]
    assert len(big) == 1, (
        f"{len(big)} tensors larger than per-channel saved: {[t.shape for t in big]}"
    )
    assert big[0].data_ptr() == x.data_ptr()
    assert big[0].shape == x.shape
    assert big[0].dtype == x.dtype


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "memory_format", "dtype"),
    [
        pytest.param((8, C), CONTIG, torch.float32, id="NC"),
        pytest.param((2, C, 4, 5), CL, torch.float32, id="NCHW-channels_last"),
        pytest.param((2, C, 2, 3, 2), CONTIG, torch.float64, id="NCDHW-float64"),
        pytest.param((2, C, 4, 5), CONTIG, torch.float16, id="NCHW-float16"),
        pytest.param((2, C, 4, 5), CONTIG, torch.bfloat16, id="NCHW-bfloat16"),
    ],
)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_graph_saves_only_input_and_per_channel_tensors(
    detach_mean, detach_var, shape, memory_format, dtype, training
):
    """The graph holds the input itself (no copy, not even an upcast one) plus weight, mean and invstd."""
    x = make_input(shape, memory_format, dtype)
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = make_affine(True, pdt)
    rm, rv = torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt)
    with SavedTensors() as rec:
        y = flexbn.batch_norm(
            x, rm, rv, w, b, training, detach_mean=detach_mean, detach_var=detach_var
        )
    assert_saves_only_input_and_per_channel(rec.saved, x)
    y.backward(torch.randn_like(y))  # the saved graph is complete
    assert x.grad is not None
    assert w.grad is not None


def test_saved_tensor_probe_sees_full_size_tensors():
    """Negative check: the probe does catch a graph that keeps copies of the input (the composition)."""
    x = make_input((4, C, 5))
    with SavedTensors() as rec:
        manual_batch_norm(x)
    with pytest.raises(AssertionError, match="larger than per-channel"):
        assert_saves_only_input_and_per_channel(rec.saved, x)


def test_module_graph_saves_only_input_and_per_channel_tensors():
    x = make_input((2, C, 4, 5), CL, torch.float32)
    bn = flexbn.BatchNorm2d(C, detach_mean=True)
    with SavedTensors() as rec:
        bn(x)
    assert_saves_only_input_and_per_channel(rec.saved, x)


@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_double_backward_through_the_bias_alone(detach_mean, detach_var):
    """create_graph=True where only the bias requires grad (no argument of the backward does): the
    backward is still differentiable and equals the composition's (the C++ kernels hand this case to the
    reference, which builds the graph)."""
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(8, 3, 4, dtype=torch.float64)
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    y = flexbn.batch_norm(x, None, None, None, b, training=True, **flags)
    (gb,) = torch.autograd.grad((y * gy).sum(), b, create_graph=True)
    yr = manual_batch_norm(x, None, b, **flags)
    (gbr,) = torch.autograd.grad((yr * gy).sum(), b, create_graph=True)
    assert_close(gb, gbr)
    assert_close(gb, gy.sum((0, 2)))
