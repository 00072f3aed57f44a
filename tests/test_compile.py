"""torch.compile: modules and the functional forms captured whole (``fullgraph=True``), compiled once,
and equal to eager -- outputs, every gradient, running buffers and ``num_batches_tracked`` over steps.

Most tests use the ``aot_eager`` backend (Dynamo capture, AOTAutograd functionalization of the in-place
buffer updates and the backward graph, no code generation), counted by a wrapping backend: one call per
graph Dynamo compiles, so a recompilation or a graph break shows as a second call. One test runs Inductor
(C++ code generation: ~12 s on 2 CPU cores with a cold cache, so marked ``slow``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import Tensor, nn

import flexbn
from conftest import assert_close

# Dynamo instantiates an autograd Function to trace one (torch 2.13 side_effects.track_object_new) inside
# catch_warnings(record=True), which does not override pytest's "error" filter.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*autograd.function.Function'> should not be instantiated:DeprecationWarning"
)

# Dynamo reads .grad of a non-leaf tensor argument (stats_input computed from x) while wrapping it.
NON_LEAF_INPUT_WARNING = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed:UserWarning"
)

C = 3
STEPS = 3


class CountingBackend:
    """A Dynamo backend that counts the graphs it is given and compiles them with ``aot_eager``."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.graphs = 0
        self.inner = torch._dynamo.lookup_backend(inner)

    def __call__(
        self, gm: torch.fx.GraphModule, example_inputs: list[Tensor]
    ) -> Callable[..., Any]:
        self.graphs += 1
        return self.inner(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randomize_affine(m: nn.Module) -> None:
    with torch.no_grad():
        for p in (m.weight, m.bias):
            if p is not None:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p is m.weight else 0.0))


def _state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_same_state(got: nn.Module, expected: nn.Module, msg: str) -> None:
    ref = expected.state_dict()
    for name, value in got.state_dict().items():
        if value.dtype.is_floating_point:
            assert_close(value, ref[name], msg=f"{name}: {msg}")
        else:
            assert torch.equal(value, ref[name]), f"{name}: {msg}"


def _inputs(opts: dict[str, Any], x: Tensor, step: int) -> dict[str, Any]:
    """Forward keyword arguments for ``x`` (``(N, C, L)``); the mask and bags change every step."""
    n, length = x.shape[0], x.shape[2]
    kw: dict[str, Any] = {}
    g = torch.Generator().manual_seed(step)
    if opts.get("mask"):
        mask = torch.rand(n, length, generator=g) > 0.4
        mask[:, :2] = True
        kw["mask"] = mask
    if opts.get("groups"):
        kw["groups"] = torch.randint(0, 2 + step, (n,), generator=g).sort().values * 3
        kw["groups"][:2], kw["groups"][-2:] = -1, 100  # bags of >= 2 samples at both ends
    if opts.get("stats_input"):
        kw["stats_input"] = torch.sin(x) * 2 + 0.5  # a function of x: gradient reaches x both ways
    return kw


MODULE_CASES = [
    pytest.param({}, {}, id="standard"),
    pytest.param({"momentum": None}, {}, id="momentum_none"),
    pytest.param({"detach_mean": True}, {}, id="detach_mean"),
    pytest.param({"detach_var": True}, {}, id="detach_var"),
    pytest.param({"detach_mean": True, "detach_var": True}, {}, id="detach_both"),
    pytest.param({"track_running_stats": False}, {}, id="no_running_stats"),
    pytest.param({}, {"mask": True}, id="mask"),
    pytest.param({"virtual_batch_size": 3}, {}, id="ghost"),
    pytest.param({"virtual_batch_size": 3, "momentum": None}, {"mask": True}, id="ghost+mask"),
    pytest.param(
        {"detach_var": True}, {"stats_input": True}, id="stats_input", marks=NON_LEAF_INPUT_WARNING
    ),
    pytest.param({}, {"groups": True}, id="groups"),
    pytest.param({"detach_mean": True}, {"groups": True, "mask": True}, id="groups+mask"),
    # r ~ 2 and d ~ 1 (not clipped, so they change every step): without _core.compiled.snapshot the
    # compiled backward would recompute them from the already-updated running statistics
    pytest.param({"renorm": True, "rmax": 2.5, "dmax": 2.0}, {"scale": 2.0}, id="renorm"),
    pytest.param(
        {"renorm": True, "momentum": None}, {"mask": True, "scale": 2.0}, id="renorm+mask"
    ),
]


