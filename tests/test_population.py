"""recompute_stats (precise BN / AdaBN) and freeze / unfreeze (axis P).

recompute_stats is checked against population statistics computed directly in float64 from the concatenated
inputs of each layer, collected by a manual pass (every batch-norm layer normalizing with its batch
statistics through torch's functional batch norm, everything else in eval mode). freeze is checked against
the same model in eval mode.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flexbn
from conftest import assert_close
from flexbn.modules import _DomainBatchNorm
from flexbn.population import _frozen_pre_hook


def randomize(model: nn.Module) -> nn.Module:
    """Random affine parameters and non-default running statistics in every batch-norm layer."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, _DomainBatchNorm)):
                if m.weight is not None:
                    m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                    m.bias.copy_(torch.randn_like(m.bias))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn_like(m.running_mean))
                    m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                    m.num_batches_tracked.fill_(7)
    return model


def population(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Float64 mean and unbiased variance per channel of ``(N, C, *)`` tensors, all batches pooled."""
    flat = torch.cat([p.double().transpose(0, 1).reshape(p.shape[1], -1) for p in parts], 1)
    return flat.mean(1), flat.var(1)


def buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = buffers(model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


# ---------------------------------------------------------------------------------------------------------
# recompute_stats: exactness


def cnn() -> nn.Sequential:
    """torch's and flexbn's batch norms mixed; later layers' inputs depend on earlier ones'
    normalization; a dropout before a batch norm (off during the pass)."""
    return randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(4, 5, 3),
            flexbn.BatchNorm2d(5, momentum=None),
            nn.ReLU(),
            nn.Conv2d(5, 3, 1),
            nn.SyncBatchNorm(3),  # not distributed here: a plain batch norm
            nn.Conv2d(3, 2, 1),
            flexbn.BatchNorm2d(2, virtual_batch_size=2),  # ghost batches: population over all
        )
    )


def manual_pass(model: nn.Sequential, batches: list[Tensor]) -> dict[int, list[Tensor]]:
    """The input of every batch-norm layer of a Sequential, per batch, with batch-norm layers normalizing
    with their batch statistics (ghost batches too) and everything else in eval mode."""
    inputs: dict[int, list[Tensor]] = {}
    with torch.no_grad():
        for x in batches:
            h = x
            for i, layer in enumerate(model):
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    inputs.setdefault(i, []).append(h)
                    vbs = getattr(layer, "virtual_batch_size", None)
                    chunks = [h] if vbs is None else h.tensor_split(h.shape[0] // vbs)
                    h = torch.cat(
                        [
                            F.batch_norm(
                                c, None, None, layer.weight, layer.bias, True, 0.0, layer.eps
                            )
                            for c in chunks
                        ]
                    )
                else:
                    h = layer.eval()(h)
    return inputs


def cnn_batches(sizes: tuple[int, ...] = (5, 2, 9, 3)) -> list[Tensor]:
    return [torch.randn(n, 3, 5, 4) * 2 + torch.randn(1, 3, 1, 1) for n in sizes]


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "frozen"])
def test_cnn_population_statistics(frozen: bool) -> None:
    model = cnn()
    batches = cnn_batches()
    ref = manual_pass(copy.deepcopy(model), batches)
    other = copy.deepcopy(model)
    if frozen:
        flexbn.freeze(model)
    model.train()
    out = flexbn.recompute_stats(model, batches)
    assert out is model
    assert sorted(ref) == [1, 5, 8, 10]
    for i, parts in ref.items():
        mean, var = population(parts)
        assert_close(model[i].running_mean, mean, msg=f"layer {i}")
        assert_close(model[i].running_var, var, msg=f"layer {i}")
        assert int(model[i].num_batches_tracked) == len(batches)
    # Negative check: update_bn's cumulative average of batch variances is not the population variance.
    torch.optim.swa_utils.update_bn(batches, other)
    assert not torch.allclose(other[1].running_var.double(), population(ref[1])[1], rtol=1e-3)
    # Frozen layers are still frozen: a training-mode forward leaves every buffer as it is.
    before = buffers(model)
    model(batches[0])
    if frozen:
        assert_unchanged(model, before)
    else:
        assert not torch.equal(model[1].running_mean, before["1.running_mean"])


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, flexbn.BatchNorm1d], ids=["torch", "flexbn"])
def test_large_mean_stays_accurate(cls: type[nn.Module]) -> None:
    """float32 channels with mean 1e4 and std 0.1, in batches of different sizes."""
    model = nn.Sequential(cls(3))
    batches = [1e4 + 0.1 * torch.randn(n, 3, 8) for n in (64, 3, 200, 17)]
    flexbn.recompute_stats(model, batches)
    mean, var = population(batches)
    assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var.double(), var, rtol=1e-6, atol=0)


class MaskedNet(nn.Module):
    """A padded-sequence model: statistics of the pre-scaling activations (stats_input), over real
    positions (mask), per bag (groups) in the second layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 1)
        self.bn = flexbn.BatchNorm1d(4)
        self.bn2 = flexbn.BatchNorm1d(4)
        randomize(self)

    def forward(self, x: Tensor, mask: Tensor, groups: Tensor | None = None) -> Tensor:
        h = self.conv(x)
        y = self.bn(2 * h + 1, stats_input=h, mask=mask)
        return self.bn2(y, mask=mask, groups=groups)


