"""torch.func: the pure functional form ``flexbn.func.batch_norm`` and the modules under
``functional_call`` + ``vmap`` (model ensembles, in training mode).

References: ``torch.nn.functional.batch_norm`` and the float64 composition ``manual_batch_norm`` (values,
Jacobians, forward-mode derivatives), flexbn's in-place ``flexbn.batch_norm`` on copies (the pure form must
return what it writes), and Python loops over the vmapped instances, run with ordinary autograd and
``torch.optim.SGD`` on independent models.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, stack_module_state, vmap

import flexbn
from conftest import MODE_ARGS, MODES, assert_close, manual_batch_norm

F64 = torch.float64
C = 3


def _stats(c: int = C, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random running mean / variance and affine parameters."""
    return (
        torch.randn(c, dtype=dtype),
        torch.rand(c, dtype=dtype) + 0.5,
        torch.rand(c, dtype=dtype) + 0.5,
        torch.randn(c, dtype=dtype),
    )


def test_signature_is_batch_norm_s() -> None:
    """Same parameters (names, kinds, defaults) as flexbn.batch_norm: no option is missing or drifts."""
    ours = inspect.signature(flexbn.func.batch_norm).parameters
    theirs = inspect.signature(flexbn.batch_norm).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name


# (keyword options, needs of the input: mask / groups / stats_input built from x)
OPTIONS = [
    pytest.param({}, id="standard"),
    pytest.param({"detach_mean": True}, id="detach_mean"),
    pytest.param({"detach_var": True}, id="detach_var"),
    pytest.param({"detach_mean": True, "detach_var": True}, id="detach_both"),
    pytest.param({"mask": True}, id="mask"),
    pytest.param({"groups": True}, id="groups"),
    pytest.param({"virtual_batch_size": 3}, id="ghost"),
    pytest.param({"stats_input": True, "detach_mean": True}, id="stats_input"),
    pytest.param({"groups": True, "mask": True, "detach_var": True}, id="groups+mask"),
    pytest.param({"renorm": True, "rmax": 1.2, "dmax": 0.1}, id="renorm"),
]


def _options(opts: dict[str, Any], x: Tensor, z: Tensor | None = None) -> dict[str, Any]:
    """Materialize the option placeholders for input ``x`` (``(N, C, L)``)."""
    out = dict(opts)
    n, _, length = x.shape
    if opts.get("mask"):
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(n, length, generator=g) > 0.3
        mask[:, 0] = True  # every sample (and so every bag) keeps at least one element per channel
        mask[:, 1] = True
        out["mask"] = mask
    if opts.get("groups"):
        out["groups"] = torch.arange(n) % 3 * 7  # bags {0, 7, 14}, interleaved
    if opts.get("stats_input"):
        out["stats_input"] = z
    return out


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize(
    "momentum", [pytest.param(0.3, id="float"), pytest.param("t", id="tensor")]
)
def test_pure_form_returns_what_the_in_place_form_writes(
    opts: dict[str, Any], momentum: Any
) -> None:
    x = torch.randn(9, C, 4, dtype=F64, requires_grad=True)
    z = (x.detach() * 1.5 + 0.2).requires_grad_() if opts.get("stats_input") else None
    rm, rv, w, b = _stats()
    w.requires_grad_()
    b.requires_grad_()
    m = torch.tensor(0.3, dtype=F64) if momentum == "t" else momentum
    kw = _options(opts, x, z)
    saved = rm.clone(), rv.clone()

    y, new_rm, new_rv = flexbn.func.batch_norm(x, rm, rv, w, b, True, m, 1e-5, **kw)
    # inputs untouched; fresh outputs, not views of the buffers; no gradient
    assert torch.equal(rm, saved[0])
    assert torch.equal(rv, saved[1])
    assert new_rm is not None
    assert new_rv is not None
    assert new_rm.data_ptr() != rm.data_ptr()
    assert new_rv.data_ptr() != rv.data_ptr()
    assert not new_rm.requires_grad
    assert not new_rv.requires_grad
    assert not torch.equal(new_rm, rm)  # negative check: they were updated

    ref_rm, ref_rv = rm.clone(), rv.clone()
    xr = x.detach().clone().requires_grad_()
    zr = None if z is None else z.detach().clone().requires_grad_()
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    kw_ref = {**kw, "stats_input": zr} if z is not None else kw
    y_ref = flexbn.batch_norm(xr, ref_rm, ref_rv, wr, br, True, m, 1e-5, **kw_ref)
    assert_close(y, y_ref)
    assert_close(new_rm, ref_rm)
    assert_close(new_rv, ref_rv)
    gy = torch.randn_like(y)
    inputs = [x, w, b] + ([z] if z is not None else [])
    refs = [xr, wr, br] + ([zr] if zr is not None else [])
    for got, exp in zip(
        torch.autograd.grad(y, inputs, gy), torch.autograd.grad(y_ref, refs, gy), strict=True
    ):
        assert_close(got, exp)


