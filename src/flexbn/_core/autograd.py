"""The autograd Functions: normalize with the statistics' flags, with an analytic backward.

Forward, per (segment,) channel (``docs/gradients.md`` derives everything below)::

    y = (x - mean) * (invstd * weight) + bias

The statistics arrive as the currency (``stats.Moments``), computed without a graph. Two flags say whether
they are functions of their source for the purpose of differentiation -- the gradient axis G:

* ``grad_mean``: gradient flows through the batch mean (``False`` = ``x.mean(dims).detach()``);
* ``grad_var``:  gradient flows through the batch variance (``False`` = ``x.var(dims).detach()``).

Both are ``False`` when the statistics are constants (running statistics in eval mode). Their source is
``stats_input`` when given, else ``x``. Only ``x``, ``weight``, ``stats_input`` and the per-segment tables
are saved; nothing else of the input's size.

The backward is the backend's: the sums ``sum(dy)`` and ``sum(dy * (x - mean))`` per (segment, channel),
then the gradients from them -- in one call for one process; with statistics synchronised across processes
the core adds the sums of every rank in between, once. When the backward is itself differentiated
(``create_graph=True``) the reference formula runs with autograd on, with the statistics recomputed from
the saved source and detached where the flags say: its derivatives are those of the hand composition
``(x - x.mean().detach?) / sqrt(x.var().detach? + eps)`` to every order. Forward-mode derivatives use the
reference formula too.

The implementation chosen for a call (``backend.implementation``) is kept for its backward; the reference
takes over where the upstream gradient is not a plain tensor (``autograd.grad(..., is_grads_batched=True)``
batches it) or where the backward is differentiated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import backend, reference, sync
from .segments import Segments
from .stats import Moments

__all__ = [
    "BatchNormFunction",
    "EagerBatchNormFunction",
    "EagerNormalizeFunction",
    "NormalizeFunction",
    "NormalizeFunctionNoJvp",
    "Spec",
    "check_counts",
    "forward",
]

_functorch = torch._C._functorch


class Spec(NamedTuple):
    """The non-differentiable arguments of one normalization."""

    eps: float
    grad_mean: bool
    grad_var: bool
    running: bool  # the tables are running statistics (constants, except to forward-mode AD)
    seg: Segments
    name: str  # the requested backend


def _setup(
    ctx: Any,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    z: Tensor | None,
    m: Moments,
    spec: Spec,
    impl: Any,
) -> None:
    ctx.save_for_backward(x, weight, z, *m)
    if not torch.compiler.is_compiling() and (
        getattr(forward_ad, "_current_level", -1) >= 0 or _functorch.is_functorch_wrapped_tensor(x)
    ):  # forward-mode AD may ask for the tangent (compiled code has none: NormalizeFunctionNoJvp)
        ctx.save_for_forward(x, weight, z, *m)
    ctx.spec, ctx.impl = spec, impl
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.bias_rows = 1 if bias is None or bias.dim() == 1 else bias.shape[0]


def _jvp(
    ctx: Any,
    x_t: Tensor | None,
    weight_t: Tensor | None,
    bias_t: Tensor | None,
    z_t: Tensor | None,
    mean_t: Tensor | None = None,
    m2_t: Tensor | None = None,
) -> Tensor:
    x, weight, z, count, mean, m2 = ctx.saved_tensors
    spec = ctx.spec
    if spec.seg.group is not None and (spec.grad_mean or spec.grad_var):
        raise NotImplementedError(
            "forward-mode AD through batch statistics synchronised across processes is not supported"
        )
    # Batch statistics move as the flags say (the tangents their tables may carry from the input under
    # torch.func are not used); running statistics move with their own tangents.
    stats_t = (mean_t, m2_t) if spec.running and (mean_t is not None or m2_t is not None) else None
    return reference.jvp_formula(
        x,
        x_t,
        z,
        z_t,
        weight,
        weight_t,
        bias_t,
        Moments(count, mean, m2),
        spec.eps,
        grad_mean=spec.grad_mean,
        grad_var=spec.grad_var,
        seg=spec.seg,
        stats_t=stats_t,
    )


def _plain(t: Tensor) -> bool:
    return not (_functorch.is_functorch_wrapped_tensor(t) or _functorch.is_legacy_batchedtensor(t))


def _backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, z, count, mean, m2 = ctx.saved_tensors
    spec = ctx.spec
    seg = spec.seg
    needs = tuple(ctx.needs_input_grad[:4])
    differentiated = torch.is_grad_enabled()
    if differentiated and (spec.grad_mean or spec.grad_var):
        if seg.group is not None:
            raise NotImplementedError(
                "double backward through batch statistics synchronised across processes is not "
                "supported (torch.nn.SyncBatchNorm does not support it either)"
            )
        gx, gw, gb, gz = reference.backward_formula(
            grad_out,
            x,
            z,
            weight,
            spec.eps,
            seg,
            grad_mean=spec.grad_mean,
            grad_var=spec.grad_var,
            needs=needs,
            bias_rows=ctx.bias_rows,
        )
    else:
        impl = ctx.impl
        if differentiated or (impl is not reference and not _plain(grad_out)):
            impl = reference  # a graph to build, or a batched upstream gradient
        gx, gw, gb, gz = gradients(
            impl, grad_out, x, z, weight, Moments(count, mean, m2), spec, needs, ctx.bias_rows
        )
    if gw is not None and gw.dtype != weight.dtype:
        gw = gw.to(weight.dtype)
    if gb is not None and gb.dtype != ctx.bias_dtype:
        gb = gb.to(ctx.bias_dtype)
    return gx, gw, gb, gz


def gradients(
    impl: Any,
    grad_out: Tensor,
    x: Tensor,
    z: Tensor | None,
    weight: Tensor | None,
    m: Moments,
    spec: Spec,
    needs: tuple[bool, bool, bool, bool],
    bias_rows: int,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The first-order backward on ``impl``. Synchronised statistics: the backend's sums, added across
    processes (every rank adds both, whatever it needs itself), then the gradients -- weight and bias
    gradients from the local sums, as with ``torch.nn.SyncBatchNorm``. Otherwise one call."""
    seg = spec.seg
    sums = local = None
    if seg.group is not None and (spec.grad_mean or spec.grad_var):
        local = impl.backward_sums(grad_out, x, m, seg)
        sums = sync.all_sum(seg.group, *local)
    return impl.backward(
        grad_out,
        x,
        z,
        weight,
        m,
        spec.eps,
        seg,
        sums,
        local,
        grad_mean=spec.grad_mean,
        grad_var=spec.grad_var,
        needs=needs,
        bias_rows=bias_rows,
    )


