"""The modules as torch modules: state_dict, loading, _version, repr, pickle/deepcopy, isinstance, reset, .to().

Each test compares against torch's own module built with the same arguments.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

import flexbn
from conftest import assert_close

NAMES = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
INPUT_SHAPES = {
    "BatchNorm1d": (4, 3, 5),
    "BatchNorm2d": (2, 3, 3, 4),
    "BatchNorm3d": (2, 3, 2, 2, 3),
}

# Constructor options that change the set of parameters and buffers.
CONFIGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"affine": False}, id="affine=False"),
    pytest.param({"bias": False}, id="bias=False"),
    pytest.param({"track_running_stats": False}, id="track_running_stats=False"),
    pytest.param({"affine": False, "track_running_stats": False}, id="affine=False-no-tracking"),
    pytest.param({"momentum": None, "eps": 1e-3}, id="momentum=None-eps=1e-3"),
]
DETACH_FLAGS = [
    pytest.param({}, id="no-flags"),
    pytest.param({"detach_mean": True}, id="detach_mean"),
    pytest.param({"detach_var": True}, id="detach_var"),
    pytest.param({"detach_mean": True, "detach_var": True}, id="detach_both"),
]


def make(lib, name: str, **kwargs: Any) -> nn.Module:
    return getattr(lib, name)(3, **kwargs)


def trained(module: nn.Module, name: str, steps: int = 2) -> nn.Module:
    """``module`` with random parameters and a few training steps behind it (non-default state)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    module.train()
    for _ in range(steps):
        module(torch.randn(INPUT_SHAPES[name]) * 3 + 1)
    return module


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    """Same state_dict: keys in the same order, equal tensors of the same dtype, same metadata."""
    a, e = actual.state_dict(), expected.state_dict()
    assert list(a) == list(e)
    for key in e:
        assert a[key].dtype == e[key].dtype, key
        assert torch.equal(a[key], e[key]), key
    assert a._metadata == e._metadata


def assert_same_output(actual: nn.Module, expected: nn.Module, name: str) -> None:
    floating = [t.dtype for t in expected.state_dict().values() if t.is_floating_point()]
    x = torch.randn(INPUT_SHAPES[name], dtype=(floating or [torch.float32])[0])
    assert_close(actual.eval()(x), expected.eval()(x))


# ------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("name", NAMES)
def test_is_an_instance_of_torch_class(name):
    module = make(flexbn, name)
    assert isinstance(module, getattr(nn, name))
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    assert type(module).__name__ == name


@pytest.mark.parametrize("name", NAMES)
def test_version_matches_torch(name):
    assert getattr(flexbn, name)._version == getattr(nn, name)._version == 2
    assert (
        make(flexbn, name).state_dict()._metadata[""] == make(nn, name).state_dict()._metadata[""]
    )


def parameters_of(fn) -> list[tuple[str, Any, Any]]:
    """(name, kind, default) of each parameter: what callers can observe of a signature."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_extends_torch(name):
    """torch's parameters, in order with the same kinds and defaults, then keyword-only additions."""
    ref, mod = (
        parameters_of(getattr(nn, name).__init__),
        parameters_of(getattr(flexbn, name).__init__),
    )
    assert mod[: len(ref)] == ref
    assert [(n, k, d) for n, k, d in mod[len(ref) :]] == [
        ("detach_mean", inspect.Parameter.KEYWORD_ONLY, False),
        ("detach_var", inspect.Parameter.KEYWORD_ONLY, False),
        ("virtual_batch_size", inspect.Parameter.KEYWORD_ONLY, None),
        ("renorm", inspect.Parameter.KEYWORD_ONLY, False),
        ("rmax", inspect.Parameter.KEYWORD_ONLY, 3.0),
        ("dmax", inspect.Parameter.KEYWORD_ONLY, 5.0),
    ]


def test_functional_signature_extends_torch():
    ref, mod = parameters_of(torch.nn.functional.batch_norm), parameters_of(flexbn.batch_norm)
    assert mod[: len(ref)] == ref
    assert all(kind is inspect.Parameter.KEYWORD_ONLY for _, kind, _ in mod[len(ref) :])


# ----------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("flags", DETACH_FLAGS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_torch(name, config, flags):
    """Same keys, order, dtypes, values and metadata; named parameters and buffers likewise."""
    mod, ref = make(flexbn, name, **config, **flags), make(nn, name, **config)
    assert_same_state(mod, ref)
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in mod.named_buffers()] == [n for n, _ in ref.named_buffers()]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_torch_state_dict_loads_strictly_and_back(name, config):
    ref = trained(make(nn, name, **config), name)
    mod = make(flexbn, name, **config, detach_mean=True)
    mod.load_state_dict(ref.state_dict(), strict=True)
    assert_same_state(mod, ref)
    assert_same_output(mod, ref, name)

    back = make(nn, name, **config)
    back.load_state_dict(trained(mod, name).state_dict(), strict=True)
    assert_same_state(back, mod)