@pytest.mark.parametrize(
    "dtype", [pytest.param(F64, id="float64"), pytest.param(torch.float32, id="float32")]
)
def test_pure_form_matches_torch(dtype: torch.dtype) -> None:
    x = torch.randn(7, C, 5, dtype=dtype)
    rm, rv, w, b = _stats(dtype=dtype)
    y, new_rm, new_rv = flexbn.func.batch_norm(x, rm, rv, w, b, True, 0.2, 1e-5)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    y_ref = F.batch_norm(x, ref_rm, ref_rv, w, b, True, 0.2, 1e-5)
    assert_close(y, y_ref)
    assert_close(new_rm, ref_rm)
    assert_close(new_rv, ref_rv)
    assert new_rm.dtype == new_rv.dtype == dtype


def test_reduced_precision_input_keeps_the_statistics_dtype() -> None:
    x = torch.randn(6, C, 4, dtype=torch.bfloat16)
    rm, rv = torch.zeros(C), torch.ones(C)
    _, new_rm, new_rv = flexbn.func.batch_norm(x, rm, rv, training=True)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    F.batch_norm(x, ref_rm, ref_rv, training=True)
    assert new_rm.dtype == new_rv.dtype == torch.float32
    assert_close(new_rm, ref_rm)
    assert_close(new_rv, ref_rv)


@pytest.mark.parametrize(
    ("training", "shape", "given"),
    [
        pytest.param(False, (6, C, 4), True, id="eval"),
        pytest.param(True, (6, C, 4), False, id="no_running_stats"),
        pytest.param(True, (0, C, 4), True, id="empty_batch"),
    ],
)
def test_returns_the_given_statistics_when_nothing_is_updated(
    training: bool, shape: tuple[int, ...], given: bool
) -> None:
    x = torch.randn(shape, dtype=F64)
    rm, rv, w, b = _stats()
    if not given:
        rm = rv = None  # type: ignore[assignment]
    y, new_rm, new_rv = flexbn.func.batch_norm(x, rm, rv, w, b, training)
    assert new_rm is rm
    assert new_rv is rv
    y_ref = F.batch_norm(x, rm, rv, w, b, training)
    assert_close(y, y_ref)


