"""Inference statistics (axis P): recompute them exactly from data, or freeze them.

* :func:`recompute_stats` -- precise BN (Wu & Johnson 2021) / AdaBN (Li et al. 2016): every batch-norm
  layer's running statistics become the exact population mean and unbiased variance of its input over a
  stream of batches, as the current model produces it.
* :func:`freeze` / :func:`unfreeze` -- batch-norm layers that normalize with their running statistics and
  never update them, whatever the train mode (FrozenBatchNorm semantics, affine parameters still trained).

Both act on torch's batch norms (any ``torch.nn.modules.batchnorm._BatchNorm``: ``BatchNorm1d/2d/3d``,
``SyncBatchNorm``, subclasses such as flexbn's) and on ``flexbn.DomainBatchNorm*``.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._core import reference, stats
from ._core.segments import Segments
from .modules import _DomainBatchNorm

__all__ = ["freeze", "recompute_stats", "unfreeze"]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm, _DomainBatchNorm)


def _bn_layers(model: object, caller: str) -> list[tuple[str, nn.Module]]:
    """The batch-norm layers of ``model`` that have running statistics, with their names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, not {type(model).__name__}")
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BN_TYPES)
        and getattr(m, "running_mean", None) is not None
        and getattr(m, "running_var", None) is not None
    ]
    if not layers:
        raise ValueError(
            f"{caller}: expected a model with at least one batch-norm layer with running statistics "
            "(torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm, flexbn.BatchNorm*, flexbn.DomainBatchNorm* with "
            f"track_running_stats=True), but {type(model).__name__} has none"
        )
    for name, m in layers:
        if nn.parameter.is_lazy(m.running_mean):
            raise ValueError(
                f"{caller}: the lazy batch-norm layer {name or '(model)'} is not initialized yet; run one "
                "forward pass first"
            )
    return layers


# ----------------------------------------------------------------------------------------------------------
# freeze / unfreeze: a forward pre-hook switches ``training`` off for the call, a forward hook with
# ``always_call=True`` switches it back (also when the forward raises). Both are module-level functions, so a
# frozen model deep-copies and pickles with its hooks; the state_dict is untouched.

_STASH = "_flexbn_frozen_training"


def _frozen_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    module.__dict__[_STASH] = module.training
    module.training = False


def _frozen_post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    if _STASH in module.__dict__:  # absent if an earlier pre-hook raised before ours ran
        module.training = module.__dict__.pop(_STASH)


def _is_frozen(module: nn.Module) -> bool:
    return any(h is _frozen_pre_hook for h in module._forward_pre_hooks.values())


def _set_frozen(module: nn.Module, frozen: bool) -> None:
    if frozen == _is_frozen(module):
        return
    if frozen:
        # First among the pre-hooks, so hooks registered by the user see the eval mode the layer runs in.
        module.register_forward_pre_hook(_frozen_pre_hook, prepend=True)
        module.register_forward_hook(_frozen_post_hook, always_call=True)
        return
    for key in [k for k, h in module._forward_pre_hooks.items() if h is _frozen_pre_hook]:
        del module._forward_pre_hooks[key]
    for key in [k for k, h in module._forward_hooks.items() if h is _frozen_post_hook]:
        del module._forward_hooks[key]
        module._forward_hooks_always_called.pop(key, None)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every batch-norm layer of ``model``: normalize with the running statistics, never update them.

    Whatever ``model.train()`` / ``model.eval()`` say, each batch-norm layer with running statistics
    (torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, flexbn's ``BatchNorm*`` and ``DomainBatchNorm*``)
    runs its forward in eval mode: the running mean and variance normalize, no buffer changes
    (``num_batches_tracked`` included) and ``SyncBatchNorm`` does not communicate. The affine weight and bias
    stay ordinary parameters: gradient reaches them and the input, as in eval mode (FrozenBatchNorm
    semantics, without replacing any module). Layers with ``track_running_stats=False`` have nothing to
    freeze and are left alone.

    How: a forward pre-hook sets the layer's ``training`` to ``False`` for the duration of each call and a
    forward hook (``always_call=True``, so also when the forward raises) restores it. ``module.training``
    therefore keeps reporting what ``model.train()`` / ``model.eval()`` set; only the layer's forward ignores
    it. The hooks survive ``model.train()``, ``copy.deepcopy`` and pickling; the ``state_dict`` is unchanged
    (same keys, nothing about freezing in it, so loading it into another model does not freeze that one).
    Idempotent; :func:`unfreeze` undoes it. :func:`recompute_stats` on a frozen model recomputes the frozen
    layers too (they run like the others during its pass) and leaves them frozen.

    Returns ``model``. Raises ``ValueError`` if it has no batch-norm layer with running statistics.

    Example:
        >>> import torch, flexbn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), flexbn.BatchNorm2d(4)).train()
        >>> before = model[1].running_mean.clone()
        >>> y = flexbn.freeze(model)(torch.randn(2, 3, 5, 5))
        >>> torch.equal(model[1].running_mean, before), model.training
        (True, True)
    """
    for _, m in _bn_layers(model, "freeze"):
        _set_frozen(m, True)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: batch-norm layers follow ``model.train()`` / ``model.eval()`` again.

    Idempotent (a layer that is not frozen is left as it is). Returns ``model``. Raises ``ValueError`` if it
    has no batch-norm layer with running statistics.

    Example:
        >>> import torch, flexbn
        >>> model = flexbn.freeze(torch.nn.Sequential(flexbn.BatchNorm1d(4))).train()
        >>> y = flexbn.unfreeze(model)(torch.randn(8, 4))
        >>> int(model[0].num_batches_tracked)  # training again: the running statistics were updated
        1
    """
    for _, m in _bn_layers(model, "unfreeze"):
        _set_frozen(m, False)
    return model


