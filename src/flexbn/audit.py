"""``flexbn audit``: list a model's batch-norm layers and check numerically that gradients flow as they say.

For every batch-norm layer (torch's ``_BatchNorm`` classes -- ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy
and user subclasses -- and flexbn's ``BatchNorm*``, ``SyncBatchNorm``, ``DomainBatchNorm*``) :func:`audit`
reports flexbn's three choices (``docs/why.md``): the gradient mode (G), the statistics set (S) and the
inference statistics (P). It then runs one forward of a float64 copy of the model on a random input (the model itself
is not touched) and, for each call of each layer, compares the gradient of a random linear functional of the
layer's output with respect to its input against a reference recomputed from the layer's own parameters
and the documented formula (``flexbn.spec``)::

    y = (x - mean) / sqrt(var + eps) * weight + bias

with ``mean`` / ``var`` the biased batch statistics over the layer's statistics set (whole batch, ghost
batches, per domain), each detached as the layer's flags say, and batch renormalization's ``r``, ``d``
as constants; or the running statistics (constants) where the layer uses them (eval mode,
``flexbn.freeze``). A layer whose gradient differs from its claim fails, and the audit names the gradient
mode it does match. Each layer's input is cut from the graph before the call (and copied, so that an
in-place operation of the model on it changes nothing), and the model goes on with a copy of its output
(an in-place ``ReLU`` or a residual ``out += x`` after it cannot change what is checked), so every check is
local to one layer.

A subclass with a ``forward`` of its own (timm's ``BatchNormAct2d``: batch norm, then an activation) is
checked at the batch-norm computations that ``forward`` makes with the layer's parameters or buffers: each
``torch.nn.functional.batch_norm`` call -- found by the mechanism :func:`flexbn.convert` routes such calls
with, so a converted subclass is checked with the options it was given -- and, for a subclass of flexbn's
classes, each call of flexbn's ``forward`` (``super().forward``). What it adds after them is not the
audit's business. Without any such call it is checked by its output where that equals batch norm of its
input (and fails if only its gradient differs), and is "not verified", with the reason, where it does not:
never a failure for what a subclass adds to its batch norm. Lazy modules are materialized by the audited
forward (on the copy).

Not verified (and said so, with the reason): layers called with ``mask=``, ``groups=`` or
``stats_input=`` (per-call statistics sets), statistics synchronised over several processes, layers the
forward does not call, subclasses as above.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import spec
from .convert import (
    _has_own_forward,
    _is_routed,
    _LayerCalls,
    _plain_call,
    _public_base,
    _routed_call,
)

__all__ = ["AuditError", "AuditRow", "audit", "format_table", "load_model", "parse_factory_args"]

_BatchNorm = nn.modules.batchnorm._BatchNorm

GRADIENT_MODES: dict[tuple[bool, bool], str] = {
    (False, False): "full",
    (True, False): "mean detached",
    (False, True): "variance detached",
    (True, True): "both detached",
}
"""``(detach_mean, detach_var)`` -> the name the audit prints."""

TOLERANCE: dict[torch.dtype, float] = {torch.float64: 1e-9, torch.float32: 1e-4}
"""Largest accepted ``max |measured - reference| / max(1, max |reference|)``, for the output and the input
gradient, per dtype the model runs in. The gradient modes differ by O(1) for the functional used (see
:func:`_functional`), so a wrong mode fails by orders of magnitude."""


class AuditError(ValueError):
    """The model cannot be audited as asked: it cannot be imported or built, or it fails on the input."""


@dataclass(frozen=True)
class AuditRow:
    """One batch-norm layer of the audited model.

    ``status`` is ``"ok"`` (the measured output and input gradient equal the reference of what the layer
    claims), ``"fail"`` (they do not; ``check`` says which gradient mode they match, if any) or
    ``"not verified"`` (``check`` gives the reason). ``max_diff`` is the largest relative difference to the
    claimed reference over the layer's calls (``None`` when nothing was compared).
    """

    name: str
    cls: str
    num_features: int
    gradient: str
    statistics: str
    inference: str
    notes: tuple[str, ...]
    status: str
    check: str
    max_diff: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data."""
        row = dataclasses.asdict(self)
        row["notes"] = list(self.notes)
        return row


