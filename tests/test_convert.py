"""flexbn.convert and flexbn.convert_to_torch: every layer swapped, state shared, behaviour unchanged.

The reference is the torch model before conversion: a deep copy of it runs beside the converted copy on the
same input, and outputs, every gradient and the running buffers after a training step must agree.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import flexbn
from conftest import assert_close

try:
    from flexbn.distributed import SyncBatchNorm as FlexSync
except ImportError:  # being written in parallel
    FlexSync = None
needs_sync = pytest.mark.skipif(
    FlexSync is None, reason="flexbn.SyncBatchNorm (src/flexbn/distributed.py) is not there yet"
)

TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
FLEX_BN = (flexbn.BatchNorm1d, flexbn.BatchNorm2d, flexbn.BatchNorm3d)


class Nested(nn.Module):
    """BN layers inside a ModuleDict and a nested Sequential, with non-default constructor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, bias=False))
        self.blocks = nn.ModuleDict(
            {
                "a": nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=None, eps=1e-3)),
                "b": nn.BatchNorm2d(4, track_running_stats=False),
                "c": nn.BatchNorm2d(4, affine=False),
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return self.blocks["c"](self.blocks["b"](self.blocks["a"](h)) + h)


# name -> (model factory, input shape)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn2d": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)
        ),
        (6, 3, 7, 7),
    ),
    "mlp1d": (
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3), nn.BatchNorm1d(3)
        ),
        (8, 5),
    ),
    "seq1d": (
        lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4, momentum=None)),
        (5, 3, 9),
    ),
    "cnn3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), (4, 2, 4, 5, 5)),
    "nested": (Nested, (5, 3, 6, 6)),
    "bn-root": (lambda: nn.BatchNorm2d(3), (6, 3, 4, 4)),
}
MODEL_IDS = list(MODELS)


def randomized(model: nn.Module) -> nn.Module:
    """Random BN weights, biases and running statistics (ones/zeros would hide a swapped tensor)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters(recurse=False):
                    p.copy_(torch.randn_like(p))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn_like(m.running_mean))
                    m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                    m.num_batches_tracked.fill_(3)
    return model


def make(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Tensor]:
    """A model with random BN state and an input for it; float64 by default, so that the comparisons of
    two different kernels are exact to rounding (float32 gradients through two stacked batch norms differ
    by ~1e-4 relative from cancellation, in torch's own kernel as much as in flexbn's)."""
    factory, shape = MODELS[name]
    return randomized(factory().to(dtype)), torch.randn(shape, dtype=dtype) * 2 + 1


def bn_types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def run(model: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    """Output, input gradient and every parameter gradient (in named_parameters order), for an output
    gradient that depends only on the output's shape and dtype (the same for the two models compared)."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    gen = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
    return (out.detach(), x.grad, *(p.grad for _, p in model.named_parameters()))


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    a, e = actual.state_dict(), expected.state_dict()
    assert list(a) == list(e)
    for key in e:
        assert a[key].dtype == e[key].dtype, key
        if e[key].is_floating_point():
            assert_close(a[key], e[key], msg=key)
        else:
            assert torch.equal(a[key], e[key]), key


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", MODEL_IDS)
def test_convert_matches_torch(name: str, mode: str) -> None:
    reference, x = make(name)
    converted = flexbn.convert(copy.deepcopy(reference))
    types = bn_types(converted)
    assert types, name  # something was converted ...
    assert all(t in FLEX_BN for t in types), types  # ... all of it
    assert_same_state(converted, reference)
    getattr(reference, mode)()
    getattr(converted, mode)()
    for i, (got, want) in enumerate(zip(run(converted, x), run(reference, x), strict=True)):
        assert_close(got, want, msg=f"output/grad #{i}")
    assert_same_state(converted, reference)  # running statistics after one step


@pytest.mark.parametrize("name", MODEL_IDS)
def test_convert_shares_parameters_and_buffers(name: str) -> None:
    model, x = make(name)
    before = dict(model.named_parameters()), dict(model.named_buffers())
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    converted = flexbn.convert(model)
    params, buffers = dict(converted.named_parameters()), dict(converted.named_buffers())
    assert list(params) == list(before[0])
    assert list(buffers) == list(before[1])
    assert all(params[k] is p for k, p in before[0].items())
    assert all(buffers[k] is b for k, b in before[1].items())
    assert list(converted.state_dict()) == list(saved)
    assert all(torch.equal(v, saved[k]) for k, v in converted.state_dict().items())
    # A training step of the converted model updates the original tensors.
    converted.train()
    converted(x)
    stepped = [k for k, b in before[1].items() if k.endswith("running_mean")]
    assert stepped
    assert all(not torch.equal(before[1][k], saved[k]) for k in stepped)


