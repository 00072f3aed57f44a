"""Statistics over segments of the batch: ``groups=`` (per-bag statistics) and ``virtual_batch_size=``
(ghost batch norm), alone and with the detach flags, in the functional API and the modules.

The references never call flexbn:

* a Python loop of ``torch.nn.functional.batch_norm(training=True)`` over each bag / chunk, the pieces put
  back in sample order with ``torch.cat`` (outputs and gradients of input, weight and bias);
* the same loop over ``conftest.manual_batch_norm`` with ``.detach()`` for the detach flags (to every
  derivative order and in forward mode);
* running statistics by hand in float64 from per-segment ``torch.var_mean`` (Keras' convention: the mean over
  segments of the segment means and of the unbiased segment variances, once per call);
* the ghost-batch chunking rule written out independently (``G = N // vbs`` chunks with boundaries
  ``ceil(g * N / G)``; one chunk when ``N < 2 * vbs``) and pinned by explicit chunk sizes.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import flexbn
from conftest import MODE_ARGS, MODES, assert_close, manual_batch_norm

C = 3
CL, CL3D, CONTIG = torch.channels_last, torch.channels_last_3d, torch.contiguous_format
MODULES = {
    2: flexbn.BatchNorm1d,
    3: flexbn.BatchNorm1d,
    4: flexbn.BatchNorm2d,
    5: flexbn.BatchNorm3d,
}
TORCH_MODULES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

# Unsorted, negative and non-consecutive ids; bags of sizes 2, 2 and 3.
IDS = [7, -2, 7, 3, -2, 3, 3]
# The same with a bag of a single sample (id 11) in the middle: fine when the input has spatial extent.
IDS_LONE = [7, -2, 11, 7, 3, -2, 3, 3]

AFFINE = [pytest.param(True, id="affine"), pytest.param(False, id="no_affine")]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
KINDS = [pytest.param("groups", id="groups"), pytest.param("ghost", id="ghost")]

GROUP_LAYOUTS = [
    pytest.param((7, C), CONTIG, IDS, id="NC"),
    pytest.param((8, C, 3), CONTIG, IDS_LONE, id="NCL-lone_bag"),
    pytest.param((7, C, 2, 3), CONTIG, IDS, id="NCHW"),
    pytest.param((8, C, 2, 3), CL, IDS_LONE, id="NCHW-channels_last-lone_bag"),
    pytest.param((8, C, 2, 1, 2), CONTIG, IDS_LONE, id="NCDHW-lone_bag"),
    pytest.param((7, C, 2, 2, 1), CL3D, IDS, id="NCDHW-channels_last_3d"),
]
GROUP_LAYOUT_ARGS = ("shape", "memory_format", "ids")

# Layouts for ghost batches and for the detach-flag tests (batch size 7 everywhere).
LAYOUTS = [
    pytest.param((7, C), CONTIG, id="NC"),
    pytest.param((7, C, 3), CONTIG, id="NCL"),
    pytest.param((7, C, 2, 3), CL, id="NCHW-channels_last"),
    pytest.param((7, C, 2, 1, 2), CONTIG, id="NCDHW"),
]
LAYOUT_ARGS = ("shape", "memory_format")


# ----------------------------------------------------------------------------------------------- helpers


def bags(ids: Sequence[int]) -> list[list[int]]:
    """Sample indices of each bag, in order of first appearance (plain Python, no torch.unique)."""
    out: dict[int, list[int]] = {}
    for n, i in enumerate(ids):
        out.setdefault(int(i), []).append(n)
    return list(out.values())


def chunks(n: int, vbs: int) -> list[list[int]]:
    """Ghost batches: ``G = n // vbs`` consecutive chunks with boundaries ``ceil(g * n / G)``; one chunk
    when ``G <= 1``."""
    g = n // vbs
    if g <= 1:
        return [list(range(n))]
    bounds = [-(-k * n // g) for k in range(g + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(g)]


def from_sizes(sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive segments of the given sizes."""
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def per_segment(f: Callable[[Tensor], Tensor], segs: list[list[int]], x: Tensor) -> Tensor:
    """``f`` applied to each segment's samples of ``x``; the pieces concatenated and put back in sample
    order (differentiable in every mode)."""
    pieces = [f(x[torch.tensor(s)]) for s in segs]
    order = torch.tensor([n for s in segs for n in s])
    assert sorted(order.tolist()) == list(range(x.shape[0]))
    return torch.cat(pieces)[torch.argsort(order)]


def torch_loop(segs, x, w=None, b=None, eps=1e-5) -> Tensor:
    """Per-segment ``torch.nn.functional.batch_norm(training=True)`` (on contiguous pieces: torch's CPU kernel
    is slow for a channels-last batch of one sample)."""
    return per_segment(
        lambda xs: F.batch_norm(xs.contiguous(), None, None, w, b, True, 0.0, eps), segs, x
    )


def composition(segs, detach_mean: bool, detach_var: bool, eps=1e-5):
    """Per-segment float64 hand composition with ``.detach()`` (``conftest.manual_batch_norm``)."""

    def f(x, w=None, b=None):
        return per_segment(
            lambda xs: manual_batch_norm(
                xs, w, b, eps, detach_mean=detach_mean, detach_var=detach_var
            ),
            segs,
            x,
        )

    return f