def sequential_state(module: nn.Module, version: int | None, drop_num_batches: bool) -> OrderedDict:
    """``nn.Sequential(module)``'s state_dict as an older torch would have written it."""
    state = nn.Sequential(module).state_dict()
    if drop_num_batches:
        del state["0.num_batches_tracked"]
    if version is None:
        del state._metadata["0"]
    else:
        state._metadata["0"] = {"version": version}
    return state


@pytest.mark.parametrize("version", [1, None], ids=["version=1", "no-metadata"])
@pytest.mark.parametrize("name", NAMES)
def test_v1_state_dict_without_num_batches_tracked_loads_as_torch(name, version):
    """torch keeps the module's own num_batches_tracked (here 5) when a v1 dict lacks it."""
    source = trained(make(nn, name), name)
    results = []
    for lib in (nn, flexbn):
        target = nn.Sequential(make(lib, name))
        target[0].num_batches_tracked.fill_(5)
        target.load_state_dict(sequential_state(source, version, True), strict=True)
        results.append(target[0])
    ref, mod = results
    assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item() == 5
    assert torch.equal(mod.running_mean, source.running_mean)
    assert_same_output(mod, ref, name)


@pytest.mark.parametrize("name", NAMES)
def test_v2_state_dict_without_num_batches_tracked_fails_as_torch(name):
    state = sequential_state(trained(make(nn, name), name), 2, True)
    errors = []
    for lib in (nn, flexbn):
        with pytest.raises(RuntimeError, match=r'Missing key.*"0\.num_batches_tracked"') as info:
            nn.Sequential(make(lib, name)).load_state_dict(copy.copy(state))
        errors.append(str(info.value))
    assert errors[1] == errors[0]
    ref, mod = (nn.Sequential(make(lib, name)) for lib in (nn, flexbn))
    assert mod.load_state_dict(state, strict=False) == ref.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------- repr


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", NAMES)
def test_repr_matches_torch_at_default_options(name, config):
    mod, ref = make(flexbn, name, **config), make(nn, name, **config)
    assert mod.extra_repr() == ref.extra_repr()
    assert repr(mod) == repr(ref)


@pytest.mark.parametrize(
    ("flags", "suffix"),
    [
        ({"detach_mean": True}, ", detach_mean=True"),
        ({"detach_var": True}, ", detach_var=True"),
        ({"detach_mean": True, "detach_var": True}, ", detach_mean=True, detach_var=True"),
    ],
    ids=["detach_mean", "detach_var", "detach_both"],
)
def test_repr_shows_detach_flags(flags, suffix):
    mod, ref = make(flexbn, "BatchNorm2d", **flags), make(nn, "BatchNorm2d")
    assert mod.extra_repr() == ref.extra_repr() + suffix
    assert repr(mod) == f"BatchNorm2d({ref.extra_repr()}{suffix})"


# --------------------------------------------------------------------------------- copy / pickle


def pickle_round_trip(module: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(module))


