"""Batch renormalization (``renorm=True``) against its definition written out in float64.

The composition (Ioffe 2017, Algorithm 1; ``composition`` below), per segment of the statistics set and
channel, with the running statistics *before* this step's update::

    mu, var = batch mean and biased variance (each detached as the flags say)
    r = (sqrt(var + eps) / sqrt(running_var + eps)).detach().clamp(1 / rmax, rmax)
    d = ((mu - running_mean) / sqrt(running_var + eps)).detach().clamp(-dmax, dmax)
    y = ((x - mu) / sqrt(var + eps) * r + d) * w + b

Checked: outputs, the input / weight / bias gradients and the running buffers over two steps, for every
gradient mode and statistics set (whole batch, ghost batches, bags, mask, domains), and the two identities
(``rmax=1, dmax=0`` is batch norm -- against torch's module too; unclipped, the training output is the
normalization by the running statistics while the gradient still flows through the batch statistics).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import Tensor, nn

import flexbn
from conftest import MODE_ARGS, MODES, assert_close

C, EPS, MOMENTUM = 3, 1e-5, 0.1
F64 = torch.float64
INF = math.inf

LIMITS = [
    pytest.param(1.0, 0.0, id="bn"),
    pytest.param(1.3, 0.4, id="clipped"),
    pytest.param(INF, INF, id="unclipped"),
]


def composition(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    rmax: float,
    dmax: float,
    detach_mean: bool = False,
    detach_var: bool = False,
    ids: Tensor | None = None,
    mask: Tensor | None = None,
    per_segment: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, new_running_mean, new_running_var, r)`` in float64, by a loop over segments.

    ``ids``: segment per sample (``None``: one). ``per_segment``: running statistics (and 2-D affine
    parameters) are indexed by segment id (domains); else shared, updated with the mean over segments of
    the segment means and unbiased variances. ``mask`` (N, *spatial): statistics over its True elements.
    """
    xd, n, nd = x.double(), x.shape[0], x.dim()
    dims, view = (0, *range(2, nd)), (1, -1) + (1,) * (nd - 2)
    ids = torch.zeros(n, dtype=torch.long) if ids is None else ids
    keep = torch.ones((n, *x.shape[2:]), dtype=torch.bool) if mask is None else mask
    rm, rv = running_mean.double(), running_var.double()
    new_rm, new_rv = rm.clone(), rv.clone()
    y, means, uvars, rs = torch.zeros_like(xd), [], [], []
    for g in ids.unique().tolist():
        sel = (ids == g).view((n,) + (1,) * (nd - 1))
        wgt = (keep.unsqueeze(1) & sel).double()
        count = wgt.sum()
        mean = (xd * wgt).sum(dims) / count
        var = ((xd - mean.view(view)) ** 2 * wgt).sum(dims) / count
        means.append(mean.detach())
        uvars.append(var.detach() * count / (count - 1))
        mu = mean.detach() if detach_mean else mean
        v = var.detach() if detach_var else var
        rm_g, rv_g = (rm[g], rv[g]) if per_segment else (rm, rv)
        sigma_b, sigma = torch.sqrt(v + EPS), torch.sqrt(rv_g + EPS)
        r = (sigma_b / sigma).detach().clamp(1 / rmax, rmax)
        d = ((mu - rm_g) / sigma).detach().clamp(-dmax, dmax)
        rs.append(r)
        yg = (xd - mu.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view)
        if weight is not None:
            w = weight[g] if weight.dim() == 2 else weight
            yg = yg * w.double().view(view)
        if bias is not None:
            b = bias[g] if bias.dim() == 2 else bias
            yg = yg + b.double().view(view)
        y = y + torch.where(sel, yg, 0)
        if per_segment:
            new_rm[g] = (1 - MOMENTUM) * rm[g] + MOMENTUM * means[-1]
            new_rv[g] = (1 - MOMENTUM) * rv[g] + MOMENTUM * uvars[-1]
    if not per_segment:
        new_rm = (1 - MOMENTUM) * rm + MOMENTUM * torch.stack(means).mean(0)
        new_rv = (1 - MOMENTUM) * rv + MOMENTUM * torch.stack(uvars).mean(0)
    return y, new_rm, new_rv, torch.stack(rs)


def randomize(bn: nn.Module) -> None:
    """Random affine parameters and running statistics (so that r and d are far from 1 and 0)."""
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
        if bn.bias is not None:
            bn.bias.normal_()
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.4, 2.5)


