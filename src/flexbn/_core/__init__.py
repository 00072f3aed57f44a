"""The core every public entry point composes: moments over S -> normalize -> update running stats (P).

A call arrives validated, as a :class:`plan.Plan`. Where torch's own batch-norm operator computes exactly
what the plan asks (no flexbn option; eval with running statistics), and the call is recorded or
transformed -- ``torch.compile``/``torch.export``, ``torch.jit.trace``, ``torch.func`` -- or runs on a device
without flexbn kernels, the core calls that operator, so exported graphs contain batch norm and folding,
ONNX ``BatchNormalization`` and quantization fusers recognise it. Eval with running statistics calls it
always: the output is torch's, bitwise.

Otherwise, flexbn's operations (``ops``: dispatcher operators running the selected backend) compute the
statistics currency, combine it across processes (``sync``), update the running statistics and normalize
with the analytic backward (``autograd``). Under ``torch.compile`` and ``torch.func`` transforms the same
steps run as plain torch (``reference``) inside the autograd Function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import autograd, backend, ops, reference, sync
from . import plan as _plan
from . import renorm as _renorm
from .autograd import BatchNormFunction, NormalizeFunction, NormalizeFunctionNoJvp, Spec
from .segments import Segments
from .stats import Moments, compute_dtype, table_dtype

__all__ = ["batch_norm", "batch_norm_functional"]

_functorch = torch._C._functorch
_flexbn_ops = torch.ops.flexbn

TORCH_BELOW = 1 << 16
"""Under ``auto``, a training batch with no flexbn option and fewer elements than this runs torch's own
batch norm: its fixed cost per call is lower, and at this size the fixed cost is most of a call (measured
in ``docs/benchmarks.md``). Eval with running statistics runs torch's always under ``auto``; an explicit
backend runs flexbn's own implementation everywhere (except in graphs recorded for other tools)."""
_ops_running_update = ops.running_update
_is_tracing = _plan._is_tracing


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    plan: _plan.Plan,
) -> Tensor:
    """Batch norm as ``plan`` describes, updating the running statistics in place (not again when
    activation checkpointing recomputes the forward during backward)."""
    return _run(x, running_mean, running_var, weight, bias, momentum, plan, in_place=True)[0]