def test_root_is_replaced_and_returned() -> None:
    bn = randomized(nn.BatchNorm2d(3))
    out = flexbn.convert(bn)
    assert type(out) is flexbn.BatchNorm2d
    assert out is not bn
    assert out.weight is bn.weight
    assert out.running_var is bn.running_var
    back = flexbn.convert_to_torch(out)
    assert type(back) is nn.BatchNorm2d
    assert back.weight is bn.weight


def test_mode_requires_grad_and_attributes_preserved() -> None:
    model, _ = make("nested")
    model.train()
    model.blocks["a"].eval()
    model.stem[1].weight.requires_grad_(False)
    model.stem[1].qconfig = "user attribute"
    converted = flexbn.convert(model)
    modes = {n: m.training for n, m in converted.named_modules()}
    assert modes["blocks.a"] is False
    assert modes["blocks.a.1"] is False
    assert modes["stem.1"] is True
    assert modes["blocks.b"] is True
    assert converted.stem[1].weight.requires_grad is False
    assert converted.blocks["a"][1].weight.requires_grad is True
    assert converted.stem[1].qconfig == "user attribute"
    assert converted.blocks["a"][1].momentum is None
    assert converted.blocks["a"][1].eps == 1e-3
    assert converted.blocks["b"].running_mean is None
    assert converted.stem[1].bias is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dtype_and_device_preserved(mode: str, dtype: torch.dtype) -> None:
    reference, x = make("cnn2d", dtype)
    converted = flexbn.convert(copy.deepcopy(reference))
    for t in [*converted.parameters(), *converted.buffers()]:
        assert t.dtype in (dtype, torch.long)
        assert t.device == x.device
    getattr(reference, mode)()
    getattr(converted, mode)()
    for got, want in zip(run(converted, x), run(reference, x), strict=True):
        assert got.dtype == dtype
        assert_close(got, want)
    assert_same_state(converted, reference)


def test_hooks_carried_over() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    seen: list[str] = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(type(m).__module__))
    model = flexbn.convert(model)
    model(torch.randn(5, 3))
    assert seen == ["flexbn.modules"]
    handle.remove()  # a handle made before the conversion acts on the new layer
    model(torch.randn(5, 3))
    assert seen == ["flexbn.modules"]


def test_shared_layer_converted_once() -> None:
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(bn, nn.Sequential(bn))
    converted = flexbn.convert(model)
    assert type(converted[0]) is flexbn.BatchNorm1d
    assert converted[0] is converted[1][0]


# -- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"detach_var": True}, id="detach_var"),
        pytest.param({"detach_mean": True, "detach_var": True}, id="detach_both"),
        pytest.param({"virtual_batch_size": 3}, id="virtual_batch_size"),
    ],
)
def test_options_applied(options: dict) -> None:
    torch_bn = randomized(nn.BatchNorm2d(3))
    reference = flexbn.BatchNorm2d(3, **options)
    reference.load_state_dict(torch_bn.state_dict())
    converted = flexbn.convert(copy.deepcopy(torch_bn), **options)
    assert all(getattr(converted, k) == v for k, v in options.items())
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    got = run(converted, x)
    for g, w in zip(got, run(reference, x), strict=True):
        assert_close(g, w)
    assert_same_state(converted, reference)
    # Negative check: the option makes a difference (the detach flags only to the input gradient).
    plain = run(torch_bn, x)
    if "virtual_batch_size" in options:
        assert (got[0] - plain[0]).abs().max() > 1e-3
    else:
        assert_close(got[0], plain[0])
    assert (got[1] - plain[1]).abs().max() > 1e-3


@pytest.mark.skipif(
    "renorm" not in inspect.signature(flexbn.BatchNorm2d).parameters, reason="no renorm= yet"
)
def test_renorm_options_pass_through() -> None:
    # Options are forwarded to the constructors generically and checked by them.
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"layer '1'.*track_running_stats"):
        flexbn.convert(model, renorm=True)
    assert bn_types(model) == [nn.BatchNorm2d, nn.BatchNorm2d]  # nothing replaced
    converted = flexbn.convert(model[:1], renorm=True, rmax=2.0)
    assert (converted[0].renorm, converted[0].rmax) == (True, 2.0)
    with pytest.raises(
        ValueError, match=r"layer '0' \(flexbn.BatchNorm2d\) has renorm=True, rmax=2.0"
    ):
        flexbn.convert_to_torch(converted)


