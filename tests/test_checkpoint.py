"""Activation checkpointing (``torch.utils.checkpoint``): running statistics updated once per forward.

A checkpointed block runs its forward twice -- once, and again during backward to rebuild the activations it
did not keep. torch's batch norm updates its running statistics and ``num_batches_tracked`` on both runs
(pytorch#96136; checked below, so the tests show the bug is real); flexbn's update once, by the first run.
Every test compares a checkpointed block with an identical block run without checkpointing, over two steps:
outputs, the input and every parameter gradient, and every buffer -- equal to rounding (the same operations
run in both). With batch renormalization the recomputation must also reuse the first run's corrections
``r, d`` (the running statistics have moved in between), including for a module called several times.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import flexbn
from conftest import assert_close

C = 3
F64 = torch.float64
REENTRANT = [pytest.param(True, id="reentrant"), pytest.param(False, id="non-reentrant")]


class Functional(nn.Module):
    """``flexbn.batch_norm`` with buffers held by a plain module (the functional path)."""

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.options = options
        self.weight = nn.Parameter(torch.empty(C, dtype=F64).uniform_(0.5, 1.5))
        self.bias = nn.Parameter(torch.randn(C, dtype=F64))
        self.register_buffer("running_mean", torch.randn(C, dtype=F64) * 0.5)
        self.register_buffer("running_var", torch.rand(C, dtype=F64) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return flexbn.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, **self.options
        )


def bn(kind: str) -> nn.Module:
    options = {
        "bn": {},
        "momentum-none": {"momentum": None},
        "detach-var": {"detach_var": True},
        "renorm": {"renorm": True, "rmax": 1.3, "dmax": 0.4},
        "renorm-unclipped": {"renorm": True, "rmax": math.inf, "dmax": math.inf},
    }
    if kind == "torch":
        module = nn.BatchNorm2d(C, dtype=F64)
    elif kind == "functional-renorm":
        return Functional(renorm=True, rmax=1.3, dmax=0.4)
    elif kind.startswith("domain"):
        module = flexbn.DomainBatchNorm2d(C, 2, dtype=F64, renorm=kind == "domain-renorm")
    else:
        module = flexbn.BatchNorm2d(C, dtype=F64, **options[kind])
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_mean.normal_(0, 0.5)
        module.running_var.uniform_(0.5, 2.0)
    return module


class Block(nn.Module):
    """bn -> relu -> 1x1 conv -> bn, the batch norms of one kind (Domain ones take the domain ids)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.bn1, self.bn2 = bn(kind), bn(kind)
        self.conv = nn.Conv2d(C, C, 1, dtype=F64)
        self.domain = kind.startswith("domain")

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        extra = (domain,) if self.domain else ()
        h = self.conv(torch.relu(self.bn1(x, *extra)))
        return self.bn2(h, *extra)


