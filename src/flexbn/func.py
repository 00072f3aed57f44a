"""The pure functional form, for ``torch.func`` transforms: the new running statistics are returned.

:func:`flexbn.batch_norm` updates ``running_mean`` / ``running_var`` in place, as
``torch.nn.functional.batch_norm`` does. In-place updates of tensors a transform did not create are what
``torch.func.grad`` / ``jacrev`` / ``jvp`` reject ("mutate a captured Tensor") and what ``vmap`` cannot do
when the input is batched and the buffers are not. :func:`batch_norm` here computes the same thing through
the same core, but returns the updated statistics as fresh tensors and modifies nothing -- the way Flax and
Equinox thread batch-norm state.

The modules need no functional twin: under ``torch.func.functional_call`` with buffers passed in (for
example ``torch.func.stack_module_state`` + ``vmap``: a model ensemble), their in-place updates write into
the tensors passed, in training mode too.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import _core
from ._core import plan as _plan

__all__ = ["batch_norm"]


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
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`flexbn.batch_norm` without side effects: ``(output, new_running_mean, new_running_var)``.

    Arguments, output, gradients, options and errors are those of :func:`flexbn.batch_norm`. Instead of
    updating ``running_mean`` / ``running_var`` in place, it returns the updated statistics as fresh tensors
    (same dtype and device as the given ones, no gradient) and leaves its arguments untouched. When nothing
    would be updated -- ``training=False`` (eval: normalized with the running statistics), running statistics
    ``None``, or an empty batch -- it returns the given ``running_mean`` and ``running_var`` themselves (or
    ``None``).

    Works under ``torch.func.vmap`` (batched input, buffers, parameters, or any mix: shared buffers with a
    batched input give batched new statistics), ``grad``, ``vjp``, ``jacrev``, ``jvp`` / ``jacfwd`` and
    ``torch.compile``. ``groups`` cannot be batched by ``vmap`` (the number of bags is data-dependent), and
    the one-value-per-segment check is not made for a batched ``mask``.

    Example:
        >>> import torch, flexbn
        >>> x, rm, rv = torch.randn(6, 3, 4), torch.zeros(3), torch.ones(3)
        >>> y, new_rm, new_rv = flexbn.func.batch_norm(x, rm, rv, training=True, momentum=0.5)
        >>> torch.equal(rm, torch.zeros(3)), torch.allclose(new_rm, 0.5 * x.mean((0, 2)))
        (True, True)
        >>> ys, rms, rvs = torch.func.vmap(  # three inputs, shared initial statistics
        ...     lambda x: flexbn.func.batch_norm(x, rm, rv, training=True)
        ... )(torch.randn(3, 6, 3, 4))
        >>> rms.shape
        torch.Size([3, 3])
    """
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
    return _core.batch_norm_functional(
        input, running_mean, running_var, weight, bias, momentum, plan
    )
