"""A call flexbn refuses changes nothing: ``num_batches_tracked``, the running statistics and the parameters
are as before, whatever the reason (bad arguments, statistics that cannot be taken, renorm limits, ids).

torch bumps ``num_batches_tracked`` before ``F.batch_norm`` checks sizes; flexbn validates first -- with
``momentum=None`` a bumped counter would skew the cumulative averages for the rest of training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import flexbn

C = 3


def _state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m: nn.Module, before: dict[str, Tensor]) -> None:
    after = m.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed by a refused call"


def _bn(**options: Any) -> nn.Module:
    return flexbn.BatchNorm1d(C, momentum=None, **options).train()


def _x(n: int = 6, length: int = 4) -> Tensor:
    return torch.randn(n, C, length)


REJECTIONS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Any], type, str]] = {
    # name: (module, the refused call, exception, message)
    "wrong-channels": (_bn, lambda m: m(torch.randn(6, C + 1, 4)), RuntimeError, "should contain"),
    "wrong-rank": (_bn, lambda m: m(torch.randn(6, C, 4, 4)), ValueError, "expected 2D or 3D"),
    "one-value-per-channel": (_bn, lambda m: m(torch.randn(1, C)), ValueError, "more than 1 value"),
    "integer-input": (_bn, lambda m: m(torch.ones(6, C, 4, dtype=torch.long)), NotImplementedError, "not implemented"),
    "mask-shape": (_bn, lambda m: m(_x(), mask=torch.ones(6, 5, dtype=torch.bool)), ValueError, "mask must have shape"),
    "mask-dtype": (_bn, lambda m: m(_x(), mask=torch.ones(6, 4)), ValueError, "mask must be a bool"),
    "mask-one-value": (
        _bn,
        lambda m: m(_x(), mask=torch.eye(6, 4, dtype=torch.bool)[:, :4] & (torch.arange(6) == 0)[:, None]),
        ValueError,
        "selected by mask has 1",
    ),
    "groups-dtype": (_bn, lambda m: m(_x(), groups=torch.zeros(6)), ValueError, "integer tensor"),
    "groups-shape": (_bn, lambda m: m(_x(), groups=torch.zeros(5, dtype=torch.long)), ValueError, "groups must have shape"),
    "groups-one-value": (
        _bn,
        lambda m: m(_x(length=1), groups=torch.tensor([0, 0, 1, 1, 1, 2])),
        ValueError,
        "selected by groups has 1",
    ),
    "stats-input-shape": (_bn, lambda m: m(_x(), stats_input=torch.randn(5, C, 4)), ValueError, "stats_input must have"),
    "renorm-limit": (
        lambda: _bn(renorm=True),
        lambda m: (setattr(m, "rmax", 0.5), m(_x())),
        ValueError,
        "rmax must be",
    ),
    "virtual-batch-size": (
        _bn,
        lambda m: (setattr(m, "virtual_batch_size", 1), m(_x())),
        ValueError,
        "virtual_batch_size must be",
    ),
    "eps": (_bn, lambda m: (setattr(m, "eps", 0.0), m(_x())), ValueError, "eps must be positive"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REJECTIONS))
def test_refused_call_changes_nothing(name: str) -> None:
    make, call, error, message = REJECTIONS[name]
    module = make()
    module(_x())  # a first step: the state is not the initial one
    before = _state(module)
    with pytest.raises(error, match=message):
        call(module)
    _assert_unchanged(module, before)
    module.eps, module.virtual_batch_size, module.rmax = 1e-5, None, 3.0  # what some calls changed
    module(_x())  # and the next call counts from where the first left off
    assert int(module.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


DOMAIN_REJECTIONS = {
    "domain-out-of-range": (torch.tensor([0, 1, 2, 0, 1, 0]), "domain ids must be in"),
    "domain-one-value": (torch.tensor([0, 0, 0, 1, 0, 0]), "domains \\[1\\] have 1"),
    "domain-dtype": (torch.zeros(6), "domain must be an integer"),
    "domain-missing": (None, "missing required argument 'domain'"),
}


@pytest.mark.parametrize("name", list(DOMAIN_REJECTIONS))
def test_refused_domain_call_changes_nothing(name: str) -> None:
    ids, message = DOMAIN_REJECTIONS[name]
    module = flexbn.DomainBatchNorm1d(C, num_domains=2, momentum=None).train()
    module(_x(), domain=torch.tensor([0, 1, 0, 1, 0, 1]))
    before = _state(module)
    with pytest.raises((ValueError, TypeError), match=message):
        module(_x(length=1), domain=ids)
    _assert_unchanged(module, before)


@pytest.mark.parametrize(
    "bias_shape", [pytest.param((C + 1,), id="too-long"), pytest.param((2, C + 1), id="per-domain")]
)
def test_domain_parameters_are_validated(bias_shape: tuple[int, ...]) -> None:
    """A DomainBatchNorm goes through the same validation as every flexbn call: a bias of the wrong size
    is refused (it was read past its end by the kernels)."""
    module = flexbn.DomainBatchNorm1d(C, num_domains=2)
    module.bias = nn.Parameter(torch.zeros(bias_shape))
    with pytest.raises(ValueError, match="bias must have shape"):
        module(_x(), domain=torch.tensor([0, 1, 0, 1, 0, 1]))


def test_a_negative_check_could_fail() -> None:
    """The helpers above see a change when there is one."""
    module = _bn()
    before = _state(module)
    module(_x())
    with pytest.raises(AssertionError, match="changed by a refused call"):
        _assert_unchanged(module, before)