def keras_running(x: Tensor, segs, rm: Tensor, rv: Tensor, momentum: float):
    """The expected running buffers after one update, by hand in float64."""
    xd = x.detach().double()
    dims = (0, *range(2, x.dim()))
    vm = [torch.var_mean(xd[torch.tensor(s)], dims, correction=1) for s in segs]
    var = torch.stack([v for v, _ in vm]).mean(0)
    mean = torch.stack([m for _, m in vm]).mean(0)
    return (1 - momentum) * rm.double() + momentum * mean, (
        1 - momentum
    ) * rv.double() + momentum * var


def make_input(shape, memory_format=CONTIG, dtype=torch.float64) -> Tensor:
    """A random leaf (mean 0.5, std 2) in ``memory_format``."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    return x.to(dtype).contiguous(memory_format=memory_format).requires_grad_()


def make_affine(affine: bool, dtype=torch.float64, c: int = C):
    """Random weight and bias (never ones/zeros), or ``(None, None)``."""
    if not affine:
        return None, None
    w = (torch.randn(c, dtype=torch.float64) + 1).to(dtype).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).to(dtype).requires_grad_()
    return w, b


def as_reference(*ts):
    """float64 leaf copies (same values) for the reference computation."""
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def leaves(*ts) -> tuple[Tensor, ...]:
    return tuple(t for t in ts if t is not None)


def grads(out: Tensor, inputs, grad_out: Tensor, **kw) -> tuple[Tensor, ...]:
    return torch.autograd.grad(out, inputs, grad_out.to(out.dtype), **kw)


def derivative(out: Tensor, inputs, grad_out: Tensor | None = None):
    """``create_graph=True`` gradient with zeros (not ``None``) for unused inputs or a constant output."""
    if not out.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    return torch.autograd.grad(
        out, inputs, grad_out, create_graph=True, allow_unused=True, materialize_grads=True
    )


def module_with(dim: int, w, b, dtype=torch.float64, **kw) -> nn.Module:
    """A flexbn module of the right dimensionality with weight/bias set to ``w``/``b``."""
    bn = MODULES[dim](C, affine=w is not None, **kw).to(dtype)
    if w is not None:
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    return bn


def segmentation(kind: str, n: int) -> tuple[dict, list[list[int]]]:
    """flexbn keywords and the expected segments for a 7-sample batch: bags ``IDS`` or ghost batches of 2
    (chunks of 3, 2, 2)."""
    assert n == 7
    if kind == "groups":
        return {"groups": torch.tensor(IDS)}, bags(IDS)
    return {"virtual_batch_size": 2}, from_sizes([3, 2, 2])


# ------------------------------------------------------------------------------------ groups: values


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(GROUP_LAYOUT_ARGS, GROUP_LAYOUTS)
def test_groups_match_per_bag_torch_loop(shape, memory_format, ids, affine, dtype, api):
    """Output and gradients of input, weight and bias (random weight, bias and upstream gradient) equal a
    loop of torch's batch norm over each bag's samples."""
    x = make_input(shape, memory_format, dtype)
    w, b = make_affine(affine, dtype)
    gy = torch.randn(shape, dtype=torch.float64)
    groups = torch.tensor(ids)
    if api == "functional":
        y = flexbn.batch_norm(x, None, None, w, b, True, groups=groups)
        params = leaves(w, b)
    else:
        bn = module_with(x.dim(), w, b, dtype)
        y = bn(x, groups=groups)
        params = leaves(bn.weight, bn.bias) if affine else ()
    got = grads(y, (x, *params), gy)

    xr, wr, br = as_reference(x, w, b)
    yr = torch_loop(bags(ids), xr, wr, br)
    want = grads(yr, leaves(xr, wr, br), gy)

    assert y.dtype == dtype
    assert y.shape == x.shape
    assert y.is_contiguous(memory_format=memory_format)
    assert got[0].is_contiguous(memory_format=memory_format)
    assert_close(y, yr, dtype=dtype, msg="output")
    assert len(got) == len(want) == (3 if affine else 1)
    names = ["input", *(["weight", "bias"] if affine else [])]
    for name, g, r in zip(names, got, want, strict=True):
        assert g.dtype == dtype
        assert_close(g, r, dtype=dtype, msg=f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(GROUP_LAYOUT_ARGS, GROUP_LAYOUTS)
def test_groups_running_stats_follow_keras_convention(shape, memory_format, ids, dtype):
    """One update per call with the mean over bags of the bag means and unbiased bag variances."""
    x = make_input(shape, memory_format, dtype)
    rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    want_m, want_v = keras_running(x, bags(ids), rm, rv, 0.3)
    # Not vacuous: the whole-batch update (torch's) is far from it.
    rm_t, rv_t = rm.clone(), rv.clone()
    F.batch_norm(x.detach(), rm_t, rv_t, None, None, True, 0.3)
    assert (rm_t.double() - want_m).abs().max() > 1e-3
    assert (rv_t.double() - want_v).abs().max() > 1e-3

    flexbn.batch_norm(x, rm, rv, None, None, True, 0.3, groups=torch.tensor(ids))
    assert rm.dtype == rv.dtype == dtype
    assert_close(rm, want_m, dtype=dtype, msg="running_mean")
    assert_close(rv, want_v, dtype=dtype, msg="running_var")


ID_TENSORS = [
    pytest.param(lambda: torch.tensor(IDS, dtype=torch.int8), id="int8"),
    pytest.param(lambda: torch.tensor(IDS, dtype=torch.int16), id="int16"),
    pytest.param(lambda: torch.tensor(IDS, dtype=torch.int32), id="int32"),
    pytest.param(lambda: torch.tensor([i + 2 for i in IDS], dtype=torch.uint8), id="uint8"),
    pytest.param(lambda: torch.tensor([[i, 99] for i in IDS]).t()[0], id="int64-non_contiguous"),
    pytest.param(lambda: torch.tensor(IDS) * 10**12, id="int64-huge"),
]


@pytest.mark.parametrize("make_ids", ID_TENSORS)
def test_groups_any_integer_dtype_and_layout(make_ids):
    ids = make_ids()
    x = make_input((7, C, 2))
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y = flexbn.batch_norm(x, rm, rv, None, None, True, 0.5, groups=ids)
    segs = bags(ids.tolist())
    assert len(segs) == 3
    assert_close(y, torch_loop(segs, x))
    want_m, want_v = keras_running(x, segs, torch.zeros(C), torch.ones(C), 0.5)
    assert_close(rm, want_m)
    assert_close(rv, want_v)


def test_groups_one_bag_is_plain_batch_norm():
    """All samples in one bag: torch's batch norm, running buffers included."""
    x = make_input((6, C, 4))
    w, b = make_affine(True)
    gy = torch.randn(x.shape, dtype=torch.float64)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.2, groups=torch.full((6,), -5))
    yt = F.batch_norm(x, rm_t, rv_t, w, b, True, 0.2)
    assert_close(y, yt)
    for g, r in zip(grads(y, (x, w, b), gy), grads(yt, (x, w, b), gy), strict=True):
        assert_close(g, r)
    assert_close(rm, rm_t)
    assert_close(rv, rv_t)