def test_mask_stats_input_groups_dict_batches() -> None:
    model = MaskedNet()
    batches = []
    for n, length in ((4, 6), (3, 9), (6, 5)):
        x = torch.randn(n, 3, length) + 3
        mask = torch.rand(n, length) < 0.7
        mask[:, :2] = True
        x = x.masked_fill(~mask.unsqueeze(1), float("nan"))  # padding must not reach any statistic
        groups = torch.arange(n) % 2 if n > 3 else None
        batches.append({"x": x, "mask": mask, "groups": groups})
    flexbn.recompute_stats(model, batches)  # default forward of a dict: model(**batch)

    h_parts, y_parts = [], []
    with torch.no_grad():
        for b in batches:
            real = b["mask"].unsqueeze(1).expand(-1, 4, -1)
            h = model.conv(b["x"]).double()
            hr = h.transpose(0, 1)[real.transpose(0, 1)].reshape(4, -1)  # (C, real elements)
            var, mean = torch.var_mean(hr, 1, correction=0)
            w, bias = model.bn.weight.double(), model.bn.bias.double()
            y = (2 * hr + 1 - mean[:, None]) / torch.sqrt(var[:, None] + model.bn.eps)
            y = y * w[:, None] + bias[:, None]
            h_parts.append(hr.T.unsqueeze(-1))
            y_parts.append(y.T.unsqueeze(-1))
    for bn, parts in ((model.bn, h_parts), (model.bn2, y_parts)):
        mean, var = population(parts)
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)
        assert torch.isfinite(bn.running_var).all()


class DomainNet(nn.Module):
    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 1)
        self.bn = flexbn.DomainBatchNorm1d(3, num_domains=3)
        self.keyword = keyword
        randomize(self)

    def forward(self, x: Tensor, domain: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.conv(x)
        if self.keyword:
            return self.bn(h, domain=domain, mask=mask)
        return self.bn(h, domain, mask=mask)


@pytest.mark.parametrize("keyword", [False, True], ids=["domain-positional", "domain-keyword"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_domain_batch_norm_per_domain(keyword: bool, masked: bool) -> None:
    model = DomainNet(keyword)
    before = buffers(model)
    domains = [torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1, 1, 1]), torch.tensor([0, 0, 1, 1])]
    batches = []
    for d in domains:
        x = torch.randn(len(d), 2, 4) + d.view(-1, 1, 1) * 5.0  # domains differ a lot
        mask = torch.ones(len(d), 4, dtype=torch.bool)
        if masked:
            mask[:, 3] = False
        batches.append((x, d, mask))
    flexbn.recompute_stats(model, batches, forward=lambda m, b: m(*b))
    with torch.no_grad():
        hs = [(model.conv(x), d, mask) for x, d, mask in batches]
    for dom in (0, 1):
        parts = [h[d == dom][:, :, mask[d == dom][0]] for h, d, mask in hs if (d == dom).any()]
        mean, var = population(parts)
        assert_close(model.bn.running_mean[dom], mean)
        assert_close(model.bn.running_var[dom], var)
    assert model.bn.num_batches_tracked.tolist() == [2, 3, 7]  # batches holding each domain
    # Domain 2 never appears: its rows are untouched (and no warning: AdaBN on some domains is the point).
    assert torch.equal(model.bn.running_mean[2], before["bn.running_mean"][2])
    assert torch.equal(model.bn.running_var[2], before["bn.running_var"][2])


def test_dropout_is_off_during_the_pass() -> None:
    model = randomize(
        nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), flexbn.BatchNorm1d(6))
    ).train()
    batches = [torch.randn(n, 4) for n in (8, 5)]
    flexbn.recompute_stats(model, batches)
    with torch.no_grad():
        mean, var = population([model[0](x) for x in batches])
    assert_close(model[2].running_mean, mean)
    assert_close(model[2].running_var, var)
    assert model[1].training  # restored


