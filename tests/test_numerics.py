"""Numerics: statistics and outputs against float64 references where float32 arithmetic is hard.

* A float32 channel with mean 1e4 and standard deviation 0.1 (``|mean| >> std``): the batch variance, the
  normalized output and the gradients, in every memory layout (``stats`` module notes).
* float16/bfloat16 input: statistics accumulated in float32, far more accurate than accumulating in the
  input's dtype.
* Degenerate channels: a constant channel in training; a zero running variance with ``eps=0`` in eval.

The bounds below are set from measurements (2 CPU threads, torch 2.13) with a margin of ~5-10x; torch's own
figures for the same inputs are recorded in comments, never asserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import flexbn
from conftest import assert_close, manual_batch_norm

CL, CONTIG = torch.channels_last, torch.contiguous_format
C = 4

# Large enough for the summation order (and torch's float32 accumulation) to matter, small enough to be fast.
LARGE_LAYOUTS = [
    pytest.param((64, C, 32, 32), CONTIG, id="NCHW"),
    pytest.param((64, C, 32, 32), CL, id="NCHW-channels_last"),
    pytest.param((65536, C), CONTIG, id="NC"),
    pytest.param((512, C, 128), CONTIG, id="NCL"),
]
LAYOUT_ARGS = ("shape", "memory_format")


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def per_channel(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def large_offset_input(shape, memory_format) -> Tensor:
    """float32, per channel mean ~1e4 and standard deviation 0.1."""
    x = torch.randn(shape, dtype=torch.float64) * 0.1 + 1e4
    return x.float().contiguous(memory_format=memory_format)


# --------------------------------------------------------------------------------- mean 1e4, std 0.1


@pytest.mark.parametrize(LAYOUT_ARGS, LARGE_LAYOUTS)
def test_large_offset_batch_statistics(shape, memory_format):
    """One training step with momentum 1 leaves exactly the batch statistics in the running buffers.

    Measured: variance relative error 1.2e-7 to 3.8e-7 in every layout. torch (same inputs): 1.4e-5
    (NCHW), 0.12 (channels_last), 0.10 (N, C), 1.9e-5 (N, C, L) -- its channels-last and 2-D kernels
    accumulate in float32.
    """
    x = large_offset_input(shape, memory_format)
    rm, rv = torch.zeros(C), torch.ones(C)
    flexbn.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
    xd, dims = x.double(), reduce_dims(x)
    mean, var = xd.mean(dims), xd.var(dims)  # unbiased, as the running variance stores it
    # the mean: within float32's resolution at 1e4 (ulp 9.8e-4)
    assert (rm.double() - mean).abs().max() < 1e-3
    rel = ((rv.double() - var) / var).abs().max().item()
    assert rel < 2e-6, f"variance relative error {rel:.2e}"


@pytest.mark.parametrize(LAYOUT_ARGS, LARGE_LAYOUTS)
def test_large_offset_output_and_gradients(shape, memory_format):
    """Training output and gradients against float64.

    Measured: output abs error <= 2.8e-6 (weights ~N(1, 1)), grad_input error <= 3.7e-7 of its largest
    value, grad_weight relative error <= 4.8e-6. torch (same inputs): output error 1.4e-2 (NCHW), 1.1
    (channels_last), 0.69 (N, C), 1.1e-2 (N, C, L), grad_weight relative error 0.056, 4.0, 1.4, 6.7e-3.
    """
    x = large_offset_input(shape, memory_format).requires_grad_()
    w = (torch.randn(C) + 1).requires_grad_()
    b = torch.randn(C).requires_grad_()
    gy = torch.randn(shape)
    y = flexbn.batch_norm(x, None, None, w, b, True)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)

    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = manual_batch_norm(xr, wr, br)
    gxr, gwr, gbr = torch.autograd.grad(yr, (xr, wr, br), gy.double())

    err = (y.double() - yr).abs().max().item()
    assert err < 2e-5, f"output abs error {err:.2e}"
    err = ((gx.double() - gxr).abs().max() / gxr.abs().max()).item()
    assert err < 3e-6, f"grad_input error {err:.2e} of its largest value"
    err = ((gw.double() - gwr).abs() / gwr.abs()).max().item()
    assert err < 5e-5, f"grad_weight relative error {err:.2e}"
    # grad_bias is a plain float32 sum of gy: its error is relative to the sum of magnitudes
    err = ((gb.double() - gbr).abs() / gy.double().abs().sum(reduce_dims(gy))).max().item()
    assert err < 1e-6, f"grad_bias error {err:.2e} relative to sum |gy|"


@pytest.mark.parametrize(LAYOUT_ARGS, LARGE_LAYOUTS)
def test_large_offset_eval_output(shape, memory_format):
    """Eval with running statistics near 1e4: ``(x - mean) * invstd``, not the fused ``x * a + b``.

    Measured: abs error <= 1e-6. torch (same inputs): 3e-3 to 6.6e-3 (its fused form).
    """
    x = large_offset_input(shape, memory_format)
    xd, dims = x.double(), reduce_dims(x)
    rm, rv = xd.mean(dims).float(), xd.var(dims).float()
    w, b = torch.randn(C) + 1, torch.randn(C)
    y = flexbn.batch_norm(x, rm, rv, w, b, False)
    yr = manual_batch_norm(x, w, b, mean=rm, var=rv)
    err = (y.double() - yr).abs().max().item()
    assert err < 1e-5, f"output abs error {err:.2e}"


# -------------------------------------------------------------------------- float16 / bfloat16 input


def pairwise_sum(v: Tensor) -> Tensor:
    """Pairwise summation with every partial sum rounded to ``v``'s dtype: accumulating in that dtype."""
    while v.shape[0] > 1:
        if v.shape[0] % 2:
            v = torch.cat([v, v.new_zeros(1)])
        v = v[0::2] + v[1::2]
    return v[0]


