"""Backends: which implementation of the core's operations runs (``reference``, ``cpp``, ``compiled``,
``triton``).

* ``reference``: plain torch (``reference.py``). Always available; several torch kernels per operation.
* ``cpp``: hand-written C++/OpenMP kernels for CPU tensors (``kernels.cpp``): one pass for the statistics,
  one for the output, two for the backward, for every statistics set, gradient mode and memory layout.
  Built at install time (one library per x86-64 level), else once per machine at first use with the
  system C++ compiler and cached on disk (``native``).
* ``compiled``: the reference operations compiled by ``torch.compile`` (Inductor: C++/OpenMP loops on CPU,
  Triton on CUDA), one compiled copy per configuration, seconds at its first call.
* ``triton``: hand-written Triton kernels for CUDA tensors (``triton_kernels``): one pass for the
  statistics, one for the output, two for the backward, for every statistics set, gradient mode and
  layout, float16/bfloat16/float32/float64. Needs Triton (``pip install 'flexbn[cuda]'``); CPU tensors only
  in Triton's interpreter (``TRITON_INTERPRET=1``, for testing). Not yet measured on a GPU, so explicit
  only (``docs/cuda.md``).
* ``auto`` (the default): the fastest measured. torch's own batch norm wherever it computes what flexbn
  would (eval with running statistics; small training batches without flexbn options, where the fixed
  cost per call decides; devices without flexbn kernels), else ``cpp`` for CPU tensors where the kernels
  can be obtained (if they cannot: ``reference``, with a ``UserWarning`` once naming the reason and the
  fix; ``flexbn.backend_info()`` says which runs). CUDA tensors with flexbn options get the reference:
  ``compiled`` and ``triton`` have not been measured on a GPU, so they are no one's default until they are.

The choice: :func:`use_backend` (a ``with`` block, for the current thread or task: a ``ContextVar``), else
:func:`set_backend` (the process), else the environment variable ``FLEXBN_BACKEND``, else ``auto``. It is
read once per batch-norm call and held by that call's backward. Explicitly asking for a backend that
cannot run here raises; ``auto`` falls back to the reference where the kernels cannot take the tensors.

Whatever the choice, the reference runs where a fast path cannot work or cannot help: under the user's own
``torch.compile`` (Inductor fuses the whole graph), under ``torch.func`` transforms, on tensor subclasses
(fake, batched), and when the backward is itself differentiated (double backward).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import shutil
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from . import reference

__all__ = [
    "BACKENDS",
    "cpp_available",
    "get_backend",
    "implementation",
    "set_backend",
    "use_backend",
]

BACKENDS = ("auto", "reference", "cpp", "compiled", "triton")
_log = logging.getLogger("flexbn")
_DEFAULT = "auto"
_context: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flexbn_backend", default=None
)
_process: list[str] = []  # set_backend's choice, if any
_environment: list[
    str
] = []  # $FLEXBN_BACKEND as read at first need (again after set_backend(None))


def _check_name(name: object) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}, but got {name!r}"
        )
    return name  # type: ignore[return-value]


def get_backend() -> str:
    """The selected backend: :func:`use_backend`'s, else :func:`set_backend`'s, else
    ``$FLEXBN_BACKEND``, else ``"auto"``. (Batch-norm calls read the environment variable once, at first
    need, and again after this function or ``set_backend(None)`` runs.)

    >>> import flexbn
    >>> flexbn.get_backend() in flexbn.BACKENDS
    True
    """
    _environment.clear()  # read afresh here (calls read it once: see requested)
    return requested()


def requested() -> str:
    """:func:`get_backend` for every call of the core: ``$FLEXBN_BACKEND`` is read once, at first need
    (again after :func:`get_backend` or ``set_backend(None)``), so each call costs a context-variable
    lookup."""
    name = _context.get()
    if name is not None:
        return name
    if _process:
        return _process[0]
    if not _environment:
        env = os.environ.get("FLEXBN_BACKEND")
        _environment.append(_check_name(env) if env else _DEFAULT)
    return _environment[0]


def set_backend(name: str | None) -> None:
    """Select the backend for every flexbn call of this process (outside :func:`use_backend` blocks):
    ``"auto"`` (default), ``"reference"``, ``"cpp"``, ``"compiled"`` or ``"triton"``; ``None`` goes back to
    ``$FLEXBN_BACKEND`` or the default. Asking for a backend that cannot run here raises ``RuntimeError``.

    >>> import flexbn
    >>> flexbn.set_backend("reference"); flexbn.get_backend()
    'reference'
    >>> flexbn.set_backend(None)
    """
    if name is None:
        _process.clear()
        _environment.clear()
        return
    _process[:] = [_check_runnable(_check_name(name))]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend inside a ``with`` block, for the current thread (or asyncio task) only: other
    threads keep their own choice. The backward of a call made inside the block uses the block's backend,
    wherever it runs.

    >>> import torch, flexbn
    >>> with flexbn.use_backend("reference"):
    ...     y = flexbn.batch_norm(torch.randn(4, 3), None, None, training=True)
    """
    token = _context.set(_check_runnable(_check_name(name)))
    try:
        yield
    finally:
        _context.reset(token)


