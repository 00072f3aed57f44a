"""Bad input, declared as data: flexbn raises what torch raises, with the same message.

Each case is a callable that makes one bad call on a library -- ``torch`` (``F.batch_norm`` and ``nn``'s
modules) or ``flexbn`` -- so the same case runs on both. Shared cases must raise the same exception type with
the same message (torch's message is computed in the test, not written down); mixed dtypes only the same
type. Cases where flexbn deliberately differs are tested on flexbn alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flexbn
from conftest import assert_close

TORCH = SimpleNamespace(
    batch_norm=F.batch_norm,
    BatchNorm1d=nn.BatchNorm1d,
    BatchNorm2d=nn.BatchNorm2d,
    BatchNorm3d=nn.BatchNorm3d,
)
LIBRARIES = {"torch": TORCH, "flexbn": flexbn}

Call = Callable[[Any], object]  # lib -> result of one call on that library
C = 3
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@dataclass(frozen=True)
class Case:
    call: Call
    exc: type[Exception]
    match: str  # regex both messages must match
    same_message: bool = True


def functional(
    shape: tuple[int, ...] = (4, C),
    *,
    dtype: torch.dtype = F32,
    running_mean: int | None = C,
    running_var: int | None = C,
    weight: int | None = None,
    bias: int | None = None,
    stats_dtype: torch.dtype | None = None,
    weight_dtype: torch.dtype | None = None,
    training: Any = True,
    momentum: Any = 0.1,
    eps: Any = 1e-5,
    stats_requires_grad: bool = False,
) -> Call:
    """A positional ``lib.batch_norm`` call; sizes of the (C,)-tensors, or None for an argument None."""

    def tensor(size: int | None, fill: float, dtype: torch.dtype | None) -> torch.Tensor | None:
        return None if size is None else torch.full((size,), fill, dtype=dtype or F32)

    def call(lib: Any) -> object:
        x = torch.randn(shape).to(dtype)
        rm = tensor(running_mean, 0.0, stats_dtype)
        rv = tensor(running_var, 1.0, stats_dtype)
        if stats_requires_grad:
            rm.requires_grad_()
        w, b = tensor(weight, 1.5, weight_dtype), tensor(bias, 0.5, weight_dtype)
        return lib.batch_norm(x, rm, rv, w, b, training, momentum, eps)

    return call


def module(
    name: str,
    shape: tuple[int, ...],
    *,
    training: bool = True,
    input_dtype: torch.dtype = F32,
    prepare: Callable[[nn.Module], object] | None = None,
    num_features: int = C,
    **kwargs: Any,
) -> Call:
    """``lib.<name>(num_features, **kwargs)`` in train or eval mode, called on a random input."""

    def call(lib: Any) -> object:
        m = getattr(lib, name)(num_features, **kwargs).train(training)
        if prepare is not None:
            prepare(m)
        return m(torch.randn(shape).to(input_dtype))

    return call


def set_attr(**values: Any) -> Callable[[nn.Module], None]:
    return lambda m: [setattr(m, k, v) for k, v in values.items()]


def case(
    id: str, call: Call, exc: type[Exception], match: str, *, xfail: str | None = None, **kw: Any
):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(Case(call, exc, match, **kw), id=id, marks=marks)


def unsupported(id: str, call: Call, torch_name: str):
    """Input of a dtype with no kernel: ``"batch_norm" not implemented for '<torch_name>'``."""
    return case(id, call, NotImplementedError, NOT_IMPLEMENTED.format(torch_name))


def mixed(id: str, call: Call):
    """A mixed-dtype case: torch's messages vary with the combination, so only the type must match."""
    return case(id, call, RuntimeError, MIXED, same_message=False)


