"""The ``triton`` backend (``flexbn/_core/triton_kernels.py``): its operations against the float64 reference,
and how it is chosen.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set per test by the ``device``
fixture) on CPU tensors: the same kernel source, tile loops, unit merges and masks, executed with numpy.
With a GPU every kernel test runs a second time on CUDA tensors, compiled (``benchmarks/gpu_check.py``).
The interpreter runs the kernels with small tiles, so these shapes cross every tile, unit and channel-block
boundary (``triton_kernels._launch``); the GPU's tile sizes are checked by compiling every configuration
for sm_90 (``test_kernels_compile_for_sm90``: Triton's compiler needs no GPU).

Each case compares with ``reference`` run in float64 on the same (rounded) input values: the currency to
float32 accuracy (float64 input: 1e-10), outputs and gradients within ``conftest.TOL`` of their dtype.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest
import torch
from torch import Tensor

import flexbn
from conftest import assert_close, manual_batch_norm
from flexbn import _core
from flexbn._core import backend, reference
from flexbn._core.segments import Segments, chunks
from flexbn._core.stats import Moments

pytestmark = pytest.mark.one_backend  # the backend is the subject

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

DEVICES = [pytest.param("cpu", id="interpreted", marks=needs_triton)]
if torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", id="cuda", marks=needs_triton))

EPS = 1e-5
DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
    pytest.param(torch.float64, id="float64"),
]
# (size, memory format): the layouts the kernels distinguish (NCL and NLC, 2-D and 5-D included)
LAYOUTS = {
    "nchw": ((6, 5, 4, 3), torch.contiguous_format),
    "channels_last": ((6, 5, 4, 3), torch.channels_last),
    "nc": ((40, 5), torch.contiguous_format),
    "ncl": ((6, 5, 7), torch.contiguous_format),
    "channels_last_3d": ((4, 3, 2, 3, 2), torch.channels_last_3d),
}
# The statistics sets, as segmentations of the batch.
SEGSETS = ["whole", "mask", "bags", "ghost", "domain", "mask_bags"]
DOMAINS = 4  # domain 2 is absent from the batch: an empty segment


@pytest.fixture
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The device the kernels run on; CPU tensors in Triton's interpreter."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES, indirect=True)


def _tk() -> Any:
    from flexbn._core import triton_kernels

    return triton_kernels


def _segments(kind: str, x: Tensor) -> Segments:
    n, spatial = x.shape[0], (x.shape[0], *x.shape[2:])
    mask = None
    if "mask" in kind:
        mask = torch.rand(spatial, device=x.device) < 0.7
        if x.dim() > 2:
            mask.reshape(n, -1)[:, 0] = True  # every sample keeps a value: no segment is empty
    if kind in ("whole", "mask"):
        return Segments(mask=mask)
    if kind in ("bags", "mask_bags"):
        ids = torch.arange(n) % 3
        return Segments(ids[torch.randperm(n)].to(x.device), 3, mask)
    if kind == "ghost":
        ids, num = chunks(n, 2, x.device)
        return Segments(ids, num, mask)
    ids = torch.tensor([0, 1, 3])[torch.arange(n) % 3]
    return Segments(ids[torch.randperm(n)].to(x.device), DOMAINS, mask)


def _input(layout: str, dtype: torch.dtype, device: str, offset: float = 3.0) -> Tensor:
    size, fmt = LAYOUTS[layout]
    x = torch.randn(size) * 2 + offset
    return x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def _params(kind: str, c: int, device: str) -> tuple[Tensor, Tensor]:
    """Random weight and bias: per channel, or per domain for the domain set."""
    rows = (DOMAINS,) if kind == "domain" else ()
    return torch.randn(*rows, c, device=device), torch.randn(*rows, c, device=device)


def _f64(m: Moments) -> Moments:
    return Moments(*(t.double() for t in m))


def _check_moments(got: Moments, want: Moments, dtype: torch.dtype) -> None:
    assert got.count.dtype == got.mean.dtype == got.m2.dtype == torch.float64
    torch.testing.assert_close(got.count, want.count, atol=0, rtol=0)
    accumulated = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(got.mean, want.mean, dtype=accumulated)
    scale = want.m2.abs().max().clamp_min(1)  # m2 grows with the count
    assert_close(got.m2 / scale, want.m2 / scale, dtype=accumulated)


# -------------------------------------------------------------------------------------------------------
# The operations against the reference.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", SEGSETS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_operations(device: str, layout: str, kind: str, dtype: torch.dtype) -> None:
    """moments, normalize, running_update and the fused forward (statistics, running update, output)."""
    tk = _tk()
    x = _input(layout, dtype, device)
    seg = _segments(kind, x)
    weight, bias = _params(kind, x.shape[1], device)
    xd = x.double()
    want = reference.moments(xd, seg)
    _check_moments(tk.moments(x, seg), want, dtype)

    y = tk.normalize(x, weight, bias, want, EPS, seg)
    y_ref = reference.normalize(xd, weight.double(), bias.double(), want, EPS, seg)
    assert y.dtype == x.dtype
    assert y.stride() == y_ref.stride()  # the reference's layout
    assert_close(y, y_ref, dtype=dtype)

    rows = (DOMAINS,) if kind == "domain" else ()
    buffers = (
        torch.randn(*rows, x.shape[1], device=device),
        torch.rand(*rows, x.shape[1], device=device),
    )
    expected = tuple(b.double() for b in buffers)
    reference.running_update(*expected, want, 0.1)
    check = 2 if kind == "domain" else (1 if seg.ids is not None else 0)
    y2, m2 = tk.forward(x, x, weight, bias, buffers, 0.1, EPS, seg, check)
    _check_moments(m2, want, dtype)
    assert_close(y2, y_ref, dtype=dtype)
    assert_close(buffers[0], expected[0], dtype=torch.float32)
    assert_close(buffers[1], expected[1], dtype=torch.float32)
    assert buffers[0].isfinite().all()  # a domain absent from the batch keeps its statistics


@pytest.mark.parametrize("momentum", ["scalar_tensor", "per_domain"])
def test_running_update_momentum_tensor(device: str, momentum: str) -> None:
    """The cumulative average passes momentum as a tensor: one value, or one per domain (no sync)."""
    tk = _tk()
    x = _input("nchw", torch.float32, device)
    seg = _segments("domain", x)
    m = reference.moments(x.double(), seg)
    factor = torch.tensor(0.25) if momentum == "scalar_tensor" else torch.rand(DOMAINS, 1)
    buffers = (torch.randn(DOMAINS, 5, device=device), torch.rand(DOMAINS, 5, device=device))
    expected = tuple(b.double() for b in buffers)
    reference.running_update(*expected, m, factor.double())
    tk.running_update(*buffers, m, factor.to(device))
    assert_close(buffers[0], expected[0])
    assert_close(buffers[1], expected[1])


@pytest.mark.parametrize("buffers", ["float16", "float64", "per_channel_of_segments"])
def test_running_update_buffers(device: str, buffers: str) -> None:
    """Buffers of another dtype are written in it; per-channel buffers of several segments receive the
    mean over segments (ghost batches)."""
    tk = _tk()
    x = _input("nchw", torch.float32, device)
    seg = _segments("ghost" if buffers == "per_channel_of_segments" else "whole", x)
    m = reference.moments(x.double(), seg)
    dtype = {"float16": torch.float16, "float64": torch.float64}.get(buffers, torch.float32)
    rm, rv = torch.randn(5, device=device, dtype=dtype), torch.rand(5, device=device, dtype=dtype)
    em, ev = rm.double(), rv.double()
    reference.running_update(em, ev, m, 0.1)
    assert tk.running_supported(rm, rv)
    tk.running_update(rm, rv, m, 0.1)
    assert rm.dtype == dtype
    assert_close(rm, em, dtype=dtype)
    assert_close(rv, ev, dtype=dtype)


@pytest.mark.parametrize("check", [1, 2])
def test_forward_lonely_segment_changes_nothing(device: str, check: int) -> None:
    """A segment of one value: no output, and the running statistics are left as they were."""
    tk = _tk()
    x = _input("nc", torch.float32, device)[:5]
    ids = torch.tensor([0, 0, 1, 2, 2], device=device)  # segment 1 holds one value per channel
    buffers = (torch.zeros(5, device=device), torch.ones(5, device=device))
    y, m = tk.forward(x, x, None, None, buffers, 0.1, EPS, Segments(ids, 3), check)
    assert y is None
    assert m.count.tolist() == [2, 1, 2]
    assert buffers[0].eq(0).all()
    assert buffers[1].eq(1).all()


MODES = [
    pytest.param(True, True, id="full"),
    pytest.param(False, True, id="detach_mean"),
    pytest.param(True, False, id="detach_var"),
    pytest.param(False, False, id="detach_both"),
]


def _backward_case(
    tk: Any,
    x: Tensor,
    z: Tensor | None,
    kind: str,
    grad_mean: bool,
    grad_var: bool,
    needs: tuple[bool, bool, bool, bool],
    synchronised: bool = False,
) -> None:
    device, dtype = x.device.type, x.dtype
    seg = _segments(kind, x)
    weight, _ = _params(kind, x.shape[1], device)
    source = x if z is None else z
    m = reference.moments(source.double(), seg)
    g = torch.randn(x.shape, device=device).to(dtype)
    if "mask" in kind:  # masked-out positions hold NaN padding: it must reach no sum
        kept = seg.kept.expand(x.shape)
        x = torch.where(kept, x, torch.nan).contiguous(memory_format=reference.memory_format(x))
    bias_rows = DOMAINS if kind == "domain" else 1
    args = dict(grad_mean=grad_mean, grad_var=grad_var, needs=needs, bias_rows=bias_rows)
    gd, xd, zd, wd = (None if t is None else t.double() for t in (g, x, z, weight))
    sums = local = sums_ref = local_ref = None
    if synchronised:  # as SyncBatchNorm: the sums added across ranks (here: this rank's, doubled)
        local = tk.backward_sums(g, x, m, seg)
        local_ref = reference.backward_sums(gd, xd, m, seg)
        for got, want in zip(local, local_ref, strict=True):
            assert got.dtype == torch.float64
            assert_close(got, want, dtype=torch.float32)
        sums, sums_ref = tuple(2 * s for s in local), tuple(2 * s for s in local_ref)
    got = tk.backward(g, x, z, weight, m, EPS, seg, sums, local, **args)
    want = reference.backward(gd, xd, zd, wd, m, EPS, seg, sums_ref, local_ref, **args)
    for name, a, b, t in zip("xwbz", got, want, (x, weight, weight, z), strict=True):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, name
        if name in "xz":
            assert a.dtype == t.dtype, name
            assert a.stride() == b.stride(), name
        assert_close(a, b, dtype=t.dtype if name in "xz" else torch.float32, msg=f"grad {name}")


@pytest.mark.parametrize("stats_input", [False, True], ids=["x", "stats_input"])
@pytest.mark.parametrize(("grad_mean", "grad_var"), MODES)
@pytest.mark.parametrize("kind", SEGSETS)
def test_backward_modes(
    device: str, kind: str, grad_mean: bool, grad_var: bool, stats_input: bool
) -> None:
    """Every gradient mode on every statistics set, statistics from the input or from stats_input."""
    x = _input("nchw", torch.float32, device)
    z = _input("nchw", torch.float32, device, offset=-1.0) if stats_input else None
    needs = (True, True, True, stats_input)
    _backward_case(_tk(), x, z, kind, grad_mean, grad_var, needs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_layouts(device: str, layout: str, dtype: torch.dtype) -> None:
    x = _input(layout, dtype, device)
    _backward_case(_tk(), x, None, "mask_bags", True, True, (True, True, True, False))


@pytest.mark.parametrize(
    "needs",
    [(True, False, False, False), (False, True, True, False), (False, False, True, False)],
    ids=["input_only", "parameters_only", "bias_only"],
)
def test_backward_needs(device: str, needs: tuple[bool, bool, bool, bool]) -> None:
    """Only what is asked for is computed (and returned)."""
    _backward_case(
        _tk(), _input("channels_last", torch.float32, device), None, "mask", True, True, needs
    )


@pytest.mark.parametrize("kind", ["whole", "mask_bags", "domain"])
def test_backward_synchronised(device: str, kind: str) -> None:
    """The sums of SyncBatchNorm's backward, and the gradients from sums added across ranks."""
    x = _input("nchw", torch.float32, device)
    _backward_case(_tk(), x, None, kind, True, True, (True, True, True, False), synchronised=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc", "ncl"])
def test_large_offset(device: str, layout: str) -> None:
    """Mean 1e4, standard deviation 0.1, float32: the shifted sums keep the statistics exact to a few
    units of float32 rounding (the C++ kernels' bounds, docs/numerics.md), where E[x^2] - E[x]^2 in
    float32 loses everything (the negative check)."""
    size, fmt = LAYOUTS[layout]
    x = (torch.randn(size) * 0.1 + 1e4).to(device).contiguous(memory_format=fmt)
    seg = _segments("mask_bags", x)
    want = reference.moments(x.double(), seg)
    got = _tk().moments(x, seg)
    std = want.var.sqrt()
    assert ((got.mean - want.mean).abs() / std).max() < 1e-6
    assert ((got.var - want.var).abs() / want.var).max() < 2e-6
    naive = (x.float() ** 2).mean() - x.float().mean() ** 2  # (whole batch, float32)
    exact = x.double().var(unbiased=False).item()
    assert abs(naive.item() - exact) / exact > 0.1


# -------------------------------------------------------------------------------------------------------
# Through flexbn's public calls, with autograd: the backend end to end.


CALLS = {
    "standard": {},
    "detach_var": {"detach_var": True},
    "mask": {"mask": True},
    "groups": {"groups": True},
    "ghost": {"virtual_batch_size": 2},
    "stats_input": {"stats_input": True, "detach_mean": True},
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("call", list(CALLS))
def test_batch_norm_end_to_end(device: str, call: str, layout: str) -> None:
    """flexbn.batch_norm on the triton backend: output, every gradient and the running statistics, equal
    to the same call on the reference backend in float64."""
    opts = dict(CALLS[call])
    x = _input(layout, torch.float32, device)
    c = x.shape[1]
    if opts.pop("mask", False):
        opts["mask"] = _segments("mask", x).mask
    if opts.pop("groups", False):
        opts["groups"] = torch.tensor([5, 9, 5, 7, 9, 7], device=device)
    z = None
    if opts.pop("stats_input", False):
        z = _input(layout, torch.float32, device, offset=1.0).requires_grad_()
        opts["stats_input"] = z
    weight = torch.randn(c, device=device, requires_grad=True)
    bias = torch.randn(c, device=device, requires_grad=True)
    g = torch.randn(x.shape, device=device)

    def run(name: str, dtype: torch.dtype) -> list[Tensor]:
        xi = x.to(dtype).requires_grad_()
        w, b = weight.detach().to(dtype).requires_grad_(), bias.detach().to(dtype).requires_grad_()
        extra = dict(opts)
        zi = None
        if z is not None:
            zi = extra["stats_input"] = z.detach().to(dtype).requires_grad_()
        rm, rv = (
            torch.zeros(c, device=device, dtype=dtype),
            torch.ones(c, device=device, dtype=dtype),
        )
        with flexbn.use_backend(name):
            y = flexbn.batch_norm(xi, rm, rv, w, b, training=True, **extra)
            inputs = [t for t in (xi, w, b, zi) if t is not None]
            grads = torch.autograd.grad(y, inputs, g.to(dtype))
        return [y, *grads, rm, rv]

    for got, want in zip(
        run("triton", torch.float32), run("reference", torch.float64), strict=True
    ):
        assert_close(got, want, dtype=torch.float32)


def test_module_and_standard_path_match_torch(device: str) -> None:
    """BatchNorm2d on the triton backend equals torch.nn.BatchNorm2d (float64 composition), and its eval
    still runs torch's own operator."""
    x = _input("channels_last", torch.float32, device).requires_grad_()
    bn = flexbn.BatchNorm2d(5).to(device)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    with flexbn.use_backend("triton"):
        y = bn(x)
    want = manual_batch_norm(x, bn.weight, bn.bias)
    assert_close(y, want, dtype=torch.float32)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, bn.weight, bn.bias), g)
    expected = torch.autograd.grad(want, (x, bn.weight, bn.bias), g.double())
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, dtype=torch.float32)


