"""Swap a model's batch-norm layers for flexbn's (:func:`convert`) and back (:func:`convert_to_torch`).

Both work like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: each layer of one of torch's or flexbn's
own classes is replaced by a new module of the target class that *shares* the old one's Parameter and buffer
objects (no copy: an optimizer built on the old parameters keeps working, and a training step updates the
same running-statistics tensors), with the same train/eval mode, device, dtype, ``requires_grad``,
``state_dict`` keys and values, children, hooks and user attributes. The model is changed in place, but a
batch-norm root of one of those classes is replaced by a new object, so always use the return value.

Subclasses of torch's classes -- timm's ``BatchNormAct2d`` (batch norm, then an activation, in one
``forward``), a layer that only changes ``_check_input_dim``, an uninitialized ``LazyBatchNorm*`` -- keep
their class, their ``forward`` and their identity: the layer's own ``torch.nn.functional.batch_norm`` call
(the one made with its parameters or running buffers, found by a ``TorchFunctionMode`` active during its
``forward``) is *routed* to :func:`flexbn.batch_norm` with the layer's options, and synchronised with
``sync=True``. Such a layer is an instance of a subclass of its own class made by flexbn (same name,
``isinstance`` and ``state_dict``; it pickles and deep-copies as the routed layer), and shows its options in
its ``repr``. A layer that cannot be converted -- a subclass whose ``forward`` never calls
``torch.nn.functional.batch_norm`` -- is named in a ``UserWarning``, or in a ``ValueError`` when ``sync`` or
options were asked for (``strict=False``: a warning), since the model would not train as asked.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from . import functional, modules

__all__ = ["convert", "convert_to_torch"]

_TORCH_TO_FLEX: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: modules.BatchNorm1d,
    nn.BatchNorm2d: modules.BatchNorm2d,
    nn.BatchNorm3d: modules.BatchNorm3d,
}
_FLEX_TO_TORCH = {flex: torch_cls for torch_cls, flex in _TORCH_TO_FLEX.items()}
_DOMAIN = (modules.DomainBatchNorm1d, modules.DomainBatchNorm2d, modules.DomainBatchNorm3d)
# Keyword-only in the constructors too, but structural: taken from each layer, not options.
_STRUCTURAL = frozenset({"bias", "domain_affine"})
# Module state that belongs to the old object only (a compiled ``_call_impl`` is bound to it).
_NOT_CARRIED = frozenset({"_compiled_call_impl"})


def convert(
    model: nn.Module,
    *,
    sync: bool = False,
    process_group: Any = None,
    strict: bool = True,
    **options: Any,
) -> nn.Module:
    """Give the batch-norm layers of ``model`` (the root included) flexbn's semantics, sharing their state.

    ``torch.nn.BatchNorm1d/2d/3d`` become ``flexbn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``
    becomes ``flexbn.SyncBatchNorm`` with its process group (it accepts any input with >= 2 dimensions).
    With ``sync=True`` every one of them, flexbn's included, becomes
    ``flexbn.SyncBatchNorm(..., process_group=process_group)``, as
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does. ``options`` are the keyword-only options of
    the flexbn constructors (``detach_mean``, ``detach_var``, ``virtual_batch_size``, ...); they are applied
    to every converted layer and to the flexbn layers already in the model (their other options are kept),
    and checked by the constructors before any layer is changed. An unknown option raises ``TypeError``.

    Subclasses of torch's classes keep their class and ``forward``: the ``torch.nn.functional.batch_norm``
    call their ``forward`` makes with the layer's own parameters or buffers runs as
    :func:`flexbn.batch_norm` with the options (synchronised with ``sync=True``; a subclass of
    ``torch.nn.SyncBatchNorm`` is synchronised over its own group, on any backend). An uninitialized
    ``LazyBatchNorm*`` is routed the same way and becomes the flexbn class when it materializes.
    Subclasses of flexbn's classes and ``flexbn.DomainBatchNorm*`` take the options they accept as
    attributes (in place). A layer that cannot be given what was asked is named: ``ValueError`` before
    anything changes when ``sync`` or options were asked for and ``strict=True``, else a ``UserWarning``
    (and it is left as it is, its children converted): a subclass whose ``forward`` does not call
    ``torch.nn.functional.batch_norm`` (or flexbn's ``forward``), ``sync=True`` on a flexbn subclass other
    than ``flexbn.SyncBatchNorm``'s or on ``DomainBatchNorm*``, an option a ``DomainBatchNorm*`` does not
    take. A routed layer whose ``forward`` then makes no such call raises ``RuntimeError`` in that
    ``forward`` if it has options or ``sync``.

    The layers share the old layers' Parameter and buffer objects, mode, children, hooks (the same hook
    dictionaries: handles returned before the conversion still remove them) and user attributes; with no
    options the model computes what it computed before (to float32 rounding: flexbn's kernels are not
    torch's) and its ``state_dict`` is unchanged. The model is modified in place and returned; a batch-norm
    root of torch's or flexbn's classes is replaced by a new object, so use the return value.

    Args:
        model: the module to convert.
        sync: synchronise every batch-norm layer's training statistics over ``process_group``.
        process_group: the process group of the synchronised layers (only with ``sync=True``; ``None``: the
            whole world).
        strict: raise on a layer that cannot be given ``sync`` or the options, instead of warning.
        **options: keyword-only constructor options of the flexbn modules, e.g. ``detach_var=True``.

    Returns:
        The converted model (a new object if ``model`` itself is a batch-norm layer of torch's or flexbn's
        classes).

    Example:
        >>> import torch, flexbn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> weight = model[1].weight
        >>> model = flexbn.convert(model, detach_var=True)
        >>> model[1]
        BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, detach_var=True)
        >>> type(model[1]) is flexbn.BatchNorm2d, model[1].weight is weight
        (True, True)
        >>> class BatchNormAct2d(torch.nn.BatchNorm2d):  # timm's, in short
        ...     def forward(self, x):
        ...         return torch.relu(super().forward(x))
        >>> layer = flexbn.convert(BatchNormAct2d(4), detach_var=True)
        >>> isinstance(layer, BatchNormAct2d), layer
        (True, BatchNormAct2d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, detach_var=True))
    """
    _check_model(model)
    for name, flag in (("sync", sync), ("strict", strict)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, but got {type(flag).__name__} ({flag!r})")
    if process_group is not None and not sync:
        raise ValueError(
            "process_group is only used with sync=True (a torch.nn.SyncBatchNorm keeps its own), "
            f"but got sync=False and process_group={process_group!r}"
        )
    accepted = _option_defaults(modules.BatchNorm2d)
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise TypeError(
            f"convert() got an unknown option {unknown[0]!r}: the options of flexbn's batch-norm "
            f"layers are {', '.join(accepted)}"
        )
    flex_sync = _flex_sync_class() if sync else _loaded_flex_sync_class()

    steps: list[_Step] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        step = _plan(name, module, sync, flex_sync, options)
        if isinstance(step, str):
            skipped.append(f"{_label(name)} ({_describe(type(module))}): {step}")
        elif step is not None:
            steps.append(step)
    if skipped:
        asked = sync or bool(options)
        if asked and strict:
            raise ValueError(
                f"cannot convert {len(skipped)} batch-norm layer(s) as asked ("
                + _format_options({**({"sync": True} if sync else {}), **options})
                + "): "
                + "; ".join(skipped)
                + ". Nothing was changed; strict=False converts the others and leaves these as they are"
            )
        warnings.warn(
            f"flexbn.convert left {len(skipped)} batch-norm layer(s) as they are: "
            + "; ".join(skipped)
            + (" (they do not get the options or sync asked for)" if asked else ""),
            UserWarning,
            stacklevel=2,
        )

    built: dict[int, nn.Module] = {}
    for step in steps:  # everything is checked before anything changes
        if step.action == "build":
            kept = _keep_options(step)
            group = process_group if sync else getattr(step.module, "process_group", None)
            built[id(step.module)] = _build(
                step.name, step.module, step.target, {**kept, **options}, group
            )
        else:
            _validate(step.name, step.module, step.target, {**step.current, **options})
    for step in steps:
        if step.action == "route":
            _route(step.module, sync, {**step.current, **options}, process_group)
        elif step.action == "set":
            for key, value in options.items():
                setattr(step.module, key, value)
            if sync:
                step.module.process_group = process_group
    plan = [(s.name, s.module, s.target, s.current) for s in steps if s.action == "build"]
    return _commit(model, plan, built)


def convert_to_torch(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replace flexbn's batch-norm layers in ``model`` (the root included) by torch's, sharing their state.

    The way back from :func:`convert`: ``flexbn.BatchNorm1d/2d/3d`` become ``torch.nn.BatchNorm1d/2d/3d``
    and ``flexbn.SyncBatchNorm`` becomes ``torch.nn.SyncBatchNorm`` with the same process group, sharing
    Parameters, buffers, mode, children, hooks and user attributes exactly as :func:`convert` does; the
    subclasses :func:`convert` routed get back their own class (in place) and lose the options. The model
    is modified in place and returned (use the return value: a batch-norm root is a new object).

    Torch's modules cannot express flexbn's options, nor per-domain statistics. With ``strict=True`` (the
    default) a ``ValueError`` lists every layer with an option that differs from its default (e.g.
    ``detach_var=True``, or ``sync=True`` on a routed subclass of a non-synchronised class), every
    ``flexbn.DomainBatchNorm*`` and every user subclass of flexbn's classes, before anything is replaced.
    With ``strict=False`` the options are dropped (the layer then behaves as torch's) and the
    ``DomainBatchNorm*`` layers and flexbn subclasses are left as they are.

    Args:
        model: the module to convert.
        strict: raise on what torch cannot express, instead of dropping options and keeping flexbn layers
            that have no torch equivalent.

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
        ValueError: cannot convert to torch's batch norm: the root (flexbn.BatchNorm1d) has detach_var=True (strict=False drops the options and leaves the layers without a torch equivalent as they are)
    """
    _check_model(model)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, but got {type(strict).__name__} ({strict!r})")
    flex_sync = _loaded_flex_sync_class()

    plan: list[tuple[str, nn.Module, type[nn.Module], dict[str, Any]]] = []
    unroute: list[nn.Module] = []
    problems = []
    for name, module in model.named_modules():
        kind = type(module)
        if _is_routed(module):
            extra = {
                k: v for k, v in _routed_options(module).items() if not _is_default_option(k, v)
            }
            if kind._flexbn_sync and not issubclass(kind._flexbn_base, nn.SyncBatchNorm):
                extra["sync"] = True
            if extra:
                problems.append(f"{_label(name)} ({_describe(kind)}) has {_format_options(extra)}")
            unroute.append(module)
            continue
        if isinstance(module, modules._DomainBatchNorm):
            problems.append(f"{_label(name)} ({_describe(kind)}) has no torch equivalent")
            continue
        if kind in _FLEX_TO_TORCH:
            target: type[nn.Module] = _FLEX_TO_TORCH[kind]
        elif flex_sync is not None and kind is flex_sync:
            target = nn.SyncBatchNorm
        else:
            if isinstance(module, modules._FlexBatchNorm):
                problems.append(f"{_label(name)} ({_describe(kind)}) has no torch equivalent")
            continue
        extra = {k: v for k, v in _current_options(module).items() if not _is_default(kind, k, v)}
        if extra:
            problems.append(f"{_label(name)} ({_class_name(kind)}) has {_format_options(extra)}")
        plan.append((name, module, target, {}))
    if problems and strict:
        raise ValueError(
            "cannot convert to torch's batch norm: "
            + "; ".join(problems)
            + " (strict=False drops the options and leaves the layers without a torch equivalent as "
            "they are)"
        )

    built = {
        id(module): _build(name, module, target, {}, getattr(module, "process_group", None))
        for name, module, target, _ in plan
    }
    for module in unroute:
        _unroute(module)
    return _commit(model, plan, built)


