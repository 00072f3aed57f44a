"""Parity with torch: ``flexbn.BatchNorm1d/2d/3d`` and ``flexbn.batch_norm`` against torch's own.

Every test feeds the same input (random weight, bias and running statistics, never ones/zeros) to torch and
to flexbn and compares everything observable: output (values, dtype, memory format), the gradients of input,
weight and bias, and the running buffers after each step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flexbn
from conftest import TOL, assert_close

CL, CL3D, CONTIG = torch.channels_last, torch.channels_last_3d, torch.contiguous_format

# The memory formats ``is_contiguous`` can be asked about, per input dimensionality.
MEMORY_FORMATS = {2: [CONTIG], 3: [CONTIG], 4: [CONTIG, CL], 5: [CONTIG, CL3D]}

# (module class name, input shape, memory format). C = 3 everywhere.
LAYOUTS = [
    pytest.param("BatchNorm1d", (6, 3), CONTIG, id="1d-NC"),
    pytest.param("BatchNorm1d", (4, 3, 5), CONTIG, id="1d-NCL"),
    pytest.param("BatchNorm2d", (2, 3, 4, 5), CONTIG, id="2d"),
    pytest.param("BatchNorm2d", (2, 3, 4, 5), CL, id="2d-channels_last"),
    pytest.param("BatchNorm3d", (2, 3, 2, 3, 4), CONTIG, id="3d"),
    pytest.param("BatchNorm3d", (2, 3, 2, 3, 4), CL3D, id="3d-channels_last_3d"),
]
LAYOUT_ARGS = ("name", "shape", "memory_format")

# Constructor options (the rest at torch's defaults).
CONFIGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"affine": False}, id="affine=False"),
    pytest.param({"bias": False}, id="bias=False"),
    pytest.param({"track_running_stats": False}, id="track_running_stats=False"),
    pytest.param({"momentum": 0.5, "eps": 1e-3}, id="momentum=0.5-eps=1e-3"),
    pytest.param({"momentum": None}, id="momentum=None"),
    pytest.param({"momentum": None, "affine": False}, id="momentum=None-affine=False"),
]

TRAIN_STEPS = 3


# ----------------------------------------------------------------------------------------------- helpers


@dataclass
class Step:
    """What one forward + backward leaves behind."""

    out: Tensor
    grad_input: Tensor
    grad_weight: Tensor | None
    grad_bias: Tensor | None


def randomize_(module: nn.Module) -> nn.Module:
    """Random weight, bias and running statistics: ones and zeros would hide affine and blending bugs."""
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.randn_like(module.weight) + 1)
        if module.bias is not None:
            module.bias.copy_(torch.randn_like(module.bias))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn_like(module.running_mean))
            module.running_var.copy_(torch.rand_like(module.running_var) + 0.5)
    return module


def make_pair(name: str, num_features: int = 3, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """torch's module and flexbn's, with the same random state (``kwargs`` go to both constructors)."""
    ref = randomize_(getattr(nn, name)(num_features, **kwargs))
    mod = getattr(flexbn, name)(num_features, **kwargs)
    with torch.no_grad():
        for (_, a), (_, b) in zip(mod.state_dict().items(), ref.state_dict().items(), strict=True):
            a.copy_(b)
    return ref, mod


def make_input(
    shape: tuple[int, ...], memory_format=CONTIG, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A random input (mean 0.5, std 2, so centring and scaling both matter) in ``memory_format``."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    return x.to(dtype).contiguous(memory_format=memory_format)


def forward_backward(module: nn.Module, x: Tensor, grad_out: Tensor) -> Step:
    """``module(x)`` and its backward for ``grad_out``, on a fresh leaf sharing ``x``'s memory and strides."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    grad = lambda p: None if p is None else p.grad  # noqa: E731
    return Step(out.detach(), x.grad, grad(module.weight), grad(module.bias))