class NormalizeFunction(torch.autograd.Function):
    """``normalize`` with the analytic backward, for ``torch.func`` transforms, ``torch.compile`` and
    statistics across processes. ``count``, ``mean``, ``m2`` and ``spec`` are not differentiable (running
    statistics' tables are, to forward-mode AD)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        stats_input: Tensor | None,
        count: Tensor,
        mean: Tensor,
        m2: Tensor,
        spec: Spec,
    ) -> Tensor:
        impl = backend.implementation(spec.name, x, weight, bias)
        return impl.normalize(x, weight, bias, Moments(count, mean, m2), spec.eps, spec.seg)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, z, count, mean, m2, spec = inputs
        impl = backend.implementation(spec.name, x, weight, bias)
        _setup(ctx, x, weight, bias, z, Moments(count, mean, m2), spec, impl)

    @staticmethod
    def jvp(
        ctx: Any, x_t: Any, w_t: Any, b_t: Any, z_t: Any, _c: Any, mean_t: Any, m2_t: Any, _: Any
    ) -> Any:
        return _jvp(ctx, x_t, w_t, b_t, z_t, mean_t, m2_t)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        return (*_backward(ctx, grad_out), None, None, None, None)


class NormalizeFunctionNoJvp(NormalizeFunction):
    """:class:`NormalizeFunction` without the custom ``jvp``, for ``torch.compile``: Dynamo cannot trace a
    Function that defines one (forward-mode AD of compiled code is then unsupported)."""

    jvp = staticmethod(torch.autograd.Function.jvp)


class EagerNormalizeFunction(torch.autograd.Function):
    """:class:`NormalizeFunction` in the older form (``forward(ctx, ...)``), for the ``flexbn::normalize``
    operator's autograd kernel: ``Function.apply`` binds the arguments of a ``setup_context``-style forward
    to its signature on every call (``inspect``, tens of microseconds); this form does not. Not usable under
    ``torch.func`` transforms, which run the other."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        stats_input: Tensor | None,
        count: Tensor,
        mean: Tensor,
        m2: Tensor,
        spec: Spec,
    ) -> Tensor:
        m = Moments(count, mean, m2)
        impl = backend.implementation(spec.name, x, weight, bias)
        _setup(ctx, x, weight, bias, stats_input, m, spec, impl)
        return impl.normalize(x, weight, bias, m, spec.eps, spec.seg)

    @staticmethod
    def jvp(
        ctx: Any, x_t: Any, w_t: Any, b_t: Any, z_t: Any, _c: Any, mean_t: Any, m2_t: Any, _: Any
    ) -> Any:
        return _jvp(ctx, x_t, w_t, b_t, z_t, mean_t, m2_t)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (*_backward(ctx, grad_out), None, None, None, None)


