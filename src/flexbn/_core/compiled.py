"""What ``torch.compile`` needs from the core beyond plain torch code.

:func:`snapshot`: AOTAutograd's partitioner may recompute, in the backward graph, a value the forward read
from an input that the same forward later mutates in place -- reading it after the mutation, so the
backward silently sees the new contents (open upstream: pytorch/pytorch#197039, "Don't recompute reads of
mutated inputs or mutable buffers"). Batch renormalization's corrections ``r``, ``d`` read the running
statistics before the step's in-place update and are needed by the backward. Reading the buffer through an
opaque custom op makes the partitioner save that copy instead of recomputing the read.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["snapshot"]


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
