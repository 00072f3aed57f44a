"""flexbn's semantics written out as plain torch, in the clearest form rather than the fastest: the
executable specification the tools check against.

``flexbn audit`` verifies each layer of a model against :func:`batch_norm` here, ``flexbn bench`` checks
every hand composition it times against flexbn first, and the lab's experiments rest on the same rules.
The library computes the same thing by other routes (``flexbn._core``: shifted sums, fused kernels, an
analytic backward); the test suite compares both with independent oracles of its own.

Everything is differentiable: gradients through the statistics flow exactly as the detach flags say, so
``torch.autograd`` on :func:`batch_norm` gives the gradients each mode claims.

Example:
    >>> import torch, flexbn
    >>> from flexbn import spec
    >>> x = torch.randn(8, 3, 5, dtype=torch.float64)
    >>> y = spec.batch_norm(x, training=True, detach_var=True)
    >>> torch.allclose(y, flexbn.batch_norm(x, None, None, training=True, detach_var=True))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_norm", "renorm_corrections", "segment_ids"]


def segment_ids(
    n: int,
    *,
    virtual_batch_size: int | None = None,
    groups: Tensor | None = None,
    domain: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor | None:
    """The segment each of ``n`` samples takes its statistics from (``None``: the whole batch).

    * ghost batches: ``n // virtual_batch_size`` chunks of consecutive samples whose sizes differ by at
      most one -- sample ``i`` is in chunk ``i * G // n`` -- and one chunk when ``G < 2``;
    * bags (``groups``): one segment per distinct id, numbered in sorted order;
    * domains: the ids themselves.

    >>> segment_ids(10, virtual_batch_size=4).tolist()
    [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    """
    if domain is not None:
        return domain.long()
    if groups is not None:
        return torch.unique(groups, return_inverse=True)[1]
    if virtual_batch_size is not None and n // virtual_batch_size > 1:
        return torch.arange(n, device=device) * (n // virtual_batch_size) // n
    return None


def renorm_corrections(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    rmax: float,
    dmax: float,
) -> tuple[Tensor, Tensor]:
    """Batch renormalization's corrections (Ioffe 2017), from the batch mean and biased variance and the
    running statistics *before* this step's update; constants to autograd::

        r = clip(sqrt(var + eps) / sqrt(running_var + eps), 1 / rmax, rmax)
        d = clip((mean - running_mean) / sqrt(running_var + eps), -dmax, dmax)
    """
    with torch.no_grad():
        sigma = torch.sqrt(running_var + eps)
        r = (torch.sqrt(var + eps) / sigma).clamp(1.0 / rmax, rmax)
        d = ((mean - running_mean) / sigma).clamp(-dmax, dmax)
    return r, d


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool,
    eps: float = 1e-5,
    detach_mean: bool = False,
    detach_var: bool = False,
    mask: Tensor | None = None,
    ids: Tensor | None = None,
    stats_input: Tensor | None = None,
    renorm: tuple[float, float] | None = None,
) -> Tensor:
    """The output of one flexbn batch norm (the running statistics are read, not updated).

    Training: per segment (``ids``, see :func:`segment_ids`) and channel, the mean and biased variance of
    ``stats_input`` (default ``x``) over the elements ``mask`` keeps, ``.detach()``-ed as the flags say;
    ``y = (x - mean) / sqrt(var + eps)``, with batch renormalization's ``* r + d`` when ``renorm`` gives
    ``(rmax, dmax)``. Padded elements are normalized with them but take part in nothing else: their output
    is a constant to every statistic, weight and bias (``mask``'s contract). Eval: the running statistics
    (per channel, or per segment when they are ``(G, C)``). Then ``* weight + bias`` (per channel, or per
    segment when ``(G, C)``).
    """
    n, c = x.shape[:2]
    shape = (1, c) + (1,) * (x.dim() - 2)
    dims = (0, *range(2, x.dim()))
    source = x if stats_input is None else stats_input
    kept = None if mask is None else mask.reshape(n, 1, *x.shape[2:])
    if not training:
        y = (x - _per_sample(running_mean, ids, shape)) / torch.sqrt(
            _per_sample(running_var, ids, shape) + eps
        )
        return _affine(y, weight, bias, ids, shape, kept)
    order, pieces = [], []
    segments = [None] if ids is None else torch.unique(ids).tolist()
    for s in segments:
        idx = torch.arange(n, device=x.device) if s is None else torch.nonzero(ids == s)[:, 0]
        xs, zs = x[idx], source[idx]
        ks = None if kept is None else kept[idx].expand_as(zs)
        if ks is None:
            var, mean = torch.var_mean(zs, dims, correction=0, keepdim=True)
        else:
            count = ks.sum(dims, keepdim=True)
            mean = torch.where(ks, zs, 0).sum(dims, keepdim=True) / count
            var = torch.where(ks, (zs - mean).square(), 0).sum(dims, keepdim=True) / count
        stat_mean = mean.detach() if detach_mean else mean
        stat_var = var.detach() if detach_var else var
        ys = (xs - stat_mean) / torch.sqrt(stat_var + eps)
        if ks is not None:  # padded elements: the same values, constant statistics
            padded = (xs - mean.detach()) / torch.sqrt(var.detach() + eps)
            ys = torch.where(kept[idx], ys, padded)
        if renorm is not None and running_mean is not None and running_var is not None:
            rm = running_mean if running_mean.dim() == 1 else running_mean[s]
            rv = running_var if running_var.dim() == 1 else running_var[s]
            r, d = renorm_corrections(mean, var, rm.reshape(shape), rv.reshape(shape), eps, *renorm)
            ys = ys * r + d
        order.append(idx)
        pieces.append(ys)
    y = torch.cat(pieces)[torch.argsort(torch.cat(order))]
    return _affine(y, weight, bias, ids, shape, kept)


def _per_sample(t: Tensor, ids: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """A per-channel ``(C,)`` tensor, or a per-segment ``(G, C)`` one indexed by ``ids``, broadcastable."""
    if t.dim() == 1 or ids is None:
        return t.reshape(shape)
    picked = t[ids]
    return picked.reshape(picked.shape + (1,) * (len(shape) - 2))


def _affine(
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    ids: Tensor | None,
    shape: tuple[int, ...],
    kept: Tensor | None,
) -> Tensor:
    """``y * weight + bias``; padded elements take the parameters as constants."""
    out = y
    if weight is not None:
        out = out * _per_sample(weight, ids, shape)
    if bias is not None:
        out = out + _per_sample(bias, ids, shape)
    if kept is None or (weight is None and bias is None):
        return out
    constant = y
    if weight is not None:
        constant = constant * _per_sample(weight.detach(), ids, shape)
    if bias is not None:
        constant = constant + _per_sample(bias.detach(), ids, shape)
    return torch.where(kept, out, constant)
