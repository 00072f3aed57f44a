"""The statistics set S as a segmentation of the batch, and how each option builds it.

Every statistics set is a segmentation: the whole batch is one segment; bags (``groups``), ghost batches
(``virtual_batch_size``) and domains give each sample a segment id; a mask removes elements from every
segment; statistics across processes are the same per-(segment, channel) moments summed over ranks. The
core reduces per (segment, channel), so one set of operations serves every option.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["WHOLE", "Segments", "chunks", "from_domain", "from_groups"]


class Segments(NamedTuple):
    """Sample ``n`` belongs to segment ``ids[n]`` of ``num`` (``ids is None``: one segment, the whole
    batch). ``mask`` (bool, ``(N, *spatial)``, the input's shape without the channels) removes elements from
    every segment: ``False`` elements take part in no reduction. ``group``: a process group the statistics
    are combined over (``sync``), with ``keys`` the local segments' global ids (bags only)."""

    ids: Tensor | None = None
    num: int = 1
    mask: Tensor | None = None
    group: Any = None
    keys: Tensor | None = None

    @property
    def kept(self) -> Tensor | None:
        """The mask broadcastable against the input, ``(N, 1, *spatial)``."""
        return None if self.mask is None else self.mask.unsqueeze(1)


WHOLE = Segments()


def chunks(n: int, size: int, device: torch.device) -> tuple[Tensor | None, int]:
    """Ghost batches: ``n // size`` chunks of consecutive samples whose sizes differ by at most one (sample
    ``i`` is in chunk ``i * G // n``); fewer than two chunks is the whole batch (``None``)."""
    num = n // size
    if num < 2:
        return None, 1
    return torch.arange(n, device=device) * num // n, num


def from_groups(groups: Tensor, *, compiling: bool) -> tuple[Tensor | None, int, Tensor]:
    """Bags: ``(ids, num, keys)``, ids in ``[0, num)`` in the order of the sorted distinct bag ids ``keys``.
    One bag is the whole batch (``ids=None``) except under ``torch.compile``, where the count is symbolic.
    Finding the distinct ids synchronises with the device once."""
    keys, inverse = torch.unique(groups, return_inverse=True)
    if not compiling and keys.numel() <= 1:
        return None, 1, keys
    return inverse, keys.numel(), keys


def from_domain(domain: Tensor, num_domains: int) -> Segments:
    """Domains: ids given by the caller, validated by the plan."""
    return Segments(domain.long(), num_domains)
