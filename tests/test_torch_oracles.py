"""PyTorch's own batch-norm test material, run against flexbn: the bar for drop-in parity.

* The ``ModuleInfo`` entries of ``torch.testing._internal.common_modules`` for ``nn.BatchNorm1d/2d/3d``:
  every constructor/forward input torch tests its modules with, in training and eval, on flexbn's module
  built with the same arguments and state -- output, every gradient, the running statistics and
  ``num_batches_tracked`` equal to torch's, and gradcheck/gradgradcheck with batched gradients as torch's
  ``test_grad``/``test_gradgrad``; and every error input, raising the same exception type and message.
* The ``OpInfo`` samples of ``nn.functional.batch_norm`` (``common_methods_invocations``): flexbn's
  functional against torch's on each sample, gradcheck with batched gradients, gradgradcheck, forward-mode
  AD and ``vmap``, with gradcheck's default tolerances.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor

import flexbn
from conftest import assert_close

common_modules = pytest.importorskip("torch.testing._internal.common_modules")
common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")

F64 = torch.float64
_FLEX = {
    "nn.BatchNorm1d": flexbn.BatchNorm1d,
    "nn.BatchNorm2d": flexbn.BatchNorm2d,
    "nn.BatchNorm3d": flexbn.BatchNorm3d,
}
MODULE_INFOS = [m for m in common_modules.module_db if m.name in _FLEX]
assert len(MODULE_INFOS) == 3  # torch still ships them (a vacuous pass otherwise)
(OP_INFO,) = [
    op
    for op in common_methods.op_db
    if op.name == "nn.functional.batch_norm" and op.variant_test_name == ""
]


def _module_cases() -> list:
    cases = []
    for info in MODULE_INFOS:
        for training in (True, False):
            inputs = info.module_inputs_func(
                info, device="cpu", dtype=F64, requires_grad=True, training=training
            )
            for i, module_input in enumerate(inputs):
                desc = module_input.desc or "default"
                mode = "train" if training else "eval"
                cases.append(pytest.param(info, training, i, id=f"{info.name}-{desc}-{mode}"))
    return cases


def _module_input(info, training: bool, index: int):
    torch.manual_seed(index)
    inputs = info.module_inputs_func(
        info, device="cpu", dtype=F64, requires_grad=True, training=training
    )
    return inputs[index]


def _pair(info, module_input, training: bool):
    """torch's module and flexbn's, same constructor arguments, same random parameters and state."""
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    ours = _FLEX[info.name](*args, **kwargs).to(F64)
    theirs = info.module_cls(*args, **kwargs).to(F64)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
        if theirs.running_mean is not None:
            theirs.running_mean.copy_(torch.randn_like(theirs.running_mean))
            theirs.running_var.copy_(torch.rand_like(theirs.running_var) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    ours.train(training), theirs.train(training)
    return ours, theirs


def _forward_input(module_input) -> tuple[tuple, dict]:
    fwd = module_input.forward_input
    return fwd.args, fwd.kwargs


def _fresh(args: tuple) -> tuple:
    return tuple(
        a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a
        for a in args
    )


@pytest.mark.parametrize(("info", "training", "index"), _module_cases())
def test_module_inputs_match_torch(info, training: bool, index: int) -> None:
    """Output, input and parameter gradients, running statistics and num_batches_tracked: torch's."""
    module_input = _module_input(info, training, index)
    ours, theirs = _pair(info, module_input, training)
    args, kwargs = _forward_input(module_input)
    a_ours, a_theirs = _fresh(args), _fresh(args)
    y_ours, y_theirs = ours(*a_ours, **kwargs), theirs(*a_theirs, **kwargs)
    assert_close(y_ours, y_theirs, msg="output")
    assert y_ours.shape == y_theirs.shape
    assert y_ours.dtype == y_theirs.dtype
    for (name, b_ours), (_, b_theirs) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        if b_theirs.dtype == torch.int64:
            assert torch.equal(b_ours, b_theirs), name
        else:
            assert_close(b_ours, b_theirs, msg=name)
    if y_theirs.requires_grad:
        g = torch.randn_like(y_theirs)
        inputs_ours = [a for a in a_ours if isinstance(a, Tensor)] + list(ours.parameters())
        inputs_theirs = [a for a in a_theirs if isinstance(a, Tensor)] + list(theirs.parameters())
        grads_ours = torch.autograd.grad(y_ours, inputs_ours, g, allow_unused=True)
        grads_theirs = torch.autograd.grad(y_theirs, inputs_theirs, g, allow_unused=True)
        for i, (p, q) in enumerate(zip(grads_ours, grads_theirs, strict=True)):
            if q is None:
                assert p is None or not p.any(), f"gradient {i}"
            else:
                assert_close(p, q, msg=f"gradient {i}")