def test_modes_momentum_hooks_restored_per_module() -> None:
    model = cnn().train()
    model[1].eval()
    model[3].eval()
    model[1].momentum = None
    model[5].momentum = 0.3
    calls = []
    model[8].register_forward_pre_hook(lambda m, a: calls.append(m.training))
    flexbn.freeze(model[10])  # one frozen layer
    modes = {name: m.training for name, m in model.named_modules()}
    momenta = {name: m.momentum for name, m in model.named_modules() if hasattr(m, "momentum")}
    hooks = {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks))
        for name, m in model.named_modules()
    }
    flexbn.recompute_stats(model, cnn_batches((4, 3)))
    assert calls == [True, True]  # batch-norm layers ran in training mode during the pass
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {n: m.momentum for n, m in model.named_modules() if hasattr(m, "momentum")} == momenta
    assert {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks))
        for name, m in model.named_modules()
    } == hooks


def test_max_batches_does_not_read_past() -> None:
    model = randomize(nn.Sequential(flexbn.BatchNorm1d(3)))
    data = [torch.randn(n, 3) + i for i, n in enumerate((4, 6, 5, 7))]

    def stream() -> Iterator[Tensor]:
        yield from data

    it = stream()
    flexbn.recompute_stats(model, it, max_batches=2)
    assert torch.equal(next(it), data[2])  # the third batch was not consumed
    mean, var = population(data[:2])
    assert_close(model[0].running_mean, mean)
    assert_close(model[0].running_var, var)
    assert int(model[0].num_batches_tracked) == 2
    flexbn.recompute_stats(model, data, max_batches=10)  # more than there are: all of them
    assert_close(model[0].running_var, population(data)[1])


def test_unreached_layer_warns_and_keeps_its_statistics() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.BatchNorm1d(3)
            self.head = flexbn.BatchNorm1d(3)

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

    model = randomize(TwoHeads())
    before = buffers(model)
    with pytest.warns(UserWarning, match=r"\['head'\]"):
        flexbn.recompute_stats(model, [torch.randn(4, 3)])
    assert torch.equal(model.head.running_var, before["head.running_var"])
    assert not torch.equal(model.body.running_var, before["body.running_var"])


def test_progress_bar_with_fake_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    record: dict[str, object] = {}

    class FakeTqdm:
        def __init__(self, iterable, total=None, desc=None, unit=None):
            record.update(total=total, desc=desc, closed=False, seen=0)
            self.iterable = iterable

        def __iter__(self):
            for item in self.iterable:
                record["seen"] += 1
                yield item

        def close(self) -> None:
            record["closed"] = True

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeTqdm))
    model = nn.Sequential(nn.BatchNorm1d(3))
    data = [torch.randn(4, 3) for _ in range(5)]
    flexbn.recompute_stats(model, data, progress=True, max_batches=3)
    assert record == {"total": 3, "desc": "recompute_stats", "closed": True, "seen": 3}
    assert int(model[0].num_batches_tracked) == 3