# ----------------------------------------------------------------------------------------------------------
# recompute_stats


class _Population:
    """Exact running population moments of one layer, per (segment, channel): the statistics currency
    (``count`` ``(S,)``, ``mean`` and ``m2`` ``(S, C)``, float64), merged batch after batch with Chan's
    formulas (``stats.merge``: no ``E[x^2] - E[x]^2``), and ``calls`` ``(S,)``, the forward calls that brought
    elements; ``S`` is ``num_domains`` for ``DomainBatchNorm``, else 1."""

    def __init__(self, segments: int, channels: int, device: torch.device) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.moments = stats.Moments(
            torch.zeros(segments, **f64),
            torch.zeros(segments, channels, **f64),
            torch.zeros(segments, channels, **f64),
        )
        self.calls = torch.zeros(segments, dtype=torch.long, device=device)

    def merge(self, m: stats.Moments) -> None:
        self.moments = stats.merge(self.moments, m)
        self.calls += (m.count > 0).long()


def _accumulate(pop: _Population, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    """Forward hook (after the layer validated its arguments): add this call's input to the population."""
    x = kwargs.get("stats_input")
    if x is None:
        x = args[0] if args else kwargs["input"]
    if x.numel() == 0:
        return
    mask = kwargs.get("mask")
    ids, num = None, 1
    if isinstance(module, _DomainBatchNorm):
        domain = args[1] if len(args) > 1 else kwargs["domain"]
        ids, num = domain.long(), module.num_domains
    # float64 moments of the batch (MPS has no float64: its corrected two-pass float32 moments, merged in
    # float64 on the CPU).
    x = x.detach().to(torch.float32 if x.device.type == "mps" else torch.float64)
    m = reference.moments(x, Segments(ids, num, mask))
    dev = pop.moments.mean.device
    pop.merge(stats.Moments(*(t.to(device=dev, dtype=torch.float64) for t in m)))


def _all_gather_merge(pop: _Population, module: nn.Module) -> None:
    """Merge the populations of every process of a synchronised layer's group (its forward in training is
    a collective already, so every process is in this pass)."""
    import torch.distributed as dist

    group = module.process_group or dist.group.WORLD
    if dist.get_world_size(group) < 2:
        return
    m = pop.moments
    calls = pop.calls.to(m.count.dtype).reshape(-1, 1)
    packed = torch.cat([m.count.reshape(-1, 1), m.mean, m.m2, calls], 1)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    channels = m.mean.shape[1]
    merged = _Population(m.mean.shape[0], channels, m.mean.device)
    for part in parts:
        n, mean, m2, _ = part.split([1, channels, channels, 1], 1)
        merged.merge(stats.Moments(n.reshape(-1), mean, m2))
    # The most calls any process made: the same num_batches_tracked on every rank, also on one whose
    # share of the data was empty.
    most = torch.stack([part[:, -1] for part in parts]).amax(0).to(pop.calls.dtype)
    pop.moments, pop.calls = merged.moments, most


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(
                "recompute_stats: got an empty tuple/list batch; pass forward= to feed it"
            )
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        "recompute_stats: the default forward feeds a Tensor, a tuple/list (its first element) or a dict "
        f"(as keyword arguments), but got a batch of type {type(batch).__name__}; pass "
        "forward=lambda model, batch: ... to say how to call the model"
    )


