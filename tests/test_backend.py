"""The backend choice (auto / reference / cpp / compiled), which calls the C++ kernels take, and the
compiled path's equality with the reference. How the kernels are obtained and called safely:
``test_native.py``; their accuracy at every size threshold: ``test_kernel_thresholds.py``.

Every other test runs on both the reference and the C++ kernels (``conftest.BACKEND_PARAMS``). Compiling
with Inductor is slow on a 2-core machine, so the compiled path is checked on a handful of representative
configurations -- each a different set of fused kernels -- rather than the whole suite.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import flexbn
from conftest import assert_close
from flexbn._core import autograd, backend, kernels, stats

needs_kernels = pytest.mark.skipif(
    not backend.cpp_available(), reason="no C++ compiler for the kernels"
)
needs_compiler = pytest.mark.skipif(
    not backend.available("cpu"), reason="no C++ compiler for Inductor's CPU code"
)

pytestmark = pytest.mark.one_backend  # these tests choose their backends themselves


def test_choice_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEXBN_BACKEND", raising=False)
    assert flexbn.get_backend() == "auto"
    with flexbn.use_backend("auto"):
        assert flexbn.get_backend() == "auto"
        with flexbn.use_backend("reference"):
            assert flexbn.get_backend() == "reference"
        assert flexbn.get_backend() == "auto"
    monkeypatch.setenv("FLEXBN_BACKEND", "auto")
    assert flexbn.get_backend() == "auto"
    monkeypatch.setenv("FLEXBN_BACKEND", "fast")
    with pytest.raises(
        ValueError, match="backend must be one of 'auto', 'reference', 'cpp', 'compiled'"
    ):
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


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls: dict[str, int] = {}
    for name, fn in list(kernels.IMPLEMENTATIONS.items()):

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(kernels.IMPLEMENTATIONS, name, counted)
    return calls


@needs_kernels
@pytest.mark.parametrize("which", ["auto", "cpp"])
def test_kernels_run_on_cpu(monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """auto and cpp run the C++ kernels for CPU training and eval, forward and backward, every dtype."""
    calls = _count_kernel_calls(monkeypatch)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(6, 3, 4, dtype=dtype, requires_grad=True)
        with flexbn.use_backend(which):
            y = flexbn.batch_norm(x, None, None, training=True)
            y.sum().backward()
            stat = torch.float32 if dtype == torch.bfloat16 else dtype
            flexbn.batch_norm(
                x, torch.zeros(3, dtype=stat), torch.ones(3, dtype=stat), training=False
            )
        with flexbn.use_backend("reference"):
            expected = flexbn.batch_norm(x.double(), None, None, training=True)
        assert y.dtype == dtype
        assert_close(y, expected, dtype=dtype)
    assert calls == {"moments": 3, "normalize": 6, "backward_formula": 3}


@needs_kernels
def test_kernels_leave_transforms_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.func transforms and double backward the reference runs (it builds graphs); empty
    input too."""
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    with flexbn.use_backend("cpp"):
        torch.func.vmap(lambda t: flexbn.batch_norm(t, None, None, training=True))(x)
        y = flexbn.batch_norm(x[0], None, None, training=True)
        assert calls.pop("moments") == 1
        assert calls.pop("normalize") == 1
        (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
        assert "backward_formula" not in calls
        gx.sum().backward()  # reaches y's own (first-order) backward once more: that one is a kernel
        assert calls.pop("backward_formula") == 1
        flexbn.batch_norm(torch.empty(0, 3), torch.zeros(3), torch.ones(3), training=False)
    assert not calls


@needs_kernels
def test_cpp_on_other_devices_raises() -> None:
    with (
        flexbn.use_backend("cpp"),
        pytest.raises(RuntimeError, match="CPU tensors only, not on meta"),
    ):
        flexbn.batch_norm(torch.randn(4, 3, device="meta"), None, None, training=True)


@needs_kernels
def test_kernels_check_segment_ids() -> None:
    """A segment id outside the table is refused by the kernel itself (no out-of-bounds write)."""
    x = torch.randn(4, 3)
    seg = stats.Segments(ids=torch.tensor([0, 1, 2, 5]), num=3, counts=torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"segment ids must lie in \[0, number of segments\)"):
        kernels.moments(x, seg)


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


def test_compiled_lets_compiler_errors_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """compiled runs only on request, so a compiler that cannot build a configuration is the caller's to
    see; auto never compiles (CPU tensors take the C++ kernels or the reference)."""
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
        with flexbn.use_backend("auto"):
            flexbn.batch_norm(x, None, None, training=True)
        assert not calls
        with flexbn.use_backend("compiled"), pytest.raises(RuntimeError, match=r"Python\.h"):
            flexbn.batch_norm(x, None, None, training=True)
        assert calls == ["moments"]
    finally:  # the real compiled copies, for the tests that follow
        for f in functions:
            f.compiled.clear()
            f.compiled.update(saved[f])


@needs_kernels
def test_kernels_with_a_smaller_openmp_team() -> None:
    """OMP_THREAD_LIMIT caps the team below torch's thread count: the row-split kernels (channels-last and
    (N, C) input) follow the team that actually runs (they crashed reading the missing threads' tables)."""
    code = (
        "import torch, flexbn\n"
        "torch.set_num_threads(2)\n"
        "x = torch.randn(4096, 8, dtype=torch.float64, requires_grad=True)\n"
        "flexbn.set_backend('cpp'); y = flexbn.batch_norm(x, None, None, training=True)\n"
        "y.backward(torch.randn_like(y))\n"
        "flexbn.set_backend('reference'); z = flexbn.batch_norm(x, None, None, training=True)\n"
        "assert torch.allclose(y, z, atol=1e-12), (y - z).abs().max()\n"
        "print('ok')"
    )
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@needs_kernels
def test_negated_views_are_read_as_their_values() -> None:
    """A lazily negated tensor (neg bit) holds -x in memory as x: the kernels leave it to the reference."""
    base = torch.randn(6, 3, 4, dtype=torch.float64)
    neg = torch._neg_view(base)
    assert neg.is_neg()
    with flexbn.use_backend("cpp"):
        y = flexbn.batch_norm(neg, None, None, training=True)
        expected = flexbn.batch_norm(neg.resolve_neg(), None, None, training=True)
    assert_close(y, expected)


def test_auto_leaves_other_devices_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto never picks the (unmeasured) compiled path for non-CPU tensors, even where it could run;
    explicit compiled does."""
    monkeypatch.setattr(backend, "available", lambda device: True)
    args = (torch.empty(4, 3, device="meta"), stats.WHOLE)
    with flexbn.use_backend("auto"):
        assert backend._choose(args) == "reference"
    with flexbn.use_backend("compiled"):
        assert backend._choose(args) == "compiled"