def reduced_precision_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance with all arithmetic in ``x``'s (reduced) dtype, as float64."""
    rows = x.transpose(0, 1).reshape(x.shape[1], -1)
    n = rows.shape[1]
    means, variances = [], []
    for r in rows:
        m = pairwise_sum(r) / n
        means.append(m.double())
        variances.append((pairwise_sum((r - m).square()) / n).double())
    return torch.stack(means), torch.stack(variances)


REDUCED = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]


@pytest.mark.parametrize(
    "shape", [pytest.param((4096, C), id="NC"), pytest.param((16, C, 16, 16), id="NCHW")]
)
@pytest.mark.parametrize("dtype", REDUCED)
def test_reduced_input_statistics_accumulate_in_float32(dtype, shape):
    """Statistics of float16/bfloat16 input (mean 3, std 1; float32 buffers) against float64.

    Measured: relative error <= 4e-8 (mean) and <= 2.2e-7 (variance); the same statistics accumulated in
    the input's dtype are off by 3e-4 to 7e-3 -- the bound sits 50x below that.
    """
    x = (torch.randn(shape) + 3).to(dtype)
    rm, rv = torch.zeros(C), torch.ones(C)
    flexbn.batch_norm(x, rm, rv, None, None, True, 1.0)
    xd, dims = x.double(), reduce_dims(x)
    n = xd.numel() // C
    mean, var = xd.mean(dims), xd.var(dims, unbiased=False)
    got_mean, got_var = rm.double(), rv.double() * (n - 1) / n
    rel_mean = ((got_mean - mean) / mean).abs().max().item()
    rel_var = ((got_var - var) / var).abs().max().item()
    assert rel_mean < 1e-6, f"mean relative error {rel_mean:.2e}"
    assert rel_var < 2e-6, f"variance relative error {rel_var:.2e}"
    # the bound discriminates: accumulating in the input's dtype would miss it by far
    low_mean, low_var = reduced_precision_moments(x)
    assert ((low_mean - mean) / mean).abs().max() > 1e-4
    assert ((low_var - var) / var).abs().max() > 1e-4


def test_float16_accumulation_would_overflow():
    """65536 values near 100 per channel: a float16 accumulator overflows (max 65504); flexbn's does not."""
    x = (torch.randn(65536, C) + 100).half()
    low_mean, _ = reduced_precision_moments(x)
    assert not low_mean.isfinite().any()
    rm, rv = torch.zeros(C), torch.ones(C)
    flexbn.batch_norm(x, rm, rv, None, None, True, 1.0)
    xd = x.double()
    assert ((rm.double() - xd.mean(0)) / xd.mean(0)).abs().max() < 1e-6
    assert ((rv.double() - xd.var(0)) / xd.var(0)).abs().max() < 2e-6


