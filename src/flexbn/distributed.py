"""Batch statistics across processes: ``flexbn.SyncBatchNorm`` on any ``torch.distributed`` backend.

The statistics of a synchronised layer are those of the concatenation of every rank's batch: each rank
reduces its own batch to counts and moments per (segment, channel), one packed collective combines them
exactly (``flexbn._core.sync``), and the backward adds the ranks' gradient sums with one more. Everything
else -- masks, bags, ``stats_input``, the detach flags -- is the single-process core, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from .modules import _FlexBatchNorm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_FlexBatchNorm):
    """Drop-in for :class:`torch.nn.SyncBatchNorm` that works on every ``torch.distributed`` backend --
    gloo on CPU as well as NCCL on CUDA -- with flexbn's options.

    In training, with a process group of more than one rank, the batch statistics (and hence the output,
    the input gradient and the running statistics, identical on every rank) are those of single-process
    flexbn on the concatenation of all ranks' batches -- with uneven batch sizes, a rank whose batch is
    empty, ``mask=`` (real elements on every rank), ``groups=`` (bag ids are global: a bag may be spread
    over ranks), ``stats_input=`` and both detach flags. Weight and bias gradients stay local, as in torch:
    ``DistributedDataParallel`` averages them. Out of training, without an initialised process group, or
    with one rank, it is local batch norm, as torch's.

    Differences from torch: it is a ``torch.nn.modules.batchnorm._BatchNorm`` but not a subclass of
    ``torch.nn.SyncBatchNorm``, because ``DistributedDataParallel`` refuses every instance of that class in
    a CPU model; ``convert_sync_batchnorm`` is :func:`flexbn.convert` with ``sync=True``. CPU tensors and
    the gloo backend work (torch raises ``ValueError: SyncBatchNorm
    expected input tensor to be on GPU``); the statistics are combined exactly (no loss of precision when
    the ranks' means are large); ranks whose configurations differ -- the channel count too -- or whose
    calls of the layer are out of step raise the same ``ValueError`` instead of computing garbage. Per
    forward two ``all_gather``: a fixed-size header, then the statistics; per backward one ``all_reduce``
    (none when both statistics are detached: no gradient flows through them).
    Not supported with synchronisation: ``virtual_batch_size`` (ghost batches are one rank's chunks),
    double backward and forward-mode AD through the statistics.

    Args:
        process_group: the group to synchronise over; ``None`` is the default (world) group.
        other arguments: as :class:`torch.nn.SyncBatchNorm` and the keyword-only options of
            :class:`flexbn.BatchNorm2d` (``detach_mean``, ``detach_var``, ...).

    Input: ``(N, C, *)``. ``forward(input, *, mask=None, groups=None, stats_input=None)``.

    Example:
        >>> import torch, flexbn
        >>> bn = flexbn.SyncBatchNorm(4, detach_var=True)  # no process group: local batch norm
        >>> bn(torch.randn(8, 4, 5)).shape
        torch.Size([8, 4, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        **options: Any,
    ) -> None:
        if options.get("virtual_batch_size") is not None:
            raise ValueError(
                "SyncBatchNorm does not take virtual_batch_size: ghost batches are chunks of one "
                "process's batch (use flexbn.BatchNorm1d/2d/3d for ghost batch norm)"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **options
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Every batch-norm layer of ``module`` as a ``flexbn.SyncBatchNorm`` sharing its parameters and
        buffers: ``flexbn.convert(module, sync=True, process_group=process_group)``."""
        from .convert import convert

        return convert(module, sync=True, process_group=process_group)

    def _sync_group(self) -> Any:
        if not dist.is_available() or not dist.is_initialized():
            return None
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def forward(
        self,
        input: Tensor,
        *,
        mask: Tensor | None = None,
        groups: Tensor | None = None,
        stats_input: Tensor | None = None,
    ) -> Tensor:
        if self.training:  # synchronised calls, counted before any check: a refused one counts too
            self._calls = getattr(self, "_calls", 0) + 1
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return super().forward(input, mask=mask, groups=groups, stats_input=stats_input)

    def _sync_calls(self) -> int:
        return getattr(self, "_calls", 0)