def test_progress_without_tqdm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    model = randomize(nn.Sequential(nn.BatchNorm1d(3)))
    before = buffers(model)
    with pytest.raises(ImportError, match=r"flexbn\[progress\]"):
        flexbn.recompute_stats(model, [torch.randn(4, 3)], progress=True)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("model", "kwargs", "exc", "match"),
    [
        pytest.param(nn.Sequential(nn.Linear(2, 2)), {}, ValueError, "batch-norm", id="no-bn"),
        pytest.param(
            nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)),
            {},
            ValueError,
            "running statistics",
            id="no-running-stats",
        ),
        pytest.param(lambda x: x, {}, TypeError, "torch.nn.Module", id="not-a-module"),
        pytest.param(None, {"max_batches": 0}, ValueError, "max_batches", id="max_batches=0"),
        pytest.param(None, {"max_batches": -2}, ValueError, "max_batches", id="max_batches<0"),
        pytest.param(None, {"max_batches": 1.5}, ValueError, "max_batches", id="max_batches-float"),
        pytest.param(None, {"max_batches": True}, ValueError, "max_batches", id="max_batches-bool"),
        pytest.param(None, {"forward": 3}, ValueError, "forward must be a callable", id="forward"),
        pytest.param(None, {"progress": 1}, TypeError, "progress must be a bool", id="progress"),
    ],
)
def test_bad_arguments(model: object, kwargs: dict, exc: type, match: str) -> None:
    model = nn.Sequential(nn.BatchNorm1d(3)) if model is None else model
    with pytest.raises(exc, match=match):
        flexbn.recompute_stats(model, [torch.randn(4, 3)], **kwargs)


def failing_forward(model: nn.Module, batch: object) -> None:
    if isinstance(batch, str):
        raise RuntimeError("broken batch")
    model(batch)


@pytest.mark.parametrize(
    ("data", "forward", "exc", "match"),
    [
        pytest.param([], None, ValueError, "no batch", id="empty-data"),
        pytest.param([torch.randn(4, 3, 5), "text"], None, TypeError, "forward=", id="batch-type"),
        pytest.param(
            [torch.randn(4, 3, 5), "text"],
            failing_forward,
            RuntimeError,
            "broken",
            id="forward-raises",
        ),
        pytest.param(
            [torch.randn(4, 3, 5), torch.randn(1, 3, 1)],
            None,
            ValueError,
            "more than 1 value",
            id="layer-raises",
        ),
    ],
)
def test_failure_restores_everything(data: list, forward: object, exc: type, match: str) -> None:
    model = randomize(nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(), flexbn.BatchNorm1d(3))).eval()
    before = buffers(model)
    hooks = [len(m._forward_hooks) for m in model]
    with pytest.raises(exc, match=match):
        flexbn.recompute_stats(model, data, forward=forward)
    assert_unchanged(model, before)
    assert not any(m.training for m in model.modules())
    assert [len(m._forward_hooks) for m in model] == hooks


# ---------------------------------------------------------------------------------------------------------
# recompute_stats across processes (gloo, CPU)


class LocalSyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm trains on GPUs only; this one normalizes per process (the population merge
    across processes is what is under test)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            0.1,
            self.eps,
        )