@pytest.mark.parametrize("dtype", REDUCED)
def test_reduced_input_output_and_gradients(dtype):
    """Output and gradients of float16/bfloat16 input within the dtype's tolerance of float64."""
    x = (torch.randn(8, C, 6, 6) * 2 + 1).to(dtype).requires_grad_()
    w = (torch.randn(C) + 1).requires_grad_()
    b = torch.randn(C).requires_grad_()
    gy = torch.randn(x.shape).to(dtype)
    y = flexbn.batch_norm(x, None, None, w, b, True)
    got = torch.autograd.grad(y, (x, w, b), gy)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = manual_batch_norm(xr, wr, br)
    want = torch.autograd.grad(yr, (xr, wr, br), gy.double())
    assert y.dtype == dtype
    assert_close(y, yr)
    assert got[0].dtype == dtype
    assert_close(got[0], want[0])
    # float32 parameters: their gradients are float32 sums over 288 elements, to float32 accuracy of
    # the reduced-precision upstream gradient
    for g, r in zip(got[1:], want[1:], strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------------- degenerate channels

CONSTANTS = [0.1, -2.3, 3.7, 10000.1]
CONSTANT_SHAPES = [
    pytest.param((17, C), CONTIG, id="NC17"),
    pytest.param((5, C, 11), CONTIG, id="NCL"),
    pytest.param((3, C, 7, 5), CONTIG, id="NCHW"),
    pytest.param((3, C, 7, 5), CL, id="NCHW-channels_last"),
]
DTYPES = [
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]


def input_with_constant_channel(shape, memory_format, dtype, value: float) -> Tensor:
    x = torch.randn(shape, dtype=torch.float64)
    x[:, 1] = value
    return x.to(dtype).contiguous(memory_format=memory_format).requires_grad_()


@pytest.mark.parametrize("value", CONSTANTS)
@pytest.mark.parametrize(LAYOUT_ARGS, CONSTANT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_channel_output_is_bias(dtype, shape, memory_format, value):
    """A channel with one value throughout has variance 0 and x - mean = 0: its output is exactly ``bias``
    (torch's fused kernel does not guarantee this: #5410) and every gradient is finite."""
    x = input_with_constant_channel(shape, memory_format, dtype, value)
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (torch.randn(C, dtype=torch.float64) + 1).to(pdt).requires_grad_()
    b = torch.randn(C, dtype=torch.float64).to(pdt).requires_grad_()
    rm, rv = torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt)
    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.5)
    channel = y[:, 1]
    expected = b[1].detach().to(dtype).expand_as(channel)
    assert torch.equal(channel, expected), (
        f"constant channel: max |y - bias| = {(channel.double() - expected.double()).abs().max():.3g}"
    )
    assert rv[1] == 0.5  # (1 - momentum) * 1 + momentum * 0
    for g in torch.autograd.grad(y, (x, w, b), torch.randn(shape, dtype=torch.float64).to(dtype)):
        assert g.isfinite().all()


@pytest.mark.parametrize("eps", [1e-5, 1e-10])
def test_constant_channel_output_is_bias_minimal(eps):
    """The smallest case of the above: 17 copies of 10000.1 in float32. The float32 mean rounds to
    10000.1016 (shift) while the values are 10000.0996, so ``delta = -2^-9``; the output
    ``(x - shift) * scale + (bias - delta * scale)`` then adds two rounded terms of size ``|delta| * scale``
    that do not cancel exactly (error ~ ulp(|delta| / sqrt(eps)): 4e-8 at eps=1e-5, 3e-6 at eps=1e-10)."""
    x = torch.full((17, 1), 10000.1)
    y = flexbn.batch_norm(x, None, None, torch.tensor([0.7]), torch.tensor([0.3]), True, eps=eps)
    assert torch.equal(y, torch.full_like(y, 0.3)), f"max |y - bias| = {(y - 0.3).abs().max():.3g}"


MODES = [
    pytest.param(False, False, id="full"),
    pytest.param(True, False, id="detach_mean"),
    pytest.param(False, True, id="detach_var"),
    pytest.param(True, True, id="detach_both"),
]


@pytest.mark.parametrize(("detach_mean", "detach_var"), MODES)
def test_constant_channel_gradients_match_composition(detach_mean, detach_var):
    """With a zero-variance channel (invstd = 1/sqrt(eps)) the gradients still equal the composition's."""
    x = input_with_constant_channel((6, C, 5), CONTIG, torch.float64, 0.5)
    w = (torch.randn(C, dtype=torch.float64) + 1).requires_grad_()
    b = torch.randn(C, dtype=torch.float64).requires_grad_()
    gy = torch.randn(x.shape, dtype=torch.float64)
    y = flexbn.batch_norm(
        x, None, None, w, b, True, eps=1e-3, detach_mean=detach_mean, detach_var=detach_var
    )
    yr = manual_batch_norm(x, w, b, 1e-3, detach_mean=detach_mean, detach_var=detach_var)
    assert_close(y, yr)
    for g, r in zip(
        torch.autograd.grad(y, (x, w, b), gy),
        torch.autograd.grad(yr, (x, w, b), gy),
        strict=True,
    ):
        assert g.isfinite().all()
        assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_eval_with_eps_zero_and_zero_running_variance_as_torch(dtype):
    """Eval, ``eps=0``, a zero running variance: 1/sqrt(0) is infinite in torch's eval path (the ``InvStd``
    rule that returns 0 only applies to training kernels, which require ``eps > 0``). flexbn matches: the
    zero-variance channel is non-finite wherever torch's is, the other channels equal torch's."""
    x = torch.randn(4, 3, 5, dtype=dtype, requires_grad=True)
    rm, rv = torch.randn(3, dtype=dtype), torch.tensor([0.0, 0.7, 1.3], dtype=dtype)
    w, b = torch.randn(3, dtype=dtype) + 1, torch.randn(3, dtype=dtype)
    y = flexbn.batch_norm(x, rm, rv, w, b, False, 0.1, 0.0)
    yt = F.batch_norm(x, rm, rv, w, b, False, 0.1, 0.0)
    assert torch.equal(y.isfinite(), yt.isfinite())
    assert not y[:, 0].isfinite().any()
    assert_close(y[:, 1:], yt[:, 1:])
    gy = torch.randn_like(x)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gxt,) = torch.autograd.grad(yt, x, gy)
    assert torch.equal(gx.isfinite(), gxt.isfinite())
    assert_close(gx[:, 1:], gxt[:, 1:])
