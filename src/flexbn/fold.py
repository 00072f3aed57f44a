"""Deployment: fold eval-mode batch norms into the convolution or linear layer before them.

In eval mode a batch norm with running statistics is an affine map per channel,
``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, so a convolution or linear layer
whose output goes to it alone can absorb it: :func:`fold` rewrites that layer's weight and bias and puts an
``nn.Identity`` in the batch norm's place -- for torch's and flexbn's layers alike (flexbn's options only
change training). :func:`fuse_modules` is ``torch.ao.quantization.fuse_modules`` with fuser methods for
flexbn's classes (the quantization workflow's explicit list of modules to fuse).
"""

from __future__ import annotations

import collections
import copy
import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import modules
from .convert import _describe, _flex_sync_class, _has_own_forward, convert_to_torch
from .population import _is_frozen

__all__ = ["fold", "fuse_modules"]

# The batch norm each layer kind can absorb: the channel dimension of its output is the norm's.
_CONV_DIMS = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.ConvTranspose1d: nn.BatchNorm1d,
    nn.ConvTranspose2d: nn.BatchNorm2d,
    nn.ConvTranspose3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}


def fold(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every batch norm that uses its running statistics into the convolution or linear layer
    whose output goes to it alone: the layer gets the folded weight and bias, and the batch norm becomes
    ``nn.Identity`` (a ``BatchNorm1d`` after a ``Linear``: a check that the input is ``(N, C)``, the only
    shape for which that fold is right).

    Pairs are found by tracing ``model.forward`` with ``torch.fx`` (batch-norm, convolution and linear
    layers as leaves), as torch's ``torch.fx.experimental.optimization.fuse`` does: a ``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d`` (``groups=1``) or ``Linear`` called once, whose only user is a batch-norm
    layer called once on it alone, and whose parameters nothing else reads. The batch norm may be torch's
    or flexbn's (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, options included, and a subclass that keeps
    the library's ``forward``). If the model cannot be traced (Python control flow on tensors), only
    pairs of consecutive layers in an ``nn.Sequential`` are folded, with a ``UserWarning`` saying why.

    Every batch norm to fold must normalize with its running statistics now -- eval mode, or frozen by
    :func:`flexbn.freeze` -- else ``ValueError`` (call ``model.eval()`` first), before anything changes.
    A batch norm after such a layer that cannot be folded is named in a ``UserWarning`` and left as it
    is: ``DomainBatchNorm*`` (per-domain statistics: one layer holds one set), a layer without running
    statistics (it normalizes with batch statistics in eval), a subclass with a ``forward`` of its own
    (timm's ``BatchNormAct2d``: it computes more than batch norm), layers with hooks or parametrizations.

    The folded weights are computed in float64 and rounded once to the layer's dtype; the output then
    equals the unfolded model's to that dtype's rounding (float32: a few units in the last place of the
    activations, measured in ``docs/deploy.md``).

    Args:
        model: the model to fold (in eval mode).
        inplace: fold ``model`` itself instead of a deep copy.

    Returns:
        The folded model (a copy unless ``inplace``).

    Example:
        >>> import torch, flexbn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), flexbn.BatchNorm2d(4), torch.nn.ReLU())
        >>> folded = flexbn.fold(model.eval())
        >>> folded
        Sequential(
          (0): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(folded(x), model(x), atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, but got {type(inplace).__name__} ({inplace!r})")
    pairs, why_not_traced = _pairs(model)
    if why_not_traced is not None:
        warnings.warn(
            f"flexbn.fold could not trace {type(model).__name__}.forward with torch.fx "
            f"({why_not_traced}); only batch norms right after a convolution or linear layer in an "
            "nn.Sequential are folded",
            UserWarning,
            stacklevel=2,
        )
    names = {id(m): name for name, m in model.named_modules()}
    training = []
    skipped = []
    foldable = []
    for layer, bn in pairs:
        reason = _why_not(layer, bn)
        if reason is not None:
            skipped.append(f"{names[id(bn)]!r} ({_describe(type(bn))}): {reason}")
        elif bn.training and not _is_frozen(bn):
            training.append(repr(names[id(bn)]))
        else:
            foldable.append((names[id(layer)], names[id(bn)]))
    if training:
        raise ValueError(
            "flexbn.fold needs batch norms that normalize with their running statistics, but "
            f"{', '.join(training)} {'is' if len(training) == 1 else 'are'} in training mode: call "
            "model.eval() first (folding is for inference)"
        )
    if skipped:
        warnings.warn(
            f"flexbn.fold left {len(skipped)} batch norm(s) after a convolution or linear layer as "
            f"they are: {'; '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    if not inplace:
        model = copy.deepcopy(model)
    for layer_name, bn_name in foldable:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        _fold_into(layer, bn)
        replacement = (
            _CheckTwoDims(bn.num_features) if isinstance(layer, nn.Linear) else nn.Identity()
        )
        _replace(model, bn, replacement)
    return model


def _pairs(model: nn.Module) -> tuple[list[tuple[nn.Module, nn.Module]], str | None]:
    """(layer, batch norm) pairs of ``model``, and why it could not be traced (None if it was)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        return _sequential_pairs(model), f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    read = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
            continue
        layer = model.get_submodule(str(node.target))
        (user,) = node.users
        if not isinstance(layer, tuple(_CONV_DIMS)) or user.op != "call_module":
            continue
        bn = model.get_submodule(str(user.target))
        if not isinstance(bn, (_BatchNorm, modules._DomainBatchNorm)):
            continue
        # Extra arguments (a domain id, flexbn's mask=) do not matter with running statistics.
        if calls[user.target] != 1 or user.args[:1] != (node,):
            continue
        prefixes = (f"{node.target}.", f"{user.target}.")
        if any(r.startswith(prefixes) for r in read):
            continue
        pairs.append((layer, bn))
    return pairs, None


def _sequential_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        children = list(seq)
        for layer, bn in itertools.pairwise(children):
            if (
                isinstance(layer, tuple(_CONV_DIMS))
                and isinstance(bn, (_BatchNorm, modules._DomainBatchNorm))
                and uses[id(layer)] == 1
                and uses[id(bn)] == 1
            ):
                pairs.append((layer, bn))
    return pairs


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaves = (_BatchNorm, modules._DomainBatchNorm, *_CONV_DIMS)
        return isinstance(m, leaves) or super().is_leaf_module(m, module_qualified_name)


def _why_not(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (None: it can)."""
    if isinstance(bn, modules._DomainBatchNorm):
        return "per-domain statistics: a layer holds one set"
    if _has_own_forward(bn):
        return "its class has a forward of its own, which may compute more than batch norm"
    if nn.parameter.is_lazy(bn.weight) or nn.parameter.is_lazy(layer.weight):
        return "an uninitialized lazy module (run a forward first)"
    wanted = next(norm for kind, norm in _CONV_DIMS.items() if isinstance(layer, kind))
    if not isinstance(bn, (wanted, nn.SyncBatchNorm, _flex_sync_class())):
        return f"it does not normalize the channels of a {type(layer).__name__}"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (it normalizes with batch statistics in eval)"
    channels = layer.out_channels if isinstance(layer, _ConvNd) else layer.out_features
    if channels != bn.num_features:
        return f"{channels} output channels for {bn.num_features} features"
    if isinstance(layer, _ConvNd) and layer.transposed and layer.groups != 1:
        return "a grouped transposed convolution"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return "the layer before it is parametrized"
    hooks = [
        h
        for d in (bn._forward_pre_hooks, bn._forward_hooks, bn._backward_hooks)
        for h in d.values()
        if getattr(h, "__module__", None) != "flexbn.population"
    ]
    if hooks or layer._forward_hooks or layer._backward_hooks:
        return "hooks on it or on the layer before it (they would see other values)"
    return None


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Give ``layer`` the weight and bias of ``bn(layer(x))``, computed in float64."""
    weight: Tensor = layer.weight
    channels = bn.num_features
    factor = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    shift = -bn.running_mean.double() * factor
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
    transposed = isinstance(layer, _ConvNd) and layer.transposed
    shape = [1, channels] if transposed else [channels, 1]
    shape += [1] * (weight.dim() - 2)
    new_weight = (weight.double() * factor.reshape(shape)).to(weight.dtype)
    new_bias = (bias * factor + shift).to(weight.dtype)
    layer.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[name] = new


class _CheckTwoDims(nn.Module):
    """In place of a ``BatchNorm1d`` folded into the ``Linear`` before it: that fold holds for ``(N, C)``
    input only (on ``(N, C, L)`` the batch norm normalized dimension 1, not the ``Linear``'s features)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 2:
            raise ValueError(
                "this BatchNorm1d was folded by flexbn.fold into the Linear before it, which holds for "
                "(N, C) input only, but got " + str(input.dim()) + "D input"
            )
        return input

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into the Linear before it"


# ----------------------------------------------------------------------------------------------------------
# torch.ao.quantization.fuse_modules


def fuse_modules(
    model: nn.Module,
    modules_to_fuse: Sequence[Any],
    *,
    inplace: bool = False,
    qat: bool = False,
) -> nn.Module:
    """``torch.ao.quantization.fuse_modules`` (``fuse_modules_qat`` with ``qat=True``) that also fuses
    flexbn's ``BatchNorm1d/2d/3d``: the same fusions as for torch's classes (conv + bn [+ relu],
    linear + bn, bn + relu, transposed conv + bn), done by torch's own fuser methods on a torch layer that
    shares the flexbn layer's tensors.

    For post-training quantization (eval mode) a flexbn layer's options are irrelevant (they only change
    training) and it fuses as torch's does. For quantization-aware training (``qat=True``, training mode)
    torch's fused modules take over the batch norm's computation, so a layer with options or frozen by
    :func:`flexbn.freeze` raises ``ValueError`` (the training would silently lose them).

    Args:
        model: the model.
        modules_to_fuse: lists of module names, as for ``torch.ao.quantization.fuse_modules``.
        inplace: fuse ``model`` itself instead of a copy.
        qat: ``torch.ao.quantization.fuse_modules_qat`` (training mode) instead.

    Returns:
        The model with fused modules (a copy unless ``inplace``).

    Example:
        >>> import torch, flexbn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), flexbn.BatchNorm2d(4), torch.nn.ReLU())
        >>> flexbn.fuse_modules(model.eval(), [["0", "1", "2"]])
        Sequential(
          (0): ConvReLU2d(
            (0): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1))
            (1): ReLU()
          )
          (1): Identity()
          (2): Identity()
        )
    """
    from torch.ao.quantization import fuse_modules as torch_fuse
    from torch.ao.quantization import fuse_modules_qat

    config = {"additional_fuser_method_mapping": fuser_methods()}
    fuse = fuse_modules_qat if qat else torch_fuse
    return fuse(model, modules_to_fuse, inplace=inplace, fuse_custom_config_dict=config)


def fuser_methods() -> dict[tuple[type[nn.Module], ...], Callable[..., nn.Module]]:
    """The fuser methods for flexbn's classes, for ``torch.ao.quantization.fuse_modules``'s
    ``fuse_custom_config_dict={"additional_fuser_method_mapping": fuser_methods()}``: each of torch's
    patterns with a torch batch norm, with flexbn's class in its place."""
    from torch.ao.quantization.fuser_method_mappings import get_fuser_method

    flex = {
        nn.BatchNorm1d: modules.BatchNorm1d,
        nn.BatchNorm2d: modules.BatchNorm2d,
        nn.BatchNorm3d: modules.BatchNorm3d,
    }
    patterns: list[tuple[type[nn.Module], ...]] = []
    for conv, bn in _CONV_DIMS.items():
        patterns.append((conv, bn))
        if conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            patterns.append((conv, bn, nn.ReLU))
    patterns += [(nn.BatchNorm2d, nn.ReLU), (nn.BatchNorm3d, nn.ReLU)]
    return {
        tuple(flex.get(t, t) for t in pattern): _on_torch_batch_norm(get_fuser_method(pattern))
        for pattern in patterns
    }


def _on_torch_batch_norm(fuser: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def fuse(is_qat: bool, *mods: nn.Module) -> nn.Module:
        return fuser(is_qat, *(_torch_twin(m, is_qat) for m in mods))

    return fuse


def _torch_twin(module: nn.Module, is_qat: bool) -> nn.Module:
    if not isinstance(module, modules._FlexBatchNorm):
        return module
    if is_qat and _is_frozen(module):
        raise ValueError(
            f"cannot fuse {_describe(type(module))} for quantization-aware training: it is frozen by "
            "flexbn.freeze, and torch's fused modules would train its statistics (unfreeze it, or fuse "
            "in eval mode)"
        )
    # For training, convert_to_torch raises on options torch's fused modules would lose.
    return convert_to_torch(module, strict=is_qat)
