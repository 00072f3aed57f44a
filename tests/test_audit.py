"""``flexbn audit``: the listing of each batch-norm layer, the numerical check of its gradient flow (which
must fail for layers that do not compute what they claim), and the command line's exit statuses and errors.

Models are written as files into ``tmp_path`` and loaded as a user's would be. The audit's reference is the
documented formula; flexbn's layers are checked against float64 compositions elsewhere, so here they must
pass, and layers that lie about their options must fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from flexbn import audit as fa
from flexbn.cli import main

MODELS = textwrap.dedent(
    '''
    import torch
    import torch.nn.functional as F
    from torch import nn

    import flexbn


    def randomize(model, seed=1):
        """Random weights, biases and running statistics (ones/zeros would hide affine bugs)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1)
            for m in model.modules():
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        return model


    class TorchCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, momentum=None), nn.ReLU(),
            )
            self.head = nn.Linear(6 * 3 * 3, 5)
            self.bn = nn.BatchNorm1d(5, track_running_stats=False)

        def forward(self, x):
            return self.bn(self.head(self.features(x).flatten(1)))


    def torch_cnn():
        return randomize(TorchCNN())


    class Domains(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = flexbn.DomainBatchNorm2d(4, 3, domain_affine=True, renorm=True, rmax=1.2, dmax=0.3)

        def forward(self, x):
            return self.bn(self.conv(x), torch.arange(x.shape[0]) % 3)


    def flex_zoo():
        model = nn.Sequential(
            nn.Conv2d(3, 4, 1),
            flexbn.BatchNorm2d(4),
            flexbn.BatchNorm2d(4, detach_mean=True),
            flexbn.BatchNorm2d(4, detach_var=True, virtual_batch_size=3),
            flexbn.BatchNorm2d(4, detach_mean=True, detach_var=True, momentum=None),
            flexbn.BatchNorm2d(4, renorm=True, rmax=1.2, dmax=0.3, detach_var=True),
            flexbn.BatchNorm2d(4, track_running_stats=False, detach_mean=True),
            flexbn.SyncBatchNorm(4, detach_mean=True),
            nn.SyncBatchNorm(4),
            flexbn.BatchNorm2d(4, detach_var=True),  # frozen below
            Domains(),
        )
        randomize(model)
        flexbn.freeze(model[9])
        return model


    class DetachesMean(flexbn.BatchNorm2d):
        """Reports detach_mean=False but detaches the mean in forward."""
        def forward(self, x):
            return flexbn.batch_norm(x, None, None, self.weight, self.bias, True, detach_mean=True)


    class IgnoresDetachVar(flexbn.BatchNorm2d):
        """Reports detach_var=True but back-propagates through the variance (torch's kernel)."""
        def forward(self, x):
            return F.batch_norm(x, None, None, self.weight, self.bias, True)


    class WholeBatch(flexbn.BatchNorm2d):
        """Reports ghost batches but takes the statistics over the whole batch."""
        def forward(self, x):
            return F.batch_norm(x, None, None, self.weight, self.bias, True)


    class NoRenorm(flexbn.BatchNorm2d):
        """Reports renorm=True but computes plain batch norm."""
        def forward(self, x):
            return F.batch_norm(x, None, None, self.weight, self.bias, True)


    class AlwaysBatch(flexbn.BatchNorm2d):
        """Uses batch statistics even in eval mode / when frozen."""
        def forward(self, x):
            return F.batch_norm(x, None, None, self.weight, self.bias, True)


    class ScalesGradient(flexbn.BatchNorm2d):
        """The right output, a gradient of no mode: half of x's gradient added (batch norm computed by
        flexbn.batch_norm, which the audit cannot see: checked by the layer's output)."""
        def forward(self, x):
            y = flexbn.batch_norm(x, None, None, self.weight, self.bias, True)
            return y + 0.5 * (x - x.detach())


    def _one(layer):
        return randomize(nn.Sequential(nn.Conv2d(3, 4, 1), layer))


    def lying():
        return _one(DetachesMean(4))

    def lying_var():
        return _one(IgnoresDetachVar(4, detach_var=True))

    def lying_ghost():
        return _one(WholeBatch(4, virtual_batch_size=2))

    def lying_renorm():
        return _one(NoRenorm(4, renorm=True, rmax=1.2, dmax=0.3))

    def lying_eval():
        return _one(AlwaysBatch(4))

    def lying_frozen():
        return flexbn.freeze(_one(AlwaysBatch(4)))

    def lying_scale():
        return _one(ScalesGradient(4))


    class PerCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.masked = flexbn.BatchNorm2d(3)
            self.bags = flexbn.BatchNorm2d(3)
            self.other = flexbn.BatchNorm2d(3)
            self.unused = nn.BatchNorm2d(3)
            self.shared = flexbn.BatchNorm2d(3, detach_mean=True)

        def forward(self, x):
            mask = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool)
            mask[0, 0] = False
            x = self.masked(x, mask=mask)
            x = self.bags(x, groups=torch.arange(x.shape[0]) // 2)
            x = self.other(x, stats_input=x * 2)
            return self.shared(self.shared(x) * 3)


    def per_call():
        return randomize(PerCall())


    def no_bn():
        return nn.Sequential(nn.Linear(3, 2), nn.ReLU())


    instance = nn.Sequential(nn.BatchNorm1d(3))
    not_callable = 3

    def not_module():
        return [nn.BatchNorm1d(3)]

    def raises():
        raise RuntimeError("no weights file")


    # -- subclasses with a forward of their own, in-place operations after a batch norm (model_zoo is
    # imported in the functions: the console-script test runs this file where tests/ is not on sys.path)


    class BatchInEvalAct(nn.BatchNorm2d):
        """timm-style batch norm + activation that uses batch statistics in eval mode too."""
        def forward(self, x):
            return torch.relu(F.batch_norm(x, None, None, self.weight, self.bias, True))


    class ManualAct(nn.BatchNorm2d):
        """Batch norm by hand, then an activation: no batch_norm call the audit could check."""
        def forward(self, x):
            var, mean = torch.var_mean(x, (0, 2, 3), correction=0, keepdim=True)
            return torch.relu((x - mean) / torch.sqrt(var + self.eps))


    def lying_act():
        return _one(BatchInEvalAct(4))

    class FlexAct(flexbn.BatchNorm2d):
        """flexbn's forward, then an activation: checked at its super().forward call."""
        def forward(self, x):
            return torch.relu(super().forward(x))

    def flex_act():
        return _one(FlexAct(4, detach_mean=True, virtual_batch_size=3))

    class Relu(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    def identity_act():
        """BatchNormAct2d on non-negative input with identity statistics and affine in eval: its output
        equals batch norm of its input, its gradient does not (ReLU's is 0 at 0)."""
        import model_zoo

        return nn.Sequential(Relu(), model_zoo.BatchNormAct2d(3))

    def manual_act():
        return _one(ManualAct(4))

    def lying_in_resnet():
        """A layer that lies, followed by an in-place ReLU and a residual `+=` (model_zoo's BasicBlock)."""
        import model_zoo

        model = model_zoo.resnet()
        lying = DetachesMean(8)
        lying.load_state_dict(model.layer1[0].bn2.state_dict())
        model.layer1[0].bn2 = lying
        return model

    def converted_efficientnet(**options):
        import model_zoo

        return flexbn.convert(model_zoo.efficientnet(), **options)
    '''
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "models.py"
    path.write_text(MODELS)
    return path


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``flexbn`` run in process: (exit status, stdout, stderr); argparse's exits included."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def rows_of(models: Path, factory: str, **kwargs: object) -> dict[str, fa.AuditRow]:
    model = fa.load_model(f"{models}:{factory}")
    return {r.name: r for r in fa.audit(model, kwargs.pop("shape", (6, 3, 3, 3)), **kwargs)}


# ----------------------------------------------------------------------------------------------------------
# listing and verification of honest layers


def test_torch_cnn_cli(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(["audit", f"{models}:torch_cnn", "--input-shape", "4,3,5,5"], capsys)
    assert (rc, err) == (0, "")
    lines = {line.split()[0]: line for line in out.splitlines() if line and line[0] in "fb"}
    assert "features.1  torch.nn.BatchNorm2d  4  full" in lines["features.1"]
    assert "running EMA, momentum 0.1" in lines["features.1"]
    assert "cumulative average (momentum=None)" in lines["features.4"]
    assert "torch.nn.BatchNorm1d  5  full" in lines["bn"]
    assert "none: batch statistics in eval" in lines["bn"]
    for name in ("features.1", "features.4", "bn"):
        assert "ok: batch statistics" in lines[name]
    assert "3 batch-norm layer(s): 3 ok, 0 failed, 0 not verified" in out


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_flexbn_zoo(models: Path, mode: str) -> None:
    rows = rows_of(models, "flex_zoo", mode=mode)
    expected = {  # name: (class, gradient, statistics, inference)
        "1": ("flexbn.BatchNorm2d", "full", "whole batch", "running EMA, momentum 0.1"),
        "2": ("flexbn.BatchNorm2d", "mean detached", "whole batch", "running EMA, momentum 0.1"),
        "3": ("flexbn.BatchNorm2d", "variance detached", "ghost batches of 3", "running EMA"),
        "4": ("flexbn.BatchNorm2d", "both detached", "whole batch", "cumulative average"),
        "5": (
            "flexbn.BatchNorm2d",
            "variance detached",
            "whole batch",
            "renorm(rmax=1.2, dmax=0.3)",
        ),
        "6": ("flexbn.BatchNorm2d", "mean detached", "whole batch", "none: batch statistics"),
        "7": ("flexbn.SyncBatchNorm", "mean detached", "sync over process group", "running EMA"),
        "8": ("torch.nn.SyncBatchNorm", "full", "sync over process group", "running EMA"),
        "9": ("flexbn.BatchNorm2d", "variance detached", "whole batch", "frozen (flexbn.freeze)"),
        "10.bn": ("flexbn.DomainBatchNorm2d", "full", "per domain (3 domains)", "renorm(rmax=1.2"),
    }
    assert list(rows) == list(expected)
    for name, (cls, gradient, statistics, inference) in expected.items():
        row = rows[name]
        assert (row.cls, row.gradient, row.num_features) == (cls, gradient, 4), name
        assert row.statistics.startswith(statistics), (name, row.statistics)
        assert inference in row.inference, (name, row.inference)
        assert row.status == "ok", (name, row.check)
        assert row.max_diff is not None, name
        assert row.max_diff < 1e-12, name
        # which statistics the check used: batch ones in training, running ones in eval and when frozen
        batch = name == "6" or (mode == "train" and name != "9")
        assert row.check.startswith("batch" if batch else "running"), (name, row.check)
    assert "mask=, groups= and stats_input= are per call" in rows["1"].notes
    assert "per-domain weight and bias" in rows["10.bn"].notes
    assert rows["4"].notes == rows["1"].notes
    assert rows["8"].notes == ("local batch norm while torch.distributed is not initialized",)


def test_float32(models: Path) -> None:
    rows = rows_of(models, "flex_zoo", dtype=torch.float32)
    assert all(r.status == "ok" for r in rows.values()), rows
    assert max(r.max_diff for r in rows.values()) > 1e-9  # float32 rounding: measured in float32


def test_model_untouched(models: Path) -> None:
    model = fa.load_model(f"{models}:flex_zoo").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fa.audit(model, (6, 3, 3, 3))
    assert model.training
    assert model[1].weight.dtype == torch.float32
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(m._forward_pre_hooks for m in model.modules() if m is not model[9])


def test_not_verified_and_calls(models: Path) -> None:
    rows = rows_of(models, "per_call")
    assert {n: r.status for n, r in rows.items()} == {
        "masked": "not verified",
        "bags": "not verified",
        "other": "not verified",
        "unused": "not verified",
        "shared": "ok",
    }
    assert "called with mask=" in rows["masked"].check
    assert "called with groups=" in rows["bags"].check
    assert "called with stats_input=" in rows["other"].check
    assert rows["unused"].check == "not called by the forward"
    assert rows["shared"].check.endswith("(2 calls)")
    assert rows["masked"].max_diff is None


# ----------------------------------------------------------------------------------------------------------
# torchvision- and timm-style models (tests/model_zoo.py): in-place operations, subclasses, lazy modules

ZOO = Path(__file__).parent / "model_zoo.py"
ZOO_LAYERS = {"resnet": 8, "mobilenet": 9, "efficientnet": 8, "densenet": 8, "lazy": 2}


@pytest.mark.one_backend  # torch's layers: the backend plays no part
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO_LAYERS))
def test_zoo_every_layer_ok(name: str, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["audit", f"{ZOO}:{name}", "--input-shape", "4,3,16,16", "--mode", mode]
    rc, out, err = cli(argv, capsys)
    count = ZOO_LAYERS[name]
    assert (rc, err) == (0, ""), out
    assert f"{count} batch-norm layer(s): {count} ok, 0 failed, 0 not verified" in out
    if name in ("efficientnet", "densenet"):  # BatchNormAct2d: checked at its F.batch_norm call
        assert "at its batch_norm call" in out
        assert "BatchNormAct2d (torch.nn.BatchNorm2d subclass)" in out


def test_lazy_model_untouched(models: Path) -> None:
    import model_zoo

    model = model_zoo.lazy()
    rows = fa.audit(model, (4, 3, 6, 6))
    assert [(r.name, r.num_features, r.status) for r in rows] == [("1", 8, "ok"), ("6", 16, "ok")]
    assert type(model[1]) is nn.LazyBatchNorm2d  # the audit materialized its copy
    assert nn.parameter.is_lazy(model[1].weight)


def test_converted_subclasses_verified_with_their_options(models: Path) -> None:
    model = fa.load_model(f"{models}:converted_efficientnet", (), {"detach_var": True})
    rows = fa.audit(model, (4, 3, 16, 16))
    assert len(rows) == 8
    for row in rows:
        assert row.status == "ok", row
        assert row.gradient == "variance detached"
        assert (
            row.cls == "BatchNormAct2d (torch.nn.BatchNorm2d subclass, converted by flexbn.convert)"
        )
    assert all("at its batch_norm call" in r.check for r in rows)
    synced = fa.audit(
        fa.load_model(f"{models}:converted_efficientnet", (), {"sync": True}), (4, 3, 16, 16)
    )
    assert all(r.statistics.startswith("sync over process group") for r in synced)
    assert all(r.status == "ok" for r in synced)


def test_subclass_with_activation_still_fails_when_it_lies(models: Path) -> None:
    (row,) = rows_of(models, "lying_act", mode="eval").values()
    assert row.status == "fail", row
    assert row.check.startswith("running statistics at its batch_norm call: output differs")
    (row,) = rows_of(models, "lying_act", mode="train").values()
    assert row.status == "ok"  # in training, batch statistics are what it claims


def test_flexbn_subclass_with_activation_checked_at_its_forward(models: Path) -> None:
    for mode in ("train", "eval"):
        (row,) = rows_of(models, "flex_act", mode=mode, shape=(7, 3, 3, 3)).values()
        assert row.status == "ok", row
        assert "at its batch_norm call" in row.check
        assert row.statistics == "ghost batches of 3"


def test_activation_equal_to_identity_on_its_values(models: Path) -> None:
    """The false failure densenet121 showed in eval: check the batch-norm call, not the output."""
    rows = rows_of(models, "identity_act", mode="eval", shape=(4, 3, 5, 5))
    assert rows["1"].status == "ok", rows["1"]
    assert "at its batch_norm call" in rows["1"].check


def test_subclass_without_a_call_is_not_verified(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (row,) = rows_of(models, "manual_act").values()
    assert row.status == "not verified"
    assert "makes no batch-norm call the audit can check" in row.check
    rc, out, _ = cli(["audit", f"{models}:manual_act", "--input-shape", "4,3,5,5"], capsys)
    assert rc == 0
    assert "0 ok, 0 failed, 1 not verified" in out


def test_lying_layer_before_in_place_ops_fails(models: Path) -> None:
    rows = rows_of(models, "lying_in_resnet", shape=(4, 3, 8, 8))
    assert rows["layer1.0.bn2"].status == "fail"
    assert "claims full, but it matches mean detached" in rows["layer1.0.bn2"].check
    assert all(r.status == "ok" for n, r in rows.items() if n != "layer1.0.bn2")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["num_classes=3", "width=4", "--input-shape", "4,3,8,8"], id="before-options"),
        pytest.param(["--input-shape", "4,3,8,8", "num_classes=3", "width=4"], id="after-options"),
        pytest.param(["3", "4", "--input-shape", "4,3,8,8"], id="positional"),
    ],
)
def test_factory_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(["audit", f"{ZOO}:resnet", *argv, "--json"], capsys)
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert doc["layers"][0]["num_features"] == 4  # width=4 reached the factory
    assert [doc["factory_args"], doc["factory_kwargs"]] in (
        [[], {"num_classes": 3, "width": 4}],
        [[3, 4], {}],
    )
    rc, out, _ = cli(["audit", f"{ZOO}:resnet", *argv], capsys)
    assert rc == 0
    assert "resnet(" in out.splitlines()[0]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        pytest.param(["width=4", "3"], "positional factory argument '3' after keyword", id="order"),
        pytest.param(["width=4", "width=5"], "factory argument 'width' given twice", id="twice"),
        pytest.param(["colour=3"], "unexpected keyword argument 'colour'", id="unknown"),
        pytest.param(["--bogus"], "unrecognized arguments: --bogus", id="bad-option"),
    ],
)
def test_factory_argument_errors(
    words: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = cli(["audit", f"{ZOO}:resnet", "--input-shape", "4,3,8,8", *words], capsys)
    assert rc == 2
    assert out == ""
    assert message in err


def test_instance_takes_no_factory_arguments(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = cli(["audit", f"{models}:instance", "3", "--input-shape", "4,3"], capsys)
    assert rc == 2
    assert "is an nn.Module instance: it takes no factory arguments" in err


def test_parse_factory_args() -> None:
    args, kwargs = fa.parse_factory_args(
        ["resnet18", "(3, 4)", "x=None", "s='a=b'", "p=True", "f=1e-3"]
    )
    assert args == ("resnet18", (3, 4))
    assert kwargs == {"x": None, "s": "a=b", "p": True, "f": 1e-3}


# ----------------------------------------------------------------------------------------------------------
# the checker can fail: layers whose computation differs from their claim


@pytest.mark.parametrize(
    ("factory", "mode", "message"),
    [
        pytest.param(
            "lying", "train", "claims full, but it matches mean detached", id="detaches-mean"
        ),
        pytest.param(
            "lying_var", "train", "claims variance detached, but it matches full", id="var"
        ),
        pytest.param("lying_ghost", "train", "output differs", id="ghost-whole-batch"),
        pytest.param("lying_renorm", "train", "output differs", id="renorm-plain"),
        pytest.param(  # a forward of its own that calls F.batch_norm: checked at that call
            "lying_eval",
            "eval",
            "running statistics at its batch_norm call: output differs",
            id="eval-batch",
        ),
        pytest.param(
            "lying_frozen",
            "train",
            "running statistics at its batch_norm call: output differs",
            id="frozen",
        ),
        pytest.param("lying_scale", "train", "it matches no gradient mode", id="scaled-grad"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_lying_layer_fails(
    models: Path, factory: str, mode: str, message: str, dtype: torch.dtype
) -> None:
    (row,) = [r for r in rows_of(models, factory, mode=mode, dtype=dtype).values()]
    assert row.status == "fail", row
    assert message in row.check
    assert row.max_diff > 1e-2  # fails by far, not by rounding


def test_lying_layer_cli(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(["audit", f"{models}:lying", "--input-shape", "4,3,5,5"], capsys)
    assert rc == 1
    assert "DetachesMean (flexbn.BatchNorm2d subclass)" in out
    assert "FAIL: claims full, but it matches mean detached" in out
    assert "0 ok, 1 failed" in out
    rc, out, _ = cli(["audit", f"{models}:lying", "--input-shape", "4,3,5,5", "--json"], capsys)
    doc = json.loads(out)
    assert rc == 1
    assert doc["passed"] is False
    assert doc["layers"][0]["status"] == "fail"


def test_json(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["audit", f"{models}:torch_cnn", "--input-shape", "4,3,5,5", "--mode", "eval", "--json"]
    rc, out, _ = cli(argv, capsys)
    doc = json.loads(out)
    assert rc == 0
    assert doc["passed"] is True
    assert (doc["input_shape"], doc["mode"], doc["dtype"]) == ([4, 3, 5, 5], "eval", "float64")
    assert [row["name"] for row in doc["layers"]] == ["features.1", "features.4", "bn"]
    assert set(doc["layers"][0]) == {f.name for f in dataclasses.fields(fa.AuditRow)}
    checks = [row["check"].split(",")[0] for row in doc["layers"]]
    assert checks == ["running statistics", "running statistics", "batch statistics"]


def test_no_batch_norm(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(["audit", f"{models}:no_bn", "--input-shape", "4,3"], capsys)
    assert (rc, err) == (0, "")
    assert "no batch-norm layer found: nothing to verify" in out


def test_instance_accepted(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(["audit", f"{models}:instance", "--input-shape", "4,3"], capsys)
    assert rc == 0
    assert "ok: batch statistics" in out


# ----------------------------------------------------------------------------------------------------------
# errors: exit status 2 and a message naming what is wrong


@pytest.mark.parametrize(
    ("target", "shape", "message"),
    [
        pytest.param("no_such_module_xyz:f", "4,3", "module not found: 'no_such_module_xyz'", id="module"),
        pytest.param("{dir}/nope.py:f", "4,3", "module file not found", id="file"),
        pytest.param("{models}", "4,3", "expected MODULE:FACTORY", id="no-colon"),
        pytest.param("{models}:nope", "4,3", "factory 'nope' not found in module", id="factory"),
        pytest.param("{models}:not_callable", "4,3", "is not callable: it is a int", id="not-callable"),
        pytest.param("{models}:not_module", "4,3", "must return a torch.nn.Module, but returned list", id="not-module"),
        pytest.param("{models}:raises", "4,3", "failed: RuntimeError: no weights file", id="factory-raises"),
        pytest.param("{broken}:f", "4,3", "importing", id="import-raises"),
        pytest.param("{models}:torch_cnn", "4,3", "the model failed on a train-mode input of shape (4, 3)", id="shape-fails"),
        pytest.param("{models}:torch_cnn", "1,3,5,5", "Expected more than 1 value per channel", id="batch-of-1"),
        pytest.param("{models}:torch_cnn", "4,x", "argument --input-shape: expected comma-separated", id="not-ints"),
        pytest.param("{models}:torch_cnn", "4", "with at least 2 dimensions", id="one-dim"),
        pytest.param("{models}:torch_cnn", "4,0,5", "but got '4,0,5'", id="zero"),
    ],
)  # fmt: skip
def test_errors(
    models: Path, target: str, shape: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = models.parent / "broken.py"
    broken.write_text("import torch\nraise ImportError('needs a GPU build')\n")
    target = target.format(models=models, dir=models.parent, broken=broken)
    rc, out, err = cli(["audit", target, "--input-shape", shape], capsys)
    assert rc == 2
    assert out == ""
    assert "flexbn audit: error:" in err, err
    assert message in err, err


def test_bad_option(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["audit", f"{models}:torch_cnn", "--input-shape", "4,3,5,5", "--mode", "test"]
    rc, _, err = cli(argv, capsys)
    assert rc == 2
    assert "invalid choice: 'test'" in err


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        pytest.param({"model": "m"}, TypeError, "model must be a torch.nn.Module, but got str", id="model"),
        pytest.param({"input_shape": (4,)}, ValueError, "at least 2 positive ints", id="shape-1d"),
        pytest.param({"input_shape": (4, 2.0)}, ValueError, "but got (4, 2.0)", id="shape-float"),
        pytest.param({"mode": "test"}, ValueError, "mode must be 'train' or 'eval'", id="mode"),
        pytest.param({"dtype": torch.float16}, ValueError, "dtype must be torch.float64 or", id="dtype"),
    ],
)  # fmt: skip
def test_api_errors(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    args = {"model": nn.BatchNorm1d(3), "input_shape": (4, 3), **kwargs}
    with pytest.raises(error) as info:
        fa.audit(args.pop("model"), args.pop("input_shape"), **args)
    assert message in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# the installed console script, with a dotted module from the current directory


def test_console_script(models: Path) -> None:
    script = Path(sys.executable).parent / "flexbn"
    result = subprocess.run(
        [str(script), "audit", "models:flex_zoo", "--input-shape", "6,3,3,3"],
        cwd=models.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "FLEXBN_BACKEND": "reference"},
    )
    assert result.returncode == 0, result.stderr
    assert "10 batch-norm layer(s): 10 ok, 0 failed, 0 not verified" in result.stdout
    assert "10.bn  flexbn.DomainBatchNorm2d" in result.stdout
