"""The backend choice (reference / compiled / auto) and the compiled path's equality with the reference.

Compiling is slow on a 2-core machine (Inductor generates and builds C++), so the compiled path is checked on
a handful of representative configurations -- each a different set of fused kernels -- rather than the whole
suite; the reference path is what every other test runs.
"""

from __future__ import annotations

import pytest
import torch

import flexbn
from conftest import assert_close
from flexbn._core import autograd, backend, stats

needs_compiler = pytest.mark.skipif(
    not backend.available("cpu"), reason="no C++ compiler for Inductor's CPU code"
)


def test_choice_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEXBN_BACKEND", raising=False)
    assert (
        flexbn.get_backend() == "reference"
    )  # the default until the compiled path is measured faster
    with flexbn.use_backend("auto"):
        assert flexbn.get_backend() == "auto"
        with flexbn.use_backend("reference"):
            assert flexbn.get_backend() == "reference"
        assert flexbn.get_backend() == "auto"
    monkeypatch.setenv("FLEXBN_BACKEND", "auto")
    assert flexbn.get_backend() == "auto"
    monkeypatch.setenv("FLEXBN_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'reference', 'compiled'"):
        flexbn.get_backend()
    with pytest.raises(ValueError, match="but got 'fast'"):
        flexbn.set_backend("fast")
    monkeypatch.setenv("FLEXBN_BACKEND", "reference")
    try:
        flexbn.set_backend("auto")  # an explicit choice overrides the environment
        assert flexbn.get_backend() == "auto"
    finally:
        flexbn.set_backend(None)
    assert flexbn.get_backend() == "reference"


def test_explicit_compiled_without_compiler_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "available", lambda device: False)
    monkeypatch.setattr(backend, "_why_not", lambda device: "no C++ compiler found")
    with pytest.raises(RuntimeError, match="'compiled' is unavailable here: no C\\+\\+ compiler"):
        flexbn.set_backend("compiled")
    with pytest.raises(RuntimeError, match="unavailable"), flexbn.use_backend("compiled"):
        pass
    with flexbn.use_backend("auto"):  # automatic selection falls back silently
        y = flexbn.batch_norm(torch.randn(4, 3), None, None, training=True)
    assert y.shape == (4, 3)


CONFIGS = {
    # name: (shape, dtype, channels_last, forward kwargs, module kwargs)
    "NCHW-float32": ((8, 4, 5, 6), torch.float32, False, {}, {}),
    "channels_last-detach_var": ((8, 4, 5, 6), torch.float32, True, {}, {"detach_var": True}),
    "NCL-float64-mask-groups": ((6, 3, 7), torch.float64, False, {"mask": True, "groups": True}, {}),
    "NC-stats_input-detach_mean": ((16, 5), torch.float32, False, {"stats_input": True},
                                   {"detach_mean": True}),
}  # fmt: skip


def _run(name: str, which: str) -> tuple[torch.Tensor, ...]:
    shape, dtype, channels_last, fwd, options = CONFIGS[name]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    kwargs = {}
    if fwd.get("mask"):
        kwargs["mask"] = torch.rand((shape[0], *shape[2:]), generator=gen) > 0.3
        kwargs["mask"][:, 0] = True
    if fwd.get("groups"):
        kwargs["groups"] = torch.tensor([0, 1, 0, 1, 1, 0])
    z = None
    if fwd.get("stats_input"):
        z = (x.detach() * 1.5 + 0.2).requires_grad_()
        kwargs["stats_input"] = z
    bn = {2: flexbn.BatchNorm1d, 3: flexbn.BatchNorm1d, 4: flexbn.BatchNorm2d}[len(shape)]
    module = bn(shape[1], **options).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(shape[1], generator=gen))
        module.bias.copy_(torch.randn(shape[1], generator=gen))
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    with flexbn.use_backend(which):
        y = module(x, **kwargs)
        y.backward(g)
        module.eval()
        y_eval = module(x.detach(), **{k: v for k, v in kwargs.items() if k == "mask"})
    grads = (x.grad, module.weight.grad, module.bias.grad) + (() if z is None else (z.grad,))
    return (y, y_eval, module.running_mean, module.running_var, *grads)


@needs_compiler
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_equals_reference(name: str) -> None:
    before = {
        f: len(f.compiled) for f in (stats.moments, autograd.normalize, autograd.backward_formula)
    }
    compiled = _run(name, "compiled")
    reference = _run(name, "reference")
    for a, b in zip(compiled, reference, strict=True):
        assert_close(a, b)
    after = {f: len(f.compiled) for f in before}
    assert after != before or all(after.values())  # the compiled path did run (or had run already)
    assert compiled[0].is_contiguous(memory_format=torch.channels_last) == CONFIGS[name][2]


@needs_compiler
def test_reference_where_compiling_cannot_help() -> None:
    """Under torch.func transforms, double backward and the user's own compile, the reference runs."""
    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    count = len(stats.moments.compiled)
    with flexbn.use_backend("compiled"):
        y = torch.func.vmap(lambda t: flexbn.batch_norm(t, None, None, training=True))(x)
        gx = torch.autograd.grad(
            (flexbn.batch_norm(x[0], None, None, training=True) ** 3).sum(), x, create_graph=True
        )[0]
        gx.sum().backward()
    assert y.shape == x.shape
    assert len(stats.moments.compiled) <= count + 1  # at most the double backward's first forward


def test_auto_falls_back_when_compiling_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: a configuration the compiler cannot build runs the reference (same result), once failed
    never retried; compiled: the error propagates."""
    calls = []

    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            calls.append(fn.__name__)
            raise RuntimeError("C++ compile error: cannot find Python.h")

        return run

    monkeypatch.setattr(backend, "available", lambda device: True)
    monkeypatch.setattr(torch, "compile", broken_compile)
    functions = (stats.moments, autograd.normalize, autograd.backward_formula)
    saved = {f: dict(f.compiled) for f in functions}
    try:
        for f in functions:
            f.compiled.clear()
        x = torch.randn(6, 3, 4, requires_grad=True)
        expected = flexbn.batch_norm(x, None, None, training=True)
        with flexbn.use_backend("auto"):
            for _ in range(2):
                assert_close(flexbn.batch_norm(x, None, None, training=True), expected)
        assert calls.count("moments") == 1  # the failed configuration is not compiled again
        with flexbn.use_backend("compiled"):
            stats.moments.compiled.clear()
            with pytest.raises(RuntimeError, match=r"cannot find Python\.h"):
                flexbn.batch_norm(x, None, None, training=True)
    finally:  # the real compiled copies, for the tests that follow
        for f in functions:
            f.compiled.clear()
            f.compiled.update(saved[f])