class EagerBatchNormFunction(torch.autograd.Function):
    """One training forward of one process (:func:`forward`) with the backward of
    :class:`NormalizeFunction`, in the older form (the ``flexbn::batch_norm`` operator). Returns
    ``(y, count, mean, m2)``; the tables are not differentiable."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        stats_input: Tensor | None,
        spec: Spec,
        running: tuple[Tensor, Tensor] | None,
        momentum: float | Tensor,
        check: str | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        y, m, impl = forward(x, weight, bias, stats_input, running, momentum, spec, check)
        _setup(ctx, x, weight, bias, stats_input, m, spec, impl)
        ctx.mark_non_differentiable(*m)
        return (y, *m)

    @staticmethod
    def jvp(ctx: Any, x_t: Any, w_t: Any, b_t: Any, z_t: Any, *_: Any) -> Any:
        return _jvp(ctx, x_t, w_t, b_t, z_t), None, None, None

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (*_backward(ctx, grad_out), None, None, None, None)


class BatchNormFunction(torch.autograd.Function):
    """:class:`EagerBatchNormFunction` for eager calls, which use the output only: returning the tables
    too costs every call a few microseconds in the forward and about ten in the backward (the engine
    handles four outputs and their gradients)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        stats_input: Tensor | None,
        spec: Spec,
        running: tuple[Tensor, Tensor] | None,
        momentum: float | Tensor,
        check: str | None,
    ) -> Tensor:
        y, m, impl = forward(x, weight, bias, stats_input, running, momentum, spec, check)
        _setup(ctx, x, weight, bias, stats_input, m, spec, impl)
        return y

    @staticmethod
    def jvp(ctx: Any, x_t: Any, w_t: Any, b_t: Any, z_t: Any, *_: Any) -> Any:
        return _jvp(ctx, x_t, w_t, b_t, z_t)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (*_backward(ctx, grad_out), None, None, None, None)


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats_input: Tensor | None,
    running: tuple[Tensor, Tensor] | None,
    momentum: float | Tensor,
    spec: Spec,
    check: str | None,
) -> tuple[Tensor, Moments, Any]:
    """One training forward on the backend (``stats_input`` the statistics' source when given): the
    output, the statistics and the implementation that ran. Raises before any state changes when ``check``
    (the option that selects the segments) finds a segment of at most one value per channel."""
    source = x if stats_input is None else stats_input
    impl = backend.implementation(spec.name, x, stats_input, weight, bias)
    code = 0 if check is None else (2 if check == "domain" else 1)
    with torch.no_grad():
        y, m = impl.forward(
            x, source.detach(), weight, bias, running, momentum, spec.eps, spec.seg, code
        )
    if y is None:
        check_counts(m.count, check, x)  # raises
    return y, m, impl


def check_counts(count: Tensor, source: str | None, x: Tensor) -> None:
    """No segment selected by ``source`` may hold a single value per channel in training (it would
    normalize to ``bias`` and give a NaN running variance); an absent domain may hold none."""
    if source == "domain":
        lonely = ((count > 0) & (count <= 1)).nonzero().flatten()
        if lonely.numel():
            raise ValueError(
                "Expected more than 1 value per channel when training in every domain present, but "
                f"domains {lonely[:10].tolist()} have 1 (input size {x.size()})"
            )
        return
    if bool((count <= 1).any()):
        raise ValueError(
            "Expected more than 1 value per channel when training in every segment of the statistics, "
            f"but a segment selected by {source} has {int(count.min().item())} (input size {x.size()})"
        )
