"""flexbn.convert on subclasses of torch's batch norm (timm's BatchNormAct2d and the like), lazy layers,
flexbn subclasses and DomainBatchNorm: the layer's own batch_norm call runs as flexbn.batch_norm with the
options, or the layer is named -- never a silent no-op.

References: each converted subclass is compared with the composition it must equal -- flexbn's module with
the same options and state, followed by the subclass's activation -- on outputs, every gradient and the
running buffers after a training step; with no options, with the unconverted subclass itself.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flexbn
import model_zoo
from conftest import assert_close
from flexbn.convert import _is_routed

OPTIONS = [
    pytest.param({"detach_var": True}, id="detach_var"),
    pytest.param({"detach_mean": True, "detach_var": True}, id="detach_both"),
    pytest.param({"virtual_batch_size": 3}, id="ghost"),
    pytest.param({"renorm": True, "rmax": 1.1, "dmax": 0.1}, id="renorm"),
]


class SuperThenAct(nn.BatchNorm2d):
    """torch's forward, then an in-place activation."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(super().forward(x), inplace=True)


class CheckOnly(nn.BatchNorm2d):
    """Only the input check changes (forward is torch's)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError("four dimensions please")


class KeywordCall(nn.BatchNorm2d):
    """Calls F.batch_norm with keyword arguments."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            input=x,
            running_mean=self.running_mean,
            running_var=self.running_var,
            weight=self.weight,
            bias=self.bias,
            training=self.training,
            momentum=0.1,
            eps=self.eps,
        ).tanh()


class AtenCall(nn.BatchNorm2d):
    """Calls torch.batch_norm (weight and bias before the running statistics)."""

    def forward(self, x: Tensor) -> Tensor:
        y = torch.batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.training, 0.1,
            self.eps, False,
        )  # fmt: skip
        return y * 2


def bn_act() -> nn.Module:
    return model_zoo.BatchNormAct2d(4, act_layer=nn.SiLU)


# name -> (factory, the computation after the batch norm)
SUBCLASSES: dict[str, tuple[Callable[[], nn.Module], Callable[[Tensor], Tensor]]] = {
    "BatchNormAct2d": (bn_act, F.silu),
    "super-then-act": (lambda: SuperThenAct(4), F.relu),
    "check-only": (lambda: CheckOnly(4), lambda y: y),
    "keyword-call": (lambda: KeywordCall(4), torch.tanh),
    "torch.batch_norm": (lambda: AtenCall(4), lambda y: y * 2),
}


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    return model_zoo.randomize(module, seed)


