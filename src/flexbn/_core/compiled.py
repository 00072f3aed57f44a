"""What ``torch.compile`` needs from the core beyond plain torch code, and the ``compiled`` backend.

:func:`snapshot`: AOTAutograd's partitioner may recompute, in the backward graph, a value the forward read
from an input that the same forward later mutates in place -- reading it after the mutation, so the
backward silently sees the new contents (open upstream: pytorch/pytorch#197039, "Don't recompute reads of
mutated inputs or mutable buffers"). Batch renormalization's corrections ``r``, ``d`` read the running
statistics before the step's in-place update and are needed by the backward. Reading the buffer through an
opaque custom op makes the partitioner save that copy instead of recomputing the read.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import reference

__all__ = ["BACKEND", "snapshot"]


@torch.library.custom_op("flexbn::snapshot", mutates_args=())
def _snapshot(t: Tensor) -> Tensor:
    return t.clone()


@_snapshot.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def snapshot(t: Tensor) -> Tensor:
    """``t``'s current value, safe to use in the backward of a compiled graph that mutates ``t`` later.

    Eager: ``t`` itself. Under ``torch.compile``: a copy the partitioner cannot recompute (module notes).
    """
    return _snapshot(t) if torch.compiler.is_compiling() else t


# -------------------------------------------------------------------------------------------------------
# The ``compiled`` backend: the reference operations compiled by torch.compile (Inductor).


def _signature(value: Any) -> Any:
    """What distinguishes one configuration from another: tensors' dtype, rank, device and layout, and every
    other value; used to give each configuration its own compiled copy (Dynamo's recompilation limit is per
    code object)."""
    if isinstance(value, Tensor):
        return (value.dtype, value.dim(), value.device.type, value.is_contiguous())
    if isinstance(value, tuple):
        return tuple(_signature(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int  # a count (e.g. of bags) varies per batch: Dynamo's own guards handle its value
    return value if isinstance(value, (bool, float, str, type(None))) else type(value)


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run through ``torch.compile``, one compiled copy per configuration."""
    copies: dict[Any, Callable[..., Any]] = {}

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        key = (_signature(args), tuple(sorted((k, _signature(v)) for k, v in kwargs.items())))
        with warnings.catch_warnings():
            # torch's own deprecation notices, raised while Inductor loads and compiles
            warnings.filterwarnings("ignore", module=r"torch(\.|$)")
            compiled = copies.get(key)
            if compiled is None:
                # A copy of the function with its own code object, hence its own Dynamo cache.
                clone = types.FunctionType(
                    fn.__code__.replace(),
                    fn.__globals__,
                    fn.__name__,
                    fn.__defaults__,
                    fn.__closure__,
                )
                clone.__kwdefaults__ = fn.__kwdefaults__
                compiled = copies[key] = torch.compile(clone)
            return compiled(*args, **kwargs)  # only on request: a compiler error reaches the caller

    run.copies = copies  # type: ignore[attr-defined]  # configuration -> compiled copy (introspection)
    return run


_moments = _compiled(reference.moments)
_normalize = _compiled(reference.normalize)


def _forward(
    x: Tensor,
    source: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running: tuple[Tensor, Tensor] | None,
    momentum: float | Tensor,
    eps: float,
    seg: Any,
    check: int,
) -> tuple[Tensor | None, Any]:
    """``reference.forward`` with its passes compiled (the count check and the update run eagerly)."""
    m = _moments(source, seg)
    if check:
        lonely = (m.count <= 1) & (m.count > 0) if check == 2 else m.count <= 1
        if bool(lonely.any()):
            return None, m
    if running is not None:
        reference.running_update(*running, m, momentum)
    return _normalize(x, weight, bias, m, eps, seg), m


BACKEND = types.SimpleNamespace(
    forward=_forward,
    moments=_moments,
    normalize=_normalize,
    running_update=reference.running_update,
    backward_sums=_compiled(reference.backward_sums),
    backward=_compiled(reference.backward),
)
"""The operations of ``reference`` compiled on first use per configuration."""