def batch_norm_functional(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    plan: _plan.Plan,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(output, new_running_mean, new_running_var)``, the buffers untouched (pure, for ``torch.func``).
    The new running statistics are fresh tensors when batch statistics update them, else the given ones."""
    return _run(x, running_mean, running_var, weight, bias, momentum, plan, in_place=False)


def _transformed(*tensors: Tensor | None) -> bool:
    """Under ``torch.compile`` or a ``torch.func`` transform: plain torch operations only."""
    if torch.compiler.is_compiling():
        return True
    wrapped = _functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t) for t in tensors)


@_plan.traced_quietly
def _run(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    plan: _plan.Plan,
    *,
    in_place: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    seg = plan.seg
    if x.numel() == 0 and seg.group is None:
        # Empty batch: nothing to take statistics over and nothing to update. As torch, a fresh tensor of the
        # input's shape that keeps the gradient chain (zero gradients for weight and bias).
        y = x.clone() if weight is None else x * weight.reshape(-1)[0]
        return (y if bias is None else y + bias.reshape(-1)[0]), running_mean, running_var
    if weight is not None and weight.dim() != 1 and seg.ids is None:
        weight = weight.reshape(-1)  # torch accepts any shape with C elements, e.g. (C, 1)
    if bias is not None and bias.dim() != 1 and seg.ids is None:
        bias = bias.reshape(-1)
    transformed = _transformed(x, weight, bias, plan.stats_input, running_mean)
    name = "reference" if transformed else backend.requested()
    if plan.standard and in_place and not isinstance(momentum, Tensor):
        on_torch = transformed or _is_tracing()  # graphs that other tools can read
        if not on_torch and name == "auto":  # the fastest: see TORCH_BELOW
            on_torch = (
                not plan.batch
                or x.device.type != "cpu"
                or x.numel() < TORCH_BELOW
                or not backend.cpp_available()
            )
        if on_torch:
            cudnn = x.is_cuda and torch.backends.cudnn.enabled  # read only where it matters
            y = torch.batch_norm(
                x, weight, bias, running_mean, running_var, plan.batch, momentum, plan.eps, cudnn
            )
            return y, running_mean, running_var
    traced = _is_tracing()  # operators, so that the trace records them
    local = not transformed and seg.group is None
    recompute = in_place and _renorm.recomputing()
    if plan.batch and local and in_place and plan.renorm is None:
        # One process, nothing between the statistics and the output: one call of the backend.
        has_running = running_mean is not None and running_var is not None and not recompute
        running = (running_mean, running_var) if has_running else None
        z = _stats_source(plan)
        flags = (not plan.detach_mean, not plan.detach_var)
        if traced:
            scalar = isinstance(momentum, Tensor)
            y = _flexbn_ops.batch_norm(
                x,
                weight,
                bias,
                z,
                running_mean if has_running else None,
                running_var if has_running else None,
                0.0 if scalar else float(momentum),
                momentum if scalar else None,
                plan.eps,
                seg.ids,
                seg.num,
                seg.mask,
                *flags,
                plan.counts_from,  # checked inside the operator, also when a traced graph runs it
                name,
            )[0]
        elif ops.differentiable(x, weight, bias, z):
            spec = Spec(plan.eps, *flags, False, seg, name)
            y = BatchNormFunction.apply(
                x, weight, bias, z, spec, running, momentum, plan.counts_from
            )
        else:
            spec = Spec(plan.eps, *flags, False, seg, name)
            y = autograd.forward(x, weight, bias, z, running, momentum, spec, plan.counts_from)[0]
        return y, running_mean, running_var
    new_mean, new_var = running_mean, running_var
    stats_input = plan.stats_input
    if plan.batch:
        source = x if stats_input is None else stats_input
        m = _moments(source, seg, name, traced)
        if plan.counts_from is not None and m is not None and _plan.readable(m.count):
            autograd.check_counts(m.count, plan.counts_from, x)
        if seg.group is not None:  # combined with the other ranks' moments
            flags = (plan.detach_mean, plan.detach_var, stats_input is not None)
            m, seg = sync.exchange(m, seg, x, plan.eps, flags, _settings(momentum, plan))
        r_d = None
        if plan.renorm is not None and running_mean is not None and running_var is not None:
            r_d = _corrections(m, x, running_mean, running_var, plan, in_place, recompute)
        if running_mean is not None and running_var is not None and not recompute:
            if in_place:
                _update(running_mean, running_var, m, momentum, name, traced)
            else:
                new_mean, new_var = reference.new_running_stats(
                    running_mean, running_var, m, momentum
                )
        grad_mean, grad_var = not plan.detach_mean, not plan.detach_var
        if plan.detach_mean and plan.detach_var:
            stats_input = None  # no gradient reaches it, and the output should not require one
        if r_d is not None:
            weight, bias = _renorm.affine(weight, bias, *r_d)
    else:  # running statistics (checked present), applied to every segment unless per segment
        tdt = table_dtype(x.device)
        rows = 1 if running_mean.dim() == 1 else running_mean.shape[0]  # type: ignore[union-attr]
        m = Moments(
            torch.ones(rows, dtype=tdt, device=x.device),
            running_mean.to(tdt).reshape(rows, -1),  # type: ignore[union-attr]
            running_var.to(tdt).reshape(rows, -1),  # type: ignore[union-attr]
        )
        if rows == 1:
            seg = Segments(mask=seg.mask)
        grad_mean = grad_var = False
        stats_input = None
    flags = (grad_mean, grad_var, not plan.batch)
    y = _normalize(x, weight, bias, stats_input, m, plan.eps, flags, seg, name, traced)
    return y, new_mean, new_var


def _settings(momentum: float | Tensor, plan: _plan.Plan) -> sync.Settings:
    """What the ranks of a synchronised call must agree on beyond the statistics' configuration."""
    rmax, dmax = plan.renorm if plan.renorm is not None else (0.0, 0.0)
    return sync.Settings(float(momentum), float(rmax), float(dmax), plan.calls)


def _stats_source(plan: _plan.Plan) -> Tensor | None:
    """``stats_input``, detached when no gradient flows through the statistics (the output then does not
    require a gradient for it)."""
    z = plan.stats_input
    return z.detach() if z is not None and plan.detach_mean and plan.detach_var else z


def _moments(source: Tensor, seg: Segments, name: str, traced: bool) -> Moments | None:
    """The currency of the statistics' source (``None``: an empty batch of a synchronised layer)."""
    if source.numel() == 0:
        return None
    source = source.detach()  # also drops forward-mode tangents: the statistics' flow is the flags'
    if traced:
        return Moments(*_flexbn_ops.moments(source, seg.ids, seg.num, seg.mask, name))
    with torch.no_grad():
        return backend.implementation(name, source).moments(source, seg)


def _update(
    running_mean: Tensor,
    running_var: Tensor,
    m: Moments,
    momentum: float | Tensor,
    name: str,
    traced: bool,
) -> None:
    if traced:
        scalar = isinstance(momentum, Tensor)
        _flexbn_ops.running_update_(
            running_mean,
            running_var,
            *m,
            0.0 if scalar else float(momentum),
            momentum if scalar else None,
            name,
        )
        return
    with torch.no_grad():
        _ops_running_update(running_mean, running_var, *m, momentum, None, name)


def _corrections(
    m: Moments,
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    plan: _plan.Plan,
    in_place: bool,
    recompute: bool,
) -> tuple[Tensor, Tensor]:
    """Batch renormalization's ``(r, d)`` from the batch and running statistics before this step's update
    (reused from the first forward when checkpointing recomputes it)."""
    cdt = compute_dtype(x.dtype)
    mean, var = m.mean.to(cdt), m.var.to(cdt)
    if running_mean.dim() == 1 and mean.shape[0] == 1:  # whole batch: per-channel corrections
        mean, var = mean[0], var[0]
    args = (mean, var, running_mean, running_var, plan.eps, *plan.renorm)  # type: ignore[misc]
    if in_place:
        return _renorm.checkpointed_corrections(running_mean, *args, recompute)
    return _renorm.corrections(*args)


def _normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats_input: Tensor | None,
    m: Moments,
    eps: float,
    flags: tuple[bool, bool, bool],
    seg: Segments,
    name: str,
    traced: bool,
) -> Tensor:
    """``flags``: ``(grad_mean, grad_var, running)`` -- gradient through the batch mean, variance; the
    tables are running statistics."""
    if traced and seg.group is None:
        return _flexbn_ops.normalize(
            x,
            weight,
            bias,
            stats_input,
            *m,
            eps,
            seg.ids,
            seg.num,
            seg.mask,
            *flags,
            name,
        )
    if not _transformed(x, weight, bias, stats_input) and not ops.differentiable(
        x, weight, bias, stats_input
    ):  # nothing to differentiate: no autograd Function
        with torch.no_grad():
            impl = backend.implementation(name, x, weight, bias)
            return impl.normalize(x, weight, bias, m, eps, seg)
    fn = NormalizeFunctionNoJvp if torch.compiler.is_compiling() else NormalizeFunction
    return fn.apply(x, weight, bias, stats_input, *m, Spec(eps, *flags, seg, name))