# -------------------------------------------------------------------------------------------------------
# Choice: explicit only, clear errors, auto never picks it.


def test_in_backends() -> None:
    assert "triton" in flexbn.BACKENDS


def test_missing_triton_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Triton, asking for the backend says what is missing and how to install it."""
    monkeypatch.setitem(sys.modules, "flexbn._core.triton_kernels", None)  # import fails
    monkeypatch.delattr(_core, "triton_kernels", raising=False)
    with pytest.raises(
        RuntimeError, match=r"'triton' is unavailable here: .*pip install 'flexbn\[cuda\]'"
    ):
        flexbn.set_backend("triton")
    with pytest.raises(RuntimeError, match="needs Triton"):
        backend.implementation("triton", torch.randn(4, 3))
    assert flexbn.get_backend() != "triton"


@needs_triton
def test_no_cuda_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CUDA device and no interpreter: set_backend raises naming both, a call on CPU tensors too."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"no CUDA device .*TRITON_INTERPRET=1"):
        flexbn.set_backend("triton")
    with pytest.raises(RuntimeError, match="cannot run this call: the Triton kernels run on CUDA"):
        backend.implementation("triton", torch.randn(4, 3))


@needs_triton
def test_implementation_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreted CPU tensors run the kernels; meta tensors (shapes only), transforms' tensors and inputs
    the kernels do not take run the reference."""
    tk = _tk()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.implementation("triton", torch.randn(4, 3)) is tk
    assert backend.implementation("triton", torch.empty(4, 3, device="meta")) is reference
    assert backend.implementation("triton", torch.empty(0, 3)) is reference
    assert backend.implementation("triton", torch.ones(4, 3, dtype=torch.int64)) is reference
    seen: list[Any] = []

    def choose(t: Tensor) -> Tensor:
        seen.append(backend.implementation("triton", t))
        return t

    torch.func.vmap(choose)(torch.randn(2, 4, 3))
    assert seen == [reference]