def assert_same_layout(actual: Tensor, expected: Tensor) -> None:
    for fmt in MEMORY_FORMATS.get(actual.dim(), [CONTIG]):
        assert actual.is_contiguous(memory_format=fmt) == expected.is_contiguous(
            memory_format=fmt
        ), f"{fmt}: flexbn strides {actual.stride()}, torch strides {expected.stride()}"


def assert_same_tensor(actual: Tensor | None, expected: Tensor | None, tol_dtype=None) -> None:
    """Same value (within ``TOL``), dtype, shape and memory format."""
    assert_close(actual, expected, dtype=tol_dtype)
    if actual is not None:
        assert actual.dtype == expected.dtype
        assert actual.shape == expected.shape
        assert_same_layout(actual, expected)


def assert_same_step(got: Step, want: Step, tol_dtype=None) -> None:
    assert_same_tensor(got.out, want.out, tol_dtype)
    assert_same_tensor(got.grad_input, want.grad_input, tol_dtype)
    assert_same_tensor(got.grad_weight, want.grad_weight, tol_dtype)
    assert_same_tensor(got.grad_bias, want.grad_bias, tol_dtype)


def assert_same_buffers(mod: nn.Module, ref: nn.Module, tol_dtype=None) -> None:
    assert_same_tensor(mod.running_mean, ref.running_mean, tol_dtype)
    assert_same_tensor(mod.running_var, ref.running_var, tol_dtype)
    if ref.num_batches_tracked is None:
        assert mod.num_batches_tracked is None
    else:
        assert mod.num_batches_tracked.dtype == torch.long
        assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item()


def step_both(ref: nn.Module, mod: nn.Module, x: Tensor, grad_out: Tensor) -> tuple[Step, Step]:
    return forward_backward(mod, x, grad_out), forward_backward(ref, x, grad_out)


# ---------------------------------------------------------------------------------- module parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS)
def test_module_matches_torch_through_training_then_eval(name, shape, memory_format, config, dtype):
    ref, mod = make_pair(name, dtype=dtype, **config)
    for _ in range(TRAIN_STEPS):
        x, g = make_input(shape, memory_format, dtype), make_input(shape, memory_format, dtype)
        assert_same_step(*step_both(ref, mod, x, g))
        assert_same_buffers(mod, ref)
    ref.eval()
    mod.eval()
    x, g = make_input(shape, memory_format, dtype), make_input(shape, memory_format, dtype)
    assert_same_step(*step_both(ref, mod, x, g))
    assert_same_buffers(mod, ref)


def test_module_parity_is_not_vacuous():
    """The comparison above notices a wrong bias, a wrong running update and a wrong memory format."""
    ref, mod = make_pair("BatchNorm2d")
    x = make_input((2, 3, 4, 5), CL)
    got, want = step_both(ref, mod, x, make_input((2, 3, 4, 5), CL))
    with pytest.raises(AssertionError):
        assert_same_step(replace(got, out=got.out + 1e-3), want)
    with pytest.raises(AssertionError):
        assert_same_tensor(got.out.contiguous(), want.out)
    with torch.no_grad():
        mod.running_var.mul_(1 + 1e-4)
    with pytest.raises(AssertionError):
        assert_same_buffers(mod, ref)