DIM = r"expected {} input \(got {}D input\)"
ONE_VALUE = r"Expected more than 1 value per channel when training, got input size torch\.Size"
EPS_TRAIN = r"batch_norm eps must be positive during training, but got"
EPS_EVAL = r"batch_norm eps must be non-negative, but got"
SIZE = r"{} should contain 3 elements not 4"
BOTH_OR_NEITHER = r"running_mean and running_var must either both be None or neither be None"
EVAL_DEFINED = r"{} must be defined in evaluation mode"
NOT_IMPLEMENTED = r"\"batch_norm\" not implemented for '{}'"
MIXED = r"mixed dtype|scalar type"


SHARED = [
    # Dimensionality of the module input (``_check_input_dim``).
    case("BatchNorm1d-1D", module("BatchNorm1d", (C,)), ValueError, DIM.format("2D or 3D", 1)),
    case(
        "BatchNorm1d-4D", module("BatchNorm1d", (2, C, 4, 4)), ValueError, DIM.format("2D or 3D", 4)
    ),
    case("BatchNorm2d-3D", module("BatchNorm2d", (2, C, 4)), ValueError, DIM.format("4D", 3)),
    case("BatchNorm2d-5D", module("BatchNorm2d", (2, C, 2, 2, 2)), ValueError, DIM.format("4D", 5)),
    case("BatchNorm3d-4D", module("BatchNorm3d", (2, C, 2, 2)), ValueError, DIM.format("5D", 4)),
    case("BatchNorm3d-2D", module("BatchNorm3d", (2, C)), ValueError, DIM.format("5D", 2)),
    case(
        "BatchNorm2d-3D-in-eval",
        module("BatchNorm2d", (2, C, 4), training=False),
        ValueError,
        DIM.format("4D", 3),
    ),
    # One value per channel with batch statistics.
    case("functional-N=1", functional((1, C)), ValueError, ONE_VALUE),
    case("functional-N=1-HW=1", functional((1, C, 1, 1)), ValueError, ONE_VALUE),
    case(
        "functional-N=1-no-stats",
        functional((1, C), running_mean=None, running_var=None),
        ValueError,
        ONE_VALUE,
    ),
    case("BatchNorm1d-N=1", module("BatchNorm1d", (1, C)), ValueError, ONE_VALUE),
    case("BatchNorm1d-N=1-L=1", module("BatchNorm1d", (1, C, 1)), ValueError, ONE_VALUE),
    case("BatchNorm2d-N=1-HW=1", module("BatchNorm2d", (1, C, 1, 1)), ValueError, ONE_VALUE),
    case("BatchNorm3d-N=1-DHW=1", module("BatchNorm3d", (1, C, 1, 1, 1)), ValueError, ONE_VALUE),
    case(
        "BatchNorm1d-N=1-eval-untracked",  # batch statistics in eval too
        module("BatchNorm1d", (1, C), training=False, track_running_stats=False),
        ValueError,
        ONE_VALUE,
    ),
    case(
        "BatchNorm1d-N=1-eval-buffers-None",
        module(
            "BatchNorm1d",
            (1, C),
            training=False,
            prepare=set_attr(running_mean=None, running_var=None),
        ),
        ValueError,
        ONE_VALUE,
    ),
    case("functional-N=1-before-eps", functional((1, C), eps=0.0), ValueError, ONE_VALUE),
    # eps: positive in training, non-negative in eval.
    case("functional-eps=0-train", functional(eps=0.0), ValueError, EPS_TRAIN),
    case("functional-eps<0-train", functional(eps=-1e-5), ValueError, EPS_TRAIN),
    case("functional-int-eps=0-train", functional(eps=0), ValueError, EPS_TRAIN),
    case("functional-eps<0-eval", functional(eps=-1.0, training=False), ValueError, EPS_EVAL),
    case(
        "BatchNorm2d-eps=0-train",
        module("BatchNorm2d", (2, C, 2, 2), eps=0.0),
        ValueError,
        EPS_TRAIN,
    ),
    case(
        "BatchNorm2d-eps<0-eval",
        module("BatchNorm2d", (2, C, 2, 2), eps=-0.5, training=False),
        ValueError,
        EPS_EVAL,
    ),
    case("functional-eps=0-before-size", functional(eps=0.0, weight=4), ValueError, EPS_TRAIN),
    # Sizes of the per-channel tensors.
    case(
        "running_mean-size", functional(running_mean=4), RuntimeError, SIZE.format("running_mean")
    ),
    case("running_var-size", functional(running_var=4), RuntimeError, SIZE.format("running_var")),
    case("weight-size", functional(weight=4, bias=C), RuntimeError, SIZE.format("weight")),
    case("bias-size", functional(weight=C, bias=4), RuntimeError, SIZE.format("bias")),
    case(
        "weight-size-eval",
        functional(weight=4, training=False),
        RuntimeError,
        SIZE.format("weight"),
    ),
    case(
        "weight-size-no-stats",
        functional(weight=4, running_mean=None, running_var=None),
        RuntimeError,
        SIZE.format("weight"),
    ),
    case(
        "all-sizes-running_mean-first",
        functional(running_mean=4, running_var=4, weight=4, bias=4),
        RuntimeError,
        SIZE.format("running_mean"),
    ),
    case(
        "BatchNorm2d-num_features=4",
        module("BatchNorm2d", (2, C, 2, 2), num_features=4),
        RuntimeError,
        SIZE.format("running_mean"),
    ),
    case(
        "BatchNorm2d-num_features=4-eval",
        module("BatchNorm2d", (2, C, 2, 2), num_features=4, training=False),
        RuntimeError,
        SIZE.format("running_mean"),
    ),
    case(
        "BatchNorm2d-num_features=4-untracked",
        module("BatchNorm2d", (2, C, 2, 2), num_features=4, track_running_stats=False),
        RuntimeError,
        SIZE.format("weight"),
    ),
    # Running statistics: both or neither; defined in eval.
    case("running_var-None-train", functional(running_var=None), ValueError, BOTH_OR_NEITHER),
    case("running_mean-None-train", functional(running_mean=None), ValueError, BOTH_OR_NEITHER),
    case(
        "BatchNorm2d-running_var-None-by-hand-train",
        module("BatchNorm2d", (2, C, 2, 2), prepare=set_attr(running_var=None)),
        ValueError,
        BOTH_OR_NEITHER,
    ),
    case(
        "eval-without-running-stats",
        functional(running_mean=None, running_var=None, training=False),
        RuntimeError,
        EVAL_DEFINED.format("running_mean"),
    ),
    case(
        "eval-without-running-stats-N=1",
        functional((1, C), running_mean=None, running_var=None, training=False),
        RuntimeError,
        EVAL_DEFINED.format("running_mean"),
    ),
    case(
        "eval-without-running-stats-before-weight-size",
        functional(running_mean=None, running_var=None, weight=4, training=False),
        RuntimeError,
        EVAL_DEFINED.format("running_mean"),
    ),
    case(
        "running_var-None-eval",
        functional(running_var=None, training=False),
        RuntimeError,
        EVAL_DEFINED.format("running_var"),
    ),
    case(
        "running_mean-None-eval",
        functional(running_mean=None, training=False),
        RuntimeError,
        EVAL_DEFINED.format("running_mean"),
    ),
    case(
        "BatchNorm2d-running_var-None-by-hand-eval",
        module("BatchNorm2d", (2, C, 2, 2), training=False, prepare=set_attr(running_var=None)),
        RuntimeError,
        EVAL_DEFINED.format("running_var"),
    ),
    case(
        "weight-size-before-running_var-None",
        functional(running_var=None, weight=4),
        RuntimeError,
        SIZE.format("weight"),
    ),
    case(
        "running_mean-size-before-running_var-None-eval",
        functional(running_mean=4, running_var=None, training=False),
        RuntimeError,
        SIZE.format("running_mean"),
    ),
    # Input dtypes without a kernel.
    unsupported("int64-input", functional(dtype=torch.int64), "Long"),
    unsupported("int32-input-eval", functional(dtype=torch.int32, training=False), "Int"),
    unsupported("uint8-input", functional(dtype=torch.uint8), "Byte"),
    unsupported("bool-input", functional(dtype=torch.bool), "Bool"),
    unsupported("complex64-input", functional(dtype=torch.complex64), "ComplexFloat"),
    unsupported(
        "BatchNorm2d-int64-input",
        module("BatchNorm2d", (2, C, 2, 2), input_dtype=torch.int64),
        "Long",
    ),
    case(
        "int64-input-N=1",
        functional((1, C), dtype=torch.int64),
        ValueError,
        ONE_VALUE,
    ),
    # Mixed dtypes.
    mixed("f64-input-f32-module", module("BatchNorm2d", (2, C, 2, 2), input_dtype=F64)),
    mixed(
        "f64-input-f32-module-eval",
        module("BatchNorm2d", (2, C, 2, 2), input_dtype=F64, training=False),
    ),
    mixed("f32-input-f64-module", module("BatchNorm2d", (2, C, 2, 2), dtype=F64)),
    mixed(
        "f32-input-f16-module-eval", module("BatchNorm2d", (2, C, 2, 2), dtype=F16, training=False)
    ),
    mixed("f32-input-f64-stats", functional(stats_dtype=F64)),
    mixed("f32-input-f16-weight", functional(weight=C, weight_dtype=F16)),
    mixed(
        "f32-input-f64-weight-no-stats",
        functional(weight=C, weight_dtype=F64, running_mean=None, running_var=None),
    ),
    mixed("f16-input-bf16-weight", functional(dtype=F16, weight=C, weight_dtype=BF16)),
    mixed("f16-input-f16-weight-f32-stats", functional(dtype=F16, weight=C, weight_dtype=F16)),
    mixed("f16-input-f32-weight-f16-stats", functional(dtype=F16, weight=C, stats_dtype=F16)),
    mixed("f16-input-f64-stats-eval", functional(dtype=F16, stats_dtype=F64, training=False)),
    mixed("bf16-input-f64-weight", functional(dtype=BF16, weight=C, weight_dtype=F64)),
    # Running statistics are not differentiable.
    case(
        "running_mean-requires-grad",
        functional(stats_requires_grad=True),
        RuntimeError,
        r"not differentiable with respect to argument 'running_mean'",
        same_message=False,  # torch names its internal op 'native_batch_norm'; flexbn says 'batch_norm'
    ),
    # Argument types.
    case(
        "momentum-None",
        functional(momentum=None),
        TypeError,
        r"argument 'momentum'.* must be float, not NoneType",
    ),
    case(
        "training-None",
        functional(training=None),
        TypeError,
        r"argument 'training' \(position 6\) must be bool, not NoneType",
    ),
    case(
        "training-int",
        functional(training=1),
        TypeError,
        r"argument 'training' \(position 6\) must be bool, not int",
    ),
    case("eps-None", functional(eps=None), TypeError, r"eps|NoneType", same_message=False),
    case(
        "eps-str-eval",
        functional(eps="a", training=False),
        TypeError,
        r"eps|str",
        same_message=False,
    ),
]