@pytest.mark.parametrize(("info", "training", "index"), _module_cases())
def test_module_gradcheck_like_torch(info, training: bool, index: int) -> None:
    """torch's test_grad / test_gradgrad: gradcheck with batched gradients (the legacy batching of the
    backward), and gradgradcheck, over the input and the parameters."""
    module_input = _module_input(info, training, index)
    ours, _ = _pair(info, module_input, training)
    args, kwargs = _forward_input(module_input)
    tensors = [a for a in _fresh(args) if isinstance(a, Tensor)]
    params = [p.detach().clone().requires_grad_() for p in ours.parameters()]  # not the module's
    if not tensors or tensors[0].numel() == 0:
        pytest.skip("an empty batch has nothing to check numerically")
    state = copy.deepcopy(ours.state_dict())

    names = [n for n, _ in ours.named_parameters()]

    def f(*inputs: Tensor) -> Tensor:
        if (
            training
        ):  # every evaluation from the same running statistics (eval does not change them)
            ours.load_state_dict(state)
        given = dict(zip(names, inputs[len(tensors) :], strict=True))
        return torch.func.functional_call(ours, given, tuple(inputs[: len(tensors)]), kwargs)

    inputs = (*tensors, *params)
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs, check_batched_grad=True)


def _error_cases() -> list:
    cases = []
    for info in MODULE_INFOS:
        errors = info.module_error_inputs_func(
            info, device="cpu", dtype=F64, requires_grad=False, training=True
        )
        for i, e in enumerate(errors):
            cases.append(pytest.param(info, i, id=f"{info.name}-error{i}-{e.error_regex[:30]}"))
    return cases


@pytest.mark.parametrize(("info", "index"), _error_cases())
def test_module_error_inputs_raise_like_torch(info, index: int) -> None:
    """Every error input of torch's tests: the same exception type and message."""
    error = info.module_error_inputs_func(
        info, device="cpu", dtype=F64, requires_grad=False, training=True
    )[index]
    module_input = error.module_error_input
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    regex = error.error_regex
    if error.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(error.error_type, match=regex):
            _FLEX[info.name](*args, **kwargs)
        return
    module = _FLEX[info.name](*args, **kwargs).to(F64).train()
    fwd_args, fwd_kwargs = _forward_input(module_input)
    nbt = module.num_batches_tracked.clone()
    with pytest.raises(error.error_type, match=regex):
        module(*fwd_args, **fwd_kwargs)
    assert torch.equal(module.num_batches_tracked, nbt)  # a rejected call changes nothing


def _op_samples() -> list:
    samples = list(OP_INFO.sample_inputs_func(OP_INFO, "cpu", F64, requires_grad=True))
    assert samples
    params = []
    for i, s in enumerate(samples):
        shape = "x".join(map(str, s.input.shape)) or "scalar"
        desc = ",".join(f"{k}={v}" for k, v in sorted(s.kwargs.items()))
        params.append(pytest.param(i, id=f"{i}-{shape}-{desc}"))
    return params