# ----------------------------------------------------------------------------------------------------------
# what each layer says about itself


def _bn_types() -> tuple[type, ...]:
    from .modules import _DomainBatchNorm

    return (_BatchNorm, _DomainBatchNorm)


def _is_domain(m: nn.Module) -> bool:
    from .modules import _DomainBatchNorm

    return isinstance(m, _DomainBatchNorm)


def _is_flex(m: nn.Module) -> bool:
    from .modules import _DomainBatchNorm, _FlexBatchNorm

    return isinstance(m, (_FlexBatchNorm, _DomainBatchNorm))


def _is_sync(m: nn.Module) -> bool:
    from .distributed import SyncBatchNorm

    if _is_routed(m):
        return bool(type(m)._flexbn_sync)
    return isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm))


def _known_name(cls: type) -> str | None:
    import flexbn

    for prefix, namespace in (("flexbn", flexbn), ("torch.nn", nn)):
        if getattr(namespace, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}"
    return None


def _class_name(m: nn.Module) -> str:
    """``torch.nn.BatchNorm2d``, ``flexbn.BatchNorm2d``, or ``MyBN (flexbn.BatchNorm2d subclass)``."""
    kind = type(m)._flexbn_base if _is_routed(m) else type(m)
    known = _known_name(kind)
    if known is not None:
        return known
    base = next((k for k in (_known_name(c) for c in kind.__mro__[1:]) if k), None)
    routed = ", converted by flexbn.convert" if _is_routed(m) else ""
    return f"{kind.__qualname__} ({base} subclass{routed})" if base else kind.__qualname__


def _flags(m: nn.Module) -> tuple[bool, bool]:
    """What the layer claims: ``(detach_mean, detach_var)``; torch's layers are full."""
    return bool(getattr(m, "detach_mean", False)), bool(getattr(m, "detach_var", False))


def _limit(value: float | Tensor) -> float:
    return float(value)


def _is_frozen(m: nn.Module) -> bool:
    from .population import _is_frozen

    return _is_frozen(m)


def _statistics(m: nn.Module) -> str:
    if _is_domain(m):
        return f"per domain ({m.num_domains} domains)"
    if _is_sync(m):
        group = "default (world)" if m.process_group is None else "given"
        return f"sync over process group: {group}"
    vbs = getattr(m, "virtual_batch_size", None)
    return "whole batch" if vbs is None else f"ghost batches of {vbs}"


def _inference(m: nn.Module) -> str:
    if m.running_mean is None and m.running_var is None:
        text = "none: batch statistics in eval (track_running_stats=False)"
    elif _is_frozen(m):
        text = "frozen (flexbn.freeze): running statistics"
    elif not m.track_running_stats:
        text = "running statistics, not updated (track_running_stats=False)"
    elif m.momentum is None:
        text = "cumulative average (momentum=None)"
    else:
        text = f"running EMA, momentum {m.momentum:g}"
    if getattr(m, "renorm", False):
        text += f"; renorm(rmax={_limit(m.rmax):g}, dmax={_limit(m.dmax):g}) in training"
    return text


def _notes(m: nn.Module) -> tuple[str, ...]:
    notes = []
    if _is_domain(m):
        notes.append("domain ids are per call")
        if m.domain_affine:
            notes.append("per-domain weight and bias")
        notes.append("mask= and stats_input= are per call")
    elif _is_flex(m):
        notes.append("mask=, groups= and stats_input= are per call")
    if _is_sync(m):
        notes.append("local batch norm while torch.distributed is not initialized")
    return tuple(notes)


# ----------------------------------------------------------------------------------------------------------
# one forward, recorded per layer


