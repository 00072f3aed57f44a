"""flexbn inside toolchains: every tracer records it faithfully (or raises), batched gradients work.

Models are written the way torchvision and timm write theirs -- in-place ReLU, a residual ``+=`` -- since
that is where a recorded graph that misses what the kernels do would show (a traced graph once returned
garbage without an error). Each recorded graph is run on a *new* input and compared with eager flexbn:
outputs, gradients, running statistics and ``num_batches_tracked``.
"""

from __future__ import annotations

import copy
import io
import threading
import warnings

import pytest
import torch
from torch import Tensor, nn

import flexbn
from conftest import assert_close

OPTIONS = [
    pytest.param({}, id="standard"),
    pytest.param({"detach_var": True}, id="detach_var"),
    pytest.param({"detach_mean": True, "detach_var": True}, id="detach_both"),
    pytest.param({"virtual_batch_size": 2}, id="ghost"),
    pytest.param({"momentum": None}, id="momentum_none"),
]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
GRAD = [pytest.param(True, id="grad"), pytest.param(False, id="no_grad")]


class Block(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu(inplace)-conv-bn, ``out += identity``, relu(inplace)."""

    def __init__(self, c: int, **options: object) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = flexbn.BatchNorm2d(c, **options)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = flexbn.BatchNorm2d(c, **options)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def make_model(options: dict, training: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        flexbn.BatchNorm2d(8, **options),
        nn.ReLU(inplace=True),
        Block(8, **options),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    model.train()
    with torch.no_grad():
        for _ in range(2):  # running statistics away from their initial values
            model(torch.randn(4, 3, 6, 6) * 2 + 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.train(training)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, flexbn.BatchNorm2d)]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Equal state (parameters, running statistics, num_batches_tracked), compared by name; ``a`` may hold
    only part of ``b``'s (an FX GraphModule keeps what its graph uses)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) <= set(sb)
    for name, x in sa.items():
        y = sb[name]
        if x.dtype == torch.int64:
            assert torch.equal(x, y), name
        else:
            assert_close(x, y, msg=name)


def quiet(fn, *args, **kwargs):
    """Call a tracer/exporter, silencing its own advice (TracerWarning on constants, deprecations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("grad", GRAD)
@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("options", OPTIONS)
def test_jit_trace_records_flexbn(options: dict, training: bool, grad: bool) -> None:
    """torch.jit.trace in the four modes: the traced graph on a new input equals eager flexbn (output,
    gradients, running statistics, num_batches_tracked); torch's batch norm where flexbn computes it,
    flexbn's operator where an option is in play."""
    model = make_model(options, training)
    x = torch.randn(4, 3, 6, 6)
    if training and options.get("virtual_batch_size"):  # chunks depend on the batch size
        with pytest.raises(ValueError, match=r"virtual_batch_size cannot be recorded"):
            quiet(torch.jit.trace, model, x, check_trace=False)
        return
    with torch.set_grad_enabled(grad):
        traced = quiet(torch.jit.trace, model, x, check_trace=False)
    eager = copy.deepcopy(model)  # the trace ran the model once: compare from the same state
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    flexbn_option = training and bool(options)  # momentum=None: flexbn's, to record 1 / nbt
    assert ("flexbn::batch_norm" in kinds) == flexbn_option
    assert ("aten::batch_norm" in kinds) == (not flexbn_option)

    x2 = (torch.randn(8, 3, 6, 6) * 3 - 1).requires_grad_()  # another batch size and distribution
    x3 = x2.detach().clone().requires_grad_()
    y, y_ref = traced(x2), eager(x3)
    assert_close(y, y_ref, msg="output")
    assert_same_state(traced, eager)
    if grad:
        g = torch.randn_like(y)
        params = list(traced.parameters())
        grads = torch.autograd.grad(y, [x2, *params], g)
        grads_ref = torch.autograd.grad(y_ref, [x3, *eager.parameters()], g)
        for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
            assert_close(a, b, msg=f"gradient {i}")


def test_jit_trace_refuses_what_it_cannot_record() -> None:
    """Bags (their number is data-dependent) cannot be traced: a clear error, not a graph that keeps the
    traced batch's count."""

    class Bags(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = flexbn.BatchNorm1d(3)

        def forward(self, x: Tensor, groups: Tensor) -> Tensor:
            return self.bn(x, groups=groups)

    with pytest.raises(ValueError, match=r"groups cannot be recorded by torch\.jit\.trace"):
        quiet(torch.jit.trace, Bags(), (torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])))


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[1]])
def test_torch_export_contains_batch_norm(options: dict, training: bool) -> None:
    """torch.export: the standard path and eval export torch's batch-norm operator (what conv+BN folding
    and quantization look for), a variant exports as a composition; both run equal to eager."""
    model = make_model(options, training)
    x = torch.randn(4, 3, 6, 6)
    program = quiet(torch.export.export, copy.deepcopy(model), (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    has_bn = any("batch_norm" in t for t in targets)
    assert has_bn == (not training or not options)
    assert not any("flexbn" in t for t in targets)  # runs without flexbn's operators
    x2 = torch.randn(4, 3, 6, 6) * 2
    exported = quiet(program.module)
    assert_close(exported(x2), copy.deepcopy(model)(x2), msg="exported program")
    decomposed = quiet(quiet(program.run_decompositions).module)
    assert_close(decomposed(x2), copy.deepcopy(model)(x2), msg="decomposed program")


@pytest.mark.parametrize(
    "dynamo", [pytest.param(False, id="legacy"), pytest.param(True, id="dynamo")]
)
@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[1]])
def test_onnx_export_runs_in_onnxruntime(options: dict, dynamo: bool) -> None:
    """Both ONNX exporters: an eval model exports through torch's batch norm (folded into the convolution
    by the exporter) and onnxruntime's output equals flexbn's."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    model = make_model(options, training=False)
    x = torch.randn(4, 3, 6, 6)
    if dynamo:
        proto = quiet(torch.onnx.export, model, (x,), dynamo=True, verbose=False).model_proto
    else:
        buffer = io.BytesIO()
        quiet(torch.onnx.export, model, (x,), buffer, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
    ops = {n.op_type for n in proto.graph.node}
    assert "Conv" in ops
    assert not any("flexbn" in op for op in ops)
    session = ort.InferenceSession(proto.SerializeToString())
    x2 = torch.randn(4, 3, 6, 6) * 2 + 1
    (out,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    assert_close(torch.from_numpy(out), model(x2).detach(), msg="onnxruntime")


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("options", OPTIONS)
def test_fx_symbolic_trace(options: dict, training: bool) -> None:
    """torch.fx.symbolic_trace traces a converted model (no control flow on traced values): one batch-norm
    call per layer -- torch's F.batch_norm without flexbn options -- and the GraphModule equals eager,
    running statistics and num_batches_tracked included."""
    model = make_model(options, training)
    graph_module = torch.fx.symbolic_trace(model)
    calls = [n.target for n in graph_module.graph.nodes if n.op == "call_function"]
    torch_calls = calls.count(torch.nn.functional.batch_norm)
    flexbn_calls = calls.count(flexbn.batch_norm)
    assert torch_calls + flexbn_calls == 3
    standard = not options or not training
    assert torch_calls == (3 if standard else 0)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    assert_close(graph_module(x), eager(x), msg="graph module")
    assert_same_state(graph_module, eager)
    recorded = {k for k in graph_module.state_dict() if k.endswith("num_batches_tracked")}
    assert len(recorded) == (3 if training else 0)  # the counters' update is in the graph


def test_fx_feature_extraction_pattern() -> None:
    """What torchvision's create_feature_extractor does: trace, then return an intermediate node."""
    model = make_model({"detach_var": True}, training=False)
    graph_module = torch.fx.symbolic_trace(model)
    graph = graph_module.graph
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == "3.conv2")
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (node,)
    graph_module.recompile()
    x = torch.randn(2, 3, 6, 6)
    expected = model[3].conv2(
        model[3].relu(model[3].bn1(model[3].conv1(model[2](model[1](model[0](x))))))
    )
    assert_close(graph_module(x), expected)