def _op_sample(index: int):
    torch.manual_seed(index)
    return list(OP_INFO.sample_inputs_func(OP_INFO, "cpu", F64, requires_grad=True))[index]


def _call(fn, sample, x: Tensor, *tensors: Tensor | None) -> Tensor:
    """``fn(x, running_mean, running_var, weight, bias, **kwargs)`` on fresh running statistics."""
    rm, rv, w, b = tensors
    rm = None if rm is None else rm.detach().clone()
    rv = None if rv is None else rv.detach().clone()
    return fn(x, rm, rv, w, b, **sample.kwargs)


@pytest.mark.parametrize("index", _op_samples())
def test_functional_samples_match_torch(index: int) -> None:
    """Each OpInfo sample: flexbn.batch_norm's output, running statistics and gradients are torch's."""
    sample = _op_sample(index)
    args = [sample.input, *sample.args]
    rms = [None if a is None else a.detach().clone() for a in args[1:3]]
    rms_t = [None if a is None else a.detach().clone() for a in args[1:3]]
    y = flexbn.batch_norm(args[0], *rms, *args[3:5], **sample.kwargs)
    y_t = torch.nn.functional.batch_norm(args[0], *rms_t, *args[3:5], **sample.kwargs)
    assert_close(y, y_t, msg="output")
    for a, b in zip(rms, rms_t, strict=True):
        assert_close(a, b, msg="running statistics")
    diff = [t for t in (args[0], args[3], args[4]) if t is not None and t.requires_grad]
    if y_t.requires_grad and diff and y_t.numel():
        g = torch.randn_like(y_t)
        for p, q in zip(
            torch.autograd.grad(y, diff, g), torch.autograd.grad(y_t, diff, g), strict=True
        ):
            assert_close(p, q, msg="gradient")


# Forward-mode AD loads torch's jvp decompositions on first use, through torch.jit.script (deprecated).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("index", _op_samples())
def test_functional_samples_autograd(index: int) -> None:
    """torch's OpInfo checks for batch norm (check_batched_grad, gradgradcheck, forward AD, batched
    forward grad): gradcheck's default tolerances."""
    sample = _op_sample(index)
    x, rm, rv, w, b = [sample.input, *sample.args]
    if x.numel() == 0:
        pytest.skip("an empty batch has nothing to check numerically")
    diff = [t for t in (x, w, b) if t is not None]

    def f(*inputs: Tensor) -> Tensor:
        it = iter(inputs)
        xs = next(it)
        ws = next(it) if w is not None else None
        bs = next(it) if b is not None else None
        return _call(flexbn.batch_norm, sample, xs, rm, rv, ws, bs)

    assert torch.autograd.gradcheck(f, diff, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, diff, check_batched_grad=True)
    assert torch.autograd.gradcheck(
        f, diff, check_forward_ad=True, check_backward_ad=False, check_batched_forward_grad=True
    )


@pytest.mark.parametrize("index", _op_samples())
def test_functional_samples_vmap(index: int) -> None:
    """torch.func.vmap over a stack of inputs equals a loop (the running statistics are not batched, as
    in torch's vmap tests of batch norm without running statistics updates: eval, or none given)."""
    sample = _op_sample(index)
    x, rm, rv, w, b = [sample.input, *sample.args]
    training = sample.kwargs.get("training", False)
    if x.numel() == 0 or (training and rm is not None):
        pytest.skip("vmap cannot update unbatched running statistics in place (as torch)")
    xs = torch.stack([x.detach(), x.detach() * 2 + 1, x.detach() - 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own fallback notices
        batched = torch.func.vmap(lambda t: flexbn.batch_norm(t, rm, rv, w, b, **sample.kwargs))(xs)
    for i in range(len(xs)):
        assert_close(batched[i], flexbn.batch_norm(xs[i], rm, rv, w, b, **sample.kwargs))