def step(model: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    """Output, input gradient and parameter gradients of one training step."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    y.backward(g)
    return (y.detach(), x.grad, *(p.grad for p in model.parameters()))


def assert_steps_equal(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close(a, b, msg=f"output/grad #{i}")


def reference(layer: nn.Module, options: dict[str, Any], after: Callable[[Tensor], Tensor]) -> Any:
    """flexbn's module with the options and a copy of the layer's state, then ``after``."""
    ref = flexbn.BatchNorm2d(
        layer.num_features, layer.eps, layer.momentum, dtype=torch.float64, **options
    )
    ref.load_state_dict(layer.state_dict())
    return ref, lambda x: after(ref(x))


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("name", list(SUBCLASSES))
def test_subclass_gets_the_options(name: str, options: dict[str, Any]) -> None:
    factory, after = SUBCLASSES[name]
    torch_layer = randomized(factory().double())
    layer = flexbn.convert(copy.deepcopy(torch_layer), **options)
    assert _is_routed(layer)
    assert isinstance(layer, type(torch_layer))
    assert type(layer).__name__ == type(torch_layer).__name__
    assert all(getattr(layer, k) == v for k, v in options.items())
    ref, ref_forward = reference(torch_layer, options, after)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 2 + 1
    for _ in range(2):  # running statistics feed renorm's corrections in the second step
        got = step(layer, x)
        xr = x.clone().requires_grad_()
        ref.zero_grad(set_to_none=True)
        y = ref_forward(xr)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype))
        assert_steps_equal(got, (y.detach(), xr.grad, ref.weight.grad, ref.bias.grad))
        assert_close(layer.running_mean, ref.running_mean)
        assert_close(layer.running_var, ref.running_var)
    # Negative check: the options change the input gradient of the unconverted layer.
    plain = step(torch_layer, x)
    assert (plain[1] - got[1]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(SUBCLASSES))
def test_no_options_computes_what_it_did(name: str, mode: str) -> None:
    factory, _ = SUBCLASSES[name]
    torch_layer = randomized(factory().double())
    layer = flexbn.convert(copy.deepcopy(torch_layer))
    assert _is_routed(layer)
    assert layer.state_dict().keys() == torch_layer.state_dict().keys()
    getattr(torch_layer, mode)()
    getattr(layer, mode)()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    assert_steps_equal(step(layer, x), step(torch_layer, x))
    for key, value in torch_layer.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value) or value.is_floating_point()
        assert_close(layer.state_dict()[key].double(), value.double(), msg=key)


def test_routed_layer_keeps_identity_state_and_hooks() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn_act())
    layer = model[1]
    params = list(layer.parameters())
    seen: list[int] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(1))
    converted = flexbn.convert(model, detach_var=True)
    assert converted is model
    assert converted[1] is layer  # the same object, its class made a subclass of its own
    assert list(layer.parameters()) == params
    assert type(layer).__mro__[2] is model_zoo.BatchNormAct2d
    assert isinstance(layer.act, nn.SiLU)
    converted(torch.randn(2, 3, 4, 4))
    handle.remove()
    converted(torch.randn(2, 3, 4, 4))
    assert seen == [1]
    assert "detach_var=True" in repr(layer)


def test_routed_layer_pickles_and_deep_copies() -> None:
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), bn_act()))
    model = flexbn.convert(model, detach_mean=True)
    x = torch.randn(5, 3, 4, 4)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (
        copy.deepcopy(model),
        torch.load(buffer, weights_only=False),
        pickle.loads(pickle.dumps(model)),
    ):
        assert type(copied[1]) is type(model[1])
        assert copied[1].detach_mean
        assert copied[1].weight is not model[1].weight
        assert_steps_equal(step(copied, x), step(copy.deepcopy(model), x))


def test_convert_to_torch_restores_the_subclass() -> None:
    torch_layer = randomized(bn_act())
    model = nn.Sequential(nn.Conv2d(3, 4, 1), copy.deepcopy(torch_layer))
    layer = model[1]
    flexbn.convert(model, detach_var=True, virtual_batch_size=2)
    with pytest.raises(
        ValueError,
        match=r"layer '1' \(model_zoo.BatchNormAct2d, a torch.nn.BatchNorm2d subclass\) has detach_var=True, virtual_batch_size=2",
    ):
        flexbn.convert_to_torch(model)
    assert _is_routed(layer)  # nothing changed
    back = flexbn.convert_to_torch(model, strict=False)
    assert back[1] is layer
    assert type(layer) is model_zoo.BatchNormAct2d
    assert not any(hasattr(layer, k) for k in ("detach_var", "virtual_batch_size", "renorm"))
    x = torch.randn(4, 4, 3, 3)
    assert_steps_equal(step(layer, x), step(torch_layer, x))
    # Without options the way back needs no strict=False.
    assert type(flexbn.convert_to_torch(flexbn.convert(bn_act()))) is model_zoo.BatchNormAct2d


def test_convert_again_updates_the_options() -> None:
    layer = flexbn.convert(bn_act(), detach_var=True)
    same = flexbn.convert(layer, detach_mean=True)
    assert same is layer
    assert (layer.detach_mean, layer.detach_var) == (True, True)
    with pytest.raises(ValueError, match="virtual_batch_size must be None or an int"):
        flexbn.convert(layer, virtual_batch_size=1)
    assert layer.virtual_batch_size is None


def test_nested_batch_norm_routes_only_its_own_call() -> None:
    """A subclass holding another batch norm: each call goes to its own layer's options."""

    class Outer(nn.BatchNorm2d):
        def __init__(self) -> None:
            super().__init__(4)
            self.inner = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return super().forward(self.inner(x))

    model = randomized(Outer().double())
    reference_inner = flexbn.BatchNorm2d(4, dtype=torch.float64)
    reference_outer = flexbn.BatchNorm2d(4, dtype=torch.float64, detach_var=True)
    reference_inner.load_state_dict(model.inner.state_dict())
    reference_outer.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "inner" not in k}
    )
    converted = flexbn.convert(model, detach_var=True)
    assert type(converted.inner) is flexbn.BatchNorm2d
    converted.inner.detach_var = False  # only the outer layer detaches
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    got = step(converted, x)
    xr = x.clone().requires_grad_()
    y = reference_outer(reference_inner(xr))
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype))
    assert_close(got[0], y.detach())
    assert_close(got[1], xr.grad)


@pytest.mark.parametrize("options", [{}, {"detach_var": True}], ids=["plain", "detach_var"])
def test_lazy_batch_norm_becomes_flexbn(options: dict[str, Any]) -> None:
    model = nn.Sequential(
        nn.LazyConv2d(4, 1), nn.LazyBatchNorm2d(momentum=None), nn.ReLU(inplace=True)
    )
    converted = flexbn.convert(model, **options)
    assert _is_routed(converted[1])
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    got = step(converted, x)  # the first call materializes it, and runs with the options already
    assert type(converted[1]) is flexbn.BatchNorm2d
    assert converted[1].detach_var == bool(options)
    reference = nn.Sequential(
        nn.Conv2d(3, 4, 1), flexbn.BatchNorm2d(4, momentum=None, **options), nn.ReLU()
    )
    reference[0].load_state_dict(converted[0].state_dict())
    reference[1].load_state_dict({**converted[1].state_dict(), "num_batches_tracked": torch.tensor(0),
                                  "running_mean": torch.zeros(4), "running_var": torch.ones(4)})  # fmt: skip
    assert_steps_equal(got, step(reference, x))
    assert_close(converted[1].running_var, reference[1].running_var)


