"""The experiment of the forum question flexbn starts from (``docs/why.md``), reproduced exactly, and
answered by flexbn.

The question: in ``torch.nn.BatchNorm2d``, are ``mu`` and ``var`` in ``(x - mu) / sqrt(var + eps)`` plain
numbers or gradient-tracked tensors? The thread's snippet (seed 2809, ``x`` of shape (10, 3, 4, 4), loss
``y.abs().sum()``) compares torch with two hand compositions. Answer: tracked -- torch equals the composition
*without* ``.detach()``; flexbn's ``detach_mean=True, detach_var=True`` is the one *with* it.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import flexbn
from conftest import assert_close

SEED, SHAPE, EPS, DIMS = 2809, (10, 3, 4, 4), 1e-5, [0, 2, 3]


def origin_input() -> Tensor:
    """As in the thread: the seed, then ``torch.randn(10, 3, 4, 4, requires_grad=True)``."""
    torch.manual_seed(SEED)
    return torch.randn(*SHAPE, requires_grad=True)


def manual(detach: bool) -> tuple[Tensor, Tensor]:
    """The thread's "Manual without detach" / "Manual with detach" blocks: (output, input gradient)."""
    x = origin_input()
    mean = x.mean(dim=DIMS, keepdim=True)
    var = x.var(DIMS, unbiased=False, keepdim=True)
    if detach:
        mean, var = mean.detach(), var.detach()
    invstd = torch.sqrt(var + EPS)  # (the thread's name; it is the standard deviation)
    y = (x - mean) / invstd
    y.abs().sum().backward()
    return y.detach(), x.grad


def run(module: nn.Module) -> tuple[Tensor, Tensor]:
    """The thread's "BN" block with ``module`` in place of ``nn.BatchNorm2d(3, affine=False)``."""
    x = origin_input()
    y = module(x)
    y.abs().sum().backward()
    return y.detach(), x.grad


def torch_bn() -> tuple[Tensor, Tensor]:
    return run(nn.BatchNorm2d(3, affine=False))


def test_torch_batch_norm_tracks_its_statistics():
    """The thread's comparison (y3 - y1): torch equals the composition without ``.detach()``."""
    y1, g1 = manual(detach=False)
    y3, g3 = torch_bn()
    assert_close(y3, y1)
    assert_close(g3, g1)


def test_flexbn_default_equals_torch():
    y, g = run(flexbn.BatchNorm2d(3, affine=False))
    y3, g3 = torch_bn()
    assert_close(y, y3)
    assert_close(g, g3)


def test_flexbn_detached_equals_composition_with_detach():
    y2, g2 = manual(detach=True)
    y, g = run(flexbn.BatchNorm2d(3, affine=False, detach_mean=True, detach_var=True))
    assert_close(y, y2)
    assert_close(g, g2)


def test_detached_gradient_differs_from_torch():
    """Same values, different gradients: the outputs agree, the input gradients do not."""
    y, g = run(flexbn.BatchNorm2d(3, affine=False, detach_mean=True, detach_var=True))
    y3, g3 = torch_bn()
    assert_close(y, y3)
    assert (g - g3).abs().max() > 0.1
    with pytest.raises(AssertionError):
        assert_close(g, g3)


@pytest.mark.parametrize(
    ("detach_mean", "detach_var"),
    [pytest.param(True, False, id="detach_mean"), pytest.param(False, True, id="detach_var")],
)
def test_one_detached_statistic_equals_its_composition(detach_mean, detach_var):
    """The two in-between answers of the thread's question, with the same experiment."""
    x = origin_input()
    mean = x.mean(dim=DIMS, keepdim=True)
    var = x.var(DIMS, unbiased=False, keepdim=True)
    mean = mean.detach() if detach_mean else mean
    var = var.detach() if detach_var else var
    y_ref = (x - mean) / torch.sqrt(var + EPS)
    y_ref.abs().sum().backward()
    bn = flexbn.BatchNorm2d(3, affine=False, detach_mean=detach_mean, detach_var=detach_var)
    y, g = run(bn)
    assert_close(y, y_ref.detach())
    assert_close(g, x.grad)
    _, g_full = torch_bn()
    # detaching the mean removes -mean(dL/dy) per channel: 0.035 and 0.069 here (sums of signs)
    assert (g - g_full).abs().max() > 0.02


def test_functional_answers_the_same():
    """``flexbn.batch_norm(x, None, None, training=True)`` in both settings (as ``F.batch_norm``)."""
    for detach, reference in ((False, manual(detach=False)), (True, manual(detach=True))):
        x = origin_input()
        y = flexbn.batch_norm(x, None, None, training=True, detach_mean=detach, detach_var=detach)
        y.abs().sum().backward()
        assert_close(y.detach(), reference[0])
        assert_close(x.grad, reference[1])