def _progress_bar(batches: Iterable[Any], max_batches: int | None) -> Any:
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise ImportError(
            "recompute_stats(progress=True) needs tqdm, an optional dependency: "
            "pip install 'flexbn[progress]' (or pip install tqdm)"
        ) from err
    try:
        total: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(batches, total=total, desc="recompute_stats", unit="batch")


def recompute_stats(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> nn.Module:
    """Set every batch-norm layer's running statistics to the exact population statistics of the data.

    Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm") when ``batches`` is training data;
    AdaBN (Li et al. 2016) when it is data of a new domain. One pass over ``batches`` under
    ``torch.no_grad()`` with the model in eval mode (dropout off) except its batch-norm layers, which run in
    training mode and so normalize with their batch statistics, as in ``torch.optim.swa_utils.update_bn``
    and fvcore's ``update_bn_stats``. Each layer's ``running_mean`` / ``running_var`` then become the mean
    and unbiased variance of every element it took statistics over, across all batches:

    * per channel -- per (domain, channel) for ``flexbn.DomainBatchNorm*`` (buffers ``(num_domains, C)``);
    * honouring the ``mask=`` (real elements only) and ``stats_input=`` (that tensor's statistics) keyword
      arguments of the layer's call; ``groups=`` and ghost batches (``virtual_batch_size``) only choose the
      batch statistics that normalize during the pass -- the population is still every element;
    * computed in float64 per batch and merged exactly across batches of any sizes (Chan et al.'s parallel
      formula), so a channel with a mean of 1e4 and std 0.1 keeps its variance to float32 rounding;
    * a layer called several times per batch pools the inputs of all its calls;
    * ``SyncBatchNorm`` layers (anything with a ``process_group``), when ``torch.distributed`` is
      initialized, merge the populations of all processes of their group (their forward is a collective,
      so every process runs this pass); other layers use the data this process sees.

    ``num_batches_tracked`` becomes the number of forward calls that brought the layer elements (per
    domain for ``DomainBatchNorm``; for a layer synchronised across processes the most any process made,
    the same on every rank), as ``update_bn`` leaves it. A layer the data never reaches keeps its
    buffers and a ``UserWarning`` names it; a domain absent from the data keeps its rows silently (AdaBN
    on one domain is the point). Layers with ``track_running_stats=False`` are skipped. Each module's
    train/eval state is restored and nothing else is changed (``momentum``, hooks, frozen layers of
    :func:`freeze` stay frozen but are recomputed too, running like the others during the pass); if the
    pass raises, the running buffers are restored as well.

    Args:
        model: a module containing batch-norm layers.
        batches: an iterable of batches (a ``DataLoader``, a list, a generator).
        forward: ``forward(model, batch)`` feeds one batch (move it to the device, unpack a dict, ...).
            Default: a Tensor batch is ``model(batch)``, a tuple or list ``model(batch[0])`` (as
            ``update_bn``), a dict ``model(**batch)``.
        max_batches: use at most this many batches (an int >= 1; a generator is not read past them).
        progress: show a tqdm progress bar (optional dependency: ``pip install 'flexbn[progress]'``).

    Returns:
        ``model``, with its running statistics replaced.

    Raises:
        ValueError: no batch-norm layer with running statistics, no batch in ``batches``, a bad
            ``max_batches``, a non-callable ``forward``.
        TypeError: ``model`` not a module, ``progress`` not a bool, a batch the default forward cannot
            feed.
        ImportError: ``progress=True`` without tqdm installed.

    Example:
        >>> import torch, flexbn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), flexbn.BatchNorm1d(4))
        >>> data = [torch.randn(n, 3) for n in (5, 7, 2)]                # uneven batches
        >>> _ = flexbn.recompute_stats(model, data)
        >>> with torch.no_grad():
        ...     h = model[0](torch.cat(data)).double()
        >>> torch.allclose(model[1].running_var.double(), h.var(0), rtol=1e-5)
        True
    """
    layers = _bn_layers(model, "recompute_stats")
    if forward is not None and not callable(forward):
        raise ValueError(
            "recompute_stats: forward must be a callable forward(model, batch) or None, but got "
            f"{type(forward).__name__}"
        )
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ValueError(
            f"recompute_stats: max_batches must be None or an int >= 1, got {max_batches!r}"
        )
    if not isinstance(progress, bool):
        raise TypeError(f"recompute_stats: progress must be a bool, got {type(progress).__name__}")
    feed = _default_forward if forward is None else forward
    iterable = _progress_bar(batches, max_batches) if progress else batches

    modes = [(m, m.training) for m in model.modules()]
    frozen = [m for _, m in layers if _is_frozen(m)]
    backup = {m: [b.clone() for b in _buffers(m)] for _, m in layers}
    pops: dict[nn.Module, _Population] = {}
    handles = []
    ok = False
    try:
        for _, m in layers:
            segments = m.num_domains if isinstance(m, _DomainBatchNorm) else 1
            device = m.running_mean.device
            device = torch.device("cpu") if device.type == "mps" else device  # MPS: no float64
            pops[m] = _Population(segments, m.running_mean.shape[-1], device)
            hook = functools.partial(_accumulate, pops[m])
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
            _set_frozen(m, False)
        model.eval()
        for _, m in layers:
            m.training = True
        seen = 0
        with torch.no_grad():
            for batch in itertools.islice(iterable, max_batches):
                feed(model, batch)
                seen += 1
        if seen == 0:
            raise ValueError("recompute_stats: batches yielded no batch (empty data)")
        unreached = _write(layers, pops, backup)
        ok = True
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes:
            m.training = mode
        for m in frozen:
            _set_frozen(m, True)
        if not ok:
            for m, saved in backup.items():
                for buf, old in zip(_buffers(m), saved, strict=True):
                    buf.copy_(old)
        if progress and hasattr(iterable, "close"):
            iterable.close()
    if unreached:
        warnings.warn(
            f"recompute_stats: no data reached the batch-norm layers {unreached}; their running "
            "statistics are left unchanged",
            UserWarning,
            stacklevel=2,
        )
    return model


def _buffers(m: nn.Module) -> list[Tensor]:
    return [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


@torch.no_grad()
def _write(
    layers: list[tuple[str, nn.Module]],
    pops: dict[nn.Module, _Population],
    backup: dict[nn.Module, list[Tensor]],
) -> list[str]:
    """Population statistics into the buffers where the layer (domain) saw elements, the old ones
    elsewhere; returns the names of the layers no element reached."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    unreached = []
    for name, m in layers:
        pop = pops[m]
        if distributed and hasattr(m, "process_group"):
            _all_gather_merge(pop, m)
        count, pop_mean, m2 = pop.moments
        seen = (count > 0).unsqueeze(1)  # (S, 1)
        if not bool(seen.any()):
            unreached.append(name or "(model)")
        var = m2 / (count.unsqueeze(1) - 1).clamp_min(1)
        old_mean, old_var = (b.to(pop_mean.device).to(torch.float64) for b in backup[m][:2])
        mean = torch.where(seen, pop_mean, old_mean.reshape(pop_mean.shape))
        var = torch.where(seen, var, old_var.reshape(var.shape))
        for buf, new in ((m.running_mean, mean), (m.running_var, var)):
            buf.copy_(new.to(buf.dtype).to(buf.device).reshape(buf.shape))
        if m.num_batches_tracked is not None:
            old = backup[m][2].to(pop.calls.device).reshape(pop.calls.shape)
            calls = torch.where(seen.flatten(), pop.calls, old)
            nbt = m.num_batches_tracked
            nbt.copy_(calls.to(nbt.device).reshape(nbt.shape))
    return unreached