# (module, input, grad_output) in layouts other than one memory format for both, non-dense strides included.
OTHER_LAYOUTS = [
    pytest.param(
        "BatchNorm2d",
        lambda: make_input((2, 3, 4, 5), CL),
        lambda: make_input((2, 3, 4, 5)),
        id="2d-x-channels_last-grad-contiguous",
    ),
    pytest.param(
        "BatchNorm2d",
        lambda: make_input((2, 3, 4, 5)),
        lambda: make_input((2, 3, 4, 5), CL),
        id="2d-x-contiguous-grad-channels_last",
    ),
    pytest.param(
        "BatchNorm2d",
        lambda: make_input((2, 3, 4, 10))[..., ::2],
        lambda: make_input((2, 3, 4, 5)),
        id="2d-x-sliced",
    ),
    pytest.param(
        "BatchNorm2d",
        lambda: make_input((4, 3, 1, 1), CL),
        lambda: make_input((4, 3, 1, 1)),
        id="2d-HW=1-channels_last",
    ),
    pytest.param(
        "BatchNorm2d",
        lambda: make_input((2, 4, 3, 5)).transpose(1, 2),
        lambda: make_input((2, 3, 4, 5)),
        id="2d-x-permuted",
    ),
    pytest.param(
        "BatchNorm1d",
        lambda: make_input((3, 6)).t(),
        lambda: make_input((6, 3)),
        id="1d-NC-transposed",
    ),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "make_x", "make_g"), OTHER_LAYOUTS)
def test_output_and_grad_layout_match_torch_for_other_strides(name, make_x, make_g, training):
    ref, mod = make_pair(name)
    ref.train(training)
    mod.train(training)
    x, g = make_x(), make_g()
    got, want = forward_backward(mod, x, g), forward_backward(ref, x, g)
    assert_same_step(got, want)
    assert_same_buffers(mod, ref)


GRAD_MODES = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "autocast-cpu-bfloat16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", GRAD_MODES.values(), ids=GRAD_MODES.keys())
def test_grad_and_autocast_modes_match_torch(mode, training):
    ref, mod = make_pair("BatchNorm2d")
    ref.train(training)
    mod.train(training)
    x = make_input((2, 3, 4, 5), CL).requires_grad_()
    with mode():
        got, want = mod(x), ref(x)
    assert_same_tensor(got, want)
    assert got.requires_grad == want.requires_grad
    assert got.is_inference() == want.is_inference()
    assert_same_buffers(mod, ref)


# ------------------------------------------------------------- eval with batch statistics; detach flags


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(LAYOUT_ARGS, LAYOUTS[:3])
def test_buffers_set_to_none_by_hand_match_torch(name, shape, memory_format, training):
    """With both running buffers removed by hand, eval uses batch statistics (torch's rule)."""
    ref, mod = make_pair(name)
    for m in (ref, mod):
        m.running_mean = m.running_var = None
        m.train(training)
    for _ in range(2):
        x, g = make_input(shape, memory_format), make_input(shape, memory_format)
        assert_same_step(*step_both(ref, mod, x, g))
        assert_same_buffers(mod, ref)  # num_batches_tracked still counts in training


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_num_batches_tracked_set_to_none_by_hand_matches_torch(momentum):
    """torch then uses factor 0.0 with momentum=None (the running statistics stay)."""
    ref, mod = make_pair("BatchNorm2d", momentum=momentum)
    ref.num_batches_tracked = mod.num_batches_tracked = None
    x, g = make_input((2, 3, 4, 5)), make_input((2, 3, 4, 5))
    assert_same_step(*step_both(ref, mod, x, g))
    assert_same_buffers(mod, ref)


DETACH_FLAGS = [
    pytest.param({"detach_mean": True}, id="detach_mean"),
    pytest.param({"detach_var": True}, id="detach_var"),
    pytest.param({"detach_mean": True, "detach_var": True}, id="detach_both"),
]


@pytest.mark.parametrize("flags", DETACH_FLAGS)
@pytest.mark.parametrize(LAYOUT_ARGS, [LAYOUTS[0], LAYOUTS[3]])
def test_detach_flags_change_neither_running_stats_nor_eval(name, shape, memory_format, flags):
    """Training outputs and running statistics are torch's; eval (constant statistics) is torch's in full."""
    ref, _ = make_pair(name)
    mod = getattr(flexbn, name)(3, **flags)
    mod.load_state_dict(ref.state_dict())
    for _ in range(TRAIN_STEPS):
        x, g = make_input(shape, memory_format), make_input(shape, memory_format)
        got, want = step_both(ref, mod, x, g)
        assert_same_tensor(got.out, want.out)
        assert_same_buffers(mod, ref)
    ref.eval()
    mod.eval()
    x, g = make_input(shape, memory_format), make_input(shape, memory_format)
    assert_same_step(*step_both(ref, mod, x, g))
    assert_same_buffers(mod, ref)