# ----------------------------------------------------------------------------------------------------------
# planning


class _Step(NamedTuple):
    name: str
    module: nn.Module
    action: (
        str  # "build": a new object of ``target``; "route": route in place; "set": set attributes
    )
    target: type[nn.Module]  # the flexbn class whose constructor checks the options
    current: dict[str, Any]  # the layer's options now


def _plan(
    name: str,
    module: nn.Module,
    sync: bool,
    flex_sync: type[nn.Module] | None,
    options: Mapping[str, Any],
) -> _Step | str | None:
    """What :func:`convert` does to ``module``: a step, the reason it cannot (a str), or nothing (None)."""
    kind = type(module)
    asked = sync or bool(options)
    if kind in _TORCH_TO_FLEX or kind is nn.SyncBatchNorm:
        target = flex_sync if sync else _TORCH_TO_FLEX.get(kind) or _flex_sync_class()
        return _Step(name, module, "build", target, {})
    if kind in _FLEX_TO_TORCH or (flex_sync is not None and kind is flex_sync):
        if not asked:
            return None  # already what was asked for
        return _Step(name, module, "build", flex_sync if sync else kind, _current_options(module))
    if _is_routed(module):
        if not asked:
            return None
        target = _flex_counterpart(kind._flexbn_base, sync or kind._flexbn_sync)
        return _Step(name, module, "route", target, _routed_options(module))
    if isinstance(module, modules._DomainBatchNorm):
        if not asked:
            return None
        if sync:
            return "per-domain statistics are not synchronised across processes"
        accepted = _option_defaults(kind)
        lost = [k for k in options if k not in accepted]
        if lost:
            return f"it does not take {', '.join(lost)}"
        if "forward" in vars(kind) and modules._DomainBatchNorm.forward not in _reached(kind)[0]:
            return "its forward does not call flexbn's DomainBatchNorm forward, which reads the options"
        return _Step(name, module, "set", _public_base(kind), _current_options(module))
    if isinstance(module, modules._FlexBatchNorm):  # a user subclass of flexbn's classes
        if not asked:
            return None
        if sync and (flex_sync is None or not isinstance(module, flex_sync)):
            return (
                "convert cannot synchronise a subclass of flexbn's classes (derive it from "
                "flexbn.SyncBatchNorm)"
            )
        if modules._FlexBatchNorm.forward not in _reached(kind)[0]:
            return "its forward does not call flexbn's forward, which reads the options"
        return _Step(name, module, "set", _public_base(kind), _current_options(module))
    if isinstance(module, _BatchNorm):  # a subclass of torch's classes
        clash = sorted(k for k in (*_ROUTED_OPTIONS, "_flexbn_base") if hasattr(module, k))
        if sync and not isinstance(module, nn.SyncBatchNorm) and hasattr(module, "process_group"):
            clash.append("process_group")
        if clash:
            return f"it has attribute(s) of its own named as flexbn's options ({', '.join(clash)})"
        if not _reached(kind)[1]:
            return "its forward does not call torch.nn.functional.batch_norm"
        target = _flex_counterpart(kind, sync)
        return _Step(name, module, "route", target, {})
    return None