def test_sync_batch_norm_subclass_is_routed() -> None:
    """timm's SyncBatchNormAct: synchronised (over its own group) through flexbn, on CPU too."""
    torch_layer = randomized(model_zoo.SyncBatchNormAct(4).double())
    torch_layer.act = nn.ReLU(inplace=True)
    layer = flexbn.convert(copy.deepcopy(torch_layer), detach_mean=True)
    assert _is_routed(layer)
    assert type(layer)._flexbn_sync
    _, ref_forward = reference(torch_layer, {"detach_mean": True}, F.relu)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    got = step(layer, x)
    xr = x.clone().requires_grad_()
    y = ref_forward(xr)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype))
    assert_close(got[0], y.detach())
    assert_close(got[1], xr.grad)
    assert flexbn.convert_to_torch(layer, strict=False) is layer
    assert type(layer) is model_zoo.SyncBatchNormAct


# -- what cannot be converted is named ---------------------------------------------------------------------


class Manual(nn.BatchNorm2d):
    """Batch norm by hand: no F.batch_norm call the options could reach."""

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)


class UserFlexBN(flexbn.BatchNorm2d):
    pass


class FlexWithAct(flexbn.BatchNorm2d):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


class FlexDirect(flexbn.BatchNorm2d):
    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True)


def test_unconvertible_layer_warns_without_options() -> None:
    model = nn.Sequential(Manual(4), nn.BatchNorm2d(4))
    with pytest.warns(
        UserWarning,
        match=r"left 1 batch-norm layer\(s\) as they are: layer '0' \(test_convert_subclasses.Manual, a torch.nn.BatchNorm2d subclass\): its forward does not call torch.nn.functional.batch_norm",
    ):
        converted = flexbn.convert(model)
    assert type(converted[0]) is Manual
    assert type(converted[1]) is flexbn.BatchNorm2d


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"detach_var": True}, r"as asked \(detach_var=True\)", id="option"),
        pytest.param({"sync": True}, r"as asked \(sync=True\)", id="sync"),
    ],
)
def test_unconvertible_layer_raises_with_options_and_changes_nothing(
    kwargs: dict, match: str
) -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), bn_act(), Manual(4))
    with pytest.raises(ValueError, match=match) as info:
        flexbn.convert(model, **kwargs)
    assert "layer '2'" in str(info.value)
    assert "layer '1'" not in str(info.value)
    assert [type(m) for m in model] == [nn.BatchNorm2d, model_zoo.BatchNormAct2d, Manual]
    with pytest.warns(UserWarning, match=r"layer '2'.*do not get the options or sync"):
        converted = flexbn.convert(model, strict=False, **kwargs)
    assert type(converted[2]) is Manual
    assert _is_routed(converted[1])


def test_runtime_check_when_the_call_is_skipped() -> None:
    class Sometimes(nn.BatchNorm2d):
        def forward(self, x: Tensor) -> Tensor:
            if x.shape[0] > 4:
                return x  # skips the batch norm on big batches
            return super().forward(x)

    layer = flexbn.convert(Sometimes(3), detach_var=True)
    layer(torch.randn(4, 3, 2, 2))
    with pytest.raises(
        RuntimeError,
        match=r"Sometimes was converted by flexbn.convert with detach_var=True, but this forward made no torch.nn.functional.batch_norm call",
    ):
        layer(torch.randn(6, 3, 2, 2))
    plain = flexbn.convert(Sometimes(3))  # nothing asked: nothing to miss
    plain(torch.randn(6, 3, 2, 2))


def test_call_with_other_tensors_is_not_routed() -> None:
    """A call made with tensors that are not the layer's is not its own: it runs as it is."""

    class Copies(nn.BatchNorm2d):
        def forward(self, x: Tensor) -> Tensor:
            return F.batch_norm(x, None, None, self.weight * 1, self.bias * 1, True)

    layer = flexbn.convert(Copies(3))
    layer(torch.randn(4, 3, 2, 2))  # no options: fine
    flexbn.convert(layer, detach_var=True)
    with pytest.raises(RuntimeError, match=r"made no torch\.nn\.functional\.batch_norm call"):
        layer(torch.randn(4, 3, 2, 2))


