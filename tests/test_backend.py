"""The backend choice (auto / reference / cpp / compiled): which implementation runs each call, what auto
routes to torch's own batch norm, and the compiled path's equality with the reference. How the kernels are
obtained and called safely: ``test_native.py``; their accuracy at every size threshold:
``test_kernel_thresholds.py``; threads choosing their own backends: ``test_tracing.py``.

Every other test runs on both the reference and the C++ kernels (``conftest.BACKEND_PARAMS``). Compiling
with Inductor is slow on a 2-core machine, so the compiled path is checked on a handful of representative
configurations -- each a different set of fused kernels -- rather than the whole suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

import flexbn
from conftest import assert_close
from flexbn import _core
from flexbn._core import backend, compiled, kernels, reference

needs_kernels = pytest.mark.skipif(
    not backend.cpp_available(), reason="no C++ compiler for the kernels"
)
needs_compiler = pytest.mark.skipif(
    not backend.compiled_available("cpu"), reason="no C++ compiler for Inductor's CPU code"
)

pytestmark = pytest.mark.one_backend  # these tests choose their backends themselves

OPERATIONS = ("forward", "moments", "normalize", "running_update", "backward_sums", "backward")


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Which implementation (module name) ran each operation."""
    calls: dict[str, list[str]] = {}
    for module in (kernels, reference):
        label = module.__name__.rsplit(".", 1)[-1]
        for op in OPERATIONS:
            real = getattr(module, op)

            def counted(
                *args: Any, _real: Any = real, _op: str = op, _l: str = label, **kw: Any
            ) -> Any:
                calls.setdefault(_op, []).append(_l)
                return _real(*args, **kw)

            monkeypatch.setattr(module, op, counted)
    return calls


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


@needs_kernels
@pytest.mark.parametrize("which", ["cpp", "auto"])
def test_kernels_run_on_cpu(monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """cpp (and auto, for a batch large enough or with a flexbn option) run the C++ kernels for CPU
    training and eval, forward and backward, every dtype (float16/bfloat16 upcast)."""
    calls = _count_calls(monkeypatch)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(6, 3, 4, dtype=dtype, requires_grad=True)
        with flexbn.use_backend(which):
            y = flexbn.batch_norm(x, None, None, training=True, detach_var=True)
            y.sum().backward()
            mask = torch.ones(6, 4, dtype=torch.bool)
            flexbn.batch_norm(x.detach(), torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype),
                              mask=mask)  # fmt: skip
    assert set(calls["forward"]) == {"kernels"}
    assert set(calls["backward"]) == {"kernels"}
    assert set(calls["normalize"]) == {"kernels"}


@needs_kernels
def test_auto_routes_to_torch_where_it_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: torch's own batch norm for eval with running statistics and for training batches without a
    flexbn option below TORCH_BELOW elements; flexbn's kernels for larger ones and for every option. An
    explicit backend runs flexbn's own everywhere."""
    calls = _count_calls(monkeypatch)
    small = torch.randn(8, 4, 5)
    large = torch.randn(_core.TORCH_BELOW // 16 + 1, 4, 4)
    rm, rv = torch.zeros(4), torch.ones(4)
    with flexbn.use_backend("auto"):
        flexbn.batch_norm(small, rm, rv, training=True)
        flexbn.batch_norm(small, rm, rv, training=False)
        assert not calls
        flexbn.batch_norm(large, rm, rv, training=True)
        assert calls.pop("forward") == ["kernels"]
        flexbn.batch_norm(small, rm, rv, training=True, detach_mean=True)
        assert calls.pop("forward") == ["kernels"]
    with flexbn.use_backend("cpp"):
        flexbn.batch_norm(small, rm, rv, training=True)
        flexbn.batch_norm(small, rm, rv, training=False)
    assert calls == {"forward": ["kernels"], "normalize": ["kernels"]}


@needs_kernels
def test_transforms_and_differentiated_backwards_take_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.func transforms and a differentiated backward (create_graph) run the reference, which builds
    graphs; the kernels take plain eager calls only."""
    calls = _count_calls(monkeypatch)
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    with flexbn.use_backend("cpp"):
        torch.func.grad(lambda x: flexbn.batch_norm(x, None, None, training=True).square().sum())(x)
        assert "kernels" not in calls.get("normalize", [])
        calls.clear()
        y = flexbn.batch_norm(x, None, None, training=True)
        (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
        assert calls["forward"] == ["kernels"]
        assert (
            "backward" not in calls
        )  # the double-backward formula is the reference's, differentiable
        gx.sum().backward()


@needs_kernels
def test_cpp_on_other_devices_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit cpp on a device without the kernels is an error, not a silent fallback."""
    monkeypatch.setattr(backend, "_plain", lambda t: True)
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        backend.implementation("cpp", _FakeCuda())


class _FakeCuda:
    """Enough of a CUDA tensor for the choice (no CUDA here)."""

    device = torch.device("cuda", 0)
    is_cpu = False

    def is_floating_point(self) -> bool:
        return True

    def numel(self) -> int:
        return 1


@needs_kernels
def test_kernels_check_segment_ids() -> None:
    seg = _core.segments.Segments(ids=torch.tensor([0, 1, 2, 5]), num=3)
    with pytest.raises(ValueError, match="segment ids"):
        kernels.moments(torch.randn(4, 3), seg)


def test_explicit_compiled_without_compiler_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "compiled_available", lambda device: False)
    monkeypatch.setattr(backend, "_why_not", lambda device: "no C++ compiler found")
    with pytest.raises(RuntimeError, match="'compiled' is unavailable here: no C\\+\\+ compiler"):
        flexbn.set_backend("compiled")
    with pytest.raises(RuntimeError, match="unavailable"), flexbn.use_backend("compiled"):
        pass
    with flexbn.use_backend("auto"):  # automatic selection never compiles
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
def test_reference_where_compiling_cannot_help() -> None:
    """Under torch.func transforms and double backward the reference runs, whatever the choice."""
    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    count = len(compiled.BACKEND.moments.copies)
    with flexbn.use_backend("compiled"):
        y = torch.func.vmap(lambda t: flexbn.batch_norm(t, None, None, training=True))(x)
        assert len(compiled.BACKEND.moments.copies) == count
        gx = torch.autograd.grad(
            (flexbn.batch_norm(x[0], None, None, training=True) ** 3).sum(), x, create_graph=True
        )[0]
        gx.sum().backward()
    assert y.shape == x.shape