def _keep_options(step: _Step) -> dict[str, Any]:
    """``step.current`` that ``step.target`` takes; raises naming the layer for one it would lose."""
    accepted = _option_defaults(step.target)
    kind = type(step.module)
    lost = {
        k: v for k, v in step.current.items() if k not in accepted and not _is_default(kind, k, v)
    }
    if lost:
        raise ValueError(
            f"cannot convert {_label(step.name)} ({_class_name(kind)}) to "
            f"{_class_name(step.target)}: it does not take the option(s) {_format_options(lost)}"
        )
    return {k: v for k, v in step.current.items() if k in accepted}


def _validate(
    name: str, module: nn.Module, target: type[nn.Module], options: dict[str, Any]
) -> None:
    """Check ``options`` for ``module`` by building a ``target`` like it on the meta device."""
    kwargs: dict[str, Any] = {"device": "meta", "bias": module.bias is not None, **options}
    args: list[Any] = [max(int(module.num_features), 1)]
    if issubclass(target, modules._DomainBatchNorm):
        args.append(module.num_domains)
        kwargs["domain_affine"] = module.domain_affine
    args += [module.eps, module.momentum, module.affine, module.track_running_stats]
    try:
        target(*args, **kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"cannot convert {_label(name)} ({_describe(type(module))}) with these options: {err}"
        ) from err


