"""Swap a model's batch-norm layers for flexbn's (:func:`convert`) and back (:func:`convert_to_torch`).

Both work like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: each layer is replaced by a new module
of the target class that *shares* the old one's Parameter and buffer objects (no copy: an optimizer built on
the old parameters keeps working, and a training step updates the same running-statistics tensors), with
the same train/eval mode, device, dtype, ``requires_grad``, ``state_dict`` keys and values, children,
hooks and user attributes. The model is changed in place, but a batch-norm root is replaced by a new object,
so always use the return value.

Only the exact classes are converted: ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` one way,
flexbn's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` the other way. Subclasses written by the user (a custom
``forward``, parametrized layers, uninitialized ``LazyBatchNorm*``) are left alone -- their behaviour may differ
from the class they derive from -- but their children are converted.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from . import modules

__all__ = ["convert", "convert_to_torch"]

_TORCH_TO_FLEX: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: modules.BatchNorm1d,
    nn.BatchNorm2d: modules.BatchNorm2d,
    nn.BatchNorm3d: modules.BatchNorm3d,
}
_FLEX_TO_TORCH = {flex: torch_cls for torch_cls, flex in _TORCH_TO_FLEX.items()}
_DOMAIN = (modules.DomainBatchNorm1d, modules.DomainBatchNorm2d, modules.DomainBatchNorm3d)
# Keyword-only in torch's constructors too: a structural argument, taken from each layer, not an option.
_STRUCTURAL = frozenset({"bias"})
# Module state that belongs to the old object only (a compiled ``_call_impl`` is bound to it).
_NOT_CARRIED = frozenset({"_compiled_call_impl"})


def convert(
    model: nn.Module,
    *,
    sync: bool = False,
    process_group: Any = None,
    **options: Any,
) -> nn.Module:
    """Replace the batch-norm layers of ``model`` (the root included) by flexbn's, sharing their state.

    ``torch.nn.BatchNorm1d/2d/3d`` become ``flexbn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``
    becomes ``flexbn.SyncBatchNorm`` with its process group (it accepts any input with >= 2 dimensions).
    With ``sync=True`` every one of them, flexbn's included, becomes
    ``flexbn.SyncBatchNorm(..., process_group=process_group)``, as
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does. ``options`` are the keyword-only options of
    the flexbn constructors (``detach_mean``, ``detach_var``, ``virtual_batch_size``, ...); they are applied
    to every converted layer and to the flexbn layers already in the model (their other options are kept),
    and checked by the constructors before any layer is replaced. An unknown option raises ``TypeError``.

    The new layers share the old layers' Parameter and buffer objects, mode, children, hooks (the same hook
    dictionaries: handles returned before the conversion still remove them) and user attributes; with no
    options the model computes exactly what it computed before and its ``state_dict`` is unchanged. The
    model is modified in place and returned; a batch-norm root is replaced by a new object, so use the
    return value. Subclasses of torch's classes written by the user, ``flexbn.DomainBatchNorm*`` and
    other modules are left as they are (their children are converted).

    Args:
        model: the module to convert.
        sync: convert every batch-norm layer to ``flexbn.SyncBatchNorm``.
        process_group: the process group of the new ``SyncBatchNorm`` layers (only with ``sync=True``;
            ``None``: the whole world).
        **options: keyword-only constructor options of the flexbn modules, e.g. ``detach_var=True``.

    Returns:
        The converted model (a new object if ``model`` itself is a batch-norm layer).

    Example:
        >>> import torch, flexbn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> weight = model[1].weight
        >>> model = flexbn.convert(model, detach_var=True)
        >>> model[1]
        BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, detach_var=True)
        >>> type(model[1]) is flexbn.BatchNorm2d, model[1].weight is weight
        (True, True)
    """
    _check_model(model)
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, but got {type(sync).__name__} ({sync!r})")
    if process_group is not None and not sync:
        raise ValueError(
            "process_group is only used with sync=True (a torch.nn.SyncBatchNorm keeps its own), "
            f"but got sync=False and process_group={process_group!r}"
        )
    flex_sync = _flex_sync_class() if sync else _loaded_flex_sync_class()

    plan: list[tuple[str, nn.Module, type[nn.Module], dict[str, Any]]] = []
    for name, module in model.named_modules():
        kind = type(module)
        if kind in _TORCH_TO_FLEX or kind is nn.SyncBatchNorm:
            current: dict[str, Any] = {}
        elif kind in _FLEX_TO_TORCH or (flex_sync is not None and kind is flex_sync):
            if not options and not sync:
                continue  # already what was asked for
            current = _current_options(module)
        else:
            continue
        if sync:
            target = flex_sync
        elif kind in _TORCH_TO_FLEX:
            target = _TORCH_TO_FLEX[kind]
        elif kind is nn.SyncBatchNorm:
            target = _flex_sync_class()
        else:
            target = kind
        plan.append((name, module, target, current))

    targets = {target for _, _, target, _ in plan}
    if not targets:  # nothing to convert: still reject a misspelt option
        targets = {flex_sync if sync else modules.BatchNorm2d}
    for target in sorted(targets, key=lambda t: t.__name__):
        accepted = _option_defaults(target)
        unknown = [key for key in options if key not in accepted]
        if unknown:
            raise TypeError(
                f"convert() got an unknown option {unknown[0]!r}: the options of "
                f"{_class_name(target)} are {', '.join(accepted) or '(none)'}"
            )

    built = {}
    for name, module, target, current in plan:
        accepted = _option_defaults(target)
        kind = type(module)
        lost = {
            k: v for k, v in current.items() if k not in accepted and not _is_default(kind, k, v)
        }
        if lost:
            raise ValueError(
                f"cannot convert {_label(name)} ({_class_name(kind)}) to {_class_name(target)}: "
                f"it does not take the option(s) {_format_options(lost)}"
            )
        kept = {k: v for k, v in current.items() if k in accepted}
        group = process_group if sync else getattr(module, "process_group", None)
        built[id(module)] = _build(name, module, target, {**kept, **options}, group)
    return _commit(model, plan, built)


def convert_to_torch(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replace flexbn's batch-norm layers in ``model`` (the root included) by torch's, sharing their state.

    The way back from :func:`convert`: ``flexbn.BatchNorm1d/2d/3d`` become ``torch.nn.BatchNorm1d/2d/3d``
    and ``flexbn.SyncBatchNorm`` becomes ``torch.nn.SyncBatchNorm`` with the same process group, sharing
    Parameters, buffers, mode, children, hooks and user attributes exactly as :func:`convert` does; the
    model is modified in place and returned (use the return value: a batch-norm root is a new object).

    Torch's modules cannot express flexbn's options, nor per-domain statistics. With ``strict=True`` (the
    default) a ``ValueError`` lists every layer with an option that differs from its default (e.g.
    ``detach_var=True``) and every ``flexbn.DomainBatchNorm*``, before anything is replaced. With
    ``strict=False`` the options are dropped (the layer then behaves as torch's) and the
    ``DomainBatchNorm*`` layers are left as they are. Subclasses written by the user are left alone.

    Args:
        model: the module to convert.
        strict: raise on what torch cannot express, instead of dropping options and keeping domain layers.

    Returns:
        The converted model (a new object if ``model`` itself is a flexbn batch-norm layer).

    Example:
        >>> import torch, flexbn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), flexbn.BatchNorm1d(4))
        >>> model = flexbn.convert_to_torch(model)
        >>> type(model[1]) is torch.nn.BatchNorm1d
        True
        >>> flexbn.convert_to_torch(flexbn.BatchNorm1d(4, detach_var=True))
        Traceback (most recent call last):
        ...
        ValueError: cannot convert to torch's batch norm: the root (flexbn.BatchNorm1d) has detach_var=True (strict=False drops the options and leaves DomainBatchNorm layers as they are)
    """
    _check_model(model)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, but got {type(strict).__name__} ({strict!r})")
    flex_sync = _loaded_flex_sync_class()

    plan: list[tuple[str, nn.Module, type[nn.Module], dict[str, Any]]] = []
    problems = []
    for name, module in model.named_modules():
        kind = type(module)
        if kind in _DOMAIN:
            problems.append(f"{_label(name)} ({_class_name(kind)}) has no torch equivalent")
            continue
        if kind in _FLEX_TO_TORCH:
            target: type[nn.Module] = _FLEX_TO_TORCH[kind]
        elif flex_sync is not None and kind is flex_sync:
            target = nn.SyncBatchNorm
        else:
            continue
        extra = {k: v for k, v in _current_options(module).items() if not _is_default(kind, k, v)}
        if extra:
            problems.append(f"{_label(name)} ({_class_name(kind)}) has {_format_options(extra)}")
        plan.append((name, module, target, {}))
    if problems and strict:
        raise ValueError(
            "cannot convert to torch's batch norm: "
            + "; ".join(problems)
            + " (strict=False drops the options and leaves DomainBatchNorm layers as they are)"
        )

    built = {
        id(module): _build(name, module, target, {}, getattr(module, "process_group", None))
        for name, module, target, _ in plan
    }
    return _commit(model, plan, built)


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")


