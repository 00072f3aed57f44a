"""Modules: thin wrappers that keep state (buffers, train/eval) and call the functional API.

``flexbn.BatchNorm1d/2d/3d`` *are* ``torch.nn.BatchNorm1d/2d/3d`` (subclasses): same constructor, parameters,
buffers, ``state_dict`` keys and ``_version``, the same checks and messages, and ``isinstance`` checks in
user code and in torch utilities (``torch.optim.swa_utils.update_bn``, weight-decay filters, ...) keep
working. They add keyword-only options and differ from torch only where those options are set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from . import _core
from . import functional as F
from ._core import plan as _plan

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "DomainBatchNorm1d",
    "DomainBatchNorm2d",
    "DomainBatchNorm3d",
    "renorm_schedule",
    "set_renorm_limits",
]


_torch_batch_norm = torch.nn.functional.batch_norm
_get_backend = _core.backend.requested


def _cumulative_factor(num_batches_tracked: Tensor, running_mean: Tensor | None) -> Tensor:
    """``1 / num_batches_tracked`` (``momentum=None``: cumulative average) as a tensor, without a host
    synchronisation. float64 where the statistics are (as torch's Python-float factor), else float32 (MPS
    has no float64); a count of 0 (a domain not yet seen) gives 1, unused."""
    double = running_mean is not None and running_mean.dtype == torch.float64
    nbt = num_batches_tracked.clamp_min(1).to(torch.float64 if double else torch.float32)
    return torch.reciprocal(nbt)


def _check_renorm_options(renorm: object, rmax: object, dmax: object, track: bool) -> None:
    _plan.check_renorm(renorm, rmax, dmax)
    if renorm and not track:
        raise ValueError(
            "renorm=True needs running statistics (track_running_stats=True): its corrections compare "
            "the batch statistics with them, but got track_running_stats=False"
        )


def _renorm_repr(module: nn.Module) -> str:
    if not module.renorm:
        return ""
    rmax, dmax = (float(v) if isinstance(v, Tensor) else v for v in (module.rmax, module.dmax))
    return f", renorm=True, rmax={rmax}, dmax={dmax}"


class _FlexBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared behaviour of the flexbn batch-norm modules (a mixin over torch's ``_BatchNorm`` classes)."""

    detach_mean: bool
    detach_var: bool
    virtual_batch_size: int | None
    renorm: bool
    rmax: float | Tensor
    dmax: float | Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        detach_mean: bool = False,
        detach_var: bool = False,
        virtual_batch_size: int | None = None,
        renorm: bool = False,
        rmax: float | Tensor = 3.0,
        dmax: float | Tensor = 5.0,
    ) -> None:
        _plan.check_flag("detach_mean", detach_mean)
        _plan.check_flag("detach_var", detach_var)
        _plan.check_virtual_batch_size(virtual_batch_size)
        _check_renorm_options(renorm, rmax, dmax, track_running_stats)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.detach_mean = detach_mean
        self.detach_var = detach_var
        self.virtual_batch_size = virtual_batch_size
        self.renorm, self.rmax, self.dmax = renorm, rmax, dmax

    def _momentum_factor(self) -> float | Tensor:
        """The factor of this step's running-statistics update; bumps ``num_batches_tracked`` in training.

        ``momentum=None`` gives the cumulative average ``1 / num_batches_tracked`` as a 0-d tensor, so no
        host synchronisation happens (torch's ``float(num_batches_tracked)`` breaks ``torch.compile`` graphs).
        Called once the call is validated: a rejected call changes nothing.
        """
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self._counts():  # (not when checkpointing recomputes the forward: counted by the first)
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = _cumulative_factor(self.num_batches_tracked, self.running_mean)
        return factor

    def forward(
        self,
        input: Tensor,
        *,
        mask: Tensor | None = None,
        groups: Tensor | None = None,
        stats_input: Tensor | None = None,
    ) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return self._traced_forward(input, mask, groups, stats_input)
        self._check_input_dim(input)
        training = self.training
        if (
            not training
            and self.running_mean is not None
            and mask is None
            and groups is None
            and stats_input is None
            and (torch.compiler.is_compiling() or _get_backend() == "auto")
        ):  # eval with running statistics: torch's own operator, bitwise (the fastest)
            return _torch_batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        # Batch statistics in training, and in eval when there are no running buffers (torch's rule).
        use_batch_stats = training or (self.running_mean is None and self.running_var is None)
        track = not training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        plan = _plan.build(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            0.0,
            self.eps,
            detach_mean=self.detach_mean,
            detach_var=self.detach_var,
            mask=mask,
            groups=groups,
            virtual_batch_size=self.virtual_batch_size,
            stats_input=stats_input,
            process_group=self._sync_group() if training else None,
            renorm=self.renorm,
            rmax=self.rmax,
            dmax=self.dmax,
            calls=self._sync_calls(),
        )
        counted = self._counts()
        momentum = self._momentum_factor()
        try:
            return _core.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, momentum, plan
            )
        except Exception:  # refused by the statistics (a segment of one value, the other ranks):
            if counted:  # the call did not happen
                self.num_batches_tracked.sub_(1)
            raise

    def _traced_forward(
        self,
        input: torch.fx.Proxy,
        mask: Any,
        groups: Any,
        stats_input: Any,
    ) -> Any:
        """``torch.fx.symbolic_trace``: one ``call_function`` node -- torch's ``F.batch_norm`` when no flexbn
        option is in play (tools that look for batch norm see it), else :func:`flexbn.batch_norm` -- with
        the layer's buffers and parameters as ``get_attr`` nodes, and the ``num_batches_tracked`` update
        recorded too. The graph is specialised to the layer's mode at tracing time, as FX does for every
        module it traces through."""
        training = self.training
        momentum: Any = 0.0 if self.momentum is None else self.momentum
        if training and self.track_running_stats and self.num_batches_tracked is not None:
            tracer = input.tracer
            path = tracer.path_of_module(self)
            name = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
            nbt = tracer.create_proxy("get_attr", name, (), {})
            nbt.add_(1)
            if self.momentum is None:
                momentum = _cumulative_factor(nbt, self.running_mean)
        use_batch_stats = training or (self.running_mean is None and self.running_var is None)
        track = not training or self.track_running_stats
        args = (
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )
        per_sample = mask is not None or groups is not None or stats_input is not None
        options = per_sample or (
            use_batch_stats
            and (
                self.detach_mean
                or self.detach_var
                or self.renorm
                or self.virtual_batch_size is not None
                or self._sync_group() is not None
                or self.momentum is None
            )
        )
        if not options:  # what torch computes: its own function (eval with running statistics, ...)
            return torch.nn.functional.batch_norm(*args)
        return F.batch_norm(
            *args,
            detach_mean=self.detach_mean,
            detach_var=self.detach_var,
            mask=mask,
            groups=groups,
            virtual_batch_size=self.virtual_batch_size,
            stats_input=stats_input,
            process_group=self._sync_group() if training else None,
            renorm=self.renorm,
            rmax=self.rmax,
            dmax=self.dmax,
        )

    def _sync_group(self) -> Any:
        """The process group training statistics are combined over (``flexbn.SyncBatchNorm``); None."""
        return None

    def _sync_calls(self) -> int:
        """The call counter the ranks compare (``flexbn.SyncBatchNorm``); 0."""
        return 0

    def _counts(self) -> bool:
        """Whether this call bumps ``num_batches_tracked`` (:meth:`_momentum_factor`)."""
        return (
            self.training
            and self.track_running_stats
            and self.num_batches_tracked is not None
            and not _core.renorm.recomputing()
        )

    def extra_repr(self) -> str:
        rep = super().extra_repr()
        if self.detach_mean:
            rep += ", detach_mean=True"
        if self.detach_var:
            rep += ", detach_var=True"
        if self.virtual_batch_size is not None:
            rep += f", virtual_batch_size={self.virtual_batch_size}"
        return rep + _renorm_repr(self)

    def __prepare_scriptable__(self) -> nn.Module:
        """For ``torch.jit.script``: torch's layer sharing this one's tensors, or a clear error."""
        from .convert import prepare_scriptable

        return prepare_scriptable(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("detach_mean", False)
        self.__dict__.setdefault("detach_var", False)
        self.__dict__.setdefault("virtual_batch_size", None)
        self.__dict__.setdefault("renorm", False)
        self.__dict__.setdefault("rmax", 3.0)
        self.__dict__.setdefault("dmax", 5.0)


_DOC = """Drop-in for :class:`torch.nn.{name}` with a choice of gradient flow through the batch statistics.

    Same arguments, parameters, buffers, ``state_dict`` and behaviour as torch's module; keyword-only
    additions:

    Args:
        detach_mean: no gradient through the batch mean in training (``x.mean(dims).detach()``).
        detach_var: no gradient through the batch variance in training (``x.var(dims).detach()``).
        virtual_batch_size: ghost batch norm: statistics per chunk of about this many consecutive samples
            (see :func:`flexbn.batch_norm` for the chunking rule).
        renorm: batch renormalization in training (needs ``track_running_stats=True``), with the clipping
            limits ``rmax`` and ``dmax``: plain attributes, read at every forward, that a warm-up schedule
            may change between steps (:func:`flexbn.renorm_schedule`, :func:`flexbn.set_renorm_limits`).

    ``forward(input, *, mask=None, groups=None, stats_input=None)``: statistics over the real elements of a
    padded batch (``mask``), per bag (``groups``, multiple-instance learning, often with
    ``track_running_stats=False``), or from another tensor (``stats_input``, e.g. before dropout); see
    :func:`flexbn.batch_norm`.

    Input: {shapes}. Output: the same shape, dtype and memory format.

    Example:
        >>> import torch, flexbn
        >>> bn = flexbn.{name}(4, detach_var=True)
        >>> bn
        {name}(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, detach_var=True)
        >>> y = bn(torch.randn({example}))
        >>> isinstance(bn, torch.nn.{name}), y.shape == torch.Size([{example}])
        (True, True)
    """


class BatchNorm1d(_FlexBatchNorm, nn.BatchNorm1d):
    __doc__ = _DOC.format(
        name="BatchNorm1d", shapes="``(N, C)`` or ``(N, C, L)``", example="8, 4, 5"
    )


class BatchNorm2d(_FlexBatchNorm, nn.BatchNorm2d):
    __doc__ = _DOC.format(name="BatchNorm2d", shapes="``(N, C, H, W)``", example="8, 4, 5, 5")


class BatchNorm3d(_FlexBatchNorm, nn.BatchNorm3d):
    __doc__ = _DOC.format(name="BatchNorm3d", shapes="``(N, C, D, H, W)``", example="8, 4, 2, 3, 3")


class _DomainBatchNorm(nn.Module):
    """Batch norm with statistics per domain (DSBN, Chang et al. 2019): a shared module whose training
    statistics and running buffers are kept per domain, with shared or per-domain affine parameters."""

    _version = 2
    _dims: tuple[int, ...] = ()
    _dims_text = ""

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        domain_affine: bool = False,
        detach_mean: bool = False,
        detach_var: bool = False,
        renorm: bool = False,
        rmax: float | Tensor = 3.0,
        dmax: float | Tensor = 5.0,
    ) -> None:
        super().__init__()
        _check_renorm_options(renorm, rmax, dmax, track_running_stats)
        if not isinstance(num_domains, int) or isinstance(num_domains, bool) or num_domains < 1:
            raise ValueError(f"num_domains must be an int >= 1, but got {num_domains!r}")
        for name, flag in (
            ("domain_affine", domain_affine),
            ("detach_mean", detach_mean),
            ("detach_var", detach_var),
        ):
            _plan.check_flag(name, flag)
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.num_domains = num_features, num_domains
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.domain_affine, self.detach_mean, self.detach_var = (
            domain_affine,
            detach_mean,
            detach_var,
        )
        self.renorm, self.rmax, self.dmax = renorm, rmax, dmax
        shape = (num_domains, num_features) if domain_affine else (num_features,)
        self.weight = nn.Parameter(torch.empty(shape, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_domains, num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_domains, num_features, **factory))
            nbt = torch.zeros(num_domains, dtype=torch.long, device=device)
            self.register_buffer("num_batches_tracked", nbt)
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._dims:
            raise ValueError(f"expected {self._dims_text} input (got {input.dim()}D input)")

    def forward(
        self,
        input: Tensor,
        domain: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        stats_input: Tensor | None = None,
    ) -> Tensor:
        """Normalize each sample with its domain's statistics: ``domain`` is an ``(N,)`` integer tensor of
        ids in ``[0, num_domains)``."""
        if isinstance(input, torch.fx.Proxy):
            raise ValueError(
                f"{type(self).__name__} cannot be traced by torch.fx.symbolic_trace (its statistics "
                "depend on the domain ids); mark it a leaf module of your tracer"
            )
        if domain is None:
            raise TypeError(
                f"{type(self).__name__}.forward() missing required argument 'domain': an (N,) integer "
                f"tensor of domain ids in [0, num_domains) = [0, {self.num_domains}), one per sample"
            )
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels (dimension 1), got input size "
                f"{tuple(input.shape)}"
            )
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        plan = _plan.build(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            0.0,
            self.eps,
            detach_mean=self.detach_mean,
            detach_var=self.detach_var,
            mask=mask,
            stats_input=stats_input,
            renorm=self.renorm,
            rmax=self.rmax,
            dmax=self.dmax,
            domain=(domain, self.num_domains),
        )
        momentum: float | Tensor = 0.0 if self.momentum is None else self.momentum
        recompute = _core.renorm.recomputing()  # counted by the first forward (checkpointing)
        present = None
        if self.training and self.track_running_stats and input.numel() > 0 and not recompute:
            present = (_core.reference.counts(input, plan.seg, torch.float32) > 0).long()
            self.num_batches_tracked.add_(present)
            if self.momentum is None:
                momentum = _cumulative_factor(
                    self.num_batches_tracked, self.running_mean
                ).unsqueeze(1)
        try:
            return _core.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, momentum, plan
            )
        except (
            Exception
        ):  # refused by the statistics (a domain of one value): the call did not happen
            if present is not None:
                self.num_batches_tracked.sub_(present)
            raise

    def __prepare_scriptable__(self) -> nn.Module:
        """For ``torch.jit.script``: one clear error (TorchScript cannot compile per-domain statistics)."""
        raise ValueError(
            f"torch.jit.script cannot compile flexbn.{type(self).__name__}: torch has no per-domain batch "
            "norm for TorchScript to use (trace it in eval mode with torch.jit.trace, or use "
            "torch.export or torch.compile)"
        )

    def extra_repr(self) -> str:
        rep = (
            f"{self.num_features}, num_domains={self.num_domains}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
        for name in ("domain_affine", "detach_mean", "detach_var"):
            if getattr(self, name):
                rep += f", {name}=True"
        return rep + _renorm_repr(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("renorm", False)
        self.__dict__.setdefault("rmax", 3.0)
        self.__dict__.setdefault("dmax", 5.0)


_DOMAIN_DOC = """Batch norm with per-domain statistics (domain-specific BN): ``forward(x, domain)``.

    Each sample is normalized with the statistics of its domain -- batch statistics per domain in training,
    per-domain running statistics (buffers of shape ``(num_domains, C)``) in eval. A domain absent from a
    batch keeps its running statistics and ``num_batches_tracked`` (shape ``(num_domains,)``). The affine
    parameters are shared across domains by default (``domain_affine=False``: the normalization is what
    differs between domains, the learned scale and shift are common); ``domain_affine=True`` gives each
    domain its own ``(num_domains, C)`` weight and bias. With ``renorm=True`` each domain's batch
    statistics are corrected towards its own running statistics. Other arguments as :class:`flexbn.{base}`;
    ``forward`` also takes ``mask=`` and ``stats_input=``. Checking that ids lie in
    ``[0, num_domains)`` synchronises with the device once per call; that check and the one-value-per-domain
    check are not made under ``torch.compile`` or for ids batched by ``torch.func.vmap``.

    Example:
        >>> import torch, flexbn
        >>> bn = flexbn.Domain{base}(4, num_domains=2)
        >>> y = bn(torch.randn({example}), domain=torch.tensor([0, 1, 0, 1, 1, 0, 0, 1]))
        >>> bn.running_mean.shape, y.shape == torch.Size([{example}])
        (torch.Size([2, 4]), True)
    """


class DomainBatchNorm1d(_DomainBatchNorm):
    __doc__ = _DOMAIN_DOC.format(base="BatchNorm1d", example="8, 4, 5")
    _dims, _dims_text = (2, 3), "2D or 3D"


class DomainBatchNorm2d(_DomainBatchNorm):
    __doc__ = _DOMAIN_DOC.format(base="BatchNorm2d", example="8, 4, 5, 5")
    _dims, _dims_text = (4,), "4D"


class DomainBatchNorm3d(_DomainBatchNorm):
    __doc__ = _DOMAIN_DOC.format(base="BatchNorm3d", example="8, 4, 2, 3, 3")
    _dims, _dims_text = (5,), "5D"


def renorm_schedule(
    step: int,
    *,
    warmup: int = 5000,
    rmax_at: int = 40000,
    dmax_at: int = 25000,
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> tuple[float, float]:
    """The batch-renormalization limits ``(rmax, dmax)`` for training step ``step`` (counted from 0).

    The schedule of Ioffe (2017, section 4): plain batch norm (``rmax = 1``, ``dmax = 0``) for the first
    ``warmup`` steps, then relaxed linearly to reach ``rmax`` at step ``rmax_at`` and ``dmax`` at step
    ``dmax_at`` (absolute steps, as in the paper: 1 -> 3 by step 40k, 0 -> 5 by step 25k, after 5k steps of
    batch norm), constant afterwards. Apply it with :func:`set_renorm_limits`.

    Example:
        >>> import flexbn
        >>> [flexbn.renorm_schedule(s) for s in (0, 5000, 15000, 25000, 40000)]
        [(1.0, 0.0), (1.0, 0.0), (1.5714285714285714, 2.5), (2.142857142857143, 5.0), (3.0, 5.0)]
    """
    counts = (("step", step), ("warmup", warmup), ("rmax_at", rmax_at), ("dmax_at", dmax_at))
    for name, value in counts:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, but got {value!r}")
    for name, value in (("rmax_at", rmax_at), ("dmax_at", dmax_at)):
        if value < warmup:
            raise ValueError(f"{name} must be >= warmup ({warmup}), but got {value}")
    _plan.check_renorm(True, rmax, dmax)

    def ramp(end: int) -> float:
        if step <= warmup:
            return 0.0
        return 1.0 if step >= end else (step - warmup) / (end - warmup)

    return 1.0 + (rmax - 1.0) * ramp(rmax_at), dmax * ramp(dmax_at)


def _renorm_layer(module: nn.Module) -> bool:
    """A flexbn layer, or a subclass routed by :func:`flexbn.convert`, with ``renorm=True``."""
    from .convert import _is_routed  # (convert imports this module)

    flexbn_layer = isinstance(module, (_FlexBatchNorm, _DomainBatchNorm)) or _is_routed(module)
    return flexbn_layer and bool(getattr(module, "renorm", False))


def set_renorm_limits(model: nn.Module, rmax: float | Tensor, dmax: float | Tensor) -> int:
    """Set ``rmax`` and ``dmax`` on every flexbn module of ``model`` (itself included) that has
    ``renorm=True`` -- batch-norm subclasses converted by :func:`flexbn.convert` included; returns how
    many. They take effect at the next forward. A limit the module holds as a 0-d tensor (for
    ``torch.compile``: no recompilation) is written into, in place.

    Example:
        >>> import torch, flexbn
        >>> model = torch.nn.Sequential(flexbn.BatchNorm1d(4, renorm=True), flexbn.BatchNorm1d(4))
        >>> flexbn.set_renorm_limits(model, *flexbn.renorm_schedule(15000))
        1
        >>> model[0].rmax, model[0].dmax
        (1.5714285714285714, 2.5)
    """
    _plan.check_renorm(True, rmax, dmax)
    count = 0
    for module in model.modules():
        if _renorm_layer(module):
            for name, value in (("rmax", rmax), ("dmax", dmax)):
                current = getattr(module, name)
                if isinstance(current, Tensor) and not isinstance(value, Tensor):
                    with torch.no_grad():
                        current.fill_(value)
                else:
                    setattr(module, name, value)
            count += 1
    return count
