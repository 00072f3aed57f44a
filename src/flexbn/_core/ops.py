"""flexbn's operations as torch operators (namespace ``flexbn``), so that every tracer and transform sees them.

* ``flexbn::batch_norm(x, weight, bias, stats_input, running_mean!, running_var!, momentum,
  momentum_tensor, eps, ids, num, mask, grad_mean, grad_var, check, backend) -> (y, count, mean, m2)``: one
  training forward of one process -- the statistics, the check that no segment selected by the option
  ``check`` holds a single value per channel (raised before anything changes), the running update, the
  output -- in one call of the backend. Differentiable in ``y`` as ``normalize`` below.
* ``flexbn::moments(x, ids, num, mask, backend) -> (count, mean, m2)``: the statistics currency of ``x``
  per (segment, channel) (``stats.Moments``). Not differentiable.
* ``flexbn::running_update_(running_mean!, running_var!, count, mean, m2, momentum, momentum_tensor,
  backend)``: the running statistics' update, in place.
* ``flexbn::normalize(x, weight, bias, stats_input, count, mean, m2, eps, ids, num, mask, grad_mean,
  grad_var, running, backend) -> y``: differentiable in ``x``, ``weight``, ``bias`` and ``stats_input``
  (and, to forward-mode AD, in the tables when ``running``: running statistics), with the analytic backward of ``autograd.NormalizeFunction`` (forward-mode too, and exact double backward).

``ids``/``num``/``mask`` are the segmentation (``segments.Segments``); ``backend`` the requested backend's
name, resolved against each call's tensors (``backend.implementation``): C++ kernels for CPU tensors, the
plain-torch reference for other devices and for meta/fake tensors. ``torch.jit.trace`` records these
operators (a traced graph runs them, gradients included, where flexbn is imported); the legacy batching of
``autograd.grad(..., is_grads_batched=True)`` loops over them. Under ``torch.compile``/``torch.export`` and
``torch.func`` transforms the core runs the reference composition instead (Inductor fuses it; the transforms
need plain torch operations), and torch's own batch-norm operator wherever flexbn computes exactly what it
does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import backend, reference
from .autograd import EagerBatchNormFunction, EagerNormalizeFunction, Spec, forward
from .segments import Segments
from .stats import Moments, table_dtype

__all__ = ["differentiable", "running_update"]

_lib = torch.library.Library("flexbn", "FRAGMENT")  # kept alive: it owns the registrations
_lib.define(
    "moments(Tensor x, Tensor? ids, int num, Tensor? mask, str backend) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "running_update_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor count, Tensor mean, "
    "Tensor m2, float momentum, Tensor? momentum_tensor, str backend) -> ()"
)
_lib.define(
    "batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? stats_input, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, float momentum, Tensor? momentum_tensor, float eps, Tensor? ids, int num, "
    "Tensor? mask, bool grad_mean, bool grad_var, str? check, str backend) -> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "normalize(Tensor x, Tensor? weight, Tensor? bias, Tensor? stats_input, Tensor count, Tensor mean, "
    "Tensor m2, float eps, Tensor? ids, int num, Tensor? mask, bool grad_mean, bool grad_var, "
    "bool running, str backend) -> Tensor"
)


def _moments(
    x: Tensor, ids: Tensor | None, num: int, mask: Tensor | None, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(backend.implementation(name, x).moments(x, Segments(ids, num, mask)))  # type: ignore[return-value]


def running_update(
    running_mean: Tensor,
    running_var: Tensor,
    count: Tensor,
    mean: Tensor,
    m2: Tensor,
    momentum: float | Tensor,
    momentum_tensor: Tensor | None = None,
    name: str = "auto",
) -> None:
    """The running update of the ``running_update_`` operator (a float, or a tensor ``momentum``)."""
    m = Moments(count, mean, m2)
    factor = momentum if momentum_tensor is None else momentum_tensor
    impl = backend.implementation(name, running_mean, running_var)
    if impl is not reference and not impl.running_supported(running_mean, running_var):
        impl = reference
    impl.running_update(running_mean, running_var, m, factor)


def _normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats_input: Tensor | None,
    count: Tensor,
    mean: Tensor,
    m2: Tensor,
    eps: float,
    ids: Tensor | None,
    num: int,
    mask: Tensor | None,
    grad_mean: bool,
    grad_var: bool,
    running: bool,
    name: str,
) -> Tensor:
    impl = backend.implementation(name, x, weight, bias)
    return impl.normalize(x, weight, bias, Moments(count, mean, m2), eps, Segments(ids, num, mask))


def _batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats_input: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    momentum_tensor: Tensor | None,
    eps: float,
    ids: Tensor | None,
    num: int,
    mask: Tensor | None,
    grad_mean: bool,
    grad_var: bool,
    check: str | None,
    name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    running = None if running_mean is None else (running_mean, running_var)
    factor = momentum if momentum_tensor is None else momentum_tensor
    spec = Spec(eps, grad_mean, grad_var, False, Segments(ids, num, mask), name)
    y, m, _ = forward(x, weight, bias, stats_input, running, factor, spec, check)
    return (y, *m)


def _batch_norm_autograd(
    keyset: torch._C.DispatchKeySet,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats_input: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    momentum_tensor: Tensor | None,
    eps: float,
    ids: Tensor | None,
    num: int,
    mask: Tensor | None,
    grad_mean: bool,
    grad_var: bool,
    check: str | None,
    name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = Spec(eps, grad_mean, grad_var, False, Segments(ids, num, mask), name)
    running = None if running_mean is None else (running_mean, running_var)
    factor = momentum if momentum_tensor is None else momentum_tensor
    if differentiable(x, weight, bias, stats_input):
        return EagerBatchNormFunction.apply(
            x, weight, bias, stats_input, spec, running, factor, check
        )
    with torch._C._AutoDispatchBelowAutograd():
        y, m, _ = forward(x, weight, bias, stats_input, running, factor, spec, check)
    return (y, *m)


def differentiable(*tensors: Tensor | None) -> bool:
    """Whether a derivative of the output can be asked for: grad mode on and an input requiring grad, or a
    forward-mode AD level open."""
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def _normalize_autograd(
    keyset: torch._C.DispatchKeySet,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats_input: Tensor | None,
    count: Tensor,
    mean: Tensor,
    m2: Tensor,
    eps: float,
    ids: Tensor | None,
    num: int,
    mask: Tensor | None,
    grad_mean: bool,
    grad_var: bool,
    running: bool,
    name: str,
) -> Tensor:
    seg = Segments(ids, num, mask)
    if differentiable(x, weight, bias, stats_input, mean, m2):
        spec = Spec(eps, grad_mean, grad_var, running, seg, name)
        return EagerNormalizeFunction.apply(x, weight, bias, stats_input, count, mean, m2, spec)
    with torch._C._AutoDispatchBelowAutograd():
        impl = backend.implementation(name, x, weight, bias)
        return impl.normalize(x, weight, bias, Moments(count, mean, m2), eps, seg)


_lib.impl("batch_norm", _batch_norm, "CompositeExplicitAutograd")
_lib.impl("batch_norm", _batch_norm_autograd, "Autograd", with_keyset=True)
_lib.impl("moments", _moments, "CompositeExplicitAutograd")
_lib.impl("running_update_", running_update, "CompositeExplicitAutograd")
_lib.impl("normalize", _normalize, "CompositeExplicitAutograd")
_lib.impl("normalize", _normalize_autograd, "Autograd", with_keyset=True)
# Not differentiable: autograd passes them by (no graph is recorded).
_lib.impl("moments", torch.library.fallthrough_kernel, "Autograd")
_lib.impl("running_update_", torch.library.fallthrough_kernel, "Autograd")


@torch.library.register_fake("flexbn::moments")
def _(x: Tensor, ids: Tensor | None, num: int, mask: Tensor | None, name: str):  # type: ignore[no-untyped-def]
    rows, tdt = (1 if ids is None else num), table_dtype(x.device)
    return (
        x.new_empty((rows,), dtype=tdt),
        x.new_empty((rows, x.shape[1]), dtype=tdt),
        x.new_empty((rows, x.shape[1]), dtype=tdt),
    )


@torch.library.register_fake("flexbn::batch_norm")
def _(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, stats_input: Tensor | None, *args: object
):  # type: ignore[no-untyped-def]
    ids, num = args[5], args[6]
    rows, tdt = (1 if ids is None else num), table_dtype(x.device)
    return (
        torch.empty_like(x, memory_format=reference.memory_format(x)),
        x.new_empty((rows,), dtype=tdt),
        x.new_empty((rows, x.shape[1]), dtype=tdt),
        x.new_empty((rows, x.shape[1]), dtype=tdt),
    )


@torch.library.register_fake("flexbn::running_update_")
def _(*args: object) -> None:
    return None


@torch.library.register_fake("flexbn::normalize")
def _(x: Tensor, *args: object) -> Tensor:
    return torch.empty_like(x, memory_format=reference.memory_format(x))