@pytest.mark.parametrize(("options", "forward"), MODULE_CASES)
def test_module_fullgraph_compiles_once_and_equals_eager(
    options: dict[str, Any], forward: dict[str, Any]
) -> None:
    """Training steps, then eval steps: one graph per mode (no recompilation as buffers change, no graph
    break), and outputs, input / weight / bias / stats_input gradients and the state equal eager's."""
    module = flexbn.BatchNorm1d(C, **options)
    _randomize_affine(module)
    eager = copy.deepcopy(module)
    backend = CountingBackend()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    for mode in ("train", "eval"):
        module.train(mode == "train")
        eager.train(mode == "train")
        for step in range(STEPS):
            x = torch.randn(8, C, 5) * forward.get("scale", 1.0) + 1.0
            xs = [x.clone().requires_grad_() for _ in range(2)]
            outs = []
            for m, xi in ((compiled, xs[0]), (eager, xs[1])):
                y = m(xi, **_inputs(forward, xi, step))
                y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
                outs.append(y)
            msg = f"{mode} step {step}"
            assert_close(outs[0], outs[1], msg=msg)
            assert_close(xs[0].grad, xs[1].grad, msg=msg)
            for name in ("weight", "bias"):
                assert_close(getattr(module, name).grad, getattr(eager, name).grad, msg=msg)
            _assert_same_state(module, eager, msg)
            module.zero_grad()
            eager.zero_grad()
        assert backend.graphs == (1 if mode == "train" else 2), mode
    if options.get("track_running_stats", True):
        assert int(module.num_batches_tracked) == STEPS  # negative check: the buffers were updated


def test_renorm_schedule_with_tensor_limits_compiles_once() -> None:
    """Limits held as 0-d tensors and changed between steps (flexbn.set_renorm_limits): no recompile."""
    module = flexbn.BatchNorm1d(C, renorm=True, rmax=torch.tensor(1.0), dmax=torch.tensor(0.0))
    _randomize_affine(module)
    eager = copy.deepcopy(module)
    backend = CountingBackend()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    for step in range(4):
        limits = flexbn.renorm_schedule(step, warmup=1, rmax_at=3, dmax_at=3)
        for m in (module, eager):
            flexbn.set_renorm_limits(m, *limits)
        x = torch.randn(8, C, 5) * 2 + 1
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [compiled(xs[0]), eager(xs[1])]
        for y in ys:
            y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        assert_close(ys[0], ys[1], msg=f"step {step}")
        assert_close(xs[0].grad, xs[1].grad, msg=f"step {step}")
        assert_close(module.weight.grad, eager.weight.grad, msg=f"step {step}")
        _assert_same_state(module, eager, f"step {step}")
    assert float(module.rmax) == 3.0  # negative check: the limits did change
    assert backend.graphs == 1


# ------------------------------------------------------------------------------------------ functional

FUNCTIONAL_CASES = [
    pytest.param({}, id="standard"),
    pytest.param({"momentum": "tensor"}, id="tensor_momentum"),
    pytest.param({"detach_mean": True, "detach_var": True}, id="detach_both"),
    pytest.param({"mask": True}, id="mask"),
    pytest.param({"virtual_batch_size": 3}, id="ghost"),
    pytest.param({"stats_input": True}, id="stats_input", marks=NON_LEAF_INPUT_WARNING),
    pytest.param({"groups": True}, id="groups"),
    pytest.param({"renorm": True}, id="renorm"),
]