class _FakeCuda:
    """Enough of a CUDA tensor for the choice (no CUDA here)."""

    device = torch.device("cuda", 0)
    is_cpu = False

    def is_floating_point(self) -> bool:
        return True

    def numel(self) -> int:
        return 1


@needs_triton
def test_auto_never_picks_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto never runs the (unmeasured) Triton kernels: CUDA tensors with options get the reference,
    CPU tensors the C++ kernels or the reference -- even with the interpreter on."""
    tk = _tk()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.implementation("auto", _FakeCuda()) is reference
    assert backend.implementation("auto", torch.randn(4, 3)) is not tk
    ran: list[str] = []
    for op in ("forward", "moments", "normalize", "backward"):
        real = getattr(tk, op)
        monkeypatch.setattr(tk, op, lambda *a, _r=real, _op=op, **k: ran.append(_op) or _r(*a, **k))
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    with flexbn.use_backend("auto"):
        y = flexbn.batch_norm(
            x, None, None, training=True, detach_var=True, mask=torch.rand(8, 4, 4) > 0.2
        )
        y.sum().backward()
    assert ran == []


def test_auto_runs_torch_off_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 1 of issue 15: on any device but the CPU, a call without flexbn options -- training or eval --
    runs torch's own batch-norm operator under auto (cuDNN / native CUDA on a GPU). Meta tensors stand in
    for CUDA here; ``test_cuda_standard_path_is_torch`` checks the real device."""
    calls: list[bool] = []
    real = torch.batch_norm

    def spy(*args: Any) -> Tensor:
        calls.append(args[5])  # training
        return real(*args)

    monkeypatch.setattr(torch, "batch_norm", spy)
    x = torch.empty(
        32, 64, 56, 56, device="meta"
    )  # large: on CPU this size would run flexbn's kernels
    rm, rv = torch.zeros(64, device="meta"), torch.ones(64, device="meta")
    with flexbn.use_backend("auto"):
        flexbn.batch_norm(x, rm, rv, training=True)
        flexbn.batch_norm(x, rm, rv, training=False)
    assert calls == [True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.py)")
