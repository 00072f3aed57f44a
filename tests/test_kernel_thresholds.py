"""The C++ kernels across each of their size thresholds, in float32, against a float64 composition of the
same float32 values, at the accuracy ``docs/numerics.md`` states for the kernels.

The kernels change strategy with the shape of the batch (``kernels.cpp``): channels-last rows are handed
over in groups of ``GROUP`` consecutive rows of one segment and added to the partial sums 16, 8 or 4 rows
per visit by their width, one by one from ``ROW_BY_ROW_BYTES``, ``WIDE_GROUP`` at a time from
``WIDE_ROW_BYTES``; a segment's partial sums join its statistics every ``BLOCK_ROWS`` rows; beyond ``SCATTER_BYTES`` of partial
sums, one segment's at a time (run mode); threads split rows with private tables up to
``PRIVATE_LIMIT`` values, channels beyond; contiguous rows are summed ``FLUSH`` values per lane at a time.
Each case below is built to cross one of them -- with segment ids, masks, or both, and with OpenMP teams
that split the work unevenly -- and checks that it does (the constants are read from ``kernels.cpp``, so
a case that stops crossing its threshold fails instead of passing vacuously).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import flexbn
from flexbn._core import backend, kernels
from flexbn._core.segments import WHOLE, Segments

pytestmark = [
    pytest.mark.one_backend,  # the kernels themselves, against float64
    pytest.mark.skipif(not backend.cpp_available(), reason="no C++ kernels here"),
]

# The documented accuracy of the float32 kernels (docs/numerics.md, "Accuracy of the kernels"), as
# errors relative to the float64 result's scale: the statistics to a channel's standard deviation, the
# output and every gradient to their largest magnitude.
ACCURACY = {"mean": 1e-6, "var": 2e-6, "output": 1e-6, "grad_input": 2e-6, "grad_param": 2e-6}


def _constants() -> dict[str, int]:
    text = Path(kernels.__file__).with_name("kernels.cpp").read_text()
    found = {}
    for name, value in re.findall(r"constexpr (?:i64|int) ([A-Z_]+) = ([^;]+);", text):
        power = re.fullmatch(r"i64\(1\) << (\d+)", value)
        if power or value.isdigit():
            found[name] = 1 << int(power.group(1)) if power else int(value)
    return found


K = _constants()


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    channels_last: bool = False
    segments: int = 0  # 0: the whole batch
    sorted_ids: bool = False  # consecutive samples share a segment (long runs)
    mask: bool = False
    threads: int = 2
    crosses: Callable[[Case], bool] = lambda case: True

    @property
    def rows(self) -> int:  # channels-last rows (samples x positions)
        return torch.Size(self.shape[:1] + self.shape[2:]).numel()

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def tables(self) -> int:
        return max(self.segments, 1) * self.channels


def _visit(case: Case) -> int:
    """Rows added per visit of the partial sums (``group_rows`` in ``kernels.cpp``), float32."""
    row = 4 * case.channels
    if row >= K["WIDE_ROW_BYTES"]:
        return K["WIDE_GROUP"]
    if row >= K["ROW_BY_ROW_BYTES"]:
        return 1
    return 16 if row <= 64 else 8 if row <= 128 else 4


def _row_split(case: Case) -> bool:
    return case.rows // K["BLOCK_ROWS"] + 1 > 1 and case.tables <= K["PRIVATE_LIMIT"]


CASES = {
    "16-row-groups-with-ids": Case(
        (12, 24, 4, 5), channels_last=True, segments=3,
        crosses=lambda c: c.rows // c.shape[0] >= K["GROUP"] and _row_split(c),
    ),
    "16-row-groups-with-ids-and-mask": Case(
        (12, 24, 4, 5), channels_last=True, segments=3, mask=True,
        crosses=lambda c: c.rows // c.shape[0] >= K["GROUP"],
    ),
    "16-row-groups-sorted-ids-NC": Case(
        (200, 40), segments=4, sorted_ids=True, crosses=lambda c: c.rows // 4 >= K["GROUP"],
    ),
    "8-row-visits-ids-mask": Case(
        (12, 32, 4, 5), channels_last=True, segments=3, mask=True,
        crosses=lambda c: _visit(c) == 8 and _row_split(c),
    ),
    "4-row-visits-ids": Case(
        (12, 48, 4, 5), channels_last=True, segments=3, crosses=lambda c: _visit(c) == 4,
    ),
    "4-row-visits-ids-mask-NC": Case(
        (200, 100), segments=4, mask=True, crosses=lambda c: _visit(c) == 4 and _row_split(c),
    ),
    "row-by-row-visits-mask-NC": Case(
        (150, 200), segments=3, mask=True, crosses=lambda c: _visit(c) == 1,
    ),
    "row-by-row-visits-channels-last": Case(
        (8, 160, 3, 5), channels_last=True, crosses=lambda c: _visit(c) == 1 and _row_split(c),
    ),
    "rows-of-2KiB": Case((300, 640), crosses=lambda c: _visit(c) == K["WIDE_GROUP"] and _row_split(c)),
    "rows-of-2KiB-one-thread": Case(
        (300, 640), threads=1, crosses=lambda c: 4 * c.channels >= K["WIDE_ROW_BYTES"],
    ),
    "rows-of-2KiB-ids-mask": Case(
        (300, 640), segments=5, sorted_ids=True, mask=True,
        crosses=lambda c: 4 * c.channels >= K["WIDE_ROW_BYTES"],
    ),
    "large-run-mode-mask": Case(
        (1200, 512), segments=300, mask=True,
        crosses=lambda c: 2 * c.tables * 4 > K["SCATTER_BYTES"],
    ),
    "large-run-mode-channels-last": Case(
        (600, 520, 1, 2), channels_last=True, segments=300,
        crosses=lambda c: 2 * c.tables * 4 > K["SCATTER_BYTES"],
    ),
    "row-split-mask-segments": Case(
        (64, 32, 6, 6), channels_last=True, segments=5, mask=True, crosses=_row_split,
    ),
    "channel-split-beyond-private-tables": Case(
        (2048, 520, 1, 3), channels_last=True, segments=2048, mask=True,
        crosses=lambda c: c.tables > K["PRIVATE_LIMIT"],
    ),
    "uneven-team-rows": Case(
        (50, 7, 2, 2), channels_last=True, segments=4, mask=True, threads=3,
        crosses=lambda c: c.rows % 3 != 0 and _row_split(c),
    ),
    "uneven-team-channels-NCL": Case(
        (9, 5, 40), segments=2, mask=True, threads=3, crosses=lambda c: c.channels % 3 != 0,
    ),
    "128-value-flush-mask-NCL": Case(
        (6, 4, 300), segments=2, mask=True,
        crosses=lambda c: c.shape[2] > K["FLUSH"] and c.shape[2] % 16 != 0,
    ),
    "128-value-flush-NCL": Case(
        (6, 4, 300), crosses=lambda c: c.shape[2] > K["FLUSH"] and c.shape[2] % 16 != 0,
    ),
}  # fmt: skip


def _inputs(case: Case) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(7)
    n, c = case.shape[:2]
    spatial = case.shape[2:]
    # Per-channel offsets far from 0 and spreads far from 1: the kernels' shifts are exercised.
    mean = torch.randn(c, generator=gen, dtype=torch.float64) * 30
    std = torch.rand(c, generator=gen, dtype=torch.float64) * 2 + 0.25
    view = (1, c) + (1,) * len(spatial)
    x = torch.randn(case.shape, generator=gen, dtype=torch.float64) * std.view(view) + mean.view(
        view
    )
    x = x.float()
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ids = None
    if case.segments:
        perm = torch.randperm(n, generator=gen)
        ids = torch.arange(n) * case.segments // n if case.sorted_ids else perm % case.segments
    mask = None
    if case.mask:
        mask = torch.rand((n, *spatial), generator=gen) > 0.2
        # Two kept values per segment and channel at least: the first two positions of every sample
        # (where there are more), and every position of two samples per segment.
        if mask[0].numel() > 2:
            mask.view(n, -1)[:, :2] = True
        if ids is None:
            first = torch.arange(n) < 2
        elif case.sorted_ids:
            starts = torch.searchsorted(ids, torch.arange(case.segments))
            first = torch.zeros(n, dtype=torch.bool)
            first[starts] = first[starts + 1] = True
        else:
            first = perm < 2 * case.segments
        mask[first] = True
    weight = torch.randn(c, generator=gen)
    bias = torch.randn(c, generator=gen)
    grad = torch.randn(case.shape, generator=gen)
    return {"x": x, "ids": ids, "mask": mask, "weight": weight, "bias": bias, "grad": grad}


def _reference(case: Case, t: dict[str, torch.Tensor | None], eps: float = 1e-5):
    """Batch norm over segments and a mask, composed in float64: statistics, output and gradients."""
    n, c = case.shape[:2]
    x = t["x"].double().reshape(n, c, -1).requires_grad_()
    weight = t["weight"].double().requires_grad_()
    bias = t["bias"].double().requires_grad_()
    ids = t["ids"] if t["ids"] is not None else torch.zeros(n, dtype=torch.int64)
    segments = max(case.segments, 1)
    keep = (
        torch.ones(n, 1, x.shape[2], dtype=torch.float64)
        if t["mask"] is None
        else t["mask"].reshape(n, 1, -1).double()
    )

    def per_segment(v: torch.Tensor) -> torch.Tensor:  # (N, C, L) -> (G, C) sums over kept elements
        return torch.zeros(segments, c, dtype=torch.float64).index_add(0, ids, (v * keep).sum(2))

    count = per_segment(torch.ones_like(x))
    mean = per_segment(x) / count
    var = per_segment((x - mean[ids].unsqueeze(2)) ** 2) / count
    invstd = torch.rsqrt(var + eps)
    w, b = weight.view(1, c, 1), bias.view(1, c, 1)
    kept = (x - mean[ids].unsqueeze(2)) * invstd[ids].unsqueeze(2) * w + b
    # Masked-out elements: normalized with the statistics, taking part in nothing else.
    direct = (x - mean[ids].unsqueeze(2).detach()) * invstd[ids].unsqueeze(2).detach() * w.detach()
    y = torch.where(keep.bool(), kept, direct + b.detach())
    g = t["grad"].double().reshape(n, c, -1)
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), g)
    return {
        "mean": mean.detach(),
        "var": var.detach(),
        "output": y.detach(),
        "grad_input": gx,
        "grad_weight": gw,
        "grad_bias": gb,
    }


def _flexbn(case: Case, t: dict[str, torch.Tensor | None]):
    n, c = case.shape[:2]
    x = t["x"].detach().requires_grad_()
    weight = t["weight"].clone().requires_grad_()
    bias = t["bias"].clone().requires_grad_()
    seg = WHOLE
    if t["ids"] is not None or t["mask"] is not None:
        num = max(case.segments, 1) if t["ids"] is not None else 1
        seg = Segments(ids=t["ids"], num=num, mask=t["mask"])
    moments = kernels.moments(t["x"], seg)
    mean = moments.mean.reshape(-1, c)
    with flexbn.use_backend("cpp"):
        y = flexbn.batch_norm(
            x, None, None, weight, bias, training=True, groups=t["ids"], mask=t["mask"]
        )
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), t["grad"])
    return {
        "mean": mean,
        "var": moments.var.reshape(-1, c),
        "output": y.detach().double().reshape(n, c, -1),
        "grad_input": gx.double().reshape(n, c, -1),
        "grad_weight": gw.double(),
        "grad_bias": gb.double(),
    }


def _errors(case: Case) -> dict[str, float]:
    t = _inputs(case)
    before = torch.get_num_threads()
    torch.set_num_threads(case.threads)
    try:
        got = _flexbn(case, t)
    finally:
        torch.set_num_threads(before)
    want = _reference(case, t)
    std = want["var"].sqrt()
    err = {
        "mean": ((got["mean"] - want["mean"]).abs() / std).max().item(),
        "var": ((got["var"] - want["var"]).abs() / want["var"]).max().item(),
    }
    for key in ("output", "grad_input", "grad_weight", "grad_bias"):
        scale = want[key].abs().max().item()
        err[key] = (got[key] - want[key]).abs().max().item() / scale
    return err


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_at_their_thresholds(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # every thread of the case's team, however small the case
    monkeypatch.setattr(kernels, "GRAIN", 1)
    case = CASES[name]
    assert case.crosses(case), f"{name} no longer crosses the threshold it is meant to"
    err = _errors(case)
    limits = {
        "mean": ACCURACY["mean"],
        "var": ACCURACY["var"],
        "output": ACCURACY["output"],
        "grad_input": ACCURACY["grad_input"],
        "grad_weight": ACCURACY["grad_param"],
        "grad_bias": ACCURACY["grad_param"],
    }
    too_large = {k: (v, limits[k]) for k, v in err.items() if not v <= limits[k]}
    assert not too_large, f"errors above the documented accuracy (error, limit): {too_large}"
