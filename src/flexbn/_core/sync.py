"""Statistics across processes: each rank's moments per (segment, channel), combined exactly.

Forward: every rank packs, per local segment, the statistics currency (``stats.Moments``: element count,
mean and m2 per channel, float64) behind a small header describing its configuration, and one
``all_gather`` gives every rank every rank's table. The tables are combined with ``stats.combine``
(Chan, Golub and LeVeque)::

    N = sum n_r,   mean = sum n_r mean_r / N,   m2 = sum (m2_r + n_r (mean_r - mean)^2)

in float64, where the spread of the ranks' means costs no precision. Every rank computes the same global
statistics from the same gathered bytes, so running statistics stay identical across ranks, and a rank
with an empty batch takes part with a count of 0.

Bags (``groups``) may differ between ranks: their ids are global, and a first, fixed-size exchange of the
headers tells every rank how many local bags the others have before the tables (padded to the largest) are
gathered with their ids. Every rank then maps its samples to the sorted global ids.

Backward: the per-(segment, channel) sums ``sum(dy)`` and ``sum(dy * (x - mean))`` of every rank are added
with one ``all_reduce``; weight and bias gradients stay local, as in ``torch.nn.SyncBatchNorm``
(``DistributedDataParallel`` averages them).

A first, fixed-size exchange carries every rank's header: the configuration (channel count, dtype, ``eps``,
detach flags, what selects the statistics, momentum, batch renormalization's limits), the layer's call
counter and the number of local bags. Ranks that disagree about any of it -- a different channel count
too, or a rank that skipped a call of the layer after catching an error -- raise the same ``ValueError`` on
every rank before the tables, whose size depends on the configuration, are exchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .segments import Segments
from .stats import Moments, combine, table_dtype

_VERSION = 2.0
_FIELDS = (
    "protocol version",
    "channels",
    "options",
    "eps",
    "dtype",
    "momentum",
    "renorm rmax",
    "renorm dmax",
    "layer call",
    "local segments",  # last: bags may differ between ranks
)
_HEADER = len(_FIELDS)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Bits of the header's options field (detach_mean 1, detach_var 2, stats_input 4, mask, groups, renorm).
MASK, GROUPS, RENORM = 8, 16, 64
_HUGE_IDS = 32  # not a configuration: this rank has bag ids that float64 cannot carry exactly


def active_group(group: Any) -> Any:
    """``group`` if statistics must be combined over it (distributed initialised, more than one rank),
    else ``None``. ``group=None`` is no synchronisation; pass ``torch.distributed.group.WORLD`` for all."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return None
    return group if dist.get_world_size(group) > 1 else None


def _gather(t: Tensor, group: Any) -> Tensor:
    """``(world, len)``: every rank's ``t`` (a 1-D tensor of the same length on every rank)."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
        return torch.stack(parts)
    out = t.new_empty(world * t.numel())
    dist.all_gather_into_tensor(out, t, group=group)
    return out.view(world, -1)


def all_sum(group: Any, *ts: Tensor) -> tuple[Tensor, ...]:
    """The sums over ranks of reductions, with one ``all_reduce`` in float64 (each rank's packet is the
    same size whatever its local dtype or backend; the results come back in the given dtypes)."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in ts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    parts = flat.split([t.numel() for t in ts])
    return tuple(p.view_as(t).to(t.dtype) for p, t in zip(parts, ts, strict=True))


def _check_headers(headers: Tensor, groups: bool) -> None:
    """Raise on every rank (they all see the same headers) when the ranks' configurations differ."""
    for i, field in enumerate(_FIELDS):
        if field == "local segments" and groups:
            continue  # bags differ between ranks; their ids are global
        column = headers[:, i]
        if field == "options":
            column = column.long() & ~_HUGE_IDS
        if not bool((column == column[0]).all()):
            values = column.tolist()
            if field == "dtype":
                values = [str(_DTYPES[int(v)]) for v in values]
            elif field == "options":
                values = [_options_text(int(v)) for v in values]
            elif field in ("channels", "layer call", "local segments"):
                values = [int(v) for v in values]
            why = "every rank must call the layer with the same configuration"
            if field == "layer call":
                why = (
                    "the ranks are at different calls of this layer: a rank skipped a call (for instance "
                    "after catching an error) and would pair its collectives with another step's"
                )
            raise ValueError(
                f"flexbn sync batch norm: the ranks of the process group disagree on the {field} "
                f"(per rank: {values}); {why}"
            )


def _options_text(bits: int) -> str:
    names = ("detach_mean", "detach_var", "stats_input", "mask", "groups", "", "renorm")
    return "{" + ", ".join(n for i, n in enumerate(names) if n and bits & (1 << i)) + "}"