def compare(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert_close(p.grad, q.grad, msg=f"gradient of {name}")
    for (name, s), t in zip(a.named_buffers(), b.buffers(), strict=True):
        if s.dtype.is_floating_point:
            assert_close(s, t, msg=f"buffer {name}")
        else:  # num_batches_tracked
            assert s.tolist() == t.tolist(), f"buffer {name}"


def run_steps(model: nn.Module, reentrant: bool | None, steps: int = 2, *, backward_twice=False):
    """``steps`` forward/backward passes (checkpointed unless ``reentrant is None``); outputs and input
    gradients per step. Gradients accumulate in the parameters."""
    torch.manual_seed(1)
    outs = []
    for step in range(steps):
        x = (torch.randn(4, C, 2, 3, dtype=F64) * 2 + step).requires_grad_()
        domain = torch.tensor([0, 1, 1, 0])
        if reentrant is None:
            y = model(x, domain)
        else:
            y = checkpoint(model, x, domain, use_reentrant=reentrant)
        g = torch.randn_like(y)
        y.backward(g, retain_graph=backward_twice)
        if backward_twice:
            y.backward(g)
        outs.append((y.detach(), x.grad))
    return outs


KINDS = [
    "bn",
    "momentum-none",
    "detach-var",
    "renorm",
    "renorm-unclipped",
    "functional-renorm",
    "domain",
    "domain-renorm",
]


@pytest.mark.parametrize("reentrant", REENTRANT)
@pytest.mark.parametrize("kind", KINDS)
def test_checkpointed_block_equals_plain_run(kind, reentrant):
    torch.manual_seed(0)
    plain = Block(kind)
    ckpt = copy.deepcopy(plain)
    for (y, gx), (y_ref, gx_ref) in zip(
        run_steps(ckpt, reentrant), run_steps(plain, None), strict=True
    ):
        assert_close(y, y_ref)
        assert_close(gx, gx_ref)
    compare(ckpt, plain)
    if not isinstance(plain.bn1, Functional):
        nbt = ckpt.bn1.num_batches_tracked
        assert nbt.tolist() == ([2, 2] if kind.startswith("domain") else 2)


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_torch_batch_norm_updates_twice(reentrant):
    """The bug being fixed, shown on torch's own module: recomputation updates the statistics again."""
    torch.manual_seed(0)
    plain = Block("torch")
    ckpt = copy.deepcopy(plain)
    for (y, gx), (y_ref, gx_ref) in zip(
        run_steps(ckpt, reentrant), run_steps(plain, None), strict=True
    ):
        assert_close(y, y_ref)
        assert_close(gx, gx_ref)
    assert int(plain.bn1.num_batches_tracked) == 2
    assert int(ckpt.bn1.num_batches_tracked) == 4
    assert (ckpt.bn1.running_mean - plain.bn1.running_mean).abs().max() > 1e-3


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_backward_twice_with_retain_graph(reentrant):
    """Two backward passes recompute twice: the statistics still move once, the corrections stay the
    first run's."""
    torch.manual_seed(0)
    plain = Block("renorm")
    ckpt = copy.deepcopy(plain)
    runs = zip(
        run_steps(ckpt, reentrant, backward_twice=True),
        run_steps(plain, None, backward_twice=True),
        strict=True,
    )
    for (y, gx), (y_ref, gx_ref) in runs:
        assert_close(y, y_ref)
        assert_close(gx, gx_ref)
    compare(ckpt, plain)
    assert int(ckpt.bn1.num_batches_tracked) == 2


class Shared(nn.Module):
    """One renorm batch norm used twice inside a segment, the segment applied to two views (as in
    siamese / contrastive training), each view in its own checkpoint."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.bn = bn("renorm")
        self.conv = nn.Conv2d(C, C, 1, dtype=F64)
        self.reentrant = reentrant

    def segment(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(torch.relu(self.bn(x))))

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        if self.reentrant is None:
            return self.segment(x1) * self.segment(x2)
        y1 = checkpoint(self.segment, x1, use_reentrant=self.reentrant)
        y2 = checkpoint(self.segment, x2, use_reentrant=self.reentrant)
        return y1 * y2


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_module_called_several_times_per_step(reentrant):
    torch.manual_seed(0)
    plain = Shared(None)
    ckpt = copy.deepcopy(plain)
    ckpt.reentrant = reentrant
    for step in range(2):
        x1, x2 = (torch.randn(4, C, 2, 2, dtype=F64) + step for _ in range(2))
        xs = [t.clone().requires_grad_() for t in (x1, x2, x1, x2)]
        y, y_ref = ckpt(xs[0], xs[1]), plain(xs[2], xs[3])
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert_close(y, y_ref)
        assert_close(xs[0].grad, xs[2].grad)
        assert_close(xs[1].grad, xs[3].grad)
        compare(ckpt, plain)
    assert int(ckpt.bn.num_batches_tracked) == 8


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_recomputation_without_stash_differs(reentrant, monkeypatch):
    """Negative check: without the first run's corrections the recomputation uses moved running statistics
    (and says so), and the gradients differ -- so the tests above can fail."""
    monkeypatch.setattr(flexbn._core.renorm, "_lookup", lambda *args: None)
    torch.manual_seed(0)
    plain = Block("renorm")
    ckpt = copy.deepcopy(plain)
    with pytest.warns(RuntimeWarning, match="without a stashed first forward"):
        (_, gx), *_ = run_steps(ckpt, reentrant, steps=1)
    (_, gx_ref), *_ = run_steps(plain, None, steps=1)
    assert (gx - gx_ref).abs().max() > 1e-3
    assert int(ckpt.bn1.num_batches_tracked) == 1  # the count is still right