# ------------------------------------------------------------------------------------------ dtypes

REDUCED = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]
DTYPE_LAYOUTS = [LAYOUTS[0], LAYOUTS[2], LAYOUTS[3], LAYOUTS[5]]


def float64_reference(module: nn.Module, x: Tensor, grad_out: Tensor) -> Step:
    """torch's module run in float64 on the same (already rounded) input: the exact answer."""
    return forward_backward(copy.deepcopy(module).double(), x.double(), grad_out.double())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize(LAYOUT_ARGS, DTYPE_LAYOUTS)
def test_reduced_input_with_float32_module_matches_torch(
    name, shape, memory_format, dtype, training
):
    """Mixed precision: output and grad_input in the input's dtype; parameters, grads and stats float32."""
    ref, mod = make_pair(name)
    ref.train(training)
    mod.train(training)
    x, g = make_input(shape, memory_format, dtype), make_input(shape, memory_format, dtype)
    exact = float64_reference(ref, x, g)
    got, want = step_both(ref, mod, x, g)

    assert got.out.dtype == got.grad_input.dtype == want.out.dtype == dtype
    assert got.grad_weight.dtype == got.grad_bias.dtype == want.grad_weight.dtype == torch.float32
    assert_same_layout(got.out, want.out)
    assert_same_layout(got.grad_input, want.grad_input)
    # Rounded to the reduced dtype: both against the exact answer, with that dtype's tolerance.
    for result in (got, want):
        assert_close(result.out, exact.out, dtype=dtype)
        assert_close(result.grad_input, exact.grad_input, dtype=dtype)
    # Accumulated in float32 from the same reduced values: torch's, to float32 tolerance.
    assert_same_tensor(got.grad_weight, want.grad_weight)
    assert_same_tensor(got.grad_bias, want.grad_bias)
    assert_same_buffers(mod, ref)
    assert mod.running_mean.dtype == mod.running_var.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize(LAYOUT_ARGS, DTYPE_LAYOUTS)
def test_reduced_module_and_input_match_torch(name, shape, memory_format, dtype, training):
    """Pure float16/bfloat16 (torch supports it on CPU): everything in the reduced dtype."""
    ref, mod = make_pair(name, dtype=dtype)
    ref.train(training)
    mod.train(training)
    x, g = make_input(shape, memory_format, dtype), make_input(shape, memory_format, dtype)
    exact = float64_reference(ref, x, g)
    exact_stats = copy.deepcopy(ref).double().train(training)
    exact_stats(x.double())
    got, want = step_both(ref, mod, x, g)

    for field in ("out", "grad_input", "grad_weight", "grad_bias"):
        assert getattr(got, field).dtype == getattr(want, field).dtype == dtype, field
        assert_close(getattr(got, field), getattr(exact, field), dtype=dtype)
    # torch's own gradients use statistics rounded to the reduced dtype (up to ~0.9 TOL off): check only its
    # output, to confirm the float64 reference.
    assert_close(want.out, exact.out, dtype=dtype)
    assert_same_layout(got.out, want.out)
    assert_same_layout(got.grad_input, want.grad_input)
    assert_same_buffers(mod, ref, tol_dtype=dtype)
    assert_close(mod.running_mean, exact_stats.running_mean, dtype=dtype)
    assert_close(mod.running_var, exact_stats.running_var, dtype=dtype)