def test_flexbn_subclasses() -> None:
    mine, act, direct = UserFlexBN(4), FlexWithAct(4), FlexDirect(4)
    model = nn.Sequential(mine, act)
    assert flexbn.convert(model, detach_var=True) is model
    assert model[0] is mine
    assert mine.detach_var
    assert act.detach_var
    with pytest.raises(ValueError, match=r"FlexDirect.*its forward does not call flexbn's forward"):
        flexbn.convert(nn.Sequential(direct), detach_var=True)
    with pytest.raises(ValueError, match=r"cannot synchronise a subclass of flexbn's classes"):
        flexbn.convert(nn.Sequential(UserFlexBN(4)), sync=True)
    with pytest.raises(
        ValueError, match=r"UserFlexBN, a flexbn.BatchNorm2d subclass\) has no torch equivalent"
    ):
        flexbn.convert_to_torch(nn.Sequential(mine))
    assert flexbn.convert_to_torch(nn.Sequential(mine), strict=False)[0] is mine


def test_domain_batch_norm_takes_the_options_it_has() -> None:
    domain = flexbn.DomainBatchNorm2d(4, num_domains=2)
    model = nn.Sequential(nn.BatchNorm2d(4), domain)
    flexbn.convert(model, detach_var=True)
    assert model[1] is domain
    assert domain.detach_var
    for kwargs, match in (
        ({"virtual_batch_size": 4}, "it does not take virtual_batch_size"),
        ({"sync": True}, "per-domain statistics are not synchronised"),
    ):
        with pytest.raises(ValueError, match=match):
            flexbn.convert(nn.Sequential(flexbn.DomainBatchNorm2d(4, 2)), **kwargs)


def test_attribute_clash_is_not_converted() -> None:
    class Clash(nn.BatchNorm2d):
        detach_var = "mine"

    with pytest.raises(
        ValueError, match=r"attribute\(s\) of its own named as flexbn's options \(detach_var\)"
    ):
        flexbn.convert(Clash(3), detach_mean=True)


# -- torchvision- and timm-style models ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "efficientnet", "densenet"])
def test_zoo_converts_every_layer(name: str) -> None:
    torch_model = model_zoo.FACTORIES[name]().double()
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in torch_model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out
        converted = flexbn.convert(copy.deepcopy(torch_model), detach_var=True)
    flexed = [
        m
        for m in converted.modules()
        if isinstance(m, flexbn.BatchNorm2d | flexbn.BatchNorm1d) or _is_routed(m)
    ]
    assert len(flexed) == count > 0
    assert all(m.detach_var for m in flexed)
    # The same model converted without options computes what torch's did, in both modes.
    plain = flexbn.convert(copy.deepcopy(torch_model))
    x = torch.randn(model_zoo.INPUT_SHAPE, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(plain, mode)()
        getattr(torch_model, mode)()
        assert_steps_equal(step(plain, x), step(torch_model, x))


@pytest.mark.filterwarnings(  # torch's own, from Dynamo tracing any autograd.Function (test_compile.py)
    "ignore:.*autograd.function.Function'> should not be instantiated:DeprecationWarning"
)
def test_compiled_fullgraph_routes_the_call() -> None:
    """torch.compile(fullgraph=True) of a model with a routed subclass: no graph break, same output and
    gradients as eager (the detach option visibly changes the input gradient)."""
    torch._dynamo.reset()
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), bn_act()))
    eager = flexbn.convert(copy.deepcopy(model), detach_var=True)
    converted = flexbn.convert(copy.deepcopy(model), detach_var=True)
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 3, 5, 5)
    want, got = step(eager, x), step(compiled, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    plain = step(model, x)
    assert (plain[1] - got[1]).abs().max() > 1e-3  # not torch's F.batch_norm
    torch._dynamo.reset()


def test_jit_script_of_routed_layer() -> None:
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), bn_act())).eval()
    x = torch.randn(2, 3, 4, 4)
    want = model(x)
    converted = flexbn.convert(model)
    with pytest.warns(DeprecationWarning, match="torch.jit.script"):
        scripted = torch.jit.script(converted)
    assert_close(scripted(x), want)
    flexbn.convert(converted, detach_var=True)
    message = r"torch.jit.script cannot compile model_zoo.BatchNormAct2d.*with detach_var=True"
    with pytest.raises(ValueError, match=message), pytest.warns(DeprecationWarning, match="script"):
        torch.jit.script(converted)


def test_renorm_limits_reach_converted_subclasses() -> None:
    """set_renorm_limits sets the limits of subclasses converted with renorm=True (a warm-up schedule that
    skipped them would train them with the final limits from the first step)."""
    from model_zoo import BatchNormAct2d

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), BatchNormAct2d(4))
    model = flexbn.convert(model, renorm=True)
    assert flexbn.set_renorm_limits(model, 1.0, 0.0) == 1
    assert (model[1].rmax, model[1].dmax) == (1.0, 0.0)