class SyncAndPlain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sync = LocalSyncBatchNorm(3)
        self.plain = nn.BatchNorm1d(3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.sync(x), self.plain(x)


def rank_data(rank: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return [torch.randn(n, 3, generator=gen) + 4 * rank for n in ((5, 3), (4, 6, 2))[rank]]


def _distributed_worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = SyncAndPlain()
        flexbn.recompute_stats(model, rank_data(rank))
        mean, var = population(rank_data(0) + rank_data(1))
        assert_close(model.sync.running_mean, mean)
        assert_close(model.sync.running_var, var)
        # The most batches any rank saw (2 and 3 here): the same on every rank.
        assert int(model.sync.num_batches_tracked) == max(len(rank_data(r)) for r in range(2))
        mean, var = population(rank_data(rank))
        assert_close(model.plain.running_mean, mean)
        assert_close(model.plain.running_var, var)
    finally:
        dist.destroy_process_group()


def test_sync_batch_norm_merges_processes(tmp_path: Path) -> None:
    """Two gloo ranks, each a fresh interpreter running ``_distributed_worker`` (bounded in time)."""
    code = "import sys, test_population as t; t._distributed_worker(int(sys.argv[1]), sys.argv[2])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(rank), str(tmp_path / "init")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out}"


# ---------------------------------------------------------------------------------------------------------
# freeze / unfreeze


class FreezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = flexbn.BatchNorm2d(4, momentum=None)
        self.dbn = flexbn.DomainBatchNorm2d(4, num_domains=2)
        self.sync = nn.SyncBatchNorm(4)
        self.free = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics always
        randomize(self)

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        h = self.bn1(self.conv(x))
        h = torch.relu(self.bn2(h))
        h = self.dbn(h, domain)
        return self.free(self.sync(h))


DOMAIN = torch.tensor([0, 1, 1, 0, 1])


def run(model: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    x = x.clone().requires_grad_()
    model.zero_grad()
    y = model(x, DOMAIN)
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_frozen_training_equals_eval() -> None:
    model = FreezeNet()
    reference = copy.deepcopy(model).eval()
    unfrozen = copy.deepcopy(model).train()
    assert flexbn.freeze(model) is model
    model.train()
    before = buffers(model)
    x, g = torch.randn(5, 3, 4, 4), torch.randn(5, 4, 4, 4)
    y, gx, grads = run(model, x, g)
    y_ref, gx_ref, grads_ref = run(reference, x, g)
    assert_close(y, y_ref)
    assert_close(gx, gx_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(grads[name], grads_ref[name], msg=name)
    assert_unchanged(model, before)
    assert model.training  # the flag still says what model.train() set
    assert model.bn1.training
    # Negative check: training mode without freeze differs and updates the buffers.
    y_train, _, _ = run(unfrozen, x, g)
    assert not torch.allclose(y_train, y_ref, atol=1e-3)
    assert not torch.equal(unfrozen.bn1.running_mean, before["bn1.running_mean"])


def test_unfreeze_restores_training_behaviour() -> None:
    model = FreezeNet()
    never = copy.deepcopy(model).train()
    flexbn.unfreeze(flexbn.freeze(model)).train()
    x, g = torch.randn(5, 3, 4, 4), torch.randn(5, 4, 4, 4)
    y, gx, _ = run(model, x, g)
    y_ref, gx_ref, _ = run(never, x, g)
    assert_close(y, y_ref)
    assert_close(gx, gx_ref)
    after, after_ref = buffers(model), buffers(never)
    for k in after_ref:
        if after[k].is_floating_point():
            assert_close(after[k], after_ref[k], msg=k)
        else:
            assert torch.equal(after[k], after_ref[k]), k
    assert int(model.bn1.num_batches_tracked) == 8  # 7 (randomize) + this step


def frozen_hook_counts(model: nn.Module) -> list[int]:
    return [
        sum(h is _frozen_pre_hook for h in m._forward_pre_hooks.values()) for m in model.modules()
    ]


def test_freeze_idempotent_and_survives_mode_switches() -> None:
    model = FreezeNet()
    flexbn.unfreeze(model)  # not frozen: nothing to undo
    assert sum(frozen_hook_counts(model)) == 0
    flexbn.freeze(flexbn.freeze(model))
    # One hook per layer with running statistics (not the track_running_stats=False one).
    assert frozen_hook_counts(model) == [0, 0, 1, 1, 1, 1, 0]
    model.eval().train().eval().train()
    before = buffers(model)
    model(torch.randn(5, 3, 4, 4), DOMAIN)
    assert_unchanged(model, before)
    flexbn.unfreeze(flexbn.unfreeze(model))
    assert sum(frozen_hook_counts(model)) == 0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_freeze_survives_copies_and_state_dict(how: str) -> None:
    model = flexbn.freeze(FreezeNet())
    keys = list(FreezeNet().state_dict())
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    clone.train()
    before = buffers(clone)
    x = torch.randn(5, 3, 4, 4)
    assert_close(clone(x, DOMAIN), copy.deepcopy(model).eval()(x, DOMAIN))
    assert_unchanged(clone, before)
    # state_dict round trip: same keys, and the frozen state is not part of it.
    fresh = FreezeNet()
    fresh.load_state_dict(clone.state_dict())
    assert sum(frozen_hook_counts(fresh)) == 0
    model.load_state_dict(fresh.state_dict())
    assert sum(frozen_hook_counts(model)) == 4


def test_frozen_layer_restores_its_mode_when_forward_raises() -> None:
    bn = flexbn.freeze(nn.Sequential(flexbn.BatchNorm2d(4))).train()[0]
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        bn(torch.randn(2, 3, 4, 4))
    assert bn.training
    assert "_flexbn_frozen_training" not in bn.__dict__


@pytest.mark.parametrize("fn", [flexbn.freeze, flexbn.unfreeze], ids=["freeze", "unfreeze"])
def test_freeze_needs_a_batch_norm_layer(fn) -> None:
    with pytest.raises(ValueError, match="at least one batch-norm layer"):
        fn(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)))