@pytest.mark.parametrize("dtype", REDUCED)
def test_reduced_tolerance_is_not_vacuous(dtype):
    """One unit in the last place of a reduced output passes; a 5% error does not."""
    exact = torch.linspace(-3, 3, 50, dtype=torch.float64)
    rounded = exact.to(dtype)
    assert_close(rounded, exact)
    with pytest.raises(AssertionError):
        assert_close((exact * 1.05).to(dtype), exact)
    assert TOL[dtype][0] < 0.05


# ------------------------------------------------------------------------------------- empty batch

EMPTY_SHAPES = [
    pytest.param("BatchNorm1d", (0, 3), id="1d-N=0"),
    pytest.param("BatchNorm1d", (0, 3, 4), id="1d-NCL-N=0"),
    pytest.param("BatchNorm1d", (2, 3, 0), id="1d-NCL-L=0"),
    pytest.param("BatchNorm2d", (0, 3, 2, 2), id="2d-N=0"),
    pytest.param("BatchNorm3d", (0, 3, 2, 2, 2), id="3d-N=0"),
]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "shape"), EMPTY_SHAPES)
def test_empty_batch_matches_torch(name, shape, training, momentum):
    """Empty output, running statistics untouched, num_batches_tracked still +1 in training, zero grads."""
    ref, mod = make_pair(name, momentum=momentum)
    ref.train(training)
    mod.train(training)
    before = copy.deepcopy(mod.state_dict())
    x, g = torch.randn(shape), torch.randn(shape)
    got, want = step_both(ref, mod, x, g)

    assert_same_step(got, want)
    assert got.out.shape == shape
    assert torch.equal(got.grad_weight, torch.zeros(3))
    assert torch.equal(got.grad_bias, torch.zeros(3))
    assert_same_buffers(mod, ref)
    assert torch.equal(mod.running_mean, before["running_mean"])
    assert torch.equal(mod.running_var, before["running_var"])
    assert mod.num_batches_tracked.item() == int(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_without_running_stats_matches_torch(training):
    ref, mod = make_pair("BatchNorm2d", track_running_stats=False)
    ref.train(training)
    mod.train(training)
    x, g = torch.randn(0, 3, 2, 2), torch.randn(0, 3, 2, 2)
    assert_same_step(*step_both(ref, mod, x, g))


# Torch returns before any check on the statistics, weight and bias for an empty input
# (``_batch_norm_impl_index``: "if (input.sym_numel() == 0)" comes first).
EMPTY_INPUT_SKIPS_CHECKS = {
    "eval-without-running-stats": lambda x: (x, None, None, None, None, False),
    "eval-one-running-stat": lambda x: (x, torch.zeros(3), None, None, None, False),
    "train-one-running-stat": lambda x: (x, torch.zeros(3), None, None, None, True),
    "weight-of-wrong-size": lambda x: (x, None, None, torch.randn(4), None, True),
    "bias-of-wrong-size": lambda x: (x, None, None, None, torch.randn(4), True),
}


@pytest.mark.parametrize(
    "args", EMPTY_INPUT_SKIPS_CHECKS.values(), ids=EMPTY_INPUT_SKIPS_CHECKS.keys()
)
def test_functional_empty_input_is_accepted_as_torch_does(args):
    want = F.batch_norm(*args(torch.randn(0, 3, 2)))
    got = flexbn.batch_norm(*args(torch.randn(0, 3, 2)))
    assert_same_tensor(got, want)


# ----------------------------------------------------------------------------------- functional

FUNCTIONAL_INPUTS = [
    pytest.param((6, 3), CONTIG, id="NC"),
    pytest.param((4, 3, 5), CONTIG, id="NCL"),
    pytest.param((2, 3, 4, 5), CONTIG, id="NCHW"),
    pytest.param((2, 3, 4, 5), CL, id="NCHW-channels_last"),
    pytest.param((2, 3, 2, 2, 3), CL3D, id="NCDHW-channels_last_3d"),
]
AFFINE = [
    pytest.param((True, True), id="weight+bias"),
    pytest.param((True, False), id="weight-only"),
    pytest.param((False, True), id="bias-only"),
    pytest.param((False, False), id="no-affine"),
]
MODES = [
    pytest.param((True, True), id="train-with-running-stats"),
    pytest.param((True, False), id="train-without-running-stats"),
    pytest.param((False, True), id="eval"),
]


def functional_args(shape, memory_format, affine, with_stats, training, momentum=0.1, eps=1e-5):
    """Positional arguments of ``batch_norm`` for each library; tensors are fresh copies for each."""
    c = shape[1]
    x = make_input(shape, memory_format)
    g = make_input(shape, memory_format)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    w, b = torch.randn(c) + 1, torch.randn(c)
    has_w, has_b = affine

    def build():
        leaf = lambda t, keep: t.clone().requires_grad_() if keep else None  # noqa: E731
        stats = (rm.clone(), rv.clone()) if with_stats else (None, None)
        return (x.clone().requires_grad_(), *stats, leaf(w, has_w), leaf(b, has_b)), g

    return build, (training, momentum, eps)


def run_functional(fn, tensors, g, rest) -> tuple[Step, Tensor | None, Tensor | None]:
    x, rm, rv, w, b = tensors
    out = fn(x, rm, rv, w, b, *rest)
    out.backward(g)
    grad = lambda p: None if p is None else p.grad  # noqa: E731
    return Step(out.detach(), x.grad, grad(w), grad(b)), rm, rv


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize(("shape", "memory_format"), FUNCTIONAL_INPUTS)
def test_functional_matches_torch(shape, memory_format, affine, mode):
    training, with_stats = mode
    build, rest = functional_args(shape, memory_format, affine, with_stats, training)
    (want, rm_t, rv_t), (got, rm_f, rv_f) = (
        run_functional(fn, *build(), rest) for fn in (F.batch_norm, flexbn.batch_norm)
    )
    assert_same_step(got, want)
    assert_close(rm_f, rm_t)
    assert_close(rv_f, rv_t)


MOMENTA = [
    pytest.param(0.1, id="0.1"),
    pytest.param(0.0, id="0.0"),
    pytest.param(0.7, id="0.7"),
    pytest.param(1.0, id="1.0"),
    pytest.param(1, id="int-1"),
    pytest.param(torch.tensor(0.3), id="0-d-tensor-0.3"),
]


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize(("shape", "memory_format"), FUNCTIONAL_INPUTS[::2])
def test_functional_updates_running_stats_in_place_as_torch(shape, memory_format, momentum):
    build, rest = functional_args(shape, memory_format, (True, True), True, True, momentum)
    (tensors_t, g), (tensors_f, _) = build(), build()
    rm_f, rv_f = tensors_f[1], tensors_f[2]
    ptrs = rm_f.data_ptr(), rv_f.data_ptr()
    initial = rm_f.clone()
    want, *_ = run_functional(F.batch_norm, tensors_t, g, rest)
    got, *_ = run_functional(flexbn.batch_norm, tensors_f, g, rest)
    assert_same_step(got, want)
    assert (rm_f.data_ptr(), rv_f.data_ptr()) == ptrs  # updated in place, not rebound
    assert_same_tensor(rm_f, tensors_t[1])
    assert_same_tensor(rv_f, tensors_t[2])
    assert float(momentum) == 0.0 or not torch.equal(rm_f, initial)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", REDUCED)
def test_functional_mixed_precision_matches_torch(dtype, training):
    x = make_input((2, 3, 4, 5), CL, dtype)
    rm, rv, w, b = torch.randn(3), torch.rand(3) + 0.5, torch.randn(3) + 1, torch.randn(3)
    stats_t, stats_f = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    want = F.batch_norm(x, *stats_t, w, b, training, 0.2)
    got = flexbn.batch_norm(x, *stats_f, w, b, training, 0.2)
    assert got.dtype == want.dtype == dtype
    assert_same_layout(got, want)
    exact = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), training)
    assert_close(got, exact, dtype=dtype)
    for a, e in zip(stats_f, stats_t, strict=True):
        assert_same_tensor(a, e)