def _flex_counterpart(cls: type[nn.Module], sync: bool) -> type[nn.Module]:
    """The flexbn class whose semantics a routed ``cls`` gets (and that a lazy one becomes)."""
    if sync or issubclass(cls, nn.SyncBatchNorm):
        return _flex_sync_class()
    torch_cls = getattr(cls, "cls_to_become", None) or cls
    for base, flex in _TORCH_TO_FLEX.items():
        if issubclass(torch_cls, base):
            return flex
    return modules.BatchNorm2d  # a direct _BatchNorm subclass: its own _check_input_dim stays


def _public_base(cls: type[nn.Module]) -> type[nn.Module]:
    """The first of flexbn's public classes in ``cls``'s MRO."""
    import flexbn

    return next(k for k in cls.__mro__ if getattr(flexbn, k.__name__, None) is k)


# ----------------------------------------------------------------------------------------------------------
# what a subclass's forward calls, read from its code (checked again at run time: see _Routed.forward)


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


@functools.cache
def _reached(cls: type) -> tuple[frozenset[Callable[..., Any]], bool]:
    """The functions ``cls.forward`` may run -- following ``super().forward`` and ``self.method`` calls
    through the classes of ``cls``'s MRO -- and whether one of them names ``batch_norm``."""
    seen: set[Callable[..., Any]] = set()
    names_bn = False

    def visit(owner: type, func: Any) -> None:
        nonlocal names_bn
        func = getattr(func, "__func__", func)
        code = getattr(func, "__code__", None)
        if code is None or func in seen or len(seen) > 64:
            return
        seen.add(func)
        names = _code_names(code)
        names_bn = names_bn or "batch_norm" in names
        mro = cls.__mro__
        if "super" in names and "forward" in names:
            later = mro[mro.index(owner) + 1 :] if owner in mro else ()
            parent = next((k for k in later if "forward" in vars(k)), None)
            if parent is not None and parent is not nn.Module:
                visit(parent, vars(parent)["forward"])
        for name in names - {"forward"}:
            holder = next((k for k in mro if name in vars(k)), None)
            if holder is not None and holder not in (nn.Module, object):
                visit(holder, vars(holder)[name])

    owner = next(k for k in cls.__mro__ if "forward" in vars(k))
    visit(owner, vars(owner)["forward"])
    return frozenset(seen), names_bn