@pytest.mark.parametrize(
    "pure", [pytest.param(False, id="in_place"), pytest.param(True, id="pure")]
)
@pytest.mark.parametrize("opts", FUNCTIONAL_CASES)
def test_functional_fullgraph_compiles_once_and_equals_eager(
    opts: dict[str, Any], pure: bool
) -> None:
    """flexbn.batch_norm (buffers updated in place) and flexbn.func.batch_norm (new ones returned)."""
    kw = {k: v for k, v in opts.items() if k not in ("mask", "groups", "stats_input", "momentum")}
    momentum = torch.tensor(0.25) if opts.get("momentum") else 0.25
    w, b = torch.rand(C) + 0.5, torch.randn(C)

    def step(x: Tensor, rm: Tensor, rv: Tensor, w: Tensor, b: Tensor, **extra: Any) -> Tensor:
        if pure:
            y, new_rm, new_rv = flexbn.func.batch_norm(
                x, rm, rv, w, b, True, momentum, **kw, **extra
            )
            return y, new_rm, new_rv
        return flexbn.batch_norm(x, rm, rv, w, b, True, momentum, **kw, **extra), rm, rv

    backend = CountingBackend()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    rm0, rv0 = torch.randn(C), torch.rand(C) + 0.5
    stats = [[rm0.clone(), rv0.clone()] for _ in range(2)]
    for i in range(STEPS):
        x = torch.randn(8, C, 5) * 2 + 1
        results, grads = [], []
        for fn, (rm, rv) in ((compiled, stats[0]), (step, stats[1])):
            xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
            y, new_rm, new_rv = fn(xi, rm, rv, wi, bi, **_inputs(opts, xi, i))
            grads.append(torch.autograd.grad(y, (xi, wi, bi), torch.cos(y.detach())))
            results.append((y, new_rm, new_rv))
        for fn_stats, (_, new_rm, new_rv) in zip(stats, results, strict=True):
            fn_stats[:] = [new_rm, new_rv]  # the next step starts from the new statistics
        for got, expected in zip(results[0] + grads[0], results[1] + grads[1], strict=True):
            assert_close(got, expected, msg=f"step {i}")
    assert not torch.equal(stats[0][0], rm0)  # negative check: the statistics moved
    assert backend.graphs == 1


# ---------------------------------------------------------------------------- graph breaks, skipped checks


def test_groups_without_fullgraph() -> None:
    """Default (fullgraph=False): torch.unique's data-dependent output size is a graph break, unless
    capture_dynamic_output_shape_ops. Either way results equal eager; after the break the number of bags
    is a constant, so its first change recompiles once (then Dynamo makes it dynamic)."""
    module = flexbn.BatchNorm1d(C)
    _randomize_affine(module)
    eager = copy.deepcopy(module)
    graphs: dict[bool, list[int]] = {}
    breaks: dict[bool, int] = {}
    for capture in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        backend = CountingBackend()
        graphs[capture] = []
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture):
            compiled = torch.compile(module, backend=backend)
            for bags in (2, 3, 4, 5, 2):
                x = torch.randn(10, C, 5)
                groups = torch.arange(10) % bags
                assert_close(
                    compiled(x, groups=groups), eager(x, groups=groups), msg=f"{bags} bags"
                )
                _assert_same_state(module, eager, f"{bags} bags")
                graphs[capture].append(backend.graphs)
        breaks[capture] = sum(torch._dynamo.utils.counters["graph_break"].values())
    assert breaks[False] > 0  # the graph break at torch.unique
    assert breaks[True] == 0
    assert graphs[False][1:] == [graphs[False][1]] * 4  # one recompilation, then none
    assert graphs[True] == [1] * 5  # captured whole, never recompiled