class Settings(NamedTuple):
    """What every rank must agree on beyond the statistics' configuration."""

    momentum: float = 0.0
    rmax: float = 0.0  # 0: no batch renormalization
    dmax: float = 0.0
    call: int = 0  # the layer's call counter (0 for the functional form)


def exchange(
    m: Moments | None,
    seg: Segments,
    x: Tensor,
    eps: float,
    flags: tuple[bool, bool, bool],
    settings: Settings = Settings(),  # noqa: B008 (an immutable tuple)
) -> tuple[Moments, Segments]:
    """Global moments and segments from this rank's local ones (``seg.group`` is the process group;
    ``m is None``: this rank's batch is empty).

    ``flags``: ``(detach_mean, detach_var, stats_input given)``. A first exchange of fixed size carries
    every rank's header -- the configuration (channels, options, eps, dtype, momentum, renorm limits), the
    layer's call counter and its number of local segments -- so that any disagreement, a different channel
    count included, raises the same ``ValueError`` on every rank before the tables (whose size depends on
    them) are exchanged.

    ``seg.keys`` (bags only) are the local segments' ids; the returned segments index the sorted global ids.
    Raises ``ValueError`` on every rank when a global segment has a single value per channel in training.
    """
    group, channels = seg.group, x.shape[1]
    tdt = table_dtype(x.device)
    bags = seg.keys is not None
    options = sum(bit for bit, on in zip((1, 2, 4), flags, strict=True) if on)
    options += MASK * (seg.mask is not None) + GROUPS * bags + RENORM * (settings.rmax > 0)
    if bags and bool((seg.keys.abs() > 2**53).any()):
        options += _HUGE_IDS  # told to every rank in the first exchange, so that every rank raises
    local = seg.num if bags else 1  # a rank with an empty batch sends a row with count 0
    # Rows: [count, mean (C), m2 (C)] per local segment, float64; absent segments all zeros.
    if m is None:
        rows = x.new_zeros((local, 1 + 2 * channels), dtype=tdt)
    else:
        count = m.count.to(tdt).reshape(-1, 1)
        present = count > 0
        mean = torch.where(present, m.mean.to(tdt), 0)
        rows = torch.cat([count, mean, torch.where(present, m.m2.to(tdt), 0)], 1)
    header = torch.tensor(
        [
            _VERSION,
            channels,
            options,
            eps,
            _DTYPES.index(x.dtype),
            settings.momentum,
            settings.rmax,
            settings.dmax,
            settings.call,
            local,
        ],
        dtype=tdt,
        device=x.device,
    )
    headers = _gather(header, group)
    huge = (headers[:, _FIELDS.index("options")].long() & _HUGE_IDS).nonzero().flatten()
    if huge.numel():
        raise ValueError(
            "groups ids must lie in [-2**53, 2**53] to be exchanged between ranks, but rank(s) "
            f"{huge.tolist()} of the process group have larger ones"
        )
    _check_headers(headers, groups=bags)
    width = 1 + 2 * channels
    if bags:
        # Bag tables padded to the largest rank's, with their global ids.
        most = int(headers[:, -1].max().item())
        keys = seg.keys.to(tdt)
        packet = torch.cat(
            [
                torch.cat([keys, keys.new_zeros(most - local)]),
                torch.cat([rows, rows.new_zeros((most - local, width))]).reshape(-1),
            ]
        )
        gathered = _gather(packet, group)
        valid = torch.arange(most, device=x.device) < headers[:, -1:]
        all_keys = gathered[:, :most][valid]
        all_rows = gathered[:, most:].reshape(len(gathered), most, width)[valid]
        global_keys = torch.unique(all_keys)
        index = torch.searchsorted(global_keys, all_keys)
        num = global_keys.numel()
    else:
        all_rows = _gather(rows.reshape(-1), group)
        index, num = torch.zeros(all_rows.shape[0], dtype=torch.long, device=x.device), 1

    parts = Moments(all_rows[:, 0], all_rows[:, 1 : 1 + channels], all_rows[:, 1 + channels :])
    total = combine(parts, index, num)
    if num == 0 or bool(
        (total.count <= 1).any()
    ):  # every global segment holds elements of some rank
        least = int(total.count.min().item()) if num else 0
        raise ValueError(
            "Expected more than 1 value per channel when training in every segment of the "
            f"statistics across the process group, but one has {least} (local input size {x.size()})"
        )
    if not bags:
        return total, seg
    ids = index.new_zeros(0) if x.shape[0] == 0 else torch.searchsorted(global_keys, keys)[seg.ids]
    return total, seg._replace(ids=ids, num=num, keys=None)