@pytest.mark.parametrize("case", SHARED)
def test_same_error_as_torch(case: Case):
    with pytest.raises(case.exc, match=case.match) as torch_error:
        case.call(TORCH)
    with pytest.raises(case.exc, match=case.match) as flexbn_error:
        case.call(flexbn)
    if case.same_message:
        assert str(flexbn_error.value) == str(torch_error.value)


# Calls torch accepts: flexbn must accept them too, with the same result.
ACCEPTED = [
    pytest.param(functional(weight=C, eps=float("inf")), id="eps=inf"),
    pytest.param(functional(eps=0.0, training=False), id="eps=0-eval"),
    pytest.param(functional(eps=1, momentum=1), id="int-eps-and-momentum"),
    pytest.param(functional(momentum=torch.tensor(0.3)), id="momentum-0-d-tensor"),
    pytest.param(functional((1, C), training=False), id="N=1-eval"),
    pytest.param(functional((4, 0), running_mean=0, running_var=0), id="C=0"),
    pytest.param(
        functional((4, 5), running_mean=None, running_var=None),
        id="any-C-without-per-channel-tensors",
    ),
    pytest.param(module("BatchNorm1d", (1, C), training=False), id="BatchNorm1d-N=1-eval-tracked"),
    pytest.param(
        module(
            "BatchNorm2d", (2, C, 2, 2), affine=False, track_running_stats=False, num_features=7
        ),
        id="BatchNorm2d-wrong-num_features-nothing-to-check",
    ),
    pytest.param(functional(momentum=True), id="momentum-True"),
    pytest.param(functional(eps=float("nan")), id="eps=nan"),
    pytest.param(functional(eps=torch.tensor(1e-3)), id="eps-0-d-tensor"),
]