def test_cuda_standard_path_is_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, the default standard path is torch's operator: bitwise F.batch_norm's result."""
    x = torch.randn(16, 8, 10, 10, device="cuda")
    w, b = torch.randn(8, device="cuda"), torch.randn(8, device="cuda")
    stats = [torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")]
    theirs = [s.clone() for s in stats]
    with flexbn.use_backend("auto"):
        y = flexbn.batch_norm(x, *stats, w, b, training=True)
    want = torch.nn.functional.batch_norm(x, *theirs, w, b, training=True)
    assert torch.equal(y, want)
    assert torch.equal(stats[0], theirs[0])


# -------------------------------------------------------------------------------------------------------
# The kernels compiled for the GPU, without one.


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel configuration a representative set of calls launches, at the GPU's tile sizes,
    compiles for an H100/H200 (sm_90) with Triton's own compiler: what the interpreter cannot check
    (types of loop-carried values, constexpr branches, layouts). About 60 configurations, cached by
    Triton on disk after the first run."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    tk = _tk()
    found: dict[Any, tuple[Any, dict[str, Any], dict[str, Any]]] = {}

    class Recorder:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            def record(*args: Any, **constexprs: Any) -> None:
                jit = triton.JITFunction(self.fn)
                signature = {
                    name: "constexpr" if a is None else mangle_type(a)
                    for name, a in zip(jit.arg_names, args, strict=False)
                }
                consts = {
                    name: None for name, a in zip(jit.arg_names, args, strict=False) if a is None
                }
                consts.update({k: v for k, v in constexprs.items() if k in jit.arg_names})
                signature.update({k: "constexpr" for k in consts})
                key = (
                    self.fn.__name__,
                    repr(sorted(signature.items())),
                    repr(sorted(consts.items(), key=str)),
                )
                found.setdefault(key, (jit, signature, consts))

            return record

    monkeypatch.setattr(
        tk,
        "_kernels",
        lambda interpret: tuple(Recorder(f) for f in (tk._reduce, tk._tables, tk._apply)),
    )
    monkeypatch.setattr(tk, "_interpreted", lambda device: False)  # the GPU's tile sizes
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for layout in ("nchw", "channels_last"):
            x = _input(layout, dtype, "cpu")
            for kind in ("whole", "mask_bags", "domain"):
                seg = _segments(kind, x)
                w, b = _params(kind, 5, "cpu")
                m = reference.moments(x.double(), seg)
                g = torch.randn(x.shape).to(dtype)
                rows = (DOMAINS,) if kind == "domain" else ()
                buffers = (torch.zeros(*rows, 5), torch.ones(*rows, 5))
                tk.moments(x, seg)
                tk.forward(x, x, w, b, buffers, 0.1, EPS, seg, 0)
                tk.forward(x, x, w, b, buffers, torch.tensor(0.5), EPS, seg, 0)
                tk.normalize(x, w, b, m, EPS, seg)
                sums = tk.backward_sums(g, x, m, seg)
                for gm, gv in ((True, True), (False, True), (True, False), (False, False)):
                    tk.backward(
                        g,
                        x,
                        None,
                        w,
                        m,
                        EPS,
                        seg,
                        None,
                        None,
                        grad_mean=gm,
                        grad_var=gv,
                        needs=(True, True, True, False),
                        bias_rows=rows[0] if rows else 1,
                    )
                tk.backward(
                    g,
                    x,
                    x,
                    w,
                    m,
                    EPS,
                    seg,
                    sums,
                    sums,
                    grad_mean=True,
                    grad_var=True,
                    needs=(True, True, True, True),
                    bias_rows=rows[0] if rows else 1,
                )
    tk.running_update(
        torch.zeros(5, dtype=torch.float16), torch.ones(5, dtype=torch.float16), m, 0.1
    )
    assert len(found) > 40
    target = GPUTarget("cuda", 90, 32)
    for (name, _, _), (jit, signature, consts) in found.items():
        kernel = triton.compile(
            ASTSource(jit, signature, consts), target=target, options=tk._OPTIONS
        )
        assert kernel.asm["cubin"], name