def test_functional_eval_with_eps_zero_matches_torch():
    """eps=0 is allowed in eval (torch >= 2.10); a positive running variance gives finite output."""
    x = make_input((4, 3, 2))
    args = (torch.randn(3), torch.rand(3) + 0.5, torch.randn(3), torch.randn(3), False, 0.1, 0.0)
    assert_same_tensor(flexbn.batch_norm(x, *args), F.batch_norm(x, *args))


def test_functional_eval_with_eps_zero_and_zero_variance_is_not_finite_as_torch():
    x = make_input((4, 3, 2))
    args = (torch.randn(3), torch.tensor([0.0, 1.0, 2.0]), torch.randn(3), torch.randn(3), False)
    want = F.batch_norm(x, *args, 0.1, 0.0)
    got = flexbn.batch_norm(x, *args, 0.1, 0.0)
    assert torch.equal(got.isfinite(), want.isfinite())


# ------------------------------------------------------------------ gaps found by torch's test material


def test_weight_of_any_shape_with_c_elements() -> None:
    """torch accepts a weight and bias of shape (C, 1) (any shape with C elements) in its forward (its own
    backward then fails); flexbn's forward equals torch's and its gradients have the parameters' shapes."""
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 1, dtype=torch.float64, requires_grad=True)
    y = flexbn.batch_norm(x, None, None, w, b, training=True)
    with torch.no_grad():
        assert_close(y, F.batch_norm(x, None, None, w, b, training=True))
    y_flat = flexbn.batch_norm(x, None, None, w.reshape(-1), b.reshape(-1), training=True)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), g)
    flat = torch.autograd.grad(y_flat, (x, w, b), g)
    for p, q in zip(grads, flat, strict=True):
        assert p.shape == q.shape
        assert_close(p, q)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCL", "NLC"])