def test_data_dependent_checks_are_skipped_under_compile() -> None:
    """Documented: a segment with one value per channel raises in eager, not under torch.compile (no host
    read, no graph break); DomainBatchNorm's id range check likewise."""
    x = torch.randn(4, C, 3)
    lonely = torch.zeros(4, 3, dtype=torch.bool)
    lonely[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        flexbn.batch_norm(x, None, None, training=True, mask=lonely)
    compiled = torch.compile(flexbn.batch_norm, fullgraph=True, backend=CountingBackend())
    assert torch.isfinite(compiled(x, None, None, training=True, mask=lonely)).all()

    domain = flexbn.DomainBatchNorm1d(C, num_domains=2).eval()
    ids = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="domain ids must be in"):
        domain(x, ids * 2)
    compiled_domain = torch.compile(domain, fullgraph=True, backend=CountingBackend())
    assert_close(compiled_domain(x, ids), domain(x, ids))


@pytest.mark.parametrize(
    "momentum", [pytest.param(0.1, id="momentum"), pytest.param(None, id="none")]
)
def test_domain_batch_norm_fullgraph_equals_eager(momentum: float | None) -> None:
    module = flexbn.DomainBatchNorm2d(C, num_domains=3, momentum=momentum, domain_affine=True)
    _randomize_affine(module)
    eager = copy.deepcopy(module)
    backend = CountingBackend()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    for mode in ("train", "eval"):
        module.train(mode == "train")
        eager.train(mode == "train")
        for step in range(STEPS):
            x = torch.randn(6, C, 3, 3)
            ids = torch.tensor([0, 0, 2, 2, 2, step % 2 * 2])  # domain 1 absent
            xs = [x.clone().requires_grad_() for _ in range(2)]
            ys = [compiled(xs[0], ids), eager(xs[1], ids)]
            for y in ys:
                y.backward(torch.cos(y.detach()))
            assert_close(ys[0], ys[1], msg=f"{mode} step {step}")
            assert_close(xs[0].grad, xs[1].grad, msg=f"{mode} step {step}")
            assert_close(module.weight.grad, eager.weight.grad, msg=f"{mode} step {step}")
            _assert_same_state(module, eager, f"{mode} step {step}")
        assert backend.graphs == (1 if mode == "train" else 2)
    assert module.num_batches_tracked.tolist() == [STEPS, 0, STEPS]


# ------------------------------------------------------------------------------------ models, inductor


class Net(nn.Module):
    def __init__(self, **bn: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = flexbn.BatchNorm2d(4, **bn)
        self.head = nn.Linear(4, 2)
        _randomize_affine(self.bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _train_compiled_and_eager(
    model: nn.Module, backend: Any, steps: int, tol: tuple[float, float] | None = None
) -> None:
    """SGD steps of a compiled and an eager copy: losses, parameters and state stay equal."""
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    for step in range(steps):
        x, target = torch.randn(6, 2, 5, 5), torch.randn(6, 2)
        losses = []
        for m, opt in zip((compiled, eager), opts, strict=True):
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss)
        if tol is None:
            assert_close(losses[0], losses[1], msg=f"step {step}")
            _assert_same_state(model, eager, f"step {step}")
        else:
            torch.testing.assert_close(losses[0], losses[1], atol=tol[0], rtol=tol[1])
            for (name, a), b in zip(
                model.state_dict().items(), eager.state_dict().values(), strict=True
            ):
                torch.testing.assert_close(a, b, atol=tol[0], rtol=tol[1], msg=name)
    model.eval()
    eager.eval()
    x = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(
        compiled(x), eager(x), **({} if tol is None else {"atol": tol[0], "rtol": tol[1]})
    )


def test_model_training_steps_fullgraph_equal_eager() -> None:
    backend = CountingBackend()
    _train_compiled_and_eager(Net(momentum=None, detach_var=True), backend, steps=STEPS)
    assert backend.graphs == 2  # train, eval


@pytest.mark.slow  # Inductor C++ compilation: ~12 s on 2 cores with a cold cache, ~6 s warm
@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script.*` is deprecated:DeprecationWarning"
)  # inductor's
def test_inductor_model_training_steps_equal_eager() -> None:
    _train_compiled_and_eager(Net(momentum=None), "inductor", steps=2, tol=(1e-5, 1e-4))
