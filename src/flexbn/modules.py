"""Modules: thin wrappers that keep state (buffers, train/eval) and call the functional API.

``flexbn.BatchNorm1d/2d/3d`` *are* ``torch.nn.BatchNorm1d/2d/3d`` (subclasses): same constructor, parameters,
buffers, ``state_dict`` keys and ``_version``, the same checks and messages, and ``isinstance`` checks in
user code and in torch utilities (``torch.optim.swa_utils.update_bn``, weight-decay filters, ...) keep
working. They add keyword-only options and differ from torch only where those options are set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _FlexBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Shared behaviour of the flexbn batch-norm modules (a mixin over torch's ``_BatchNorm`` classes)."""

    detach_mean: bool
    detach_var: bool
    virtual_batch_size: int | None

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
    ) -> None:
        F._check_flag("detach_mean", detach_mean)
        F._check_flag("detach_var", detach_var)
        F.check_virtual_batch_size(virtual_batch_size)
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

    def _momentum_factor(self) -> float | Tensor:
        """The factor of this step's running-statistics update; bumps ``num_batches_tracked`` in training.

        ``momentum=None`` gives the cumulative average ``1 / num_batches_tracked`` as a 0-d tensor, so no
        host synchronisation happens (torch's ``float(num_batches_tracked)`` breaks ``torch.compile`` graphs).
        """
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                # float64 where the statistics are (as torch's Python-float factor), else float32 (MPS has
                # no float64); the update itself runs in the statistics' dtype either way.
                double = self.running_mean is not None and self.running_mean.dtype == torch.float64
                nbt = self.num_batches_tracked.to(torch.float64 if double else torch.float32)
                factor = torch.reciprocal(nbt)
        return factor

    def forward(
        self,
        input: Tensor,
        *,
        mask: Tensor | None = None,
        groups: Tensor | None = None,
        stats_input: Tensor | None = None,
    ) -> Tensor:
        self._check_input_dim(input)
        momentum = self._momentum_factor()
        # Batch statistics in training, and in eval when there are no running buffers (torch's rule).
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            detach_mean=self.detach_mean,
            detach_var=self.detach_var,
            mask=mask,
            groups=groups,
            virtual_batch_size=self.virtual_batch_size,
            stats_input=stats_input,
        )

    def extra_repr(self) -> str:
        rep = super().extra_repr()
        if self.detach_mean:
            rep += ", detach_mean=True"
        if self.detach_var:
            rep += ", detach_var=True"
        if self.virtual_batch_size is not None:
            rep += f", virtual_batch_size={self.virtual_batch_size}"
        return rep

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("detach_mean", False)
        self.__dict__.setdefault("detach_var", False)
        self.__dict__.setdefault("virtual_batch_size", None)


_DOC = """Drop-in for :class:`torch.nn.{name}` with a choice of gradient flow through the batch statistics.

    Same arguments, parameters, buffers, ``state_dict`` and behaviour as torch's module; keyword-only
    additions:

    Args:
        detach_mean: no gradient through the batch mean in training (``x.mean(dims).detach()``).
        detach_var: no gradient through the batch variance in training (``x.var(dims).detach()``).
        virtual_batch_size: ghost batch norm: statistics per chunk of about this many consecutive samples
            (see :func:`flexbn.batch_norm` for the chunking rule).

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