@pytest.mark.parametrize("affine", AFFINE)
def test_groups_one_bag_per_sample_is_instance_norm(affine):
    """Every sample its own bag: ``torch.nn.functional.instance_norm`` -- outputs, gradients, and its
    running-buffer update (the mean over instances of the instance means and unbiased variances)."""
    x = make_input((5, C, 6))
    w, b = make_affine(affine)
    gy = torch.randn(x.shape, dtype=torch.float64)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    groups = torch.tensor([4, 0, 3, 1, 2])
    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.4, groups=groups)
    yt = F.instance_norm(x, rm_t, rv_t, w, b, True, 0.4)
    assert_close(y, yt)
    for g, r in zip(grads(y, leaves(x, w, b), gy), grads(yt, leaves(x, w, b), gy), strict=True):
        assert_close(g, r)
    assert_close(rm, rm_t, msg="running_mean")
    assert_close(rv, rv_t, msg="running_var")


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")],
)
def test_groups_reduced_precision_input_with_float32_parameters(dtype):
    x = make_input((8, C, 2, 3), CL, dtype)
    w, b = make_affine(True, torch.float32)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    want_m, want_v = keras_running(x, bags(IDS_LONE), rm, rv, 0.1)
    y = flexbn.batch_norm(x, rm, rv, w, b, True, groups=torch.tensor(IDS_LONE))
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=CL)
    assert_close(y, torch_loop(bags(IDS_LONE), *as_reference(x, w, b)), dtype=dtype)
    assert_close(rm, want_m, dtype=torch.float32)
    assert_close(rv, want_v, dtype=torch.float32)


LONE_VALUE = [
    pytest.param((8, C), id="NC"),
    pytest.param((8, C, 1), id="NCL-L1"),
    pytest.param((8, C, 1, 1), id="NCHW-1x1"),
]


@pytest.mark.parametrize("api", ["functional", "module", "module-no_running_stats-eval"])
@pytest.mark.parametrize("shape", LONE_VALUE)
def test_groups_bag_with_one_value_per_channel_raises(shape, api):
    """A bag of one sample without spatial extent has one value per channel: no batch statistics."""
    x = torch.randn(shape)
    groups = torch.tensor(IDS_LONE)
    if api == "functional":

        def call() -> Tensor:
            return flexbn.batch_norm(x, None, None, None, None, True, groups=groups)
    else:
        bn = MODULES[x.dim()](C, track_running_stats=api == "module")
        if api != "module":
            bn.eval()  # no running statistics: batch statistics in eval too

        def call() -> Tensor:
            return bn(x, groups=groups)

    with pytest.raises(ValueError, match=r"groups.*has 1"):
        call()


# ---------------------------------------------------------------------------------- ghost batches