def _check_runnable(name: str) -> str:
    if name == "compiled" and not compiled_available("cpu") and not compiled_available("cuda"):
        raise RuntimeError(f"flexbn backend 'compiled' is unavailable here: {_why_not('cpu')}")
    if name == "cpp" and not cpp_available():
        raise RuntimeError(f"flexbn backend 'cpp' is unavailable here: {_kernels().why_not()}")
    if name == "triton":
        why = triton_why_not()
        if why:
            raise RuntimeError(f"flexbn backend 'triton' is unavailable here: {why}")
    return name


_loaded: list[types.ModuleType] = []


def _kernels() -> types.ModuleType:
    if not _loaded:
        from . import kernels  # imported on first use: nothing heavy at ``import flexbn``

        _loaded.append(kernels)
    return _loaded[0]


def _triton() -> types.ModuleType:
    """The Triton kernels (imported on first request: Triton is not a requirement of flexbn)."""
    try:
        from . import triton_kernels
    except ImportError as err:
        raise RuntimeError(
            f"flexbn backend 'triton' needs Triton ({err}); install it with pip install 'flexbn[cuda]'"
        ) from err
    return triton_kernels


def triton_why_not() -> str:
    """Why the ``triton`` backend cannot run here (``""``: it can): Triton missing, or no CUDA device
    outside Triton's interpreter."""
    try:
        kernels = _triton()
    except RuntimeError as err:
        return str(err)
    if torch.cuda.is_available():
        return ""
    why = kernels.why_not(torch.device("cpu"))
    return why and f"no CUDA device (torch.cuda.is_available() is False); {why}"


def cpp_available() -> bool:
    """Whether the ``cpp`` kernels can be built (or were) and loaded here."""
    return _kernels().why_not() == ""


@functools.cache
def compiled_available(device_type: str) -> bool:
    """Whether the compiled backend can run on this device type."""
    return _why_not(device_type) == ""


@functools.cache
def _why_not(device_type: str) -> str:
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this platform"
    if device_type == "cpu":
        names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(n and shutil.which(n) for n in names):
            return "no C++ compiler found (Inductor's CPU code generation needs g++ or clang++)"
        return ""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return "" if has_triton() else "Triton is not installed"
    return f"no compiled kernels for device type {device_type!r}"


_functorch = torch._C._functorch
_reference = reference


def _plain(t: Tensor) -> bool:
    """Not a functorch-wrapped or legacy-batched tensor (``is_grads_batched``): its memory is its value."""
    return not (_functorch.is_functorch_wrapped_tensor(t) or _functorch.is_legacy_batchedtensor(t))


def implementation(name: str, *tensors: Tensor | None) -> Any:
    """The module implementing the operations for this call: ``reference``, ``kernels`` (``cpp``),
    ``compiled`` or ``triton_kernels``, for the requested backend ``name`` and the call's tensors (the
    input first)."""
    if name == "reference":
        return _reference
    x = tensors[0]
    device = x.device.type if x is not None else "cpu"
    if name == "cpp" or (name == "auto" and device == "cpu"):
        kernels = _kernels()
        if kernels.supports(*tensors) and not any(t is not None and not _plain(t) for t in tensors):
            if name == "cpp" or kernels.why_not() == "":
                return kernels
        elif name == "cpp" and device not in ("cpu", "meta"):  # meta: shapes only, the reference
            raise RuntimeError(f"flexbn backend 'cpp' runs on CPU tensors only, not on {device}")
        if name == "auto" and device == "cpu":
            _log_once(device)
        return _reference
    if name == "triton":
        if device == "meta" or not all(t is None or _plain(t) for t in tensors):
            return _reference  # shapes only, or a transform's tensors
        kernels = _triton()
        why = kernels.why_not(x.device) if x is not None else ""
        if why:
            raise RuntimeError(f"flexbn backend 'triton' cannot run this call: {why}")
        return kernels if kernels.supports(*tensors) else _reference
    if name == "compiled" and device != "meta" and all(t is None or _plain(t) for t in tensors):
        if not compiled_available(device):
            raise RuntimeError(
                f"flexbn backend 'compiled' cannot run on {device}: {_why_not(device)}"
            )
        from . import compiled

        return compiled.BACKEND
    _log_once(device)
    return _reference


@functools.cache
def _log_once(device: str) -> None:
    if device == "cpu":
        why = _kernels().why_not()
        if why:  # a silent slow path otherwise: say so once, with the fix
            _kernels().native.warn_unavailable(why)
        why = why or "unsupported tensors"
    else:
        why = "no fast path measured on this device; flexbn.set_backend('triton') to try flexbn's kernels"
    _log.debug("flexbn: reference backend on %s (%s)", device, why)
