"""The functional API: argument checking, then the core.

``flexbn.batch_norm`` takes the positional arguments of ``torch.nn.functional.batch_norm`` and behaves
identically at default options -- values, gradients, the in-place update of the running buffers, and the
exceptions raised for bad input -- and adds keyword-only options that choose where gradient flows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _core
from ._core import plan as _plan

__all__ = ["batch_norm"]

_torch_batch_norm = torch.nn.functional.batch_norm
_requested = _core.backend.requested


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    detach_mean: bool = False,
    detach_var: bool = False,
    mask: Tensor | None = None,
    groups: Tensor | None = None,
    virtual_batch_size: int | None = None,
    stats_input: Tensor | None = None,
    process_group: Any = None,
    renorm: bool = False,
    rmax: float | Tensor = 3.0,
    dmax: float | Tensor = 5.0,
) -> Tensor:
    r"""Batch normalization with a choice of gradient flow through the batch statistics and of the set they
    are computed over.

    Per channel ``c`` (dimension 1), over all other dimensions:
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``. In training the batch mean and biased variance are
    used, and ``running_mean`` / ``running_var`` (if given) are updated in place with
    ``running = (1 - momentum) * running + momentum * batch`` (the unbiased variance is stored). In eval
    (``training=False``) the running statistics are used and must be given.

    Args:
        input: ``(N, C, *)`` floating tensor; float16/bfloat16 input may come with float32 parameters and
            statistics (the output keeps the input's dtype and memory format).
        running_mean, running_var: ``(C,)`` buffers or ``None`` (only in training).
        weight, bias: optional ``(C,)`` affine parameters.
        training: use (and track) batch statistics.
        momentum: factor of the running-statistics update; a float or a 0-d tensor.
        eps: added to the variance inside the square root; must be positive in training.
        detach_mean: no gradient through the batch mean -- exactly ``input.mean(dims).detach()``.
        detach_var: no gradient through the batch variance -- exactly
            ``input.var(dims, unbiased=False).detach()``.
        mask: ``(N, *spatial)`` bool tensor, ``True`` for real elements (padded sequences): statistics over
            real elements only. Every element is normalized with them, but padded ones take part in
            nothing else -- not in the statistics, the weight and bias gradients, or the statistics'
            gradient (theirs is ``dy * weight * invstd``) -- so their values, even non-finite, never reach a
            real output or gradient. The running variance is the unbiased one over real elements.
        groups: ``(N,)`` integer tensor, a bag / segment id per sample (any ids, in any order, bags of any
            size): statistics are computed per (bag, channel) and each sample is normalized with its bag's
            (multiple-instance learning). Finding the distinct ids synchronises with the device once.
        virtual_batch_size: ghost batch norm: statistics per chunk of consecutive samples. The batch is
            split into ``N // virtual_batch_size`` chunks whose sizes differ by at most one (sample ``n`` is
            in chunk ``n * G // N``), so every chunk has at least ``virtual_batch_size`` samples and never
            one value per channel; ``N < 2 * virtual_batch_size`` is one chunk. Must be an int >= 2.
        stats_input: a tensor of the input's shape the statistics are computed from (e.g. the activations
            before dropout), then applied to ``input``. Gradient reaches ``stats_input`` through the
            statistics (as the detach flags allow) and ``input`` through the direct path only. The running
            statistics are those of ``stats_input``.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for all
            ranks) to take the training statistics over: every rank's batch, combined exactly by one
            collective in forward and one in backward, on any backend (gloo on CPU too) -- the result is
            that of this function on the concatenation of the ranks' batches, except for the weight and
            bias gradients, which stay local (``DistributedDataParallel`` averages them). Every rank must
            call it with the same configuration (checked: a ``ValueError`` on every rank). ``groups`` ids
            are global. ``None`` (default), an uninitialised ``torch.distributed``, one rank, or eval:
            this process only. Not with ``virtual_batch_size``. See :class:`flexbn.SyncBatchNorm`.
        renorm: batch renormalization (Ioffe 2017) in training: the output is
            ``((x - mean) / sqrt(var + eps) * r + d) * weight + bias`` with the corrections
            ``r = clip(sqrt(var + eps) / sqrt(running_var + eps), 1 / rmax, rmax)`` and
            ``d = clip((mean - running_mean) / sqrt(running_var + eps), -dmax, dmax)``, computed from the
            running statistics before this call updates them and carrying no gradient; gradient flows
            through the batch mean and variance as the detach flags say. Needs ``running_mean`` /
            ``running_var``; changes nothing in eval. ``rmax=1, dmax=0`` is batch norm; unclipped, the
            output is normalization by the running statistics. See ``docs/inference-statistics.md``.
        rmax, dmax: the clipping limits, ``rmax >= 1`` and ``dmax >= 0`` (``inf`` allowed): floats, or
            0-d tensors (under ``torch.compile`` a float is a constant of the graph, and a new value
            compiles a new one; a tensor's value is read at run time).

    ``mask`` combines with ``groups`` or ``virtual_batch_size`` (these two exclude each other), and all of
    them with the detach flags and ``stats_input``. With ``groups`` or ``virtual_batch_size`` the running
    statistics are updated once per call with the mean over segments of the segment means and of the
    unbiased segment variances (Keras' convention). They only select batch statistics: eval mode with
    running statistics normalizes every sample with those (and ignores ``stats_input``).

    Both detach flags only matter in training (eval statistics are constants). With both ``False`` this is
    ``torch.nn.functional.batch_norm``: gradients flow through both statistics.

    Under ``torch.compile`` (and for a ``mask`` batched by ``torch.func.vmap``) the one check that reads
    tensor values on the host is not made, so the graph does not break: that every segment selected by
    ``mask`` / ``groups`` has more than 1 value per channel (such a segment would normalize to ``bias`` and
    give a NaN running variance). ``groups`` finds its bags with ``torch.unique``, whose output size depends
    on the data: ``fullgraph=True`` captures it, otherwise it is a graph break (unless
    ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``); ``groups`` cannot be batched by
    ``vmap`` (``ValueError``).

    Raises:
        ValueError, RuntimeError, TypeError, NotImplementedError: as
            ``torch.nn.functional.batch_norm`` for the same bad input, with the same messages (wrong sizes,
            one value per channel in training, ``eps <= 0`` in training, missing running statistics in
            eval); mismatched dtypes raise a ``RuntimeError`` naming the argument. Deliberate differences:
            ``ValueError`` for input with fewer than 2 dimensions (torch raises an ``IndexError``), and
            ``TypeError`` for non-bool detach flags. ``ValueError`` for ``rmax < 1``, ``dmax < 0``, and for
            ``renorm=True`` in training without running statistics.

    Under activation checkpointing (``torch.utils.checkpoint``) the running statistics are updated once,
    by the first forward, not again when the forward is recomputed during backward (torch's
    ``batch_norm`` updates them twice, pytorch#96136).

    Example:
        >>> import torch, flexbn
        >>> x = torch.randn(8, 3, 5, requires_grad=True)
        >>> y = flexbn.batch_norm(x, None, None, training=True, detach_mean=True, detach_var=True)
        >>> mean = x.mean((0, 2), keepdim=True).detach()
        >>> var = x.var((0, 2), unbiased=False, keepdim=True).detach()
        >>> torch.allclose(y, (x - mean) / torch.sqrt(var + 1e-5), atol=1e-6)
        True
    """
    if has_torch_function_variadic(
        input, running_mean, running_var, weight, bias, mask, groups, stats_input
    ):
        return handle_torch_function(
            batch_norm,
            (input, running_mean, running_var, weight, bias, mask, groups, stats_input),
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            detach_mean=detach_mean,
            detach_var=detach_var,
            mask=mask,
            groups=groups,
            virtual_batch_size=virtual_batch_size,
            stats_input=stats_input,
            process_group=process_group,
            renorm=renorm,
            rmax=rmax,
            dmax=dmax,
        )
    if (
        training is False
        and running_mean is not None
        and running_var is not None
        and mask is None
        and groups is None
        and virtual_batch_size is None
        and stats_input is None
        and process_group is None
        and renorm is False
        and type(detach_mean) is bool  # valid flags; they change nothing in eval
        and type(detach_var) is bool
        and type(rmax) is float
        and rmax == _plan._RMAX  # other limits: the plan's checks first
        and type(dmax) is float
        and dmax == _plan._DMAX
        and type(momentum) is float
        and (torch.compiler.is_compiling() or _requested() == "auto")
    ):  # eval with running statistics and no option: torch's own operator, its checks and result
        return _torch_batch_norm(
            input, running_mean, running_var, weight, bias, False, momentum, eps
        )
    plan = _plan.build(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        detach_mean=detach_mean,
        detach_var=detach_var,
        mask=mask,
        groups=groups,
        virtual_batch_size=virtual_batch_size,
        stats_input=stats_input,
        process_group=process_group,
        renorm=renorm,
        rmax=rmax,
        dmax=dmax,
    )
    return _core.batch_norm(input, running_mean, running_var, weight, bias, momentum, plan)