def test_errors_are_batch_norm_s() -> None:
    x = torch.randn(4, C, 2)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        flexbn.func.batch_norm(x, None, None, training=False)
    with pytest.raises(TypeError, match="detach_var must be a bool"):
        flexbn.func.batch_norm(x, None, None, training=True, detach_var=1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- vmap ---

B = 3  # vmapped instances


def _loop(fn: Callable[..., Any], args: list[Any], in_dims: tuple[int | None, ...]) -> list[Tensor]:
    """vmap's reference: ``fn`` on each instance (arguments with in_dim None shared), stacked."""
    outs = [
        fn(*[a if d is None else a[i] for a, d in zip(args, in_dims, strict=True)])
        for i in range(B)
    ]
    return [torch.stack([o[k] for o in outs]) for k in range(len(outs[0]))]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize(
    "batched",
    [
        pytest.param(("x",), id="batched_input"),
        pytest.param(("x", "stats"), id="batched_input_and_stats"),
        pytest.param(("x", "stats", "affine", "mask"), id="all_batched"),
    ],
)
def test_vmap_equals_a_loop(opts: dict[str, Any], batched: tuple[str, ...]) -> None:
    xs = torch.randn(B, 8, C, 4, dtype=F64)
    rms, rvs, ws, bs = (torch.stack(t) for t in zip(*[_stats() for _ in range(B)], strict=True))
    kw = _options(opts, xs[0], xs[0])
    mask = kw.pop("mask", None)
    if mask is not None and "mask" in batched:
        mask = torch.stack([mask.roll(i, 1).roll(i, 0) for i in range(B)])  # per-instance masks

    def f(x: Tensor, rm: Tensor, rv: Tensor, w: Tensor, b: Tensor, mask: Tensor | None) -> Any:
        extra = {**kw, "stats_input": x.sin()} if opts.get("stats_input") else kw
        return flexbn.func.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, mask=mask, **extra)

    args = [
        xs,
        rms if "stats" in batched else rms[0],
        rvs if "stats" in batched else rvs[0],
        ws if "affine" in batched else ws[0],
        bs if "affine" in batched else bs[0],
        mask,
    ]
    in_dims = (
        0,
        *(
            0 if a is not None and a.dim() > d else None
            for a, d in zip(args[1:], (1, 1, 1, 1, 2), strict=True)
        ),
    )
    got = vmap(f, in_dims=in_dims)(*args)
    expected = _loop(f, args, in_dims)
    assert got[1].shape == (B, C)  # batched new statistics, also from shared ones
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)


def test_vmap_rejects_batched_groups() -> None:
    xs, groups = torch.randn(B, 6, C), torch.tensor([[0, 0, 1, 1, 2, 2]] * B)
    with pytest.raises(ValueError, match=r"groups cannot be batched by torch\.func\.vmap"):
        vmap(lambda x, g: flexbn.func.batch_norm(x, None, None, training=True, groups=g))(
            xs, groups
        )
    # shared groups are fine
    out = vmap(lambda x: flexbn.func.batch_norm(x, None, None, training=True, groups=groups[0])[0])(
        xs
    )
    assert_close(out[1, 2:4], F.batch_norm(xs[1, 2:4], None, None, training=True))


def test_vmap_skips_the_data_dependent_check_for_batched_masks() -> None:
    """Documented: a mask batched by vmap is not checked for lonely values (no host read); eager is."""
    xs = torch.randn(B, 4, C, 3, dtype=F64)
    lonely = torch.zeros(B, 4, 3, dtype=torch.bool)
    lonely[:, 0, 0] = True
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        flexbn.func.batch_norm(xs[0], None, None, training=True, mask=lonely[0])
    ys = vmap(lambda x, m: flexbn.func.batch_norm(x, None, None, training=True, mask=m)[0])(
        xs, lonely
    )
    assert torch.isfinite(ys).all()


# ------------------------------------------------------------- grad / jacrev / jvp vs float64 composition