@needs_compiler
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_equals_reference(name: str) -> None:
    """compiled (Inductor-generated C++ loops) computes what the reference does."""
    before = len(compiled.BACKEND.moments.copies) + len(compiled.BACKEND.normalize.copies)
    for expected, actual in zip(_run(name, "reference"), _run(name, "compiled"), strict=True):
        assert_close(actual, expected, msg=name)
    after = len(compiled.BACKEND.moments.copies) + len(compiled.BACKEND.normalize.copies)
    assert after > before or after > 0  # the compiled path did run (or had run already)


def test_compiled_lets_compiler_errors_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """compiled runs only on request, so a compiler that cannot build a configuration is the caller's to
    see; auto never compiles (CPU tensors take the C++ kernels, torch's op or the reference)."""
    calls = []

    def broken_compile(fn: Any, *args: Any, **kwargs: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            calls.append(fn.__name__)
            raise RuntimeError("C++ compile error: cannot find Python.h")

        return run

    monkeypatch.setattr(backend, "compiled_available", lambda device: True)
    monkeypatch.setattr(torch, "compile", broken_compile)
    functions = [getattr(compiled.BACKEND, op) for op in ("moments", "normalize", "backward_sums")]
    saved = [dict(f.copies) for f in functions]
    try:
        for f in functions:
            f.copies.clear()
        x = torch.randn(6, 3, 4, requires_grad=True)
        with flexbn.use_backend("auto"):
            flexbn.batch_norm(x, None, None, training=True)
        assert not calls
        with flexbn.use_backend("compiled"), pytest.raises(RuntimeError, match=r"Python\.h"):
            flexbn.batch_norm(x, None, None, training=True, detach_var=True)
        assert calls == ["moments"]
    finally:  # the real compiled copies, for the tests that follow
        for f, copies in zip(functions, saved, strict=True):
            f.copies.clear()
            f.copies.update(copies)


@needs_kernels
def test_kernels_with_a_smaller_openmp_team() -> None:
    """OMP_THREAD_LIMIT caps the team below torch's thread count: the row-split kernels (channels-last and
    (N, C) input) follow the team that actually runs (they crashed reading the missing threads' tables)."""
    code = (
        "import torch, flexbn\n"
        "from flexbn._core import kernels\n"
        "torch.set_num_threads(2); kernels.GRAIN = 1  # a team of two, however small the input\n"
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
    explicit compiled does (meta tensors: shapes only, always the reference)."""
    monkeypatch.setattr(backend, "compiled_available", lambda device: True)
    monkeypatch.setattr(backend, "_plain", lambda t: not isinstance(t, torch.Tensor) or t.is_cpu)
    assert backend.implementation("auto", _FakeCuda()) is reference
    assert backend.implementation("compiled", _FakeCuda()) is compiled.BACKEND
    assert backend.implementation("compiled", torch.empty(4, 3, device="meta")) is reference


@pytest.mark.parametrize(
    "options", [{}, {"detach_var": True}, {"renorm": True}], ids=["plain", "detach", "renorm"]
)
def test_functional_eval_is_torch_under_auto(
    monkeypatch: pytest.MonkeyPatch, options: dict
) -> None:
    """``flexbn.batch_norm`` in eval with running statistics and no option the eval output depends on
    (the detach flags do not change it) hands the call to torch's operator under ``auto`` (its fixed cost);
    an explicit backend keeps flexbn's."""
    import flexbn.functional as fn

    calls = []
    real = fn._torch_batch_norm
    monkeypatch.setattr(fn, "_torch_batch_norm", lambda *a: calls.append(1) or real(*a))
    x, rm, rv = torch.randn(6, 3, 5), torch.randn(3), torch.rand(3) + 0.5
    w, b = torch.randn(3), torch.randn(3)
    with flexbn.use_backend("auto"):
        y = flexbn.batch_norm(x, rm, rv, w, b, False, **options)
    assert len(calls) == (0 if "renorm" in options else 1)  # renorm's limits: flexbn's checks first
    torch.testing.assert_close(
        y, torch.nn.functional.batch_norm(x, rm, rv, w, b), rtol=0, atol=1e-6
    )
    calls.clear()
    with flexbn.use_backend("reference"):
        flexbn.batch_norm(x, rm, rv, w, b, False)
    assert calls == []