# ----------------------------------------------------------------------------------------------------------
# routing: a layer's own F.batch_norm call runs as flexbn.batch_norm with the layer's options


class _BatchNormCall(NamedTuple):
    """The arguments of one ``batch_norm`` call, in ``torch.nn.functional.batch_norm``'s order."""

    input: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    training: bool
    momentum: float | Tensor
    eps: float


_F_ORDER = _BatchNormCall._fields
_TORCH_ORDER = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
)
_CALL_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_ROUTED_OPTIONS = ("detach_mean", "detach_var", "virtual_batch_size", "renorm", "rmax", "dmax")


def _bind(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _BatchNormCall:
    values = dict(zip(_F_ORDER if func is F.batch_norm else _TORCH_ORDER, args, strict=False))
    values.update(kwargs)
    return _BatchNormCall(*(values.get(k, _CALL_DEFAULTS.get(k)) for k in _F_ORDER))


def _owns(layer: nn.Module, call: _BatchNormCall) -> bool:
    """Whether ``call`` is the layer's own: made with one of its parameters or running buffers (all four
    ``None`` for a layer that has none)."""
    own = (layer.running_mean, layer.running_var, layer.weight, layer.bias)
    passed = (call.running_mean, call.running_var, call.weight, call.bias)
    if all(t is None for t in own):
        return all(t is None for t in passed)
    return any(t is not None and p is t for p, t in zip(passed, own, strict=True))


class _LayerCalls(TorchFunctionMode):
    """Active during one layer's ``forward``: its own ``batch_norm`` calls (``torch.nn.functional.
    batch_norm`` or ``torch.batch_norm``) run as ``handle(layer, call)``; every other call runs as it is.
    ``found`` gets one entry per call handled (a list, which ``torch.compile`` can trace)."""

    def __init__(
        self,
        layer: nn.Module,
        handle: Callable[[nn.Module, _BatchNormCall], Tensor],
        found: list[int],
    ) -> None:
        super().__init__()
        self.layer, self.handle, self.found = layer, handle, found

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm or func is torch.batch_norm:
            call = _bind(func, args, kwargs)
            if _owns(self.layer, call):
                self.found.append(1)
                return self.handle(self.layer, call)
        return func(*args, **kwargs)


def _routed_call(layer: nn.Module, call: _BatchNormCall) -> Tensor:
    """``call`` as :func:`flexbn.batch_norm` with ``layer``'s options (and its process group)."""
    group = None
    if type(layer)._flexbn_sync and layer.training and call.training:
        group = _flex_sync_class()._sync_group(layer)
    return functional.batch_norm(
        *call,
        detach_mean=layer.detach_mean,
        detach_var=layer.detach_var,
        virtual_batch_size=layer.virtual_batch_size,
        renorm=layer.renorm,
        rmax=layer.rmax,
        dmax=layer.dmax,
        process_group=group,
    )


def _plain_call(layer: nn.Module, call: _BatchNormCall) -> Tensor:
    """``call`` as ``torch.nn.functional.batch_norm`` (what an unconverted layer computes)."""
    return F.batch_norm(*call)


class _Routed:
    """First base of the class :func:`convert` gives a subclass of torch's batch norm (see
    :func:`_routed_class`): its ``forward`` runs the layer's own with its ``batch_norm`` calls routed."""

    _flexbn_base: type[nn.Module]  # the layer's own class
    _flexbn_sync: bool

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, _Routed):  # a lazy layer that became its flexbn class in this call
            return type(self).forward(self, *args, **kwargs)
        handle = self.__dict__.get("_flexbn_handle", _routed_call)  # flexbn audit observes calls
        found: list[int] = []
        with _LayerCalls(self, handle, found):  # type: ignore[arg-type]
            out = super().forward(*args, **kwargs)  # type: ignore[misc]
        if not found and _asks(self):
            raise RuntimeError(
                f"{type(self).__name__} was converted by flexbn.convert with "
                f"{_format_options(_asked(self))}, but this forward made no "
                "torch.nn.functional.batch_norm call with the layer's own parameters or running "
                "buffers, so they were not applied (convert_to_torch(model, strict=False) undoes the "
                "conversion)"
            )
        return out

    def extra_repr(self) -> str:
        rep = super().extra_repr()  # type: ignore[misc]
        asked = _asked(self)
        return rep + "".join(f", {k}={v!r}" for k, v in asked.items())

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The made class is found again from the layer's own (importable) class when unpickled.
        kind = type(self)
        return (_new_routed, (kind._flexbn_base, kind._flexbn_sync), dict(self.__dict__))

    def __prepare_scriptable__(self) -> nn.Module:
        return prepare_scriptable(self)  # type: ignore[arg-type]