# (N, virtual_batch_size, expected chunk sizes)
GHOST_CASES = [
    pytest.param(8, 4, [4, 4], id="N8-vbs4-divisible"),
    pytest.param(6, 2, [2, 2, 2], id="N6-vbs2-divisible"),
    pytest.param(10, 4, [5, 5], id="N10-vbs4"),
    pytest.param(7, 2, [3, 2, 2], id="N7-vbs2"),
    pytest.param(9, 2, [3, 2, 2, 2], id="N9-vbs2"),
    pytest.param(11, 3, [4, 4, 3], id="N11-vbs3"),
    pytest.param(13, 4, [5, 4, 4], id="N13-vbs4"),
    pytest.param(7, 4, [7], id="N7-vbs4-one_chunk"),
    pytest.param(4, 4, [4], id="N4-vbs4-one_chunk"),
    pytest.param(3, 8, [3], id="N3-vbs8-one_chunk"),
]


@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
@pytest.mark.parametrize(("n", "vbs", "sizes"), GHOST_CASES)
def test_ghost_matches_per_chunk_torch_loop(n, vbs, sizes, shape, memory_format):
    """Output, gradients and running buffers equal torch's batch norm over each chunk (Keras' update)."""
    assert chunks(n, vbs) == from_sizes(sizes)  # the rule, pinned by explicit sizes
    assert len(sizes) == 1 or (min(sizes) >= vbs and max(sizes) - min(sizes) <= 1)
    shape = (n, *shape[1:])
    x = make_input(shape, memory_format)
    w, b = make_affine(True)
    gy = torch.randn(shape, dtype=torch.float64)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    want_m, want_v = keras_running(x, from_sizes(sizes), rm, rv, 0.3)

    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.3, virtual_batch_size=vbs)
    yr = torch_loop(from_sizes(sizes), x, w, b)
    assert y.is_contiguous(memory_format=memory_format)
    assert_close(y, yr, msg="output")
    for name, g, r in zip(
        ("input", "weight", "bias"), grads(y, (x, w, b), gy), grads(yr, (x, w, b), gy), strict=True
    ):
        assert_close(g, r, msg=f"grad {name}")
    assert_close(rm, want_m, msg="running_mean")
    assert_close(rv, want_v, msg="running_var")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "vbs"), [(2, 2), (5, 3), (7, 4), (3, 100)], ids=str)
def test_ghost_batch_smaller_than_two_chunks_is_plain_batch_norm(n, vbs, dtype):
    """``N < 2 * virtual_batch_size``: one chunk -- torch's batch norm, running buffers included."""
    x = make_input((n, C, 2, 2), CL, dtype)
    w, b = make_affine(True, dtype)
    gy = torch.randn(x.shape, dtype=dtype)
    rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.3, virtual_batch_size=vbs)
    yt = F.batch_norm(x, rm_t, rv_t, w, b, True, 0.3)
    assert_close(y, yt)
    for g, r in zip(grads(y, (x, w, b), gy), grads(yt, (x, w, b), gy), strict=True):
        assert_close(g, r)
    assert_close(rm, rm_t)
    assert_close(rv, rv_t)


@pytest.mark.parametrize("momentum", [0.2, None], ids=["momentum0.2", "cumulative"])
@pytest.mark.parametrize("dim", [3, 4], ids=["BatchNorm1d", "BatchNorm2d"])
def test_ghost_module_over_several_steps_then_eval(dim, momentum):
    """Training steps of different batch sizes (chunked, and one chunk for the last), then eval with the
    running statistics for every sample (no chunks)."""
    spatial = (2,) * (dim - 2)
    w, b = make_affine(True)
    bn = module_with(dim, w, b, momentum=momentum, virtual_batch_size=4)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step, n in enumerate([10, 8, 13, 5], start=1):
        x = make_input((n, C, *spatial))
        y = bn(x)
        assert_close(y, torch_loop(chunks(n, 4), x, w, b), msg=f"step {step}")
        rm, rv = keras_running(x, chunks(n, 4), rm, rv, 0.2 if momentum else 1 / step)
        assert_close(bn.running_mean, rm, msg=f"running_mean after step {step}")
        assert_close(bn.running_var, rv, msg=f"running_var after step {step}")
        assert int(bn.num_batches_tracked) == step

    bn.eval()
    x = make_input((12, C, *spatial))
    gy = torch.randn(x.shape, dtype=torch.float64)
    y = bn(x)
    yt = F.batch_norm(x, rm, rv, w, b, False)
    assert_close(y, yt)
    assert_close(grads(y, (x,), gy)[0], grads(yt, (x,), gy)[0])
    assert_close(bn.running_mean, rm)
    assert int(bn.num_batches_tracked) == 4