@pytest.mark.parametrize("options", [{}, {"detach_mean": True}, {"mask": True}])
def test_batched_gradients(options: dict) -> None:
    """autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True): the legacy batching of the
    backward (its upstream gradients carry no storage) -- they crashed on the kernels."""
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 4) > 0.3 if options.get("mask") else None
    flags = {k: v for k, v in options.items() if k != "mask"}

    def f(x: Tensor, w: Tensor) -> Tensor:
        return flexbn.batch_norm(x, None, None, w, None, True, mask=mask, **flags)

    y = f(x, w)
    vs = torch.randn(7, *y.shape, dtype=torch.float64)
    batched = torch.autograd.grad(y, (x, w), vs, is_grads_batched=True, retain_graph=True)
    for i in range(len(vs)):
        one = torch.autograd.grad(y, (x, w), vs[i], retain_graph=True)
        assert_close(batched[0][i], one[0], msg=f"input, row {i}")
        assert_close(batched[1][i], one[1], msg=f"weight, row {i}")
    jac = torch.autograd.functional.jacobian(lambda x: f(x, w), x, vectorize=True)
    jac_loop = torch.autograd.functional.jacobian(lambda x: f(x, w), x, vectorize=False)
    assert_close(jac, jac_loop)


@pytest.mark.one_backend
def test_eval_is_torchs_operator_bitwise() -> None:
    """Under ``auto`` (the default), eval with running statistics (no mask) is torch's own batch norm:
    bitwise equal. (An explicit backend runs flexbn's, accurate where torch's fused form is not.)"""
    torch.manual_seed(1)
    ours, theirs = flexbn.BatchNorm2d(6), nn.BatchNorm2d(6)
    with torch.no_grad():
        state = {
            "running_mean": torch.randn(6) * 100,
            "running_var": torch.rand(6) + 0.01,
            "weight": torch.randn(6),
            "bias": torch.randn(6),
        }
        for m in (ours, theirs):
            for name, value in state.items():
                getattr(m, name).copy_(value)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 6, 5, 5) * 10 + 100
    with flexbn.use_backend("auto"):
        assert torch.equal(ours(x), theirs(x))
    with flexbn.use_backend("reference"):
        assert not torch.equal(
            ours(x), theirs(x)
        )  # flexbn's own: (x - mean) * scale, not x * a + b