class _SyncForward(nn.SyncBatchNorm):
    """After a user's ``torch.nn.SyncBatchNorm`` subclass in a routed class's MRO: torch's forward without
    its CUDA-only collective, so that the layer's ``F.batch_norm`` call is routed (flexbn synchronises it on
    any backend)."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return _BatchNorm.forward(self, input)


@functools.cache
def _routed_class(base: type[nn.Module], sync: bool) -> type[nn.Module]:
    """The subclass of ``base`` that a routed layer of class ``base`` becomes (one per base and sync)."""
    bases: tuple[type, ...] = (_Routed, base)
    if issubclass(base, nn.SyncBatchNorm):
        bases += (_SyncForward,)
    namespace: dict[str, Any] = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "_flexbn_base": base,
        "_flexbn_sync": sync or issubclass(base, nn.SyncBatchNorm),
    }
    becomes = getattr(base, "cls_to_become", None)  # a lazy layer's class once materialized
    if becomes is not None:
        exact = becomes in _TORCH_TO_FLEX or becomes is nn.SyncBatchNorm
        namespace["cls_to_become"] = (
            _flex_counterpart(becomes, sync) if exact else _routed_class(becomes, sync)
        )
    return type(base.__name__, bases, namespace)


def _new_routed(base: type[nn.Module], sync: bool) -> nn.Module:
    cls = _routed_class(base, sync)
    return cls.__new__(cls)


def _is_routed(module: object) -> bool:
    return isinstance(module, _Routed)


@functools.cache
def _library_forwards() -> tuple[Callable[..., Any], ...]:
    return (
        _BatchNorm.forward,
        nn.SyncBatchNorm.forward,
        modules._FlexBatchNorm.forward,
        _flex_sync_class().forward,
        modules._DomainBatchNorm.forward,
    )


def _has_own_forward(module: nn.Module) -> bool:
    """Whether the layer's class (its own, for a routed layer) has a ``forward`` that is not torch's or
    flexbn's, which may compute more than batch norm (an activation after it)."""
    kind = type(module)._flexbn_base if _is_routed(module) else type(module)
    return kind.forward not in _library_forwards()


