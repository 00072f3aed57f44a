"""The functional API: argument checking, then the core.

``flexbn.batch_norm`` takes the positional arguments of ``torch.nn.functional.batch_norm`` and behaves
identically at default options -- values, gradients, the in-place update of the running buffers, and the
exceptions raised for bad input -- and adds keyword-only options that choose where gradient flows.
"""

from __future__ import annotations

import itertools
import math
from numbers import Real

import torch
from torch import Tensor

from . import _core

__all__ = ["batch_norm"]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TORCH_DTYPE_NAMES = {
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


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
    groups: Tensor | None = None,
    virtual_batch_size: int | None = None,
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
        groups: ``(N,)`` integer tensor, a bag / segment id per sample (any ids, in any order, bags of any
            size): statistics are computed per (bag, channel) and each sample is normalized with its bag's
            (multiple-instance learning). Finding the distinct ids synchronises with the device once.
        virtual_batch_size: ghost batch norm: statistics per chunk of consecutive samples. The batch is
            split into ``N // virtual_batch_size`` chunks whose sizes differ by at most one (sample ``n`` is
            in chunk ``n * G // N``), so every chunk has at least ``virtual_batch_size`` samples and never
            one value per channel; ``N < virtual_batch_size`` is one chunk. Must be an int >= 2.

    With ``groups`` or ``virtual_batch_size`` the running statistics are updated once per call with the mean
    over segments of the segment means and of the unbiased segment variances (Keras' convention). Both
    only select batch statistics: eval mode with running statistics normalizes every sample with those.

    Both detach flags only matter in training (eval statistics are constants). With both ``False`` this is
    ``torch.nn.functional.batch_norm``: gradients flow through both statistics.

    Raises:
        ValueError, RuntimeError, TypeError, NotImplementedError: as
            ``torch.nn.functional.batch_norm`` for the same bad input, with the same messages (wrong sizes,
            one value per channel in training, ``eps <= 0`` in training, missing running statistics in
            eval); mismatched dtypes raise a ``RuntimeError`` naming the argument. Deliberate differences:
            ``ValueError`` for input with fewer than 2 dimensions (torch raises an ``IndexError``), and
            ``TypeError`` for non-bool detach flags.

    Example:
        >>> import torch, flexbn
        >>> x = torch.randn(8, 3, 5, requires_grad=True)
        >>> y = flexbn.batch_norm(x, None, None, training=True, detach_mean=True, detach_var=True)
        >>> mean = x.mean((0, 2), keepdim=True).detach()
        >>> var = x.var((0, 2), unbiased=False, keepdim=True).detach()
        >>> torch.allclose(y, (x - mean) / torch.sqrt(var + 1e-5), atol=1e-6)
        True
    """
    check_inputs(input, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_flag("detach_mean", detach_mean)
    _check_flag("detach_var", detach_var)
    seg = segments(input, groups, virtual_batch_size, training=training)
    return _core.batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        float(eps),
        detach_mean,
        detach_var,
        seg,
    )


def check_virtual_batch_size(value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 2):
        raise ValueError(f"virtual_batch_size must be None or an int >= 2, but got {value!r}")


def segments(
    input: Tensor,
    groups: Tensor | None,
    virtual_batch_size: int | None,
    *,
    training: bool,
) -> _core.stats.Segments:
    """The statistics set S as segments of the batch, validated. In training no segment may have a single
    value per channel; out of training (running statistics) the segmentation is irrelevant: ``WHOLE``."""
    check_virtual_batch_size(virtual_batch_size)
    if groups is not None and virtual_batch_size is not None:
        raise ValueError(
            "groups and virtual_batch_size cannot be combined: both choose the samples the statistics "
            "are taken over (pass one of them)"
        )
    n = input.shape[0]
    if n == 0 or (groups is None and virtual_batch_size is None):
        return _core.stats.WHOLE
    spatial = input.numel() // (n * input.shape[1]) if input.shape[1] else 0
    cdt = _core.stats.compute_dtype(input.dtype)
    if virtual_batch_size is not None:
        num = n // virtual_batch_size
        if num <= 1 or not training:
            return _core.stats.WHOLE
        ids = torch.arange(n, device=input.device) * num // n
        starts = [-(-g * n // num) for g in range(num + 1)]  # ceil(g * n / num): chunk g's first
        sizes = [b - a for a, b in itertools.pairwise(starts)]
        counts = torch.tensor(sizes, dtype=cdt, device=input.device).mul_(spatial).unsqueeze(1)
        return _core.stats.Segments(ids, num, counts)
    if not isinstance(groups, Tensor):
        raise TypeError(f"groups must be a Tensor of segment ids, not {type(groups).__name__}")
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise ValueError(
            f"groups must be an integer tensor of segment ids, but got dtype {groups.dtype}"
        )
    if groups.shape != (n,):
        raise ValueError(
            f"groups must have shape (N,) = ({n},), one segment id per sample, but got shape "
            f"{tuple(groups.shape)}"
        )
    if groups.device != input.device:
        raise ValueError(f"groups is on {groups.device} but input is on {input.device}")
    if not training:
        return _core.stats.WHOLE
    unique, ids, per_bag = torch.unique(groups, return_inverse=True, return_counts=True)
    if spatial == 1 and bool((per_bag == 1).any()):
        lonely = unique[per_bag == 1].tolist()
        raise ValueError(
            "Expected more than 1 value per channel when training in every group, but groups "
            f"{lonely[:10]} have a single sample and input size {input.size()} has no spatial extent"
        )
    if unique.numel() == 1:
        return _core.stats.WHOLE
    counts = per_bag.to(cdt).mul_(spatial).unsqueeze(1)
    return _core.stats.Segments(ids, unique.numel(), counts)


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, but got {type(value).__name__} ({value!r})")


def check_inputs(
    input: object,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: object,
    momentum: object,
    eps: object,
) -> None:
    """Validate the torch-compatible arguments: what ``torch.nn.functional.batch_norm`` raises, in its order.

    torch checks in Python first (one value per channel, ``eps``), returns early for an empty input, then
    checks each given tensor's size (and that eval mode has running statistics), then the pairing of the
    running statistics, then dtypes.
    """
    if not isinstance(input, Tensor):
        raise TypeError(
            f"batch_norm(): argument 'input' must be Tensor, not {type(input).__name__}"
        )
    if not isinstance(training, bool):
        raise TypeError(
            f"batch_norm(): argument 'training' (position 6) must be bool, not {type(training).__name__}"
        )
    if not isinstance(momentum, (Real, Tensor)):
        raise TypeError(
            "batch_norm(): argument 'momentum' (position 7) must be float, "
            f"not {type(momentum).__name__}"
        )
    if not isinstance(eps, (Real, Tensor)):
        raise TypeError(
            f"batch_norm(): argument 'eps' (position 8) must be float, not {type(eps).__name__}"
        )
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    size = input.size()
    if training and math.prod(size[:1] + size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not training and eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:
        return  # torch returns before any per-channel check for an empty input
    channels = input.shape[1]
    named = (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    )
    for i, (name, t) in enumerate(named):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if t is None and i < 2 and not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dtype not in _FLOATING:
        name = _TORCH_DTYPE_NAMES.get(input.dtype, str(input.dtype))
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{name}'")
    for name, t in named[:2]:
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"The function 'batch_norm' is not differentiable with respect to argument '{name}'. "
                "This input cannot have requires_grad True."
            )
    param_dtype = next((t.dtype for _, t in named if t is not None), None)
    allowed = {input.dtype}
    if input.dtype in (torch.float16, torch.bfloat16) and param_dtype == torch.float32:
        allowed = {
            torch.float32
        }  # mixed precision: reduced input, float32 parameters and statistics
    for name, t in named:
        if t is not None and t.dtype not in allowed:
            raise RuntimeError(
                f"mixed dtype: {name} has dtype {t.dtype}, expected "
                f"{' or '.join(sorted(str(d) for d in allowed))} for input of dtype {input.dtype} "
                "(parameters and running statistics share the input's dtype, or are float32 for "
                "float16/bfloat16 input)"
            )
