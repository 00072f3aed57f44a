"""The statistics currency: per (segment, channel) the count of elements, their mean and ``m2``, the sum of
squared deviations from the mean -- one representation, and one way to combine two (Chan, Golub and
LeVeque's pairwise formulas), used by the kernels, the exchange across processes and ``recompute_stats``.

Numerics, documented once here:

* Tables are float64 (float32 on MPS, which has none): a batch's statistics are small, and keeping them
  in float64 makes their combination -- across processes, across the batches of ``recompute_stats`` -- exact
  for practical purposes, however far apart the parts' means are.
* The moments themselves are accumulated from the input in at least float32 (float16/bfloat16 input is
  upcast): the reference by a corrected two-pass algorithm with pairwise summation, the C++ kernels by sums
  of deviations from a shift kept near the mean (``docs/numerics.md``). Neither forms ``E[x^2] - E[x]^2``.
* For normalization the mean is carried in the compute dtype as a pair ``shift + delta`` (the float64 mean
  rounded, and the rounding residual), so that ``((x - shift) - delta) * scale + bias`` keeps full precision
  when ``|mean| >> std``; the variance is ``m2 / count`` (biased), ``invstd = 1 / sqrt(var + eps)`` in the
  compute dtype. The running variance receives the unbiased ``m2 / (count - 1)``, as torch's does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Moments", "combine", "compute_dtype", "merge", "table_dtype"]

_REDUCED = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and intermediate results are computed in: >= float32."""
    return torch.float32 if dtype in _REDUCED else dtype


def table_dtype(device: torch.device) -> torch.dtype:
    """The dtype of statistics tables: float64, except on MPS (no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


class Moments(NamedTuple):
    """``count`` ``(G,)``, ``mean`` and ``m2`` ``(G, C)``: elements per channel in each segment, their mean,
    and the sum of their squared deviations from it. ``G`` is the number of segments (1: the whole batch)."""

    count: Tensor
    mean: Tensor
    m2: Tensor

    @property
    def var(self) -> Tensor:
        """The biased variance ``m2 / count`` (``0 / 0 -> 0`` for an empty segment)."""
        return self.m2 / self.count.clamp_min(1).unsqueeze(1)


def merge(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two sets of elements (Chan et al.); either may be empty (count 0)."""
    n = a.count + b.count
    weight = (b.count / n.clamp_min(1)).unsqueeze(1)  # 0 where neither has elements
    delta = b.mean - a.mean
    mean = a.mean + delta * weight
    m2 = a.m2 + b.m2 + delta.square() * a.count.unsqueeze(1) * weight
    return Moments(n, mean, m2)


def combine(parts: Moments, index: Tensor, num: int) -> Moments:
    """Rows of ``parts`` (each a set of elements) combined into ``num`` sets: row ``i`` joins set
    ``index[i]``. Exact in one step: ``mean = sum n_i mean_i / N``,
    ``m2 = sum (m2_i + n_i (mean_i - mean)^2)`` -- deviations from the combined mean, no cancellation."""
    n = parts.count.new_zeros(num).index_add_(0, index, parts.count)
    weights = parts.count.unsqueeze(1)
    safe = n.clamp_min(1).unsqueeze(1)
    channels = parts.mean.shape[1]
    mean = parts.mean.new_zeros((num, channels)).index_add_(0, index, weights * parts.mean) / safe
    spread = parts.m2 + weights * (parts.mean - mean.index_select(0, index)).square()
    m2 = parts.m2.new_zeros((num, channels)).index_add_(0, index, spread)
    return Moments(n, mean, m2)