@dataclass
class _Call:
    x: Tensor | None  # the leaf given to the layer (None: no tensor input to differentiate)
    args: tuple[Any, ...]  # the other positional arguments (DomainBatchNorm: the domain ids)
    kwargs: dict[str, Any]
    training: bool  # the mode the layer's forward ran in (after flexbn.freeze's pre-hook)
    running_mean: Tensor | None  # before the call's update
    running_var: Tensor | None
    y: Any = None


def _record(calls: list[_Call]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        rm, rv = module.running_mean, module.running_var
        snap = (None if t is None else t.detach().clone() for t in (rm, rv))
        first = args[0] if args else None
        if not isinstance(first, Tensor) or not first.is_floating_point():
            calls.append(_Call(None, args[1:], dict(kwargs), module.training, *snap))
            return None
        # Cut (the check is local to this layer) and copied (the model may change its tensor in place).
        x = first.detach().clone().requires_grad_(True)
        calls.append(_Call(x, args[1:], dict(kwargs), module.training, *snap))
        return (x, *args[1:]), kwargs

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        calls[-1].y = output
        # The model goes on with a copy: an in-place ReLU or `out += x` after the layer leaves ours alone.
        return output.clone() if isinstance(output, Tensor) else None

    return pre_hook, hook


def _observer(
    calls: list[_Call],
    compute: Callable[[nn.Module, Any], Tensor],
) -> Callable[[nn.Module, Any], Tensor]:
    """A handler for :class:`flexbn.convert._LayerCalls`: each of the layer's own ``batch_norm`` calls
    runs as ``compute`` runs it, for the model, and once more for the check, on a cut copy of its input and
    copies of the running buffers (so the model's graph and buffers are as without the audit)."""

    def handle(layer: nn.Module, call: Any) -> Tensor:
        x = call.input
        if isinstance(x, Tensor) and x.is_floating_point():
            rm, rv = (None if t is None else t.detach().clone() for t in call[1:3])
            leaf = x.detach().clone().requires_grad_(True)
            own = (layer.running_mean, layer.running_var)  # what the reference uses: the layer's
            snap = (None if t is None else t.detach().clone() for t in own)
            calls.append(_Call(leaf, (), {}, layer.training, *snap))
            calls[-1].y = compute(layer, call._replace(input=leaf, running_mean=rm, running_var=rv))
        return compute(layer, call)

    return handle


def _observed_forward(
    m: nn.Module, handle: Callable[..., Tensor], *args: Any, **kwargs: Any
) -> Any:
    with _LayerCalls(m, handle, []):
        return type(m).forward(m, *args, **kwargs)


def _observe(m: nn.Module, calls: list[_Call]) -> None:
    """Record in ``calls`` the batch-norm computations that the ``forward`` of ``m`` (the audit's copy;
    a subclass with a ``forward`` of its own) makes with its parameters: its ``F.batch_norm`` calls --
    through the routing of a converted layer, or the same mode around the forward of one that is not --
    and, for a subclass of flexbn's classes, its calls of flexbn's ``forward`` (``super().forward``)."""
    if _is_routed(m):
        m.__dict__["_flexbn_handle"] = _observer(calls, _routed_call)
    else:
        m.forward = functools.partial(_observed_forward, m, _observer(calls, _plain_call))
    if _is_flex(m):
        kind = type(m)
        base = _public_base(kind)
        m.__class__ = type(
            kind.__name__, (kind, _observing_subclass(base)), {"_audit_calls": calls}
        )


@functools.cache
def _observing_subclass(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` (one of flexbn's classes) whose ``forward`` is recorded like a layer call: placed after a
    user's subclass in the MRO, it is what that subclass's ``super().forward`` runs."""

    def forward(self: nn.Module, input: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(input, Tensor) and input.is_floating_point():
            own = (self.running_mean, self.running_var)
            snap = (None if t is None else t.detach().clone() for t in own)
            leaf = input.detach().clone().requires_grad_(True)
            self._audit_calls.append(_Call(leaf, args, dict(kwargs), self.training, *snap))
            # Once more for the check, on copies of the buffers (the model's are updated once).
            saved = dict(self._buffers)
            self._buffers.update({k: None if v is None else v.clone() for k, v in saved.items()})
            try:
                self._audit_calls[-1].y = base.forward(self, leaf, *args, **kwargs)
            finally:
                self._buffers.update(saved)
        return base.forward(self, input, *args, **kwargs)

    return type(f"_Observed{base.__name__}", (base,), {"forward": forward})


# ----------------------------------------------------------------------------------------------------------
# the reference


def _uses_batch_stats(m: nn.Module, training: bool) -> bool:
    if _is_domain(m):
        return training or m.running_mean is None
    return training or (m.running_mean is None and m.running_var is None)


def _sync_world(m: nn.Module, training: bool) -> int:
    """Number of processes the layer's training statistics are taken over (1: local)."""
    if not (_is_sync(m) and training and dist.is_available() and dist.is_initialized()):
        return 1
    group = m.process_group if m.process_group is not None else dist.group.WORLD
    return dist.get_world_size(group)


def _segment_ids(m: nn.Module, call: _Call, n: int, device: torch.device) -> Tensor | None:
    """Segment id per sample of the statistics set (None: the whole batch), by flexbn's rules."""
    if _is_domain(m):
        domain = call.args[0] if call.args else call.kwargs["domain"]
        return spec.segment_ids(n, domain=domain)
    vbs = getattr(m, "virtual_batch_size", None)
    return spec.segment_ids(n, virtual_batch_size=vbs, device=device)


def _reference(
    m: nn.Module, call: _Call, x: Tensor, detach_mean: bool, detach_var: bool, batch: bool
) -> Tensor:
    """The documented formula (``flexbn.spec``) in float64 from the layer's parameters, for input ``x``
    (float64)."""
    ids = _segment_ids(m, call, x.shape[0], x.device)
    rm, rv = (None if t is None else t.double() for t in (call.running_mean, call.running_var))
    renorm = None
    if batch and getattr(m, "renorm", False):
        renorm = (_limit(m.rmax), _limit(m.dmax))
    return spec.batch_norm(
        x,
        rm,
        rv,
        None if m.weight is None else m.weight.detach().double(),
        None if m.bias is None else m.bias.detach().double(),
        training=batch,
        eps=float(m.eps),
        detach_mean=detach_mean,
        detach_var=detach_var,
        ids=ids,
        renorm=renorm,
    )


def _functional(y: Tensor, generator: torch.Generator) -> Tensor:
    """Weights of a random linear functional of ``y``: standard normal, plus 1 and plus ``y`` standardized
    per channel, so that the gradient modes differ by O(1) (detaching the mean drops the weights' channel
    mean, detaching the variance their correlation with the normalized output)."""
    y = y.detach()
    dims = (0, *range(2, y.dim()))
    std = y.std(dims, correction=0, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    noise = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
    return noise + 1 + (y - y.mean(dims, keepdim=True)) / std


def _rel_diff(actual: Tensor, expected: Tensor) -> float:
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return float((actual.double() - expected).abs().max()) / scale if expected.numel() else 0.0


@dataclass
class _Outcome:
    status: str
    check: str
    diff: float | None = None
    output_differs: bool = False  # a failure because the output (not only the gradient) differs


def _check_call(
    m: nn.Module, call: _Call, tol: float, generator: torch.Generator, where: str = ""
) -> _Outcome:
    if call.x is None:
        return _Outcome("not verified", "its input is not a floating-point tensor")
    per_call = [k for k in ("mask", "groups", "stats_input") if call.kwargs.get(k) is not None]
    if per_call:
        names = ", ".join(f"{k}=" for k in per_call)
        return _Outcome("not verified", f"called with {names} (a per-call statistics set)")
    y = call.y
    if not isinstance(y, Tensor) or y.shape != call.x.shape:
        return _Outcome(
            "not verified", "its output is not a tensor of the input's shape", output_differs=True
        )
    if not y.requires_grad:
        return _Outcome("not verified", "its output carries no gradient (forward under no_grad?)")
    world = _sync_world(m, call.training)
    if world > 1:
        return _Outcome("not verified", f"statistics synchronised over {world} processes")
    batch = _uses_batch_stats(m, call.training)
    weights = _functional(y, generator)
    (grad,) = torch.autograd.grad(y, call.x, weights, retain_graph=True, allow_unused=True)
    grad = torch.zeros_like(call.x) if grad is None else grad

    def compare(detach_mean: bool, detach_var: bool) -> tuple[float, float]:
        x = call.x.detach().double().requires_grad_(True)
        ref = _reference(m, call, x, detach_mean, detach_var, batch)
        (ref_grad,) = torch.autograd.grad(ref, x, weights.double())
        return _rel_diff(y.detach(), ref.detach()), _rel_diff(grad, ref_grad)

    claimed = _flags(m) if batch else (False, False)
    out_diff, grad_diff = compare(*claimed)
    diff = max(out_diff, grad_diff)
    used = ("batch statistics" if batch else "running statistics") + where
    if diff <= tol:
        return _Outcome("ok", f"{used}, max diff {diff:.1e}", diff)
    if out_diff > tol:
        text = f"{used}: output differs from the formula by {out_diff:.1e}"
        return _Outcome("fail", text, diff, output_differs=True)
    if not batch:
        return _Outcome("fail", f"{used}: input gradient differs by {grad_diff:.1e}", diff)
    matches = [name for flags, name in GRADIENT_MODES.items() if compare(*flags)[1] <= tol]
    found = f"it matches {' and '.join(matches)}" if matches else "it matches no gradient mode"
    text = f"claims {GRADIENT_MODES[claimed]}, but {found} (max diff to the claim {grad_diff:.1e})"
    return _Outcome("fail", text, diff)


def _verify(
    m: nn.Module,
    calls: list[_Call],
    inner: list[_Call] | None,
    tol: float,
    generator: torch.Generator,
) -> _Outcome:
    """The layer's outcome from its calls; ``inner``: the batch-norm calls made in the ``forward`` of a
    layer that has its own (None for torch's and flexbn's classes, whose output must be batch norm).
    Such a layer is checked at those calls; without any, by its output where that is batch norm of its
    input (a gradient that differs then fails), else it is not verified."""
    if not calls:
        return _Outcome("not verified", "not called by the forward")
    if (
        inner
    ):  # a forward of its own, which may add to its batch norm: check the batch norm it calls
        where = " at its batch_norm call"
        outcomes = [_check_call(m, call, tol, generator, where) for call in inner]
        calls = inner
    else:
        outcomes = [_check_call(m, call, tol, generator) for call in calls]
    if inner is not None and not inner and any(o.output_differs for o in outcomes):
        return _Outcome(
            "not verified",
            "its forward returns more than batch norm of its input and makes no batch-norm call "
            "the audit can check (torch.nn.functional.batch_norm with the layer's parameters, or "
            "flexbn's forward)",
        )
    rank = {"fail": 0, "not verified": 1, "ok": 2}
    worst = min(outcomes, key=lambda o: (rank[o.status], -(o.diff or 0.0)))
    if len(calls) > 1:
        worst = dataclasses.replace(worst, check=f"{worst.check} ({len(calls)} calls)")
    diffs = [o.diff for o in outcomes if o.diff is not None]
    return dataclasses.replace(worst, diff=max(diffs) if diffs else None)


# ----------------------------------------------------------------------------------------------------------
# the public function


def _check_shape(input_shape: object) -> tuple[int, ...]:
    ok = isinstance(input_shape, (tuple, list, torch.Size)) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape
    )
    if not ok or len(input_shape) < 2:
        raise ValueError(
            "input_shape must be a sequence of at least 2 positive ints (N, C, ...), but got "
            f"{input_shape!r}"
        )
    return tuple(input_shape)


def _copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``model`` in ``dtype``; a lazy module's uninitialized tensors are copied as new
    uninitialized ones (deepcopy refuses them), so the audited forward materializes them in the copy."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        if nn.parameter.is_lazy(t):
            kind = type(t)
            memo[id(t)] = kind(requires_grad=t.requires_grad, device=t.device, dtype=t.dtype)
    try:
        return copy.deepcopy(model, memo).to(dtype)
    except Exception as exc:
        raise AuditError(
            f"could not copy the model to {dtype}: {type(exc).__name__}: {exc}"
        ) from exc


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


def _device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        if not nn.parameter.is_lazy(t):
            return t.device
    return torch.device("cpu")


def audit(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    mode: str = "train",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> list[AuditRow]:
    """List the batch-norm layers of ``model`` and verify each one's gradient flow numerically.

    Runs one forward of a copy of ``model`` in ``dtype`` (float64 or float32), in ``mode`` (``"train"`` or
    ``"eval"``), on a standard normal input of ``input_shape`` (on the device of the model's first
    parameter) drawn from ``seed``; ``model`` itself is not modified. Returns one :class:`AuditRow` per
    layer, in ``model.named_modules()`` order (an empty list if there is none); see the module docstring
    for what is compared. Raises :class:`AuditError` if the copy or the forward fails (with the
    exception's message), ``TypeError`` / ``ValueError`` for bad arguments.

    Example:
        >>> import torch, flexbn
        >>> from flexbn.audit import audit
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), flexbn.BatchNorm2d(4, detach_var=True))
        >>> [(r.name, r.gradient, r.status) for r in audit(model, (2, 3, 5, 5))]
        [('1', 'variance detached', 'ok')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    shape = _check_shape(input_shape)
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', but got {mode!r}")
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype must be torch.float64 or torch.float32, but got {dtype!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, but got {type(seed).__name__}")
    work = _copy(model, dtype)
    work.train(mode == "train")
    device = _device(work)
    generator = torch.Generator(device=device).manual_seed(seed)
    layers = [(name, m) for name, m in work.named_modules() if isinstance(m, _bn_types())]
    calls: dict[nn.Module, list[_Call]] = {m: [] for _, m in layers}
    inner: dict[nn.Module, list[_Call] | None] = {m: None for _, m in layers}
    handles = []
    for _, m in layers:
        pre_hook, hook = _record(calls[m])
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
        if _has_own_forward(m):
            inner[m] = []
            _observe(m, inner[m])  # type: ignore[arg-type]
    x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    try:
        # Dropout and lazy modules' initialization draw from the seed, not from the caller's generator.
        with torch.enable_grad(), torch.random.fork_rng(devices=_cuda_devices(work)):
            torch.manual_seed(seed)
            work(x)
    except Exception as exc:
        raise AuditError(
            f"the model failed on a {mode}-mode input of shape {shape} ({dtype}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    rows = []
    with torch.enable_grad():
        for name, m in layers:
            outcome = _verify(m, calls[m], inner[m], TOLERANCE[dtype], generator)
            rows.append(
                AuditRow(
                    name=name or "(model)",
                    cls=_class_name(m),
                    num_features=int(m.num_features),
                    gradient=GRADIENT_MODES[_flags(m)],
                    statistics=_statistics(m),
                    inference=_inference(m),
                    notes=_notes(m),
                    status=outcome.status,
                    check=outcome.check,
                    max_diff=outcome.diff,
                )
            )
    return rows


def format_table(rows: Sequence[AuditRow]) -> str:
    """The rows as an aligned plain-text table, followed by the layers' notes.

    Example:
        >>> import torch, flexbn
        >>> from flexbn.audit import audit, format_table
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> print(format_table(audit(model, (8, 3))))  # doctest: +NORMALIZE_WHITESPACE, +ELLIPSIS
        layer  class                 C  gradient  statistics   inference                 check
        ---...
        1      torch.nn.BatchNorm1d  4  full      whole batch  running EMA, momentum 0.1  ok: batch statistics, max diff ...
    """
    header = ("layer", "class", "C", "gradient", "statistics", "inference", "check")
    body = [
        (
            r.name,
            r.cls,
            str(r.num_features),
            r.gradient,
            r.statistics,
            r.inference,
            f"{'FAIL' if r.status == 'fail' else r.status}: {r.check}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *body)
    ]
    lines.insert(1, "-" * len(lines[0]))
    notes: dict[str, list[str]] = {}
    for r in rows:
        for note in r.notes:
            notes.setdefault(note, []).append(r.name)
    if notes:
        lines += ["", "notes:"] + [f"  {note}: {', '.join(names)}" for note, names in notes.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# loading a model from the command line


def _import(module: str) -> Any:
    path = Path(module)
    if module.endswith(".py") or os.sep in module or "/" in module:
        if not path.is_file():
            raise AuditError(f"module file not found: {module!r}")
        name = f"_flexbn_audit_{path.stem}_{len(sys.modules)}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise AuditError(f"cannot import {module!r} as a Python file")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded  # dataclasses, pickling and typing look the module up by name
        sys.path.insert(0, str(path.resolve().parent))  # sibling imports, as `python file.py`
        try:
            spec.loader.exec_module(loaded)
        except Exception as exc:
            del sys.modules[name]
            raise AuditError(f"importing {module!r} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path.remove(str(path.resolve().parent))
        return loaded
    added = "" not in sys.path and os.getcwd() not in sys.path
    if added:  # a console script's sys.path lacks the current directory
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise AuditError(
                f"module not found: {module!r} (not importable from the current directory or "
                "sys.path; pass a dotted module name or a path to a .py file)"
            ) from exc
        raise AuditError(f"importing {module!r} failed: ModuleNotFoundError: {exc}") from exc
    except Exception as exc:
        raise AuditError(f"importing {module!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(os.getcwd())


def load_model(
    spec: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """The model named by ``"MODULE:FACTORY"``: ``FACTORY`` (a dotted attribute of ``MODULE``) called
    with ``args`` and ``kwargs`` must return an ``nn.Module``; an ``nn.Module`` instance is taken as it is
    (and takes no arguments).
    ``MODULE`` is a dotted module importable from the current directory or ``sys.path``, or a path to a
    ``.py`` file (imported under a private name, with its directory on ``sys.path`` while it runs).
    Raises :class:`AuditError` with what went wrong.

    Example:
        >>> from flexbn.audit import load_model
        >>> load_model("torch.nn:Identity")
        Identity()
        >>> load_model("torch.nn:BatchNorm1d", (4,), {"momentum": None})
        BatchNorm1d(4, eps=1e-05, momentum=None, affine=True, bias=True, track_running_stats=True)
    """
    kwargs = kwargs or {}
    call = _format_call(spec, args, kwargs)
    module_name, sep, factory_name = spec.rpartition(":")
    if not sep or not module_name or not factory_name:
        raise AuditError(
            "expected MODULE:FACTORY (e.g. mypackage.models:make_model or models/cnn.py:build), "
            f"but got {spec!r}"
        )
    module = _import(module_name)
    obj: Any = module
    for part in factory_name.split("."):
        if not hasattr(obj, part):
            public = sorted(
                k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
            )
            raise AuditError(
                f"factory {factory_name!r} not found in module {module_name!r} "
                f"(its callables: {', '.join(public[:12]) or 'none'})"
            )
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        if args or kwargs:
            raise AuditError(f"{spec} is an nn.Module instance: it takes no factory arguments")
        return obj
    if not callable(obj):
        raise AuditError(
            f"factory {spec!r} is not callable: it is a {type(obj).__name__}; expected a function or "
            "class returning a torch.nn.Module"
        )
    try:
        model = obj(*args, **kwargs)
    except Exception as exc:
        raise AuditError(f"calling {call} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise AuditError(
            f"factory {spec!r} must return a torch.nn.Module, but returned {type(model).__name__}"
        )
    return model


def _format_call(spec: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    parts = [*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]
    return f"{spec}({', '.join(parts)})"


def parse_factory_args(words: Sequence[str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The factory arguments of the command line: ``NAME=VALUE`` is a keyword argument, any other word a
    positional one; each value is a Python literal (``10``, ``0.5``, ``False``, ``None``, ``(3, 4)``,
    ``'a=b'``) or else the word itself as a string. Positional arguments come first.

    Example:
        >>> from flexbn.audit import parse_factory_args
        >>> parse_factory_args(["resnet18", "num_classes=10", "pretrained=False", "act='relu'"])
        (('resnet18',), {'num_classes': 10, 'pretrained': False, 'act': 'relu'})
    """
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for word in words:
        name, sep, text = word.partition("=")
        if sep and name.isidentifier():
            if name in kwargs:
                raise AuditError(f"factory argument {name!r} given twice")
            kwargs[name] = _literal(text)
        elif kwargs:
            raise AuditError(
                f"positional factory argument {word!r} after keyword arguments (give NAME=VALUE last)"
            )
        else:
            args.append(_literal(word))
    return tuple(args), kwargs


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


# ----------------------------------------------------------------------------------------------------------
# command line


def _shape_arg(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.strip().strip("()[]").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            "expected comma-separated positive ints N,C,... with at least 2 dimensions "
            f"(e.g. 8,3,32,32), but got {text!r}"
        )
    return shape


def add_parser(sub: Any) -> None:
    """Register ``flexbn audit`` on the ``flexbn`` command's subparsers."""
    p = sub.add_parser(
        "audit",
        help="list a model's batch-norm layers and verify their gradient flow numerically",
        description="List every batch-norm layer of the model that FACTORY builds (gradient mode, "
        "statistics set, inference statistics) and check each layer's input gradient against the "
        "formula it claims, on a float64 copy. Exit status: 0 every check passed (or no batch-norm "
        "layer), 1 a check failed, 2 usage error.",
    )
    p.add_argument(
        "target",
        metavar="MODULE:FACTORY",
        help="dotted module (importable from the current directory) or path to a .py file, and a "
        "callable in it returning a torch.nn.Module",
    )
    p.add_argument(
        "factory_args",
        nargs="*",
        metavar="ARG",
        help="arguments of FACTORY: NAME=VALUE for a keyword argument, else positional; values are "
        "Python literals, or strings (e.g. timm:create_model resnet18 num_classes=10)",
    )
    p.add_argument(
        "--input-shape",
        required=True,
        type=_shape_arg,
        metavar="N,C,...",
        help="shape of the random input, e.g. 8,3,32,32",
    )
    p.add_argument("--mode", choices=("train", "eval"), default="train", help="default: train")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="default: 0")
    p.add_argument("--json", action="store_true", help="print machine-readable rows")


def run_cli(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    """Run ``flexbn audit`` with parsed arguments; returns the exit status (0, 1 or 2)."""
    stdout = stdout or sys.stdout
    dtype = getattr(torch, args.dtype)
    try:
        fargs, fkwargs = parse_factory_args(args.factory_args)
        model = load_model(args.target, fargs, fkwargs)
        rows = audit(model, args.input_shape, mode=args.mode, dtype=dtype, seed=args.seed)
    except AuditError as exc:
        print(f"flexbn audit: error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.status == "fail"]
    if args.json:
        doc = {
            "model": args.target,
            "factory_args": list(fargs),
            "factory_kwargs": fkwargs,
            "class": type(model).__name__,
            "input_shape": list(args.input_shape),
            "mode": args.mode,
            "dtype": args.dtype,
            "passed": not failed,
            "layers": [r.as_dict() for r in rows],
        }
        print(json.dumps(doc, indent=2), file=stdout)
        return 1 if failed else 0
    shape = ",".join(map(str, args.input_shape))
    target = _format_call(args.target, fargs, fkwargs) if fargs or fkwargs else args.target
    print(
        f"flexbn audit: {target} -> {type(model).__name__}, input ({shape}) {args.dtype}, "
        f"{args.mode} mode\n",
        file=stdout,
    )
    if not rows:
        print("no batch-norm layer found: nothing to verify", file=stdout)
        return 0
    print(format_table(rows), file=stdout)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "fail", "not verified")}
    print(
        f"\n{len(rows)} batch-norm layer(s): {counts['ok']} ok, {counts['fail']} failed, "
        f"{counts['not verified']} not verified",
        file=stdout,
    )
    return 1 if failed else 0