@pytest.mark.parametrize("momentum", [0.2, None], ids=["momentum0.2", "cumulative"])
def test_groups_module_over_several_steps_then_eval(momentum):
    """``bn(x, groups=ids)`` over steps with different bags: one Keras update and one count per call."""
    w, b = make_affine(True)
    bn = module_with(4, w, b, momentum=momentum, detach_var=True)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    steps = [IDS, IDS_LONE, [0, 0, 1, 1, 1, 2, 2, 2, 2], [5] * 4]
    for step, ids in enumerate(steps, start=1):
        x = make_input((len(ids), C, 2, 2), CL)
        y = bn(x, groups=torch.tensor(ids))
        assert_close(y, torch_loop(bags(ids), x, w, b), msg=f"step {step}")
        rm, rv = keras_running(x, bags(ids), rm, rv, 0.2 if momentum else 1 / step)
        assert_close(bn.running_mean, rm, msg=f"running_mean after step {step}")
        assert_close(bn.running_var, rv, msg=f"running_var after step {step}")
        assert int(bn.num_batches_tracked) == step

    bn.eval()
    x = make_input((8, C, 2, 2), CL)
    assert_close(bn(x, groups=torch.tensor(IDS_LONE)), F.batch_norm(x, rm, rv, w, b, False))
    assert int(bn.num_batches_tracked) == len(steps)


# ------------------------------------------------------------------------------------------- eval mode


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("api", ["functional", "module"])
def test_eval_with_running_stats_ignores_segments(kind, api):
    """Eval with running statistics: every sample is normalized with them (output and gradients as
    torch's eval), even where a segment would have one value per channel; the buffers stay as they are."""
    x = make_input((8, C))
    w, b = make_affine(True)
    gy = torch.randn(x.shape, dtype=torch.float64)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    kw = {"groups": torch.tensor(IDS_LONE)} if kind == "groups" else {"virtual_batch_size": 2}
    if api == "functional":
        y = flexbn.batch_norm(x, rm, rv, w, b, False, 0.1, detach_mean=True, **kw)
        params = (w, b)
    else:
        vbs = kw.pop("virtual_batch_size", None)
        bn = module_with(2, w, b, detach_mean=True, virtual_batch_size=vbs).eval()
        with torch.no_grad():
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
        rm, rv = bn.running_mean, bn.running_var
        y = bn(x, **kw)
        params = (bn.weight, bn.bias)
    yt = F.batch_norm(x, rm0, rv0, w, b, False)
    assert_close(y, yt)
    for g, r in zip(grads(y, (x, *params), gy), grads(yt, (x, w, b), gy), strict=True):
        assert_close(g, r)
    assert torch.equal(rm, rm0)
    assert torch.equal(rv, rv0)


