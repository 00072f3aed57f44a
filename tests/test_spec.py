"""flexbn.spec, the specification the tools check against, equals flexbn on every option (outputs and
gradients), and its rules are the library's (ghost chunks, bag and domain ids, renorm's corrections)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import flexbn
from conftest import assert_close
from flexbn import spec

F64 = torch.float64
CASES: dict[str, dict[str, Any]] = {
    "standard": {},
    "detach_mean": {"detach_mean": True},
    "detach_var": {"detach_var": True},
    "mask": {"mask": True},
    "groups": {"groups": True},
    "ghost": {"virtual_batch_size": 3},
    "stats_input": {"stats_input": True, "detach_mean": True},
    "renorm": {"renorm": True},
    "eval": {"eval": True},
}


@pytest.mark.parametrize("name", list(CASES))
def test_spec_equals_flexbn(name: str) -> None:
    opts = dict(CASES[name])
    x = torch.randn(7, 3, 4, dtype=F64, requires_grad=True)
    w = torch.randn(3, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
    kwargs: dict[str, Any] = {}
    spec_kwargs: dict[str, Any] = {}
    training = not opts.pop("eval", False)
    if opts.pop("mask", False):
        mask = torch.rand(7, 4) > 0.3
        mask[:, 0] = True
        kwargs["mask"] = spec_kwargs["mask"] = mask
    if opts.pop("groups", False):
        groups = torch.tensor([5, 1, 5, 1, 9, 9, 1])
        kwargs["groups"] = groups
        spec_kwargs["ids"] = spec.segment_ids(7, groups=groups)
    if "virtual_batch_size" in opts:
        kwargs["virtual_batch_size"] = vbs = opts.pop("virtual_batch_size")
        spec_kwargs["ids"] = spec.segment_ids(7, virtual_batch_size=vbs)
    if opts.pop("stats_input", False):
        z = (x.detach() * 2 + 1).requires_grad_()
        kwargs["stats_input"] = spec_kwargs["stats_input"] = z
    if opts.pop("renorm", False):
        kwargs.update(renorm=True, rmax=1.5, dmax=0.5)
        spec_kwargs["renorm"] = (1.5, 0.5)
    flags = {k: opts.pop(k) for k in ("detach_mean", "detach_var") if k in opts}
    assert not opts
    y = flexbn.batch_norm(x, rm.clone(), rv.clone(), w, b, training, **flags, **kwargs)
    y_spec = spec.batch_norm(x, rm, rv, w, b, training=training, **flags, **spec_kwargs)
    assert_close(y, y_spec)
    g = torch.randn_like(y)
    inputs = [x, w, b] + ([kwargs["stats_input"]] if "stats_input" in kwargs else [])
    for p, q in zip(
        torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_spec, inputs, g), strict=True
    ):
        assert_close(p, q)


def test_ghost_chunks_are_the_library_rule() -> None:
    from flexbn._core.segments import chunks

    for n, size in [(10, 4), (100, 32), (8, 4), (7, 4), (256, 32)]:
        ids, num = chunks(n, size, torch.device("cpu"))
        expected = spec.segment_ids(n, virtual_batch_size=size)
        assert (ids is None) == (expected is None)
        if ids is not None:
            assert torch.equal(ids, expected)
            assert num == int(expected.max()) + 1
