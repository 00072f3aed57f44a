"""DomainBatchNorm: per-domain statistics against one torch batch norm per domain (a Python loop)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import flexbn
from conftest import assert_close, manual_batch_norm

C, D = 3, 3
SHAPES = {
    "1d-NC": (flexbn.DomainBatchNorm1d, nn.BatchNorm1d, (12, C)),
    "1d-NCL": (flexbn.DomainBatchNorm1d, nn.BatchNorm1d, (9, C, 4)),
    "2d": (flexbn.DomainBatchNorm2d, nn.BatchNorm2d, (9, C, 3, 2)),
    "3d": (flexbn.DomainBatchNorm3d, nn.BatchNorm3d, (9, C, 2, 2, 2)),
}
DOMAINS = [2, 0, 2, 1, 0, 0, 2, 1, 1, 0, 2, 1]


def loop_reference(dbn, refs, x, domain):
    """Each domain's samples through its own torch module (sharing the flexbn module's parameters)."""
    y = torch.empty_like(x)
    for d, ref in enumerate(refs):
        idx = (domain == d).nonzero().flatten()
        if idx.numel():
            y[idx] = ref(x[idx])
    return y


def make_pair(name, momentum=0.1, domain_affine=False, dtype=torch.float64):
    cls, tcls, shape = SHAPES[name]
    dbn = cls(C, D, momentum=momentum, domain_affine=domain_affine, dtype=dtype)
    with torch.no_grad():
        dbn.weight.uniform_(0.5, 1.5)
        dbn.bias.normal_()
    refs = []
    for d in range(D):
        ref = tcls(C, momentum=momentum, dtype=dtype)
        with torch.no_grad():
            ref.weight.copy_(dbn.weight[d] if domain_affine else dbn.weight)
            ref.bias.copy_(dbn.bias[d] if domain_affine else dbn.bias)
        refs.append(ref)
    return dbn, refs, shape


@pytest.mark.parametrize("domain_affine", [False, True], ids=["shared-affine", "domain-affine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
@pytest.mark.parametrize("name", SHAPES)
def test_matches_one_torch_module_per_domain(name, momentum, domain_affine):
    dbn, refs, shape = make_pair(name, momentum, domain_affine)
    domain = torch.tensor(DOMAINS[: shape[0]])
    for step in range(3):
        present = domain if step != 1 else domain.clamp_max(1)  # step 1: domain 2 absent
        x = torch.randn(shape, dtype=torch.float64) * 2 + step
        xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = dbn(xf, present)
        y_ref = loop_reference(dbn, refs, xr, present)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert_close(y, y_ref)
        assert_close(xf.grad, xr.grad)
        ref_wgrad = [r.weight.grad if r.weight.grad is not None else torch.zeros(C) for r in refs]
        ref_bgrad = [r.bias.grad if r.bias.grad is not None else torch.zeros(C) for r in refs]
        if domain_affine:
            assert_close(dbn.weight.grad, torch.stack(ref_wgrad).double())
            assert_close(dbn.bias.grad, torch.stack(ref_bgrad).double())
        else:
            assert_close(dbn.weight.grad, sum(ref_wgrad).double())
            assert_close(dbn.bias.grad, sum(ref_bgrad).double())
        for p in [dbn.weight, dbn.bias, *[q for r in refs for q in r.parameters()]]:
            p.grad = None
        assert_close(dbn.running_mean, torch.stack([r.running_mean for r in refs]))
        assert_close(dbn.running_var, torch.stack([r.running_var for r in refs]))
        assert dbn.num_batches_tracked.tolist() == [int(r.num_batches_tracked) for r in refs]
    dbn.eval()
    for r in refs:
        r.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert_close(dbn(x, domain), loop_reference(dbn, refs, x, domain))


@pytest.mark.parametrize(
    ("detach_mean", "detach_var"), [(True, False), (False, True), (True, True)]
)
def test_detach_flags_per_domain(detach_mean, detach_var):
    dbn = flexbn.DomainBatchNorm2d(C, D, detach_mean=detach_mean, detach_var=detach_var).double()
    x = torch.randn(9, C, 2, 2, dtype=torch.float64, requires_grad=True)
    domain = torch.tensor(DOMAINS[:9])
    y = dbn(x, domain)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    parts = []
    for d in range(D):
        idx = (domain == d).nonzero().flatten()
        parts.append(
            (
                idx,
                manual_batch_norm(
                    x[idx],
                    dbn.weight,
                    dbn.bias,
                    1e-5,
                    detach_mean=detach_mean,
                    detach_var=detach_var,
                ),
            )
        )
    y_ref = torch.empty_like(y)
    for idx, part in parts:
        y_ref = y_ref.index_copy(0, idx, part)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert_close(y, y_ref)
    assert_close(gx, gx_ref)


def test_state_dict_repr_and_pickle():
    dbn = flexbn.DomainBatchNorm2d(C, D, domain_affine=True)
    assert list(dbn.state_dict()) == [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]
    assert dbn.running_mean.shape == (D, C)
    assert dbn.weight.shape == (D, C)
    assert repr(dbn) == (
        "DomainBatchNorm2d(3, num_domains=3, eps=1e-05, momentum=0.1, affine=True, bias=True, "
        "track_running_stats=True, domain_affine=True)"
    )
    dbn(torch.randn(6, C, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    clone = pickle.loads(pickle.dumps(dbn))
    for k, v in dbn.state_dict().items():
        assert torch.equal(v, clone.state_dict()[k]), k
    assert (
        not flexbn.DomainBatchNorm1d(C, D, track_running_stats=False)
        .state_dict()
        .get("running_mean")
    )


def test_no_running_stats_uses_domain_batch_stats_in_eval():
    dbn = flexbn.DomainBatchNorm1d(C, 2, track_running_stats=False).double().eval()
    x = torch.randn(8, C, dtype=torch.float64)
    domain = torch.tensor([0, 1] * 4)
    y = dbn(x, domain)
    for d in range(2):
        assert_close(y[domain == d], manual_batch_norm(x[domain == d], dbn.weight, dbn.bias))


ERRORS = {
    "domain-out-of-range": (
        lambda m: m(torch.randn(4, C), torch.tensor([0, 1, 3, 0])),
        r"\[0, 3\)",
    ),
    "domain-negative": (lambda m: m(torch.randn(4, C), torch.tensor([0, -1, 1, 0])), r"domain ids"),
    "domain-float": (lambda m: m(torch.randn(4, C), torch.tensor([0.0, 1, 1, 0])), r"integer"),
    "domain-shape": (lambda m: m(torch.randn(4, C), torch.tensor([0, 1])), r"\(N,\) = \(4,\)"),
    "domain-single-value": (
        lambda m: m(
            torch.randn(4, C),
            torch.tensor([0, 1, 1, 0]).clamp_max(0).index_fill(0, torch.tensor([3]), 2),
        ),
        r"more than 1 value",
    ),
    "wrong-dim": (
        lambda m: m(torch.randn(4, C, 2, 2), torch.tensor([0, 1, 1, 0])),
        r"expected 2D or 3D input \(got 4D input\)",
    ),
    "wrong-channels": (
        lambda m: m(torch.randn(4, C + 1), torch.tensor([0, 1, 1, 0])),
        r"4 channels|3 channels",
    ),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_errors(case):
    call, match = case
    with pytest.raises(ValueError, match=match):
        call(flexbn.DomainBatchNorm1d(C, 3))


@pytest.mark.parametrize(
    "num_domains", [0, -1, 2.0, True], ids=["zero", "negative", "float", "bool"]
)
def test_bad_num_domains(num_domains):
    with pytest.raises(ValueError, match="num_domains"):
        flexbn.DomainBatchNorm1d(C, num_domains)
