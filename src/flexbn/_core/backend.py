"""Backends: who runs the core's hot functions -- ``stats.moments``, ``autograd.normalize`` and
``autograd.backward_formula``.

* ``reference``: the pure-torch functions themselves. Always available, no compiler; several passes over the
  input, each a separate torch kernel.
* ``cpp``: hand-written C++/OpenMP kernels for CPU tensors (``kernels.cpp``): one pass for the statistics,
  one for the output, and two for the backward, for every statistics set, gradient mode and memory layout.
  Built at install time (one library per x86-64 level), else once per machine at first use with the
  system C++ compiler and cached on disk (``native``).
* ``compiled``: the reference functions compiled by ``torch.compile`` (Inductor: C++/OpenMP loops on CPU,
  Triton on CUDA). Each configuration (dtype, rank, memory layout, options, statistics set) compiles
  separately, seconds at its first call (Inductor caches the generated code on disk).
* ``auto`` (the default): ``cpp`` for CPU tensors where the kernels can be obtained, else ``reference``
  (with a ``UserWarning`` once, naming the reason and the fix; ``flexbn.backend_info()`` says which runs).
  CUDA tensors run the reference too: ``compiled`` (Triton) has never been measured on a GPU here, so it
  is not chosen for anyone until it is; ask for it explicitly (its compilation errors then reach the
  caller).

``flexbn.set_backend(name)`` or the environment variable ``FLEXBN_BACKEND`` choose; explicitly asking for a
backend that cannot run here raises. Whatever the choice, the reference runs where a fast path cannot help
or cannot work: under the user's own ``torch.compile`` (Inductor fuses the whole graph), under ``torch.func``
transforms, and when the function is itself being differentiated (double backward); ``compiled`` also
leaves statistics synchronised across processes to the reference (collectives), while ``cpp`` computes the
local sums and lets the core exchange them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["BACKENDS", "cpp_available", "fused", "get_backend", "set_backend", "use_backend"]

BACKENDS = ("auto", "reference", "cpp", "compiled")
_log = logging.getLogger("flexbn")
_DEFAULT = "auto"
_selected: list[str] = []  # the explicit choice, if any (else the environment's, else _DEFAULT)
F = TypeVar("F", bound=Callable[..., Any])


def _check_name(name: object) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}, but got {name!r}"
        )
    return name  # type: ignore[return-value]


def get_backend() -> str:
    """The selected backend: ``set_backend``'s, else ``$FLEXBN_BACKEND``, else ``"auto"``.

    >>> import flexbn
    >>> flexbn.get_backend() in flexbn.BACKENDS
    True
    """
    if _selected:
        return _selected[-1]
    return _check_name(os.environ.get("FLEXBN_BACKEND", _DEFAULT) or _DEFAULT)


def set_backend(name: str | None) -> None:
    """Select the backend for every flexbn call in this process: ``"auto"`` (default), ``"reference"``,
    ``"cpp"`` or ``"compiled"``; ``None`` goes back to ``$FLEXBN_BACKEND`` or the default. Asking for a
    backend that cannot run here raises ``RuntimeError``.

    >>> import flexbn
    >>> flexbn.set_backend("reference"); flexbn.get_backend()
    'reference'
    >>> flexbn.set_backend(None)
    """
    if name is None:
        _selected.clear()
        return
    _selected[:] = [_check_runnable(_check_name(name))]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend inside a ``with`` block (restores the previous choice)."""
    _selected.append(_check_runnable(_check_name(name)))
    try:
        yield
    finally:
        _selected.pop()


def _check_runnable(name: str) -> str:
    if name == "compiled" and not available("cpu") and not available("cuda"):
        raise RuntimeError(f"flexbn backend 'compiled' is unavailable here: {_why_not('cpu')}")
    if name == "cpp" and not cpp_available():
        raise RuntimeError(f"flexbn backend 'cpp' is unavailable here: {_kernels().why_not()}")
    return name


_loaded: list[types.ModuleType] = []


def _kernels() -> types.ModuleType:
    if not _loaded:
        from . import kernels  # imported on first use: nothing heavy at ``import flexbn``

        _loaded.append(kernels)
    return _loaded[0]


def cpp_available() -> bool:
    """Whether the ``cpp`` kernels can be built (or were) and loaded here."""
    return _kernels().why_not() == ""


@functools.cache
def available(device_type: str) -> bool:
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


def _tensors(args: tuple[Any, ...], out: list[Tensor]) -> list[Tensor]:
    """The tensors among ``args`` and inside its tuples (the segments), appended to ``out``."""
    for a in args:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, tuple):
            _tensors(a, out)
    return out


def _choose(args: tuple[Any, ...]) -> str:
    """Which implementation runs this call: ``"reference"``, ``"cpp"`` or ``"compiled"`` (see the module
    notes for the exceptions)."""
    name = get_backend()
    if name == "reference" or torch.compiler.is_compiling():
        return "reference"
    tensors = _tensors(args, [])
    if not tensors:
        return "reference"
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if any(wrapped(t) for t in tensors):
        return "reference"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "reference"  # being differentiated: the reference builds the graph
    device = tensors[0].device.type
    if name == "cpp" or (name == "auto" and device == "cpu"):
        if device != "cpu" and name == "cpp":
            raise RuntimeError(f"flexbn backend 'cpp' runs on CPU tensors only, not on {device}")
        kernels = _kernels()
        if kernels.supports(*tensors) and (name == "cpp" or kernels.why_not() == ""):
            return "cpp"
        if name == "auto":
            _log_once(device)
        return "reference"
    if any(getattr(a, "group", None) is not None for a in args if isinstance(a, tuple)):
        return "reference"  # synchronised statistics: collectives, not compiled
    if name == "compiled":
        if not available(device):
            raise RuntimeError(
                f"flexbn backend 'compiled' cannot run on {device}: {_why_not(device)}"
            )
        return "compiled"
    _log_once(device)  # auto off the CPU: the reference (see the module notes)
    return "reference"


@functools.cache
def _log_once(device: str) -> None:
    if device == "cpu":
        why = _kernels().why_not()
        if why:  # a silent slow path otherwise: say so once, with the fix
            _kernels().native.warn_unavailable(why)
        why = why or "unsupported tensors"
    else:
        why = "no fast path measured on this device; flexbn.set_backend('compiled') to try Inductor"
    _log.debug("flexbn: reference backend on %s (%s)", device, why)


def _signature(value: Any) -> Any:
    """What distinguishes one configuration from another: tensors' dtype, rank and layout, and every other
    value; used to give each configuration its own compiled copy (Dynamo's recompilation limit is per code
    object)."""
    if isinstance(value, Tensor):
        return (value.dtype, value.dim(), value.device.type, value.is_contiguous())
    if isinstance(value, tuple):
        return tuple(_signature(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int  # a count (e.g. of bags) varies per batch: Dynamo's own guards handle its value
    return value if isinstance(value, (bool, float, str, type(None))) else type(value)


def fused(fn: F) -> F:
    """Run ``fn`` (a pure-torch core function) compiled when the backend says so, else as it is."""
    copies: dict[Any, Callable[..., Any]] = {}

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        choice = _choose(args + tuple(kwargs.values()))
        if choice == "reference":
            return fn(*args, **kwargs)
        if choice == "cpp":
            out = _kernels().IMPLEMENTATIONS[fn.__name__](*args, **kwargs)
            return fn(*args, **kwargs) if out is NotImplemented else out
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

    run.reference = fn  # type: ignore[attr-defined]
    run.compiled = copies  # type: ignore[attr-defined]  # configuration -> compiled copy (introspection)
    return run  # type: ignore[return-value]
