"""flexbn: batch normalization whose statistics you control.

A drop-in for ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.functional.batch_norm`` that makes explicit, and
lets you choose, whether gradients flow through the batch mean and variance.

>>> import torch, flexbn
>>> bn = flexbn.BatchNorm2d(16, detach_mean=True)   # like torch.nn.BatchNorm2d(16), mean detached
>>> bn(torch.randn(4, 16, 8, 8)).shape
torch.Size([4, 16, 8, 8])
"""

from . import func
from ._core.backend import BACKENDS, get_backend, set_backend, use_backend
from ._core.native import backend_info
from .convert import convert, convert_to_torch
from .distributed import SyncBatchNorm
from .fold import fold, fuse_modules
from .functional import batch_norm
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    DomainBatchNorm3d,
    renorm_schedule,
    set_renorm_limits,
)
from .population import freeze, recompute_stats, unfreeze

__all__ = [
    "BACKENDS",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "DomainBatchNorm1d",
    "DomainBatchNorm2d",
    "DomainBatchNorm3d",
    "SyncBatchNorm",
    "__version__",
    "backend_info",
    "batch_norm",
    "convert",
    "convert_to_torch",
    "fold",
    "freeze",
    "func",
    "fuse_modules",
    "get_backend",
    "recompute_stats",
    "renorm_schedule",
    "set_backend",
    "set_renorm_limits",
    "unfreeze",
    "use_backend",
]
__version__ = "0.1.0"