LENGTHS_MASK = torch.arange(5) < torch.tensor([5, 3, 4]).unsqueeze(1)  # (3, 5)
BAGS = torch.tensor([0, 2, 0, 1, 2, 1, 0])
# name: (module class, module options, input shape, forward kwargs, segment ids, mask)
SETS = {
    "whole-2d": (flexbn.BatchNorm2d, {}, (4, C, 3, 2), {}, None, None),
    "ghost": (
        flexbn.BatchNorm1d,
        {"virtual_batch_size": 2},
        (6, C),
        {},
        torch.arange(6) * 3 // 6,
        None,
    ),
    "groups": (flexbn.BatchNorm1d, {}, (7, C, 2), {"groups": BAGS}, BAGS, None),
    "mask": (flexbn.BatchNorm1d, {}, (3, C, 5), {"mask": LENGTHS_MASK}, None, LENGTHS_MASK),
    "groups+mask": (
        flexbn.BatchNorm1d,
        {},
        (3, C, 5),
        {"groups": torch.tensor([1, 0, 1]), "mask": LENGTHS_MASK},
        torch.tensor([1, 0, 1]),
        LENGTHS_MASK,
    ),
}


def upstream(y: Tensor, mask: Tensor | None) -> Tensor:
    """A random output gradient, zero at padded positions (their outputs are passengers)."""
    g = torch.randn_like(y)
    return g if mask is None else g * mask.unsqueeze(1)


@pytest.mark.parametrize(MODE_ARGS, MODES)
@pytest.mark.parametrize(("rmax", "dmax"), LIMITS)
@pytest.mark.parametrize("name", SETS)
def test_matches_composition(name, rmax, dmax, detach_mean, detach_var):
    cls, options, shape, kwargs, ids, mask = SETS[name]
    bn = cls(C, renorm=True, rmax=rmax, dmax=dmax, dtype=F64, **options)
    bn.detach_mean, bn.detach_var = detach_mean, detach_var
    randomize(bn)
    clipped = []
    for step in range(
        2
    ):  # the second step's corrections use the running statistics the first updated
        x = (torch.randn(shape, dtype=F64) * 1.5 + 0.3 * step).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        w = bn.weight.detach().clone().requires_grad_()
        b = bn.bias.detach().clone().requires_grad_()
        y_ref, rm_ref, rv_ref, r = composition(
            xr,
            bn.running_mean,
            bn.running_var,
            w,
            b,
            rmax=rmax,
            dmax=dmax,
            detach_mean=detach_mean,
            detach_var=detach_var,
            ids=ids,
            mask=mask,
        )
        y = bn(x, **kwargs)
        g = upstream(y, mask)
        y.backward(g)
        y_ref.backward(g)
        assert_close(y, y_ref)
        assert_close(x.grad, xr.grad)
        assert_close(bn.weight.grad, w.grad)
        assert_close(bn.bias.grad, b.grad)
        assert_close(bn.running_mean, rm_ref)
        assert_close(bn.running_var, rv_ref)
        assert int(bn.num_batches_tracked) == step + 1
        bn.zero_grad()
        clipped.append(((r == rmax) | (r == 1 / rmax)).float().mean())
    if rmax == 1.3:  # not vacuous: some corrections are clipped, some are not
        assert 0 < float(torch.stack(clipped).mean()) < 1


