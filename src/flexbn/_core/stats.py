"""Per-channel moments over the statistics set, and the running-statistics update.

Numerics, documented once here:

* Moments are accumulated in at least float32: float16/bfloat16 input is upcast to float32; float32 and
  float64 are reduced in their own dtype with torch's pairwise (cascade) summation.
* The mean is computed in two passes, as ``shift + delta``: ``shift`` is the plain mean rounded to the compute
  dtype, and ``delta = mean(x - shift)`` the residual that rounding lost (the "corrected two-pass" algorithm
  of Chan, Golub and LeVeque). The variance is ``mean((x - shift)^2) - delta^2``. Every quantity is formed
  from ``x - shift``, which is exact for values near the mean, so no ``E[x^2] - E[x]^2`` cancellation occurs:
  a float32 channel with mean 1e4 and standard deviation 0.1 keeps its variance to ~1e-7 relative error in
  every memory layout, and its normalized output to ~1e-6 -- torch's CPU kernel is off by more than 10% in
  the variance for channels_last and ``(N, C)`` input there, and by ~1e-2 in the output in every layout
  (``docs/numerics.md``).
* Consumers keep the pair: the output is ``((x - shift) - delta) * scale + bias`` -- never the fused
  ``x * a + b`` that cancels catastrophically when ``|mean| >> std`` -- and the backward forms
  ``sum(g * (x - mean))`` as ``sum(g * (x - shift)) - delta * sum(g)``.
* The variance used for normalization is the biased one (divide by the count); the running variance stores
  the unbiased one (divide by count - 1), as torch does.
* ``invstd = 1 / sqrt(var + eps)``, with ``eps`` inside the square root (``inf`` for a zero running variance
  with ``eps=0`` in eval, as torch; training requires ``eps > 0``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .backend import fused

_REDUCED = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and intermediate results are computed in: >= float32."""
    return torch.float32 if dtype in _REDUCED else dtype


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """All dimensions but the channel dimension 1."""
    return (0, *range(2, x.dim()))


def per_channel(t: Tensor, ndim: int) -> Tensor:
    """View a ``(C,)`` tensor as ``(1, C, 1, ...)`` to broadcast against an ``ndim``-D input."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def count_per_channel(x: Tensor) -> int:
    """Number of elements each channel's statistics are taken over: ``numel / C`` (not the batch size)."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def upcast(x: Tensor) -> Tensor:
    """``x`` in its compute dtype (a copy only for float16/bfloat16)."""
    return x.to(compute_dtype(x.dtype))