def _routed_options(module: nn.Module) -> dict[str, Any]:
    return {k: getattr(module, k) for k in _ROUTED_OPTIONS}


def _is_default_option(name: str, value: Any) -> bool:
    return _is_default(modules.BatchNorm2d, name, value)


def _asked(module: nn.Module) -> dict[str, Any]:
    """What a routed layer was asked for: its options that are not the default, and sync."""
    asked = {k: v for k, v in _routed_options(module).items() if not _is_default_option(k, v)}
    if type(module)._flexbn_sync and not issubclass(type(module)._flexbn_base, nn.SyncBatchNorm):
        asked["sync"] = True
    return asked


def _asks(module: nn.Module) -> bool:
    return bool(_asked(module))


def _route(module: nn.Module, sync: bool, options: dict[str, Any], process_group: Any) -> None:
    base = type(module)._flexbn_base if _is_routed(module) else type(module)
    sync = sync or (_is_routed(module) and type(module)._flexbn_sync)
    defaults = _option_defaults(modules.BatchNorm2d)
    for key in _ROUTED_OPTIONS:
        setattr(module, key, options.get(key, getattr(module, key, defaults[key])))
    if sync and (process_group is not None or not hasattr(module, "process_group")):
        module.process_group = process_group
    module.__class__ = _routed_class(base, sync)