@pytest.mark.parametrize(MODE_ARGS, MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_eval_without_running_stats_uses_segment_statistics(kind, detach_mean, detach_var):
    """``track_running_stats=False``: eval uses batch statistics, per bag / chunk as in training."""
    x = make_input((7, C, 3))
    w, b = make_affine(True)
    gy = torch.randn(x.shape, dtype=torch.float64)
    kw, segs = segmentation(kind, 7)
    vbs = kw.pop("virtual_batch_size", None)
    bn = module_with(
        3,
        w,
        b,
        track_running_stats=False,
        virtual_batch_size=vbs,
        detach_mean=detach_mean,
        detach_var=detach_var,
    ).eval()
    y = bn(x, **kw)
    yr = composition(segs, detach_mean, detach_var)(x, w, b)
    assert_close(y, yr)
    params = (bn.weight, bn.bias)
    for g, r in zip(grads(y, (x, *params), gy), grads(yr, (x, w, b), gy), strict=True):
        assert_close(g, r)


# --------------------------------------------------------------------------------- gradient modes


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS[:3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_detach_flags_match_per_segment_composition(
    detach_mean, detach_var, kind, shape, memory_format, affine, api
):
    """Each mode with segments equals the per-segment ``.detach()`` composition: output and gradients."""
    x = make_input(shape, memory_format)
    w, b = make_affine(affine)
    gy = torch.randn(shape, dtype=torch.float64)
    kw, segs = segmentation(kind, shape[0])
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}
    if api == "functional":
        y = flexbn.batch_norm(x, None, None, w, b, True, **flags, **kw)
        params = leaves(w, b)
    else:
        vbs = kw.pop("virtual_batch_size", None)
        bn = module_with(x.dim(), w, b, virtual_batch_size=vbs, **flags)
        y = bn(x, **kw)
        params = leaves(bn.weight, bn.bias) if affine else ()
    yr = composition(segs, detach_mean, detach_var)(x, w, b)
    assert y.is_contiguous(memory_format=memory_format)
    assert_close(y, yr, msg="output")
    got, want = grads(y, (x, *params), gy), grads(yr, leaves(x, w, b), gy)
    names = ["input", *(["weight", "bias"] if affine else [])]
    for name, g, r in zip(names, got, want, strict=True):
        assert_close(g, r, msg=f"grad {name}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(MODE_ARGS, MODES[1:])
def test_detached_segment_gradients_differ_from_full(kind, detach_mean, detach_var):
    """Negative check: with segments, each detached mode's input gradient is far from the full mode's."""
    x = make_input((7, C, 3))
    gy = torch.randn(x.shape, dtype=torch.float64)
    kw, _ = segmentation(kind, 7)
    (full,) = grads(flexbn.batch_norm(x, None, None, training=True, **kw), (x,), gy)
    y = flexbn.batch_norm(
        x, None, None, training=True, detach_mean=detach_mean, detach_var=detach_var, **kw
    )
    (det,) = grads(y, (x,), gy)
    assert (full - det).abs().max() > 0.05


@pytest.mark.parametrize(LAYOUT_ARGS, [LAYOUTS[1], LAYOUTS[2]])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_double_backward_matches_per_segment_composition(
    detach_mean, detach_var, kind, shape, memory_format
):
    """Second derivatives of ``<grad_input, v> + <grad_weight, vw> + <grad_bias, vb>`` wrt input, weight,
    bias and the upstream gradient equal the per-segment composition's."""
    x = make_input(shape, memory_format)
    w, b = make_affine(True)
    gy = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn(shape, dtype=torch.float64)
    vw, vb = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    kw, segs = segmentation(kind, shape[0])

    def second(f, x, w, b):
        first = derivative(f(x, w, b), (x, w, b), gy)
        s = (first[0] * v).sum() + (first[1] * vw).sum() + (first[2] * vb).sum()
        return derivative(s, (x, w, b, gy))

    def fb(x, w, b):
        return flexbn.batch_norm(
            x, None, None, w, b, True, detach_mean=detach_mean, detach_var=detach_var, **kw
        )

    got = second(fb, x, w, b)
    want = second(composition(segs, detach_mean, detach_var), *as_reference(x, w, b))
    for name, g, r in zip(("input", "weight", "bias", "grad_out"), got, want, strict=True):
        assert_close(g, r, msg=f"second derivative wrt {name}")


# torch loads its forward-AD decompositions with torch.jit.script on first use, which warns in torch 2.13
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_forward_mode_ad_matches_per_segment_composition(detach_mean, detach_var, kind):
    x = make_input((7, C, 3))
    w, b = make_affine(True)
    primals = (x.detach(), w.detach(), b.detach())
    tangents = tuple(torch.randn_like(t) for t in primals)
    kw, segs = segmentation(kind, 7)

    def jvp(f):
        with fwAD.dual_level():
            out = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
            return fwAD.unpack_dual(out)

    def fb(x, w, b):
        return flexbn.batch_norm(
            x, None, None, w, b, True, detach_mean=detach_mean, detach_var=detach_var, **kw
        )

    y, ty = jvp(fb)
    yr, tyr = jvp(composition(segs, detach_mean, detach_var))
    assert_close(y, yr)
    assert tyr is not None
    assert_close(ty, tyr)


GRADCHECK_CASES = [
    pytest.param((6, 2), {"groups": torch.tensor([4, -1, 4, 0, -1, 0])}, id="NC-groups"),
    pytest.param((4, 2, 3), {"groups": torch.tensor([2, 1, 2, 9])}, id="NCL-groups-lone_bag"),
    pytest.param((5, 2), {"virtual_batch_size": 2}, id="NC-ghost"),
    pytest.param((2, 2, 2, 3), {"groups": torch.tensor([1, 0])}, id="NCHW-groups"),
]


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(("shape", "kw"), GRADCHECK_CASES)
def test_gradcheck_and_gradgradcheck_full_mode(shape, kw, affine):
    """Full mode with segments is a smooth function of (input, weight, bias) with exact derivatives."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    inputs = (x, *leaves(*make_affine(affine, c=shape[1])))

    def f(x, w=None, b=None):
        return flexbn.batch_norm(x, None, None, w, b, True, 0.1, 1e-3, **kw)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# ------------------------------------------------------------------------------------------------ errors

N_ERR = 7
BAD = [
    # (training, functional kwargs, exception, patterns the message must match)
    pytest.param({"groups": torch.zeros(N_ERR, 1, dtype=torch.long)}, ValueError,
                 ["groups", re.escape("(7, 1)")], id="groups-shape_N1"),
    pytest.param({"groups": torch.zeros(N_ERR + 1, dtype=torch.long)}, ValueError,
                 ["groups", re.escape("(8,)")], id="groups-shape_too_long"),
    pytest.param({"groups": torch.tensor(3)}, ValueError, ["groups", re.escape("()")],
                 id="groups-0d"),
    pytest.param({"groups": torch.zeros(N_ERR)}, ValueError, ["groups", "float32"],
                 id="groups-float"),
    pytest.param({"groups": torch.zeros(N_ERR, dtype=torch.bool)}, ValueError,
                 ["groups", "bool"], id="groups-bool"),
    pytest.param({"groups": torch.zeros(N_ERR, dtype=torch.complex64)}, ValueError,
                 ["groups", "complex64"], id="groups-complex"),
    pytest.param({"groups": [0] * N_ERR}, TypeError, ["groups", "list"], id="groups-list"),
    pytest.param({"virtual_batch_size": 1}, ValueError, ["virtual_batch_size", "1"], id="vbs-1"),
    pytest.param({"virtual_batch_size": 0}, ValueError, ["virtual_batch_size", "0"], id="vbs-0"),
    pytest.param({"virtual_batch_size": -3}, ValueError, ["virtual_batch_size", "-3"],
                 id="vbs-negative"),
    pytest.param({"virtual_batch_size": 2.5}, ValueError, ["virtual_batch_size", r"2\.5"],
                 id="vbs-float"),
    pytest.param({"virtual_batch_size": 4.0}, ValueError, ["virtual_batch_size", r"4\.0"],
                 id="vbs-integral_float"),
    pytest.param({"virtual_batch_size": True}, ValueError, ["virtual_batch_size", "True"],
                 id="vbs-bool"),
    pytest.param({"virtual_batch_size": "4"}, ValueError, ["virtual_batch_size", "'4'"],
                 id="vbs-str"),
    pytest.param({"virtual_batch_size": torch.tensor(4)}, ValueError, ["virtual_batch_size"],
                 id="vbs-tensor"),
    pytest.param({"groups": torch.zeros(N_ERR, dtype=torch.long), "virtual_batch_size": 2},
                 ValueError, ["groups", "virtual_batch_size"], id="groups_and_vbs"),
]  # fmt: skip


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("kw", "exc", "patterns"), BAD)
def test_bad_segment_arguments_raise(kw, exc, patterns, training):
    """A ``ValueError`` (``TypeError`` for a non-tensor) naming the argument and what was received, in
    training and in eval (with running statistics) alike."""
    x = torch.randn(N_ERR, C, 2)
    with pytest.raises(exc) as info:
        flexbn.batch_norm(x, torch.zeros(C), torch.ones(C), None, None, training, **kw)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


@pytest.mark.parametrize(("kw", "exc", "patterns"), [p for p in BAD if "vbs" not in p.id])
def test_bad_groups_raise_in_module_forward(kw, exc, patterns):
    bn = flexbn.BatchNorm1d(C)
    with pytest.raises(exc) as info:
        bn(torch.randn(N_ERR, C, 2), **kw)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


@pytest.mark.parametrize(
    "vbs", [1, 0, -3, 2.5, True, "8"], ids=["1", "0", "negative", "float", "bool", "str"]
)
@pytest.mark.parametrize("cls", [flexbn.BatchNorm1d, flexbn.BatchNorm2d, flexbn.BatchNorm3d])
def test_module_constructor_rejects_bad_virtual_batch_size(cls, vbs):
    with pytest.raises(ValueError, match=r"virtual_batch_size.*" + re.escape(repr(vbs))):
        cls(C, virtual_batch_size=vbs)


def test_module_with_ghost_batches_rejects_groups():
    bn = flexbn.BatchNorm1d(C, virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"groups.*virtual_batch_size|virtual_batch_size.*groups"):
        bn(torch.randn(8, C), groups=torch.tensor([0, 1] * 4))


EMPTY = [
    pytest.param((0, C, 4), id="N0"),
    pytest.param((4, C, 0), id="L0"),
    pytest.param((4, 0, 3), id="C0"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", EMPTY)
def test_empty_input_with_segments_is_empty_as_torch(shape, kind):
    """An input with no element (no sample, no spatial extent or no channel): torch's batch norm returns an
    empty output without error; with segments too, and the running buffers are left as they are."""
    n, c = shape[:2]
    x = torch.randn(shape, requires_grad=True)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    kw = {"groups": torch.arange(n) % 2} if kind == "groups" else {"virtual_batch_size": 2}
    assert F.batch_norm(x, rm.clone(), rv.clone(), None, None, True).shape == shape
    y = flexbn.batch_norm(x, rm, rv, None, None, True, **kw)
    assert y.shape == shape
    assert torch.equal(rm, rm0)
    assert torch.equal(rv, rv0)


# ----------------------------------------------------------------------------- repr, state, pickling


@pytest.mark.parametrize(
    ("flags", "suffix"),
    [
        ({"virtual_batch_size": 8}, ", virtual_batch_size=8"),
        ({"virtual_batch_size": 2, "detach_var": True}, ", detach_var=True, virtual_batch_size=2"),
        ({}, ""),
    ],
    ids=["vbs", "vbs-detach_var", "none"],
)
@pytest.mark.parametrize("dim", [2, 4, 5], ids=["1d", "2d", "3d"])
def test_repr_shows_virtual_batch_size(dim, flags, suffix):
    rep = repr(MODULES[dim](4, momentum=None, **flags))
    torch_rep = repr(TORCH_MODULES[dim](4, momentum=None))
    assert rep == torch_rep[:-1] + suffix + ")"


@pytest.mark.parametrize("dim", [2, 4, 5], ids=["1d", "2d", "3d"])
def test_state_dict_unchanged_by_virtual_batch_size(dim):
    bn = MODULES[dim](4, virtual_batch_size=3)
    bn(torch.randn(7, 4, *(2,) * (dim - 2)))
    ref = TORCH_MODULES[dim](4)
    assert list(bn.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(bn.state_dict())  # strict, both ways
    bn.load_state_dict(ref.state_dict())
    assert bn.virtual_batch_size == 3


ROUND_TRIPS = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": lambda m: _torch_round_trip(m),
    "deepcopy": copy.deepcopy,
}


def _torch_round_trip(m: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("round_trip", list(ROUND_TRIPS))
def test_round_trip_keeps_virtual_batch_size(round_trip):
    """The copy keeps the option and still computes per-chunk statistics (against the torch loop)."""
    w, b = make_affine(True)
    bn = ROUND_TRIPS[round_trip](module_with(3, w, b, virtual_batch_size=3))
    assert bn.virtual_batch_size == 3
    x = make_input((7, C, 2))
    assert_close(bn(x), torch_loop(from_sizes([4, 3]), x, w, b))


# ------------------------------------------------------------------------------- vectorization


def _ops(f: Callable[[], None]) -> list[str]:
    """The aten operators ``f`` dispatches (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as rec:
        f()
    return rec.ops


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(MODE_ARGS, [MODES[0], MODES[3]])
def test_no_python_loop_over_segments(kind, detach_mean, detach_var):
    """500 bags of 2 samples (or 500 ghost batches) match the per-segment loop, and forward plus backward
    dispatch exactly the same operators as for 3 segments: nothing is repeated per segment."""
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}

    def case(segments: int):
        n = 2 * segments
        x = make_input((n, C))
        if kind == "groups":
            ids = torch.randperm(n) % segments * 3 - 7
            kw, segs = {"groups": ids}, bags(ids.tolist())
        else:
            kw, segs = {"virtual_batch_size": 2}, chunks(n, 2)
        return x, kw, segs

    x, kw, segs = case(500)
    w, b = make_affine(True)
    gy = torch.randn(x.shape, dtype=torch.float64)
    y = flexbn.batch_norm(x, None, None, w, b, True, **flags, **kw)
    yr = composition(segs, **flags)(x, w, b)
    assert_close(y, yr)
    for g, r in zip(grads(y, (x, w, b), gy), grads(yr, (x, w, b), gy), strict=True):
        assert_close(g, r)

    def run(segments: int) -> list[str]:
        x, kw, _ = case(segments)

        def f() -> None:
            y = flexbn.batch_norm(x, None, None, w, b, True, **flags, **kw)
            torch.autograd.grad(y, (x, w, b), torch.ones_like(y))

        return _ops(f)

    few, many = run(3), run(500)
    assert len(few) >= 8  # not vacuous: the unique, allocations and gradient ops are recorded
    assert few == many


# --------------------------------------------------------------------------------------- properties


@st.composite
def segment_cases(draw: st.DrawFn) -> dict:
    n = draw(st.integers(2, 12))
    c = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
    kind = draw(st.sampled_from(["groups", "ghost"]))
    case = {
        "shape": (n, c, *spatial),
        "channels_last": len(spatial) in (2, 3) and draw(st.booleans()),
        "detach_mean": draw(st.booleans()),
        "detach_var": draw(st.booleans()),
        "affine": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5])),
        "momentum": draw(st.sampled_from([0.0, 0.1, 1.0])),
        "seed": draw(st.integers(0, 2**16)),
    }
    if kind == "ghost":
        case["kw"] = {"virtual_batch_size": draw(st.integers(2, n + 1))}
        case["segs"] = chunks(n, case["kw"]["virtual_batch_size"])
        return case
    k = draw(st.integers(1, n))
    names = draw(st.lists(st.integers(-50, 50), min_size=k, max_size=k, unique=True))
    labels = [names[a] for a in draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))]
    if math.prod(spatial) == 1:  # every bag needs more than one value per channel
        lonely = [s[0] for s in bags(labels) if len(s) == 1]
        if len(lonely) == 1:
            labels[lonely[0]] = labels[1 if lonely[0] == 0 else 0]
        for i in lonely[1:]:
            labels[i] = labels[lonely[0]]
    case["kw"] = {"groups": torch.tensor(labels)}
    case["segs"] = bags(labels)
    assert all(len(s) * math.prod(spatial) > 1 for s in case["segs"])
    return case


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=segment_cases())
def test_property_matches_per_segment_composition(case):
    """Random shapes, bag layouts / ghost sizes, modes and options: output, gradients and running buffers
    equal the per-segment float64 composition and the Keras update."""
    torch.manual_seed(case["seed"])
    shape = case["shape"]
    fmt = {4: CL, 5: CL3D}[len(shape)] if case["channels_last"] else CONTIG
    x = (torch.randn(shape, dtype=torch.float64) * 3 - 1).contiguous(memory_format=fmt)
    x.requires_grad_()
    w, b = make_affine(case["affine"], c=shape[1])
    gy = torch.randn(shape, dtype=torch.float64)
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64)
    want_m, want_v = keras_running(x, case["segs"], rm, rv, case["momentum"])
    flags = {"detach_mean": case["detach_mean"], "detach_var": case["detach_var"]}
    y = flexbn.batch_norm(
        x, rm, rv, w, b, True, case["momentum"], case["eps"], **flags, **case["kw"]
    )
    yr = composition(case["segs"], eps=case["eps"], **flags)(x, w, b)
    assert y.is_contiguous(memory_format=fmt)
    assert_close(y, yr)
    for g, r in zip(grads(y, leaves(x, w, b), gy), grads(yr, leaves(x, w, b), gy), strict=True):
        assert_close(g, r)
    assert_close(rm, want_m)
    assert_close(rv, want_v)