# torch loads its forward-AD decompositions with torch.jit.script on first use, which warns in torch 2.13
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize(MODE_ARGS, MODES)
def test_jacobians_match_the_composition(detach_mean: bool, detach_var: bool) -> None:
    x = torch.randn(5, C, 2, dtype=F64)
    _, _, w, b = _stats()
    rm, rv = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64)
    flags = {"detach_mean": detach_mean, "detach_var": detach_var}

    def ours(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return flexbn.func.batch_norm(x, rm, rv, w, b, True, **flags)[0]

    def composition(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return manual_batch_norm(x, w, b, **flags)

    for transform in (jacrev, jacfwd):
        got = transform(ours, argnums=(0, 1, 2))(x, w, b)
        expected = jacrev(composition, argnums=(0, 1, 2))(x, w, b)
        for g, e in zip(got, expected, strict=True):
            assert_close(g, e)
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    assert_close(jvp(ours, (x, w, b), tangents)[1], jvp(composition, (x, w, b), tangents)[1])
    # negative check: the modes differ in their input Jacobian (except the fully detached vs itself)
    full = jacrev(lambda x: manual_batch_norm(x, w, b))(x)
    assert torch.equal(
        torch.isclose(full, got[0]).all(), torch.tensor(not (detach_mean or detach_var))
    )


def test_grad_with_new_statistics_as_aux_and_per_instance_gradients() -> None:
    """grad(..., has_aux) threads the new statistics out; vmap(grad) gives per-instance gradients."""
    xs = torch.randn(B, 6, C, 2, dtype=F64)
    rm, rv, w, b = _stats()
    saved = rm.clone(), rv.clone()

    def loss(w: Tensor, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        y, new_rm, new_rv = flexbn.func.batch_norm(x, rm, rv, w, b, True, 0.5)
        return (y.square() * torch.arange(C, dtype=F64).view(1, C, 1)).sum(), (new_rm, new_rv)

    grads, (new_rms, new_rvs) = vmap(grad(loss, has_aux=True), in_dims=(None, 0))(w, xs)
    for i in range(B):
        wi = w.clone().requires_grad_()
        expected = torch.autograd.grad(loss(wi, xs[i])[0], wi)[0]
        assert_close(grads[i], expected)
        ref_rm, ref_rv = rm.clone(), rv.clone()
        F.batch_norm(xs[i], ref_rm, ref_rv, w, b, True, 0.5)
        assert_close(new_rms[i], ref_rm)
        assert_close(new_rvs[i], ref_rv)
    assert torch.equal(rm, saved[0])  # the given statistics are not modified
    assert torch.equal(rv, saved[1])


# --------------------------------------------------------- modules: functional_call + vmap ensembles ---


class SmallCNN(nn.Module):
    """conv -> flexbn BN -> relu -> conv -> flexbn BN -> relu -> (masked) mean -> linear."""

    def __init__(self, **bn: Any) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = flexbn.BatchNorm2d(4, **bn)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.bn2 = flexbn.BatchNorm2d(3, **{**bn, "momentum": None})  # cumulative average too
        self.head = nn.Linear(3, 2)
        for m in (self.bn1, self.bn2):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x), mask=mask))
        h = torch.relu(self.bn2(self.conv2(h), mask=mask))
        if mask is None:
            return self.head(h.mean((2, 3)))
        m = mask.unsqueeze(1).to(h.dtype)
        return self.head((h * m).sum((2, 3)) / m.sum((2, 3)))


def _assert_buffer(actual: Tensor, expected: Tensor, msg: str) -> None:
    """Running statistics within tolerance, counters exactly."""
    if expected.dtype.is_floating_point:
        assert_close(actual, expected, msg=msg)
    else:
        assert torch.equal(actual, expected), msg


ENSEMBLE = [
    pytest.param({}, "train", "func_grad", id="train-func_grad"),
    pytest.param({}, "train", "autograd", id="train-autograd"),
    pytest.param({}, "eval", "func_grad", id="eval"),
    pytest.param({"momentum": None}, "train", "func_grad", id="momentum_none"),
    pytest.param({"detach_mean": True, "detach_var": True}, "train", "func_grad", id="detach_both"),
    pytest.param({"detach_var": True}, "train", "autograd", id="detach_var-autograd"),
    pytest.param({"mask": True}, "train", "func_grad", id="mask"),
    pytest.param({"virtual_batch_size": 3}, "train", "func_grad", id="ghost"),
    pytest.param({"renorm": True, "rmax": 1.1, "dmax": 0.05}, "train", "func_grad", id="renorm"),
]