@pytest.mark.parametrize("call", ACCEPTED)
def test_accepted_as_torch(call: Call):
    torch.manual_seed(1)
    want = call(TORCH)
    torch.manual_seed(1)
    got = call(flexbn)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert_close(got, want)


# Where flexbn deliberately differs from torch: tested on flexbn alone.
FLEXBN_ONLY = [
    # torch raises IndexError ("Dimension out of range" / "tuple index out of range").
    case(
        "functional-1D",
        functional((4,), running_mean=None, running_var=None),
        ValueError,
        r"expected at least 2D input \(got 1D input\)",
    ),
    case(
        "functional-0D",
        functional((), running_mean=None, running_var=None),
        ValueError,
        r"expected at least 2D input \(got 0D input\)",
    ),
    # Non-bool detach flags.
    case(
        "functional-detach_mean=1",
        lambda lib: lib.batch_norm(torch.randn(4, C), None, None, training=True, detach_mean=1),
        TypeError,
        r"detach_mean must be a bool, but got int \(1\)",
    ),
    case(
        "functional-detach_var=None",
        lambda lib: lib.batch_norm(torch.randn(4, C), None, None, training=True, detach_var=None),
        TypeError,
        r"detach_var must be a bool, but got NoneType \(None\)",
    ),
    case(
        "functional-detach_var-tensor",
        lambda lib: lib.batch_norm(
            torch.randn(4, C), None, None, training=True, detach_var=torch.tensor(True)
        ),
        TypeError,
        r"detach_var must be a bool, but got Tensor",
    ),
    case(
        "BatchNorm2d-detach_mean='yes'",
        lambda lib: lib.BatchNorm2d(C, detach_mean="yes"),
        TypeError,
        r"detach_mean must be a bool, but got str \('yes'\)",
    ),
    case(
        "BatchNorm1d-detach_var=0",
        lambda lib: lib.BatchNorm1d(C, detach_var=0),
        TypeError,
        r"detach_var must be a bool, but got int \(0\)",
    ),
]


@pytest.mark.parametrize("case", FLEXBN_ONLY)
def test_flexbn_error(case: Case):
    with pytest.raises(case.exc, match=case.match):
        case.call(flexbn)


@pytest.mark.parametrize(
    "call",
    [
        functional((4,), running_mean=None, running_var=None),
        functional((), running_mean=None, running_var=None),
    ],
    ids=["1D", "0D"],
)
def test_torch_raises_index_error_for_less_than_2d_input(call: Call):
    """The documented difference: torch's error for <2-D functional input is an unfriendly IndexError."""
    with pytest.raises(IndexError):
        call(TORCH)


@pytest.mark.parametrize("name", LIBRARIES)
def test_error_cases_build_valid_calls(name):
    """Sanity: the case builders make calls that succeed when nothing is wrong (so the errors are real)."""
    lib = LIBRARIES[name]
    assert functional(weight=C, bias=C)(lib).shape == (4, C)
    assert functional(training=False, weight=C, bias=C)(lib).shape == (4, C)
    assert module("BatchNorm2d", (2, C, 2, 2))(lib).shape == (2, C, 2, 2)
    assert functional(dtype=F16)(lib).dtype == F16  # mixed precision itself is fine
