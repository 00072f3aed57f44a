"""Per-channel moments over the statistics set, and the running-statistics update.

Numerics, documented once here:

* Moments are accumulated in at least float32: float16/bfloat16 input is upcast to float32, float32 and
  float64 are reduced in their own dtype by ``torch.var_mean`` (on CPU a Welford reduction with a double
  accumulator for float32; on CUDA Welford in float32). Welford has no ``E[x^2] - E[x]^2`` cancellation,
  so a channel with mean 1e4 and standard deviation 0.1 keeps its variance to ~1e-7 relative error in every
  memory layout -- torch's own CPU kernel sums channels_last and ``(N, C)`` float32 input in float32 per
  thread and is off by more than 10% there (``docs/numerics.md``).
* The variance used for normalization is the biased one (divide by the count); the running variance stores
  the unbiased one (divide by count - 1), as torch does.
* ``invstd = 1 / sqrt(var + eps)``, with ``eps`` inside the square root, and ``0`` where ``var + eps == 0``
  (torch's ``InvStd``; only reachable in eval mode with ``eps=0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x`` over all dimensions but 1, in the compute dtype.

    Differentiable (used with autograd enabled only to build double-backward graphs).
    """
    var, mean = torch.var_mean(upcast(x), reduce_dims(x), correction=0)
    return mean, var


def invstd(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``, and 0 where ``var + eps == 0`` (as torch's ``InvStd``)."""
    denom = var + eps
    return torch.where(denom == 0, torch.zeros_like(denom), torch.rsqrt(denom))


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | Tensor,
) -> None:
    """In place: ``running <- (1 - momentum) * running + momentum * batch``.

    ``var`` is the biased batch variance; the running variance receives the unbiased one,
    ``var * count / (count - 1)``. ``momentum`` may be a 0-d tensor (cumulative average, ``momentum=None``
    in the modules) so the update stays free of host synchronisation under ``torch.compile``.
    """
    unbiased = var * (count / (count - 1)) if count > 1 else var * float("nan")
    running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
    running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)