@pytest.mark.parametrize(("options", "mode", "grads_by"), ENSEMBLE)
def test_vmapped_ensemble_equals_a_loop_over_models(
    options: dict[str, Any], mode: str, grads_by: str
) -> None:
    """Three CNNs with flexbn layers trained two SGD steps as one vmapped ensemble (stacked parameters and
    buffers) equal three models trained one by one: outputs, every gradient, updated parameters, and the
    running buffers (written in place into the stacked tensors) with num_batches_tracked."""
    bn = {k: v for k, v in options.items() if k != "mask"}
    models = [SmallCNN(**bn).double().train(mode == "train") for _ in range(B)]
    loop_models = copy.deepcopy(models)
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = copy.deepcopy(models[0]).to("meta")
    n, hw, lr = 6, 5, 0.5

    def loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, t: Tensor, mask: Any) -> Any:
        out = functional_call(base, (p, b), (x,), {"mask": mask})
        return F.mse_loss(out, t), out

    def ensemble_loss(p: dict[str, Tensor], b: dict[str, Tensor], *data: Any) -> Any:
        in_dims = (0, 0, 0, 0, None if data[-1] is None else 0)
        losses, outs = vmap(loss, in_dims=in_dims)(p, b, *data)
        return losses.sum(), outs

    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in loop_models]
    for step in range(2):
        x = torch.randn(B, n, 2, hw, hw, dtype=F64)
        target = torch.randn(B, n, 2, dtype=F64)
        mask = None
        if options.get("mask"):
            mask = torch.rand(B, n, hw, hw) > 0.4
            mask[:, :, 0, :2] = True
        if grads_by == "func_grad":
            grads, outs = grad(ensemble_loss, has_aux=True)(params, buffers, x, target, mask)
        else:
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            total, outs = ensemble_loss(leaves, buffers, x, target, mask)
            total.backward()
            grads = {k: v.grad for k, v in leaves.items()}
        params = {k: (v - lr * grads[k]).detach() for k, v in params.items()}

        for i, (model, opt) in enumerate(zip(loop_models, optimizers, strict=True)):
            opt.zero_grad()
            out = model(x[i], None if mask is None else mask[i])
            F.mse_loss(out, target[i]).backward()
            assert_close(outs[i], out, msg=f"output, step {step}")
            for name, p in model.named_parameters():
                assert_close(grads[name][i], p.grad, msg=f"grad {name}, step {step}")
            opt.step()
            for name, p in model.named_parameters():
                assert_close(params[name][i], p, msg=f"{name}, step {step}")
            for name, buf in model.named_buffers():
                _assert_buffer(buffers[name][i], buf, msg=f"buffer {name}, step {step}")
    nbt = buffers["bn1.num_batches_tracked"]
    assert nbt.tolist() == ([2] * B if mode == "train" else [0] * B)  # negative check for eval
    if mode == "train":  # the buffers moved from their initial values
        assert not torch.equal(
            buffers["bn2.running_var"], torch.ones_like(buffers["bn2.running_var"])
        )


def test_vmapped_domain_batch_norm_with_batched_domain_ids() -> None:
    """DomainBatchNorm under functional_call + vmap: per-instance data, domain ids and buffers."""
    models = [flexbn.DomainBatchNorm1d(C, num_domains=3).double() for _ in range(B)]
    for m in models:
        nn.init.normal_(m.bias)
    loop_models = copy.deepcopy(models)
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(B, 8, C, 2, dtype=F64)
    domains = torch.stack([torch.randperm(8) % 2 * (i % 2 + 1) for i in range(B)])  # absent domains
    out = vmap(lambda p, b, x, d: functional_call(base, (p, b), (x, d)))(
        params, buffers, x, domains
    )
    for i, m in enumerate(loop_models):
        assert_close(out[i], m(x[i], domains[i]))
        for name, buf in m.named_buffers():
            _assert_buffer(buffers[name][i], buf, msg=name)
    assert buffers["num_batches_tracked"].tolist() == [[1, 1, 0], [1, 0, 1], [1, 1, 0]]


def test_module_with_shared_buffers_and_batched_input_needs_the_pure_form() -> None:
    """One model, vmapped over data: the in-place update of an unbatched buffer cannot take batched
    statistics (as torch's BatchNorm); flexbn.func.batch_norm returns them instead."""
    bn = flexbn.BatchNorm1d(C).double()
    xs = torch.randn(B, 6, C, dtype=F64)
    with pytest.raises(RuntimeError, match="vmap"):
        vmap(bn)(xs)
    _, rms, _ = vmap(
        lambda x: flexbn.func.batch_norm(x, bn.running_mean, bn.running_var, training=True)
    )(xs)
    assert_close(rms, 0.1 * xs.mean(1))