@pytest.mark.one_backend
def test_threads_choose_their_own_backend() -> None:
    """use_backend is per thread: two threads in different blocks each run their own backend."""
    from flexbn._core import backend

    seen: dict[str, list[str]] = {"reference": [], "cpp": []}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            with flexbn.use_backend(name):
                barrier.wait(timeout=10)
                for _ in range(20):
                    x = torch.randn(4, 3)
                    impl = backend.implementation(flexbn.get_backend(), x)
                    seen[name].append(impl.__name__.rsplit(".", 1)[-1])
                    flexbn.batch_norm(x, None, None, training=True)
                barrier.wait(timeout=10)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    if not backend.cpp_available():
        pytest.skip("no C++ compiler for the kernels")
    threads = [threading.Thread(target=work, args=(n,)) for n in ("reference", "cpp")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert set(seen["reference"]) == {"reference"}
    assert set(seen["cpp"]) == {"kernels"}


@pytest.mark.one_backend
def test_backward_uses_the_calls_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call made inside a use_backend block runs its backward on that block's backend after the block
    has ended (the choice is held by the call)."""
    from flexbn._core import backend, kernels, reference

    if not backend.cpp_available():
        pytest.skip("no C++ compiler for the kernels")
    calls: list[str] = []
    for module, label in ((kernels, "cpp"), (reference, "reference")):
        real = module.backward

        def counted(*args, _real=real, _label=label, **kwargs):
            calls.append(_label)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "backward", counted)
    x = torch.randn(6, 3, 4, requires_grad=True)
    with flexbn.use_backend("cpp"):
        y = flexbn.batch_norm(x, None, None, training=True, detach_var=True)
    with flexbn.use_backend("reference"):
        y.sum().backward()
    assert calls == ["cpp"]


@pytest.mark.parametrize("options", [{}, {"detach_var": True}, {"mask": True}])
def test_fake_and_meta_tensors(options: dict) -> None:
    """Shapes without data: FakeTensorMode and the meta device run flexbn (the reference, for shapes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    flags = {k: v for k, v in options.items() if k != "mask"}
    with FakeTensorMode():
        mask = torch.ones(4, 5, dtype=torch.bool) if options.get("mask") else None
        x = torch.randn(4, 3, 5, requires_grad=True)
        rm, rv = torch.zeros(3), torch.ones(3)
        y = flexbn.batch_norm(x, rm, rv, training=True, mask=mask, **flags)
        y.sum().backward()
        assert y.shape == x.shape
        assert x.grad.shape == x.shape
    bn = flexbn.BatchNorm1d(3, device="meta", **flags)
    x = torch.empty(4, 3, 5, device="meta", requires_grad=True)
    y = bn(
        x, mask=torch.ones(4, 5, dtype=torch.bool, device="meta") if options.get("mask") else None
    )
    y.sum().backward()
    assert y.device.type == "meta"
    assert y.shape == x.shape


def test_operators_pass_opcheck() -> None:
    """torch.library.opcheck: schemas (mutation of the running statistics declared), autograd
    registration, fake kernels matching the real ones, AOT dispatch with dynamic shapes."""
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    mask = torch.rand(6, 4) > 0.2
    mask[:, 0] = True
    name = flexbn.get_backend()
    ops = torch.ops.flexbn
    cases = [
        (
            ops.batch_norm.default,
            (x, w, b, None, rm, rv, 0.1, None, 1e-5, None, 1, None, True, True, None, name),
        ),
        (
            ops.batch_norm.default,
            (x, w, b, None, rm, rv, 0.1, None, 1e-5, ids, 3, mask, False, True, "groups", name),
        ),
        (ops.moments.default, (x.detach(), ids, 3, mask, name)),
    ]
    count, mean, m2 = ops.moments(x.detach(), None, 1, None, name)
    cases.append(
        (
            ops.normalize.default,
            (x, w, b, None, count, mean, m2, 1e-5, None, 1, None, True, False, False, name),
        )
    )
    cases.append(
        (ops.running_update_.default, (rm.clone(), rv.clone(), count, mean, m2, 0.1, None, name))
    )
    for op, args in cases:
        torch.library.opcheck(op, args)