@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_limits_one_and_zero_are_torch_batch_norm(detach_mean, detach_var):
    """rmax=1, dmax=0 is batch norm exactly: against flexbn without renorm (any mode) and torch's module."""
    bn = flexbn.BatchNorm2d(
        C, renorm=True, rmax=1.0, dmax=0.0, detach_mean=detach_mean, detach_var=detach_var
    )
    randomize(bn)
    plain = flexbn.BatchNorm2d(C, detach_mean=detach_mean, detach_var=detach_var)
    plain.load_state_dict(bn.state_dict())
    ref = nn.BatchNorm2d(C)
    ref.load_state_dict(bn.state_dict())
    for _ in range(2):
        x = torch.randn(4, C, 3, 3) * 2 + 1
        xs = [x.clone().requires_grad_() for _ in range(3)]
        ys = [m(xi) for m, xi in zip((bn, plain, ref), xs, strict=True)]
        g = torch.randn_like(ys[0])
        for y in ys:
            y.backward(g)
        torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)  # bit for bit
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=0, atol=0)
        for p, q in zip(bn.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        torch.testing.assert_close(bn.running_var, plain.running_var, rtol=0, atol=0)
        if not (detach_mean or detach_var):
            assert_close(ys[0], ys[2])
            assert_close(xs[0].grad, xs[2].grad)
            assert_close(bn.weight.grad, ref.weight.grad)
            assert_close(bn.running_mean, ref.running_mean)
            assert_close(bn.running_var, ref.running_var)
        for m in (bn, plain, ref):
            m.zero_grad()


@pytest.mark.parametrize("name", SETS)
def test_unclipped_training_output_is_running_normalization(name):
    """Unclipped, each segment's corrections undo its statistics: y = (x - mu) / sigma * w + b (running
    statistics) for every sample -- yet the input gradient is batch norm's, not that of this formula."""
    cls, options, shape, kwargs, _, mask = SETS[name]
    bn = cls(C, renorm=True, rmax=INF, dmax=INF, dtype=F64, **options)
    randomize(bn)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    x = (torch.randn(shape, dtype=F64) * 2 - 1).requires_grad_()
    view = (1, -1) + (1,) * (x.dim() - 2)
    xe = x.detach().clone().requires_grad_()
    y_eval = (xe - rm.view(view)) / torch.sqrt(rv.view(view) + EPS) * bn.weight.detach().view(view)
    y_eval = y_eval + bn.bias.detach().view(view)
    y = bn(x, **kwargs)
    assert_close(y, y_eval)
    g = upstream(y, mask)
    y.backward(g)
    y_eval.backward(g)
    assert (x.grad - xe.grad).abs().max() > 1e-2  # gradient flows through the batch statistics


@pytest.mark.parametrize(MODE_ARGS, MODES)
@pytest.mark.parametrize("domain_affine", [False, True], ids=["shared-affine", "domain-affine"])
@pytest.mark.parametrize(("rmax", "dmax"), LIMITS[1:])
def test_domain_matches_composition(rmax, dmax, domain_affine, detach_mean, detach_var):
    """Per-domain running statistics: each domain's corrections against its own; an absent domain keeps
    its buffers and count."""
    bn = flexbn.DomainBatchNorm2d(
        C, 3, renorm=True, rmax=rmax, dmax=dmax, domain_affine=domain_affine, dtype=F64
    )
    bn.detach_mean, bn.detach_var = detach_mean, detach_var
    randomize(bn)
    domain = torch.tensor([2, 0, 2, 1, 0, 0, 1, 1])
    for step in range(2):
        ids = domain if step == 0 else domain.clamp_max(1)  # step 1: domain 2 absent
        x = (torch.randn(8, C, 2, 2, dtype=F64) + step).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        w = bn.weight.detach().clone().requires_grad_()
        b = bn.bias.detach().clone().requires_grad_()
        y_ref, rm_ref, rv_ref, _ = composition(
            xr,
            bn.running_mean,
            bn.running_var,
            w,
            b,
            rmax=rmax,
            dmax=dmax,
            detach_mean=detach_mean,
            detach_var=detach_var,
            ids=ids,
            per_segment=True,
        )
        y = bn(x, ids)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert_close(y, y_ref)
        assert_close(x.grad, xr.grad)
        assert_close(bn.weight.grad, w.grad)
        assert_close(bn.bias.grad, b.grad)
        assert_close(bn.running_mean, rm_ref)
        assert_close(bn.running_var, rv_ref)
        bn.zero_grad()
    assert bn.num_batches_tracked.tolist() == [2, 2, 1]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_functional_without_affine_and_eval(affine):
    """The functional form (weight / bias optional); eval mode ignores renorm."""
    rm, rv = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    w = torch.rand(C, dtype=F64, requires_grad=True) if affine else None
    b = torch.randn(C, dtype=F64, requires_grad=True) if affine else None
    x = torch.randn(6, C, 4, dtype=F64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y_ref, rm_ref, rv_ref, _ = composition(xr, rm, rv, w, b, rmax=1.2, dmax=0.3)
    rm1, rv1 = rm.clone(), rv.clone()
    y = flexbn.batch_norm(x, rm1, rv1, w, b, training=True, renorm=True, rmax=1.2, dmax=0.3)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_close(y, y_ref)
    assert_close(x.grad, xr.grad)
    assert_close(rm1, rm_ref)
    assert_close(rv1, rv_ref)
    y_eval = flexbn.batch_norm(x, rm, rv, w, b, renorm=True, rmax=1.2, dmax=0.3)
    torch.testing.assert_close(y_eval, flexbn.batch_norm(x, rm, rv, w, b), rtol=0, atol=0)


def test_eval_mode_is_unchanged():
    bn = flexbn.BatchNorm2d(C, renorm=True, rmax=1.5, dmax=1.0)
    randomize(bn)
    bn(torch.randn(4, C, 2, 2))
    plain = flexbn.BatchNorm2d(C)
    plain.load_state_dict(bn.state_dict())
    bn.eval(), plain.eval()
    x = torch.randn(4, C, 2, 2)
    torch.testing.assert_close(bn(x), plain(x), rtol=0, atol=0)


def test_limits_are_read_at_every_forward():
    """A training loop changes rmax / dmax between steps (warm-up); a bad value raises at the forward."""
    bn = flexbn.BatchNorm1d(C, renorm=True, dtype=F64)
    randomize(bn)
    for rmax, dmax in [(1.0, 0.0), (INF, INF), (1.1, 0.2)]:
        assert flexbn.set_renorm_limits(bn, rmax, dmax) == 1
        x = torch.randn(8, C, dtype=F64) * 3
        y_ref, _, _, _ = composition(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, rmax=rmax, dmax=dmax
        )
        assert_close(bn(x), y_ref)
    for name, value in [("rmax", 0.5), ("dmax", -0.1), ("rmax", math.nan)]:
        bad = copy.deepcopy(bn)
        setattr(bad, name, value)
        with pytest.raises(ValueError, match=name):
            bad(x)


def test_limits_as_tensors():
    """0-d tensor limits (read at run time under torch.compile): same result as floats; written into in
    place by set_renorm_limits; bad shapes, dtypes and values raise."""
    bn = flexbn.BatchNorm1d(
        C, renorm=True, rmax=torch.tensor(1.0), dmax=torch.tensor(0.0), dtype=F64
    )
    randomize(bn)
    limits = (bn.rmax, bn.dmax)
    assert flexbn.set_renorm_limits(bn, 1.2, 0.1) == 1
    assert bn.rmax is limits[0]  # written in place
    assert float(bn.rmax) == pytest.approx(1.2)
    assert repr(bn).endswith(f"rmax={float(bn.rmax)}, dmax={float(bn.dmax)})")
    x = torch.randn(8, C, dtype=F64) * 3
    y_ref, _, _, _ = composition(
        x,
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        rmax=float(bn.rmax),
        dmax=float(bn.dmax),
    )
    assert_close(bn(x), y_ref)
    for value, exc in [
        (torch.tensor([1.5, 2.0]), TypeError),
        (torch.tensor(2), TypeError),
        (torch.tensor(0.5), ValueError),
    ]:
        with pytest.raises(exc, match="rmax"):
            flexbn.BatchNorm1d(C, renorm=True, rmax=value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_input_with_float32_module(dtype):
    bn = flexbn.BatchNorm2d(C, renorm=True, rmax=1.3, dmax=0.4)
    randomize(bn)
    x = (torch.randn(4, C, 3, 3) * 2).to(dtype).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    y_ref, rm_ref, rv_ref, _ = composition(
        xr, bn.running_mean, bn.running_var, w, b, rmax=1.3, dmax=0.4
    )
    y = bn(x)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    assert y.dtype == x.grad.dtype == dtype
    assert bn.weight.grad.dtype == bn.running_mean.dtype == torch.float32
    assert_close(y, y_ref, dtype=dtype)
    assert_close(x.grad, xr.grad, dtype=dtype)
    assert_close(bn.weight.grad, w.grad, dtype=dtype)
    assert_close(bn.bias.grad, b.grad, dtype=dtype)
    assert_close(bn.running_mean, rm_ref, dtype=torch.float32)
    assert_close(bn.running_var, rv_ref, dtype=torch.float32)


# torch loads its forward-AD decompositions with torch.jit.script on first use, which warns in torch 2.13
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_gradcheck_second_order_and_forward_ad():
    """Finite differences see r and d as functions of x; they agree with the stop-gradient where both are
    clipped (running statistics far from the batch's), which exercises the effective weight and bias
    to second order and in forward mode."""
    rm, rv = torch.full((C,), 50.0, dtype=F64), torch.full((C,), 1e4, dtype=F64)

    def f(x, w, b):
        return flexbn.batch_norm(
            x, rm.clone(), rv.clone(), w, b, training=True, renorm=True, rmax=1.5, dmax=0.25
        )

    x = torch.randn(5, C, 2, dtype=F64, requires_grad=True)
    w = torch.rand(C, dtype=F64, requires_grad=True)
    b = torch.randn(C, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_bad_options_raise():
    for kwargs, exc, name in [
        ({"rmax": 0.99}, ValueError, "rmax"),
        ({"dmax": -1.0}, ValueError, "dmax"),
        ({"rmax": math.nan}, ValueError, "rmax"),
        ({"dmax": math.nan}, ValueError, "dmax"),
        ({"rmax": "3"}, TypeError, "rmax"),
        ({"dmax": True}, TypeError, "dmax"),
        ({"renorm": 1}, TypeError, "renorm"),
    ]:
        with pytest.raises(exc, match=name):
            flexbn.BatchNorm1d(C, **{"renorm": True, **kwargs})
        with pytest.raises(exc, match=name):
            flexbn.DomainBatchNorm1d(C, 2, **{"renorm": True, **kwargs})
        with pytest.raises(exc, match=name):
            flexbn.batch_norm(torch.randn(4, C), None, None, training=True, **kwargs)
    for cls, args in [(flexbn.BatchNorm2d, (C,)), (flexbn.DomainBatchNorm2d, (C, 2))]:
        with pytest.raises(ValueError, match="track_running_stats"):
            cls(*args, renorm=True, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        flexbn.batch_norm(torch.randn(4, C), None, None, training=True, renorm=True)
    bn = flexbn.BatchNorm1d(C, renorm=True)
    bn.track_running_stats = False  # switched off after construction: raises at the forward
    with pytest.raises(ValueError, match="running statistics"):
        bn(torch.randn(4, C))
    assert flexbn.BatchNorm1d(C, renorm=True, rmax=INF, dmax=0.0).rmax == INF  # limits included


def test_repr_pickle_and_state_dict():
    bn = flexbn.BatchNorm2d(C, renorm=True, rmax=2.0, dmax=INF)
    assert repr(bn).endswith("track_running_stats=True, renorm=True, rmax=2.0, dmax=inf)")
    assert "renorm" not in repr(flexbn.BatchNorm2d(C))
    dbn = flexbn.DomainBatchNorm1d(C, 2, renorm=True)
    assert repr(dbn).endswith("renorm=True, rmax=3.0, dmax=5.0)")
    ref = nn.BatchNorm2d(C)
    ref.load_state_dict(bn.state_dict(), strict=True)  # no new buffers
    for module in (bn, dbn):
        state = module.__getstate__()
        for name in ("renorm", "rmax", "dmax"):
            del state[name]  # a pickle from before these options
        old = module.__class__.__new__(module.__class__)
        old.__setstate__(state)
        assert (old.renorm, old.rmax, old.dmax) == (False, 3.0, 5.0)
        again = pickle.loads(pickle.dumps(module))
        assert (again.renorm, again.rmax) == (True, module.rmax)


def ludvb(step: int) -> tuple[float, float]:
    """The ramps hard-coded in ludvb/batchrenorm (the paper's schedule)."""
    rmax = min(max(2 / 35000 * step + 25 / 35, 1.0), 3.0)
    dmax = min(max(5 / 20000 * step - 25 / 20, 0.0), 5.0)
    return rmax, dmax


@pytest.mark.parametrize("step", [0, 1, 4999, 5000, 5001, 12345, 25000, 30000, 40000, 10**6])
def test_schedule_is_the_papers(step):
    rmax, dmax = flexbn.renorm_schedule(step)
    expected = ludvb(step)
    assert rmax == pytest.approx(expected[0], abs=1e-12)
    assert dmax == pytest.approx(expected[1], abs=1e-12)


def test_schedule_options_and_errors():
    assert flexbn.renorm_schedule(50, warmup=0, rmax_at=100, dmax_at=200, rmax=2, dmax=4) == (
        1.5,
        1.0,
    )
    assert flexbn.renorm_schedule(10, warmup=10, rmax_at=10, dmax_at=10) == (1.0, 0.0)
    assert flexbn.renorm_schedule(11, warmup=10, rmax_at=10, dmax_at=10) == (3.0, 5.0)
    for kwargs, name in [
        ({"step": -1}, "step"),
        ({"step": 1.5}, "step"),
        ({"step": 0, "rmax_at": 10}, "rmax_at"),
        ({"step": 0, "dmax_at": 4999}, "dmax_at"),
        ({"step": 0, "rmax": 0.5}, "rmax"),
    ]:
        step = kwargs.pop("step")
        with pytest.raises(ValueError, match=name):
            flexbn.renorm_schedule(step, **kwargs)


def test_set_renorm_limits_touches_renorm_layers_only():
    model = nn.Sequential(
        flexbn.BatchNorm1d(C, renorm=True),
        nn.Sequential(flexbn.DomainBatchNorm1d(C, 2, renorm=True), flexbn.BatchNorm1d(C)),
        nn.BatchNorm1d(C),
    )
    assert flexbn.set_renorm_limits(model, 1.5, 0.5) == 2
    assert (model[0].rmax, model[0].dmax, model[1][0].rmax) == (1.5, 0.5, 1.5)
    assert (model[1][1].rmax, model[1][1].dmax) == (3.0, 5.0)
    with pytest.raises(ValueError, match="rmax"):
        flexbn.set_renorm_limits(model, 0.0, 1.0)