def test_non_finite_input_gives_torchs_running_statistics(channels_last: bool) -> None:
    """inf in a channel: torch's running mean becomes inf (the plain mean), its variance NaN; NaN, or
    both infinities, give NaN. flexbn's shifted sums gave NaN everywhere, and a clamp turned the NaN
    variance of channels-last input into 0 (a finite running variance that looked fine)."""
    x = torch.randn(8, 3, 4, 1)
    x[2, 0, 1] = float("inf")
    x[3, 1, 0], x[4, 1, 2] = float("-inf"), float("inf")
    x[5, 2, 3] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(3), torch.ones(3)
    torch.nn.functional.batch_norm(x, rm, rv, training=True)
    assert rm[0] == float("inf")  # the expectation below is torch's
    for options in ({}, {"detach_var": True}):
        ours_m, ours_v = torch.zeros(3), torch.ones(3)
        flexbn.batch_norm(x, ours_m, ours_v, training=True, **options)
        assert torch.equal(ours_m.isnan(), rm.isnan()), options
        assert torch.equal(ours_m.isinf(), rm.isinf()), options
        assert ours_v.isnan().all(), options


def test_batch_norm_in_a_backward_hook_updates_running_statistics() -> None:
    """A forward run inside a backward hook (grad disabled) is not a checkpoint recomputation: it updates
    the running statistics, as torch's does (activation checkpointing recomputes with grad enabled)."""
    ours, theirs = flexbn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    h = torch.randn(5, 3, requires_grad=True)

    def hook(grad: torch.Tensor) -> None:
        ours(torch.randn(5, 3) + 2)
        theirs(torch.randn(5, 3) + 2)

    h.register_hook(hook)
    (h * 2).sum().backward()
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    assert not torch.equal(ours.running_mean, torch.zeros(3))
