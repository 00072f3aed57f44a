"""Batch renormalization's corrections (Ioffe 2017), and their reuse when checkpointing recomputes a forward.

With the batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` (biased variance, as normalization uses)
and the running ones ``mu``, ``sigma = sqrt(running_var + eps)`` *before* this step's update::

    r = clip(sigma_B / sigma, 1 / rmax, rmax)        d = clip((mu_B - mu) / sigma, -dmax, dmax)
    y = ((x - mu_B) / sigma_B * r + d) * weight + bias

``r`` and ``d`` carry no gradient (Algorithm 1's ``stop_gradient``; Keras, ludvb/batchrenorm and torchrl do
the same), while gradient still flows through ``mu_B`` and ``var_B`` as the detach flags say. They are
per-(segment,) channel constants, so the output is plain batch normalization with the weight ``weight * r``
and the bias ``bias + weight * d`` (:func:`affine`): the autograd Function is unchanged, and autograd of
those two products gives the weight and bias gradients. With several segments (bags, ghost batches,
domains) the batch statistics, hence ``r`` and ``d`` and the effective parameters, are ``(G, C)``.

Activation checkpointing (``torch.utils.checkpoint``) runs a forward twice: once, and again during backward
to rebuild what it did not keep. The batch statistics of the second run equal the first's (same input) but
the running statistics have been updated in between, so ``r`` and ``d`` computed afresh would differ. A
forward that may be recomputed (grad disabled -- reentrant checkpoint's first run -- or saved-tensor hooks
active -- non-reentrant checkpoint) therefore stashes its ``(mu_B, var_B, r, d)`` per running buffer, and
the recomputation takes the stashed corrections whose batch statistics are nearest to its own (on the
device: no host synchronisation). Matching by batch statistics rather than by call order serves a module
called several times per step, in one or several checkpointed segments, recomputed in any order or twice
(``retain_graph``), and partial recomputation (non-reentrant early stop). The stash keeps the last
:data:`STASH_SIZE` entries per buffer; ties (bitwise-equal batch statistics) go to the newest.
"""

from __future__ import annotations

import collections
import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .compiled import snapshot

__all__ = ["STASH_SIZE", "affine", "corrections", "recomputing"]

STASH_SIZE = 32
"""Stashed corrections kept per running buffer: forwards that may still be recomputed."""


class _Entry(NamedTuple):
    mean: Tensor
    var: Tensor
    r: Tensor
    d: Tensor


# running_mean buffer -> deque of _Entry, newest last
_STASH: WeakIdKeyDictionary = WeakIdKeyDictionary()


def recomputing() -> bool:
    """Whether this forward is a recomputation: it runs inside a backward pass of the autograd engine,
    with grad mode on.

    Activation checkpointing -- ``torch.utils.checkpoint`` reentrant or not, and the reentrant schemes of
    DeepSpeed, Megatron or fairscale -- reruns a forward from the engine to rebuild a graph, so with grad
    enabled; a forward that runs in a backward hook runs with grad disabled (unless the backward itself
    builds a graph, ``create_graph=True``), and updates the running statistics as torch's does. The
    engine's graph-task id (what ``torch.utils.checkpoint`` itself reads) is a thread-local read: no host
    synchronisation. Never under ``torch.compile``, where checkpointed regions are recomputed inside the
    compiled backward graph, which does not replay buffer mutations.
    """
    return (
        not torch.compiler.is_compiling()
        and torch._C._current_graph_task_id() != -1
        and torch.is_grad_enabled()
    )


def _may_be_recomputed() -> bool:
    """Whether a first forward may be rerun later: grad disabled (reentrant checkpoint's first run) or
    saved-tensor hooks active (non-reentrant checkpoint)."""
    if not torch.is_grad_enabled():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # not in this torch version: assume it may
        return True
    try:
        return top(False) is not None
    except TypeError:  # older signature without ignore_is_tracing
        return top() is not None


def _plain(*tensors: Tensor) -> bool:
    """No tensor is wrapped by a ``torch.func`` transform (stashed wrappers would escape it)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(wrapped(t) for t in tensors)


def corrections(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    rmax: float | Tensor,
    dmax: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """``(r, d)`` from the batch ``mean`` / biased ``var`` and the running statistics, in the batch
    statistics' dtype (the compute dtype) and shape; no gradient. The limits may be 0-d tensors."""
    with torch.no_grad():
        if isinstance(rmax, Tensor):
            rmax = rmax.to(mean)
        if isinstance(dmax, Tensor):
            dmax = dmax.to(mean)
        # snapshot: under torch.compile, read before this step's in-place update (compiled.py)
        rm, rv = snapshot(running_mean).to(mean.dtype), snapshot(running_var).to(var.dtype)
        inv_sigma = torch.rsqrt(rv + eps)
        r = (torch.sqrt(var + eps) * inv_sigma).clamp(1.0 / rmax, rmax)
        d = ((mean - rm) * inv_sigma).clamp(-dmax, dmax)
    return r, d


def affine(
    weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
) -> tuple[Tensor, Tensor]:
    """The effective affine parameters ``(weight * r, bias + weight * d)`` (without ``weight``: ``r`` and
    ``d``); differentiable in ``weight`` and ``bias``."""
    if weight is None:
        return r, (d if bias is None else bias + d)
    shift = weight * d
    return weight * r, (shift if bias is None else bias + shift)


def checkpointed_corrections(
    buffer: Tensor,
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    rmax: float | Tensor,
    dmax: float | Tensor,
    recompute: bool,
) -> tuple[Tensor, Tensor]:
    """:func:`corrections` for the running statistics updated in place in ``buffer`` (the running mean):
    stashed when the forward may be recomputed, taken from the stash when it is a recomputation."""
    if torch.compiler.is_compiling() or not _plain(mean, var, running_mean):
        return corrections(mean, var, running_mean, running_var, eps, rmax, dmax)
    if recompute:
        found = _lookup(buffer, mean, var)
        if found is not None:
            return found
        warnings.warn(
            "flexbn: batch renormalization recomputed during backward (activation checkpointing) without "
            "a stashed first forward; its corrections r, d use the current running statistics, so the "
            "recomputed output may differ from the first forward's",
            RuntimeWarning,
            stacklevel=4,
        )
    r, d = corrections(mean, var, running_mean, running_var, eps, rmax, dmax)
    if not recompute and _may_be_recomputed():
        stash = _STASH.get(buffer)
        if stash is None:
            stash = _STASH[buffer] = collections.deque(maxlen=STASH_SIZE)
        stash.append(_Entry(mean, var, r, d))
    return r, d


def _lookup(buffer: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor] | None:
    """The stashed ``(r, d)`` whose batch statistics are nearest to ``(mean, var)``, newest on ties."""
    stash = _STASH.get(buffer)
    entries = [
        e
        for e in reversed(stash or ())
        if e.mean.shape == mean.shape and e.mean.dtype == mean.dtype
    ]
    if not entries:
        return None
    if len(entries) == 1:
        return entries[0].r, entries[0].d
    with torch.no_grad():
        means = torch.stack([e.mean for e in entries]).flatten(1)
        vars_ = torch.stack([e.var for e in entries]).flatten(1)
        dist = (means - mean.flatten()).abs().sum(1) + (vars_ - var.flatten()).abs().sum(1)
        i = dist.argmin()  # first minimum: the newest (no host synchronisation)
        return torch.stack([e.r for e in entries])[i], torch.stack([e.d for e in entries])[i]
