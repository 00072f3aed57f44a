"""Property tests (hypothesis): random shapes, options, modes and train/eval steps against references.

For any input and configuration, in float64:

* outputs and running buffers equal torch's (the detach flags change gradients only);
* gradients equal torch's where they should (full mode, or running statistics in use), and the float64 hand
  composition ``manual_batch_norm(..., detach_mean, detach_var)`` where batch statistics are detached.

Deterministic: ``derandomize=True`` and a torch seed drawn by hypothesis for every example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import flexbn
from conftest import assert_close, manual_batch_norm

SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NAMES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    channels_last: bool
    affine: bool
    track_running_stats: bool  # module: the constructor option; functional: running buffers given
    momentum: float | None
    eps: float
    detach_mean: bool
    detach_var: bool
    training: tuple[bool, ...]  # one entry per step
    seed: int

    @property
    def flags(self) -> dict[str, bool]:
        return {"detach_mean": self.detach_mean, "detach_var": self.detach_var}

    @property
    def detached(self) -> bool:
        return self.detach_mean or self.detach_var


@st.composite
def cases(draw: st.DrawFn, module: bool) -> Case:
    dim = draw(st.integers(2, 5))
    c = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=dim - 2, max_size=dim - 2)))
    track = draw(st.booleans())
    training = tuple(draw(st.lists(st.booleans(), min_size=1, max_size=3)))
    if not module and not track:
        training = tuple(True for _ in training)  # the functional call needs running stats in eval
    # batch statistics need more than one value per channel
    batch_stats = any(training) or (module and not track)
    n = draw(st.integers(2 if batch_stats and math.prod(spatial) == 1 else 1, 4))
    momenta = [0.0, 0.1, 0.5, 1.0] + ([None] if module else [])
    return Case(
        shape=(n, c, *spatial),
        channels_last=dim >= 4 and draw(st.booleans()),
        affine=draw(st.booleans()),
        track_running_stats=track,
        momentum=draw(st.sampled_from(momenta)),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        detach_mean=draw(st.booleans()),
        detach_var=draw(st.booleans()),
        training=training,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_input(case: Case) -> Tensor:
    x = torch.randn(case.shape, dtype=torch.float64) * 2 + 0.5
    if case.channels_last:
        x = x.contiguous(memory_format=MEMORY_FORMATS[x.dim()])
    return x


def assert_grads(got, want, names) -> None:
    for name, g, r in zip(names, got, want, strict=True):
        assert_close(g, r, msg=f"grad {name}")


def check_step(
    out: Tensor,
    ref_out: Tensor,
    inputs: tuple[Tensor, ...],
    ref_inputs: tuple[Tensor, ...],
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    gy: Tensor,
    case: Case,
    batch_stats: bool,
) -> None:
    """Output as torch; gradients as torch, or as the hand composition when detached batch statistics."""
    assert_close(out, ref_out, msg="output")
    names = ("input", "weight", "bias")[: len(inputs)]
    got = torch.autograd.grad(out, inputs, gy)
    if batch_stats and case.detached:
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
        y = manual_batch_norm(
            leaves[0],
            *(leaves[1:] if case.affine else (None, None)),
            case.eps,
            **case.flags,
        )
        want = torch.autograd.grad(y, leaves, gy)
    else:
        want = torch.autograd.grad(ref_out, ref_inputs, gy)
    assert_grads(got, want, names)


@SETTINGS
@given(case=cases(module=True))
def test_module_matches_torch_or_composition(case: Case):
    torch.manual_seed(case.seed)
    name = NAMES[len(case.shape)]
    kwargs = {
        "eps": case.eps,
        "momentum": case.momentum,
        "affine": case.affine,
        "track_running_stats": case.track_running_stats,
        "dtype": torch.float64,
    }
    ref = getattr(nn, name)(case.shape[1], **kwargs)
    mod = getattr(flexbn, name)(case.shape[1], **kwargs, **case.flags)
    with torch.no_grad():
        for t in (ref.weight, ref.bias, ref.running_mean):
            if t is not None:
                t.copy_(torch.randn_like(t))
        if ref.running_var is not None:
            ref.running_var.copy_(torch.rand_like(ref.running_var) + 0.5)
    mod.load_state_dict(ref.state_dict())

    for training in case.training:
        ref.train(training)
        mod.train(training)
        x = make_input(case)
        gy = torch.randn(case.shape, dtype=torch.float64)
        xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref_out = mod(xf), ref(xt)
        params = (mod.weight, mod.bias) if case.affine else ()
        ref_params = (ref.weight, ref.bias) if case.affine else ()
        batch_stats = training or not case.track_running_stats
        check_step(
            out,
            ref_out,
            (xf, *params),
            (xt, *ref_params),
            x,
            mod.weight,
            mod.bias,
            gy,
            case,
            batch_stats,
        )
        for key, value in ref.state_dict().items():
            got = mod.state_dict()[key]
            if key.endswith("num_batches_tracked"):
                assert torch.equal(got, value)
            else:
                assert_close(got, value, msg=key)


@SETTINGS
@given(case=cases(module=False))
def test_functional_matches_torch_or_composition(case: Case):
    torch.manual_seed(case.seed)
    c = case.shape[1]
    weight = torch.randn(c, dtype=torch.float64, requires_grad=True) if case.affine else None
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True) if case.affine else None
    rm = rv = None
    if case.track_running_stats:
        rm = torch.randn(c, dtype=torch.float64)
        rv = torch.rand(c, dtype=torch.float64) + 0.5
    rm_t = None if rm is None else rm.clone()
    rv_t = None if rv is None else rv.clone()
    params = tuple(t for t in (weight, bias) if t is not None)

    for training in case.training:
        x = make_input(case)
        gy = torch.randn(case.shape, dtype=torch.float64)
        xf, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        args = (weight, bias, training, case.momentum, case.eps)
        out = flexbn.batch_norm(xf, rm, rv, *args, **case.flags)
        ref_out = F.batch_norm(xt, rm_t, rv_t, *args)
        check_step(out, ref_out, (xf, *params), (xt, *params), x, weight, bias, gy, case, training)
        assert_close(rm, rm_t, msg="running_mean")
        assert_close(rv, rv_t, msg="running_var")