class Segments(NamedTuple):
    """The statistics set S as a segmentation of the batch: sample ``n`` belongs to segment ``ids[n]``.

    ``ids is None`` is the whole batch (one segment; statistics of shape ``(C,)``). Otherwise statistics have
    shape ``(num, C)``. ``mask`` (bool, ``(N, 1, *spatial)``) removes elements from every segment: they
    take no part in any reduction. ``counts`` holds the number of elements per channel in each segment --
    ``(num, 1)``, or 0-d for the whole batch -- when it is not simply ``numel / C``.
    """

    ids: Tensor | None = None
    num: int = 1
    counts: Tensor | None = None
    mask: Tensor | None = None
    # A process group the statistics are combined over (``sync``); None: this process only.
    group: Any = None
    # Bags across processes: the local segments' ids, before ``sync`` maps them to global segments.
    keys: Tensor | None = None

    def expand(self, stat: Tensor, ndim: int) -> Tensor:
        """Broadcast per-segment statistics against the input: ``(1|N, C, 1, ...)``."""
        if self.ids is None:
            return per_channel(stat, ndim)
        picked = stat.index_select(0, self.ids)
        return picked.reshape(picked.shape + (1,) * (ndim - 2))

    def keep(self, t: Tensor) -> Tensor:
        """``t`` with masked-out elements replaced by 0 (so non-finite padding cannot leak into products)."""
        return t if self.mask is None else torch.where(self.mask, t, 0)

    def reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` (input-shaped) over each segment's kept elements: ``(C,)`` or ``(num, C)``."""
        t = self.keep(t)
        if self.ids is None:
            return t.sum(reduce_dims(t))
        per_sample = t.sum(tuple(range(2, t.dim()))) if t.dim() > 2 else t
        out = per_sample.new_zeros((self.num, t.shape[1]))
        return out.index_add(0, self.ids, per_sample)

    def count(self, x: Tensor) -> int | Tensor:
        """Elements per channel in each segment, broadcastable against the statistics.

        A segment with no element (a domain absent from the batch) counts as 1: its statistics are then
        finite zeros that no sample uses, instead of NaNs that would leak into parameter gradients.
        """
        if self.counts is None:
            return count_per_channel(x)
        return self.counts.clamp_min(1) if self.ids is not None else self.counts

    def param(self, p: Tensor, ndim: int) -> Tensor:
        """Broadcast an affine parameter, shared ``(C,)`` or per segment ``(num, C)``, against the input."""
        return per_channel(p, ndim) if p.dim() == 1 else self.expand(p, ndim)

    def total(self, t: Tensor, per_segment: bool = False) -> Tensor:
        """Per-segment values of a parameter gradient, summed to ``(C,)`` unless the parameter is per
        segment."""
        return t if (self.ids is None or per_segment) else t.sum(0)


WHOLE = Segments()


def segment_counts(x: Tensor, ids: Tensor | None, num: int, mask: Tensor | None) -> Tensor:
    """Kept elements per channel in each segment: ``(num, 1)``, or 0-d for the whole batch (``ids=None``).

    ``mask`` is ``(N, *spatial)`` bool or ``None`` (every element kept).
    """
    n, cdt = x.shape[0], compute_dtype(x.dtype)
    if mask is not None:
        per_sample = mask.reshape(n, math.prod(mask.shape[1:])).sum(1, dtype=cdt)
    else:
        spatial = x.numel() // max(n * x.shape[1], 1)
        per_sample = torch.full((n,), spatial, dtype=cdt, device=x.device)
    if ids is None:
        return per_sample.sum()
    return per_sample.new_zeros(num).index_add(0, ids, per_sample).unsqueeze(1)


class Moments(NamedTuple):
    """Statistics in the compute dtype: the mean is ``shift + delta`` (see the module notes)."""

    shift: Tensor
    delta: Tensor
    var: Tensor  # biased

    @property
    def mean(self) -> Tensor:
        return self.shift + self.delta


@fused
def moments(x: Tensor, seg: Segments = WHOLE) -> Moments:
    """Mean (as ``shift + delta``) and biased variance of ``x`` per segment and channel.

    Differentiable: with autograd recording, the result is a function of ``x`` with the exact derivatives of
    the mean and variance (used to build double-backward graphs).
    """
    xa, nd = seg.keep(upcast(x)), x.dim()
    count = seg.count(x)
    shift = seg.reduce(xa) / count
    xs = seg.keep(xa - seg.expand(shift, nd))
    delta = seg.reduce(xs) / count
    # Pairwise summation of squares; torch.linalg.vector_norm would avoid the temporary but accumulates
    # float32 naively (1e-5 relative error at 256k elements) and is not differentiable at 0.
    sq = seg.reduce(xs.square())
    var = (sq / count - delta * delta).clamp_min(0)
    return Moments(shift, delta, var)


def invstd(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``."""
    return torch.rsqrt(var + eps)


@torch.no_grad()
def new_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    x: Tensor,
    seg: Segments,
    momentum: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """The updated running statistics as fresh tensors (the buffers are not modified):
    ``running <- (1 - momentum) * running + momentum * batch``.

    ``var`` is the biased batch variance; the running variance receives the unbiased one,
    ``var * count / (count - 1)``. Statistics of shape ``(G, C)`` (several segments) update

    * per-segment running buffers of the same shape (one per domain) where the segment has elements --
      a domain absent from the batch keeps its buffers; ``momentum`` may then be ``(G, 1)``;
    * per-channel buffers with the mean over segments of the segment means and of the unbiased segment
      variances (Keras' convention for ghost batches), once per call.

    ``momentum`` may be a tensor (cumulative average, ``momentum=None`` in the modules) so the update stays
    free of host synchronisation under ``torch.compile``.
    """
    count = seg.count(x)
    if isinstance(count, Tensor):
        unbiased = var * count / (count - 1)
    else:
        unbiased = var * (count / (count - 1)) if count > 1 else var * float("nan")
    if mean.dim() == 2 and running_mean.dim() == 1:
        mean, unbiased = mean.mean(0), unbiased.mean(0)
    new_mean = momentum * mean + (1 - momentum) * running_mean
    new_var = momentum * unbiased + (1 - momentum) * running_var
    if running_mean.dim() == 2 and seg.counts is not None:
        present = seg.counts > 0
        new_mean = torch.where(present, new_mean, running_mean)
        new_var = torch.where(present, new_var, running_var)
    return new_mean.to(running_mean.dtype), new_var.to(running_var.dtype)