def test_options_applied_to_existing_flexbn_layers() -> None:
    model = nn.Sequential(flexbn.BatchNorm1d(4, detach_mean=True), nn.BatchNorm1d(4))
    untouched = flexbn.convert(model)
    assert untouched[0] is model[0]  # no options: an existing flexbn layer is kept as it is
    weight = model[0].weight
    converted = flexbn.convert(model, detach_var=True)
    assert [type(m) for m in converted] == [flexbn.BatchNorm1d, flexbn.BatchNorm1d]
    assert converted[0].detach_mean
    assert converted[0].detach_var
    assert not converted[1].detach_mean
    assert converted[1].detach_var
    assert converted[0].weight is weight


def test_unknown_option_raises_before_any_change() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match=r"unknown option 'detach_variance'.*detach_var"):
        flexbn.convert(model, detach_variance=True)
    with pytest.raises(TypeError, match="unknown option 'eps'"):
        flexbn.convert(model, eps=1e-3)
    with pytest.raises(TypeError, match="unknown option 'typo'"):
        flexbn.convert(nn.Linear(2, 2), typo=1)  # no batch norm at all: still checked
    assert bn_types(model) == [nn.BatchNorm1d, nn.BatchNorm1d]


def test_invalid_option_value_names_layer_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"layer '1'.*virtual_batch_size must be None or an int"):
        flexbn.convert(model, virtual_batch_size=1)
    with pytest.raises(TypeError, match="detach_var must be a bool"):
        flexbn.convert(model, detach_var=1)
    assert bn_types(model) == [nn.BatchNorm1d]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"sync": 1}, TypeError, "sync must be a bool", id="sync-not-bool"),
        pytest.param(
            {"process_group": "g"}, ValueError, "only used with sync=True", id="pg-no-sync"
        ),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        flexbn.convert(nn.BatchNorm1d(3), **kwargs)


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, but got Tensor"):
        flexbn.convert(torch.zeros(3))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        flexbn.convert_to_torch([nn.BatchNorm1d(3)])
    with pytest.raises(TypeError, match="strict must be a bool"):
        flexbn.convert_to_torch(nn.BatchNorm1d(3), strict="no")


# -- subclasses (tests/test_convert_subclasses.py has the rest) ----------------------------------------


class UserBN(nn.BatchNorm2d):
    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * 2


def test_subclasses_keep_their_class_and_children_are_converted() -> None:
    user = UserBN(3)
    user.add_module("inner", nn.BatchNorm2d(3))
    domain = flexbn.DomainBatchNorm2d(3, num_domains=2)
    model = nn.Sequential(user, domain, nn.BatchNorm2d(3))
    converted = flexbn.convert(model, detach_var=True)
    assert converted[0] is user  # routed in place: the same object, an instance of its own class
    assert isinstance(user, UserBN)
    assert type(user) is not UserBN
    assert user.detach_var
    assert converted[1] is domain
    assert domain.detach_var
    assert type(user.inner) is flexbn.BatchNorm2d  # children of a routed layer are converted
    assert type(converted[2]) is flexbn.BatchNorm2d
    back = flexbn.convert_to_torch(converted, strict=False)
    assert type(back[0]) is UserBN
    assert type(back[0].inner) is nn.BatchNorm2d
    assert back[1] is domain


# -- the way back --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", MODEL_IDS)
def test_round_trip(name: str, mode: str) -> None:
    reference, x = make(name)
    model = copy.deepcopy(reference)
    params = dict(model.named_parameters())
    back = flexbn.convert_to_torch(flexbn.convert(model))
    assert bn_types(back) == bn_types(reference)
    assert all(p is params[k] for k, p in back.named_parameters())
    assert_same_state(back, reference)
    getattr(reference, mode)()
    getattr(back, mode)()
    for got, want in zip(run(back, x), run(reference, x), strict=True):
        assert_close(got, want)
    assert_same_state(back, reference)