def _unroute(module: nn.Module) -> None:
    kind = type(module)
    for key in _ROUTED_OPTIONS:
        module.__dict__.pop(key, None)
    if kind._flexbn_sync and not issubclass(kind._flexbn_base, nn.SyncBatchNorm):
        module.__dict__.pop("process_group", None)
    module.__dict__.pop("_flexbn_handle", None)
    module.__class__ = kind._flexbn_base


# ----------------------------------------------------------------------------------------------------------
# TorchScript


def prepare_scriptable(module: nn.Module) -> nn.Module:
    """What ``torch.jit.script`` compiles in place of a flexbn batch-norm layer (its
    ``__prepare_scriptable__``): torch's equivalent layer sharing its parameters and buffers -- for a
    layer without options, which computes what torch's does -- or a ``ValueError`` naming the options
    TorchScript cannot express. Like every ``__prepare_scriptable__``, the result replaces the layer in
    its parent, so ``torch.jit.script(model)`` leaves torch's layers in ``model`` too (they compute the
    same; ``flexbn.convert`` brings flexbn's back).

    Example:
        >>> import torch, flexbn
        >>> type(flexbn.BatchNorm2d(4).__prepare_scriptable__())
        <class 'torch.nn.modules.batchnorm.BatchNorm2d'>
    """
    kind = type(module)
    if _is_routed(module):
        asked = _asked(module)
        target: type[nn.Module] = kind._flexbn_base
    else:
        flex_sync = _loaded_flex_sync_class()
        if kind in _FLEX_TO_TORCH:
            target = _FLEX_TO_TORCH[kind]
        elif flex_sync is not None and kind is flex_sync:
            target = nn.SyncBatchNorm
        else:
            raise ValueError(
                f"torch.jit.script cannot compile {_describe(kind)}, a user subclass of flexbn's "
                "batch norm: TorchScript does not know flexbn's forward (use torch.compile or "
                "torch.export)"
            )
        asked = {k: v for k, v in _current_options(module).items() if not _is_default(kind, k, v)}
    if issubclass(target, nn.SyncBatchNorm):
        raise ValueError(
            f"torch.jit.script cannot compile {_describe(kind)}: TorchScript cannot compile torch's "
            "SyncBatchNorm either (its torch.distributed calls); use torch.compile or torch.export"
        )
    if asked:
        raise ValueError(
            f"torch.jit.script cannot compile {_describe(kind)} with {_format_options(asked)}: "
            "TorchScript runs only torch's batch norm (use torch.compile or torch.export, or, for "
            "inference, where these options change nothing, flexbn.convert_to_torch(model, "
            "strict=False) before scripting)"
        )
    if _is_routed(module):
        twin = target.__new__(target)
        twin.__dict__.update(module.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            twin.__dict__[key] = dict(module.__dict__[key])
        for key in (*_ROUTED_OPTIONS, "_flexbn_handle"):
            twin.__dict__.pop(key, None)
        return twin
    twin = _build("", module, target, {}, getattr(module, "process_group", None))
    _transfer(module, twin)
    return twin


# ----------------------------------------------------------------------------------------------------------
# building and swapping layers


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


def _describe(cls: type) -> str:
    """The public name of one of torch's or flexbn's classes, else ``module.Name, a <base> subclass``."""
    if _is_routed_class(cls):
        cls = cls._flexbn_base  # type: ignore[attr-defined]
    if _is_public(cls):
        return _class_name(cls)
    base = next((k for k in cls.__mro__[1:] if _is_public(k)), None)
    own = f"{cls.__module__}.{cls.__qualname__}"
    return f"{own}, a {_class_name(base)} subclass" if base is not None else own


def _is_public(cls: type) -> bool:
    import flexbn

    return any(getattr(ns, cls.__name__, None) is cls for ns in (nn, flexbn))


def _is_routed_class(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, _Routed)


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