def _flex_sync_class() -> type[nn.Module]:
    from .distributed import SyncBatchNorm

    return SyncBatchNorm


def _loaded_flex_sync_class() -> type[nn.Module] | None:
    """``flexbn.SyncBatchNorm`` if its module is imported (else no instance of it can exist)."""
    return getattr(sys.modules.get(f"{__package__}.distributed"), "SyncBatchNorm", None)


@functools.cache
def _option_defaults(cls: type[nn.Module]) -> dict[str, Any]:
    """The keyword-only constructor options of a flexbn class and their defaults, following ``**kwargs``
    up the MRO (so a subclass that forwards them is read correctly)."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.kind is p.KEYWORD_ONLY and p.name not in _STRUCTURAL:
                found.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return found


def _current_options(module: nn.Module) -> dict[str, Any]:
    return {
        name: getattr(module, name)
        for name in _option_defaults(type(module))
        if hasattr(module, name)
    }


def _is_default(cls: type[nn.Module], name: str, value: Any) -> bool:
    default = _option_defaults(cls).get(name, inspect.Parameter.empty)
    if value is default:
        return True
    return isinstance(value, bool) == isinstance(default, bool) and bool(value == default)


def _format_options(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _label(name: str) -> str:
    return f"layer {name!r}" if name else "the root"


def _class_name(cls: type) -> str:
    """``torch.nn.BatchNorm2d`` / ``flexbn.BatchNorm2d``: the public names, which say which library."""
    package = cls.__module__.split(".")[0]
    public = {"torch": "torch.nn", "flexbn": "flexbn"}.get(package, cls.__module__)
    return f"{public}.{cls.__name__}"


def _build(
    name: str,
    old: nn.Module,
    target: type[nn.Module],
    options: dict[str, Any],
    process_group: Any,
) -> nn.Module:
    """A new ``target`` with ``old``'s hyperparameters and ``options`` (checked by its constructor) and
    tensors of its own on ``old``'s device and dtype, to be replaced by ``old``'s in :func:`_transfer`."""
    kwargs: dict[str, Any] = dict(options)
    ref = next((t for t in (old.weight, old.running_mean, old.bias) if t is not None), None)
    if ref is not None:
        kwargs["device"] = ref.device
        if ref.is_floating_point():
            kwargs["dtype"] = ref.dtype
    if issubclass(target, nn.SyncBatchNorm) or target is _flex_sync_class():
        kwargs["process_group"] = process_group
    try:
        return target(
            old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, **kwargs
        )
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"cannot convert {_label(name)} ({_class_name(type(old))}) to {_class_name(target)}: {err}"
        ) from err


def _transfer(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the state of ``old``: the same Parameter and buffer objects (in ``old``'s order; tensors
    only ``new`` has are kept), mode, children, hook dictionaries and attributes that ``new``'s constructor
    did not set -- except ``old``'s own options, which ``new`` has as its constructor made them."""
    state, fresh = old.__dict__, new.__dict__
    for key in ("_parameters", "_buffers"):
        merged = dict(state[key])
        for k, v in fresh[key].items():
            merged.setdefault(k, v)
        fresh[key] = merged
    fresh["_non_persistent_buffers_set"] = set(state["_non_persistent_buffers_set"]) | {
        k for k in fresh["_non_persistent_buffers_set"] if k not in state["_buffers"]
    }
    fresh["_modules"] = dict(state["_modules"])
    fresh["training"] = state["training"]
    own_options = _option_defaults(type(old))  # empty for torch's classes
    for key, value in state.items():
        if key in _NOT_CARRIED:
            continue
        if "hook" in key:
            # Share the dictionary, so RemovableHandles made on ``old`` act on ``new``.
            if isinstance(value, dict):
                value.update(fresh.get(key) or {})
                fresh[key] = value
            elif fresh.get(key) is None:
                fresh[key] = value
        elif key not in fresh and key not in own_options:
            fresh[key] = value


def _commit(
    model: nn.Module,
    plan: Iterable[tuple[str, nn.Module, type[nn.Module], dict[str, Any]]],
    built: dict[int, nn.Module],
) -> nn.Module:
    """Move each old layer's state into its replacement and point every parent at the replacement."""
    parents = list(model.modules())
    for _, old, _, _ in plan:
        _transfer(old, built[id(old)])
    for parent in parents:
        holder = built.get(id(parent), parent)
        for child_name, child in list(holder._modules.items()):
            if child is not None and id(child) in built:
                holder._modules[child_name] = built[id(child)]
    return built.get(id(model), model)