def test_convert_to_torch_strict_lists_every_problem_and_changes_nothing() -> None:
    model = nn.Sequential(
        flexbn.BatchNorm1d(4),
        flexbn.BatchNorm1d(4, detach_var=True),
        nn.Sequential(flexbn.BatchNorm1d(4, virtual_batch_size=8)),
        flexbn.DomainBatchNorm1d(4, num_domains=2),
    )
    with pytest.raises(ValueError, match="cannot convert to torch") as info:
        flexbn.convert_to_torch(model)
    message = str(info.value)
    assert "layer '1' (flexbn.BatchNorm1d) has detach_var=True" in message
    assert "layer '2.0' (flexbn.BatchNorm1d) has virtual_batch_size=8" in message
    assert "layer '3' (flexbn.DomainBatchNorm1d) has no torch equivalent" in message
    assert "layer '0'" not in message  # default options are no problem
    assert [type(m) for m in model[:2]] == [flexbn.BatchNorm1d, flexbn.BatchNorm1d]


def test_convert_to_torch_not_strict_drops_options() -> None:
    domain = flexbn.DomainBatchNorm1d(4, num_domains=2)
    model = nn.Sequential(nn.Linear(3, 4), flexbn.BatchNorm1d(4, detach_var=True), domain)
    randomized(model)
    reference = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    reference.load_state_dict(model[:2].state_dict())
    back = flexbn.convert_to_torch(model, strict=False)
    assert type(back[1]) is nn.BatchNorm1d
    assert back[2] is domain
    assert not hasattr(back[1], "detach_var")
    x = torch.randn(6, 3)
    for got, want in zip(run(back[:2], x), run(reference, x), strict=True):
        assert_close(got, want)


# -- SyncBatchNorm ---------------------------------------------------------------------------------------


@needs_sync
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_sync_batchnorm_becomes_flexbn_sync(mode: str) -> None:
    # torch's SyncBatchNorm runs on CPU when no process group is initialised (it falls back to
    # F.batch_norm), so both modes can be compared; a 3-D input suits it as any N-D input does.
    reference = randomized(nn.Sequential(nn.Conv1d(3, 4, 2), nn.SyncBatchNorm(4)))
    converted = flexbn.convert(copy.deepcopy(reference))
    assert type(converted[1]) is FlexSync
    assert_same_state(converted, reference)
    getattr(reference, mode)()
    getattr(converted, mode)()
    x = torch.randn(5, 3, 6)
    for got, want in zip(run(converted, x), run(reference, x), strict=True):
        assert_close(got, want)
    assert_same_state(converted, reference)
    back = flexbn.convert_to_torch(converted)
    assert type(back[1]) is nn.SyncBatchNorm
    assert back[1].weight is converted[1].weight


@needs_sync
def test_sync_keeps_or_sets_process_group() -> None:
    group, other = object(), object()  # stand-ins: no forward runs in this test
    model = nn.Sequential(nn.SyncBatchNorm(4, process_group=group))
    kept = flexbn.convert(model)
    assert type(kept[0]) is FlexSync
    assert kept[0].process_group is group
    assert flexbn.convert_to_torch(kept)[0].process_group is group
    model = nn.Sequential(
        nn.BatchNorm1d(4),
        nn.BatchNorm2d(4),
        nn.SyncBatchNorm(4, process_group=group),
        flexbn.BatchNorm3d(4, detach_mean=True),
    )
    weights = [m.weight for m in model]
    synced = flexbn.convert(model, sync=True, process_group=other, detach_var=True)
    assert all(type(m) is FlexSync and m.process_group is other for m in synced)
    assert all(m.weight is w for m, w in zip(synced, weights, strict=True))
    assert [m.detach_mean for m in synced] == [False, False, False, True]
    assert all(m.detach_var for m in synced)


@needs_sync
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sync_true_matches_torch_without_process_group(mode: str) -> None:
    reference, x = make("cnn2d")
    converted = flexbn.convert(copy.deepcopy(reference), sync=True)
    assert all(t is FlexSync for t in bn_types(converted))
    getattr(reference, mode)()
    getattr(converted, mode)()
    for got, want in zip(run(converted, x), run(reference, x), strict=True):
        assert_close(got, want)
    assert_same_state(converted, reference)


@needs_sync
def test_sync_rejects_ghost_batches_naming_the_layer() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), flexbn.BatchNorm2d(4, virtual_batch_size=4))
    with pytest.raises(ValueError, match=r"layer '1'.*virtual_batch_size"):
        flexbn.convert(model, sync=True)
    assert [type(m) for m in model] == [nn.BatchNorm2d, flexbn.BatchNorm2d]  # nothing replaced
