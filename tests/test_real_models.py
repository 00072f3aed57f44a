"""convert, audit and fold on the real torchvision and timm models, where they import (skipped otherwise:
PyPI's torchvision wheel does not import beside the CPU torch of this project's environment, and timm needs
torchvision; tests/model_zoo.py has the same code patterns and always runs).

Small inputs (2 x 3 x 64 x 64), random initialization, float64 where results are compared.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import flexbn
from conftest import assert_close
from flexbn import audit as fa
from flexbn.convert import _is_routed

pytestmark = pytest.mark.one_backend

timm = pytest.importorskip("timm", reason="timm (and torchvision, which it imports) not importable")
tv_models = pytest.importorskip("torchvision.models")

SHAPE = (2, 3, 64, 64)
MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm-efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "timm-regnetx_002": lambda: timm.create_model("regnetx_002"),
    "timm-densenet121": lambda: timm.create_model("densenet121"),
    "timm-resnet18": lambda: timm.create_model("resnet18"),
    "torchvision-resnet18": lambda: tv_models.resnet18(),
    "torchvision-mobilenet_v3_small": lambda: tv_models.mobilenet_v3_small(),
    "torchvision-efficientnet_b0": lambda: tv_models.efficientnet_b0(),
}


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_every_layer(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    count = len(batch_norms(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = flexbn.convert(copy.deepcopy(model), detach_var=True)
    layers = batch_norms(converted)
    assert len(layers) == count
    assert all(type(m).__module__.startswith("flexbn") or _is_routed(m) for m in layers)
    assert all(m.detach_var for m in layers)
    plain = flexbn.convert(copy.deepcopy(model))
    x = torch.randn(SHAPE, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(plain, mode)()
        torch.manual_seed(1)  # dropout and stochastic depth in training
        want = model(x)
        torch.manual_seed(1)
        assert_close(plain(x), want)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_audit_every_layer_ok(name: str, mode: str) -> None:
    torch.manual_seed(0)
    rows = fa.audit(MODELS[name](), SHAPE, mode=mode)
    assert rows
    assert all(r.status == "ok" for r in rows), [r for r in rows if r.status != "ok"][:3]


@pytest.mark.parametrize("name", list(MODELS))
def test_fold(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    with torch.no_grad():
        for m in batch_norms(model):  # non-trivial statistics
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(SHAPE, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's BatchNormAct2d are named and left as they are
        folded = flexbn.fold(model)
    if name.startswith("torchvision"):
        assert not batch_norms(folded)
    assert_close(folded(x), model(x))


def test_cli_factory_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flexbn", "audit", "timm:create_model", "resnet18", "num_classes=3",
         "--input-shape", "2,3,64,64"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "20 batch-norm layer(s): 20 ok, 0 failed, 0 not verified" in result.stdout