def torch_save_round_trip(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = [
    pytest.param(pickle_round_trip, id="pickle"),
    pytest.param(copy.deepcopy, id="deepcopy"),
    pytest.param(torch_save_round_trip, id="torch.save"),
]


@pytest.mark.parametrize("flags", DETACH_FLAGS)
@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_keeps_state_and_flags(name, round_trip, flags):
    module = trained(make(flexbn, name, momentum=0.3, **flags), name).eval()
    copied = round_trip(module)
    assert type(copied) is type(module)
    assert (copied.detach_mean, copied.detach_var) == (module.detach_mean, module.detach_var)
    assert (copied.momentum, copied.eps, copied.training) == (0.3, module.eps, False)
    assert_same_state(copied, module)
    assert repr(copied) == repr(module)
    x = torch.randn(INPUT_SHAPES[name], requires_grad=True)
    assert torch.equal(copied.train()(x), module.train()(x))
    assert_same_state(copied, module)  # the same update on both


def test_pickle_from_before_the_detach_flags_loads_with_defaults():
    """A pickled module whose ``__dict__`` lacks the flags (an older flexbn) unpickles with both False."""
    module = flexbn.BatchNorm2d(3)
    del module.__dict__["detach_mean"], module.__dict__["detach_var"]
    copied = pickle_round_trip(module)
    assert (copied.detach_mean, copied.detach_var) == (False, False)
    assert repr(copied) == repr(nn.BatchNorm2d(3))


# --------------------------------------------------------------------------------------- resets


@pytest.mark.parametrize("method", ["reset_running_stats", "reset_parameters"])
@pytest.mark.parametrize("config", CONFIGS)
def test_resets_match_torch(config, method):
    ref = trained(make(nn, "BatchNorm2d", **config), "BatchNorm2d")
    mod = make(flexbn, "BatchNorm2d", **config)
    mod.load_state_dict(ref.state_dict())
    getattr(ref, method)()
    getattr(mod, method)()
    assert_same_state(mod, ref)
    if ref.track_running_stats:
        assert mod.num_batches_tracked.item() == 0
        assert torch.equal(mod.running_var, torch.ones(3))
    if method == "reset_parameters" and ref.affine:
        assert torch.equal(mod.weight, torch.ones(3))
    elif ref.affine:
        assert not torch.equal(mod.weight, torch.ones(3))  # parameters survive reset_running_stats


# ------------------------------------------------------------------------------------ dtype/device

CONVERSIONS = [
    pytest.param(lambda m: m.double(), id="double()"),
    pytest.param(lambda m: m.half(), id="half()"),
    pytest.param(lambda m: m.bfloat16(), id="bfloat16()"),
    pytest.param(lambda m: m.to(torch.float64), id="to(float64)"),
    pytest.param(lambda m: m.to(dtype=torch.float16), id="to(dtype=float16)"),
    pytest.param(lambda m: m.to("cpu", torch.float64), id="to(cpu,float64)"),
    pytest.param(lambda m: m.float().double().float(), id="float-double-float"),
]


@pytest.mark.parametrize("convert", CONVERSIONS)
@pytest.mark.parametrize("config", CONFIGS[:4])
def test_dtype_conversions_match_torch(config, convert):
    ref = trained(make(nn, "BatchNorm2d", **config), "BatchNorm2d")
    mod = make(flexbn, "BatchNorm2d", **config, detach_var=True)
    mod.load_state_dict(ref.state_dict())
    assert convert(mod) is mod
    convert(ref)
    assert_same_state(mod, ref)  # dtypes included: num_batches_tracked stays int64
    assert mod.detach_var is True
    assert_same_output(mod, ref, "BatchNorm2d")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_constructor_device_and_dtype_match_torch(name, dtype):
    mod = make(flexbn, name, device="cpu", dtype=dtype)
    ref = make(nn, name, device="cpu", dtype=dtype)
    assert_same_state(mod, ref)
    assert {t.device for t in mod.state_dict().values()} == {torch.device("cpu")}


# --------------------------------------------------------------------------------- torch utilities


def test_swa_update_bn_treats_flexbn_as_batch_norm():
    """``torch.optim.swa_utils.update_bn`` recognises the modules and recomputes their statistics."""
    batches = [torch.randn(4, 3, 2, 2) * 2 + 1 for _ in range(3)]
    models = [nn.Sequential(nn.Conv2d(3, 3, 1), make(lib, "BatchNorm2d")) for lib in (nn, flexbn)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        torch.optim.swa_utils.update_bn(batches, model)
    ref, mod = (model[1] for model in models)
    assert mod.momentum == ref.momentum == 0.1  # restored afterwards
    assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    assert_close(mod.running_mean, ref.running_mean)
    assert_close(mod.running_var, ref.running_var)
    assert not torch.equal(mod.running_var, torch.ones(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_call_uses_and_updates_the_given_buffers_as_torch(training):
    """``torch.func.functional_call`` swaps in parameters and buffers; the update lands in those."""
    ref, mod = make(nn, "BatchNorm2d").train(training), make(flexbn, "BatchNorm2d").train(training)
    state = {
        "weight": torch.randn(3),
        "bias": torch.randn(3),
        "running_mean": torch.randn(3),
        "running_var": torch.rand(3) + 0.5,
        "num_batches_tracked": torch.tensor(4),
    }
    ref_state, mod_state = ({k: v.clone() for k, v in state.items()} for _ in range(2))
    x = torch.randn(2, 3, 2, 2)
    got = torch.func.functional_call(mod, mod_state, (x,))
    want = torch.func.functional_call(ref, ref_state, (x,))
    assert_close(got, want)
    for key in ("running_mean", "running_var"):
        assert_close(mod_state[key], ref_state[key])
        assert torch.equal(mod_state[key], state[key]) is not training  # updated in training only
    assert mod_state["num_batches_tracked"].item() == ref_state["num_batches_tracked"].item()
    assert_same_state(mod, make(nn, "BatchNorm2d"))  # the module's own state is untouched
