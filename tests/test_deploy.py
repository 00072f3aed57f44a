"""Deployment (docs/deploy.md): flexbn.fold, flexbn.fuse_modules (torch.ao.quantization.fuse_modules with
fuser methods for flexbn's classes) and torch.jit.script of models with flexbn layers.

References: the unfolded model in eval mode (float64: equal to 1e-10; float32: to float32 rounding),
torch's own fusion of the unconverted model, and counts of what was folded (a fold that folds nothing would
pass an equality test).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

import flexbn
import model_zoo
from conftest import assert_close

pytestmark = pytest.mark.one_backend  # eval mode and folded layers: no backend is involved

JIT_DEPRECATED = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


BN = (nn.modules.batchnorm._BatchNorm, flexbn.DomainBatchNorm2d)
# zoo model -> batch norms fold() can fold (those right after a conv/linear, of torch's classes)
FOLDABLE = {"resnet": 8, "mobilenet": 9, "efficientnet": 0, "densenet": 0}


@pytest.mark.parametrize("convert", [False, True], ids=["torch", "flexbn"])
@pytest.mark.parametrize("name", list(FOLDABLE))
def test_fold_zoo(name: str, convert: bool) -> None:
    model = model_zoo.FACTORIES[name]().double().eval()
    if convert:
        model = flexbn.convert(model, detach_var=True)  # options change training only
    before = count(model, BN)
    x = torch.randn(model_zoo.INPUT_SHAPE, dtype=torch.float64)
    want = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = flexbn.fold(model)
    assert count(folded, BN) == before - FOLDABLE[name]
    assert count(model, BN) == before  # a copy by default
    assert_close(folded(x), want)
    if name in ("efficientnet", "densenet"):  # BatchNormAct2d after a conv: named, left as it is
        (warning,) = caught
        assert "has a forward of its own" in str(warning.message)
        assert "BatchNormAct2d" in str(warning.message)
    else:
        assert not caught


def test_fold_float32_agreement() -> None:
    model = model_zoo.resnet().eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        want = model.double()(x.double())
        folded = flexbn.fold(model.float())
        got = folded(x)
    assert count(folded, BN) == 0
    rel = float((got.double() - want).abs().max() / want.abs().max())
    assert rel < 1e-5, rel  # float32 rounding of a folded network (docs/deploy.md has the figure)
    assert rel > 0  # negative check: float32, not a float64 copy


def test_fold_linear_checks_two_dimensional_input() -> None:
    model = nn.Sequential(nn.Linear(4, 3), flexbn.BatchNorm1d(3)).double().eval()
    model_zoo.randomize(model)
    folded = flexbn.fold(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert_close(folded(x), model(x))
    with pytest.raises(ValueError, match=r"holds for \(N, C\) input only, but got 3D input"):
        folded(torch.randn(5, 3, 4, dtype=torch.float64))  # BatchNorm1d normalized dim 1 here


@pytest.mark.parametrize(
    ("layer", "bn"),
    [
        pytest.param(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), id="conv1d"),
        pytest.param(nn.Conv3d(2, 3, 2), flexbn.BatchNorm3d(3), id="conv3d"),
        pytest.param(nn.ConvTranspose2d(2, 3, 3, stride=2), flexbn.BatchNorm2d(3), id="transposed"),
        pytest.param(nn.Conv2d(2, 4, 3, groups=2), flexbn.SyncBatchNorm(4), id="grouped-sync"),
        pytest.param(
            nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3, affine=False), id="no-affine"
        ),
    ],
)
def test_fold_layer_kinds(layer: nn.Module, bn: nn.Module) -> None:
    model = model_zoo.randomize(nn.Sequential(layer, bn).double()).eval()
    shape = {1: (4, 2, 7), 2: (4, 2, 6, 6), 3: (4, 2, 4, 4, 4)}[layer.weight.dim() - 2]
    x = torch.randn(shape, dtype=torch.float64)
    folded = flexbn.fold(model)
    assert isinstance(folded[1], nn.Identity)
    assert_close(folded(x), model(x))


def test_fold_refuses_training_mode_and_changes_nothing() -> None:
    model = model_zoo.resnet()
    with pytest.raises(
        ValueError, match=r"'bn1', 'layer1.0.bn1'.* are in training mode: call model.eval\(\) first"
    ):
        flexbn.fold(model, inplace=True)
    assert count(model, BN) == 8


def test_fold_frozen_layers_in_training_mode() -> None:
    model = flexbn.freeze(
        model_zoo.resnet().double()
    )  # frozen: running statistics, whatever the mode
    x = torch.randn(model_zoo.INPUT_SHAPE, dtype=torch.float64)
    folded = flexbn.fold(model)
    assert count(folded, BN) == 0
    assert_close(folded(x), model(x))


def test_fold_leaves_what_it_cannot_fold_and_says_so() -> None:
    class Domains(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = flexbn.DomainBatchNorm2d(4, 2)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.batch = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x: Tensor) -> Tensor:
            return self.batch(self.conv2(self.bn(self.conv(x), torch.arange(x.shape[0]) % 2)))

    model = Domains().eval()
    with pytest.warns(
        UserWarning,
        match=r"left 2 batch norm\(s\).*'bn' \(flexbn.DomainBatchNorm2d\): per-domain statistics.*'batch' \(torch.nn.BatchNorm2d\): no running statistics",
    ):
        folded = flexbn.fold(model)
    assert count(folded, BN) == 2


def test_fold_skips_shared_outputs_and_hooks() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.conv(x)
            return self.bn(h) + h + self.bn2(self.conv2(h))  # conv's output also used elsewhere

    model = model_zoo.randomize(Shared().double()).eval()
    model.bn2.register_forward_hook(lambda m, i, o: None)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="'bn2'.*hooks"):
        folded = flexbn.fold(model)
    assert count(folded, BN) == 2
    assert_close(folded(x), model(x))


def test_fold_untraceable_model_falls_back_to_sequential() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            if h.sum() > 0:  # control flow on a tensor: torch.fx cannot trace it
                h = -h
            return self.bn(self.conv(h))

    model = model_zoo.randomize(Branchy().double()).eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.warns(
        UserWarning, match=r"could not trace Branchy.forward with torch.fx \(TraceError"
    ):
        folded = flexbn.fold(model)
    assert isinstance(folded.a[1], nn.Identity)
    assert isinstance(folded.bn, nn.BatchNorm2d)  # outside a Sequential: not known to follow conv
    assert_close(folded(x), model(x))


def test_fold_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, but got str"):
        flexbn.fold("model")
    with pytest.raises(TypeError, match="inplace must be a bool"):
        flexbn.fold(nn.Sequential(), inplace=1)


# -- torch.ao.quantization.fuse_modules -------------------------------------------------------------------


def conv_bn_relu() -> nn.Module:
    return model_zoo.randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


def test_fuse_modules_as_torch_does() -> None:
    from torch.ao.quantization import fuse_modules

    model = conv_bn_relu().eval()
    want = fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
    converted = flexbn.convert(copy.deepcopy(model), detach_var=True)
    with pytest.raises(AssertionError, match="did not find fuser method"):
        fuse_modules(
            copy.deepcopy(converted), [["0", "1", "2"]]
        )  # torch's alone: why flexbn's exists
    got = flexbn.fuse_modules(converted, [["0", "1", "2"]])
    assert [type(m) for m in got] == [type(m) for m in want]
    assert type(got[0]).__name__ == "ConvReLU2d"
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(got(x), want(x))  # the same fuser on the same tensors


def test_fuse_modules_qat_refuses_options() -> None:
    model = flexbn.convert(conv_bn_relu(), detach_var=True)
    with pytest.raises(ValueError, match=r"detach_var=True"):
        flexbn.fuse_modules(model, [["0", "1", "2"]], qat=True)
    plain = flexbn.fuse_modules(flexbn.convert(conv_bn_relu()), [["0", "1"]], qat=True)
    assert type(plain[0]).__name__ == "ConvBn2d"
    frozen = flexbn.freeze(flexbn.convert(conv_bn_relu()))
    with pytest.raises(ValueError, match=r"frozen by flexbn\.freeze"):
        flexbn.fuse_modules(frozen, [["0", "1"]], qat=True)


# -- torch.jit.script -------------------------------------------------------------------------------------


@JIT_DEPRECATED
def test_jit_script_of_converted_model() -> None:
    model = model_zoo.resnet().eval()
    converted = flexbn.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8)
    scripted = torch.jit.script(converted)
    assert_close(scripted(x), model(x))
    scripted.train()
    assert_close(scripted(x), model.train()(x))  # no options: torch's batch norm in training too
    assert count(converted, flexbn.BatchNorm2d) == 0  # __prepare_scriptable__ swapped them in place


@JIT_DEPRECATED
@pytest.mark.parametrize(
    ("layer", "message"),
    [
        pytest.param(
            flexbn.BatchNorm2d(4, detach_var=True),
            "flexbn.BatchNorm2d with detach_var=True",
            id="options",
        ),
        pytest.param(flexbn.SyncBatchNorm(4), "flexbn.SyncBatchNorm", id="sync"),
    ],
)
def test_jit_script_raises_one_clear_message(layer: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=f"torch.jit.script cannot compile {message}"):
        torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), layer))
