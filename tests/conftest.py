"""Shared test helpers: one tolerance table, one comparison, a float64 reference, a fixed seed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

import flexbn
from flexbn._core import backend as _backend

# The four gradient modes (which statistics are detached), for parametrize: (detach_mean, detach_var).
MODES = [
    pytest.param(False, False, id="full"),
    pytest.param(True, False, id="detach_mean"),
    pytest.param(False, True, id="detach_var"),
    pytest.param(True, True, id="detach_both"),
]
MODE_ARGS = ("detach_mean", "detach_var")

# (atol, rtol) per dtype of the tensor under test, for values of order 1. float16/bfloat16 allow about two
# units in the last place of the output (bfloat16 has 8 significant bits, float16 11).
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def assert_close(
    actual: Tensor | None,
    expected: Tensor | None,
    *,
    dtype: torch.dtype | None = None,
    msg: str | None = None,
) -> None:
    """``actual`` equals ``expected`` within ``TOL[dtype]`` (default: ``actual``'s dtype).

    ``None`` must match ``None``. Dtypes may differ (a float16 result against a float64 reference); check the
    dtype separately where it matters.
    """
    if actual is None or expected is None:
        assert actual is None, msg or f"expected None, got {actual!r}"
        assert expected is None, msg or f"expected {expected!r}, got None"
        return
    atol, rtol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, check_dtype=False, equal_nan=True, msg=msg
    )


def manual_batch_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    mean: Tensor | None = None,
    var: Tensor | None = None,
    detach_mean: bool = False,
    detach_var: bool = False,
) -> Tensor:
    """Batch norm written out in float64 (autograd flows through the batch statistics), in ``x``'s shape.

    Batch statistics (biased variance) unless ``mean`` and ``var`` are given (eval mode). ``detach_mean`` /
    ``detach_var`` are the hand compositions flexbn's options must equal: ``x.mean(dims).detach()`` and
    ``x.var(dims, unbiased=False).detach()`` (each detached independently, to every derivative order).
    """
    xd = x.double()
    dims = (0, *range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if mean is None or var is None:
        var, mean = torch.var_mean(xd, dims, correction=0, keepdim=True)
        if detach_mean:
            mean = mean.detach()
        if detach_var:
            var = var.detach()
    else:
        mean, var = mean.double().reshape(shape), var.double().reshape(shape)
    y = (xd - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    return y


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state."""
    torch.manual_seed(0)


# Every test runs once per backend: the pure-torch reference and the C++ kernels (issue 6: the fast path
# must not change any result). A module that chooses backends itself opts out with
# ``pytestmark = pytest.mark.one_backend``.
BACKEND_PARAMS = [
    pytest.param("reference", id="reference"),
    pytest.param(
        "cpp",
        id="cpp",
        marks=pytest.mark.skipif(
            not _backend.cpp_available(), reason="no C++ compiler for the kernels"
        ),
    ),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("one_backend") is None:
        metafunc.fixturenames.append("flexbn_backend")
        metafunc.parametrize("flexbn_backend", BACKEND_PARAMS, indirect=True)


@pytest.fixture
def flexbn_backend(request: pytest.FixtureRequest) -> str:
    """The backend a test runs on (set around the test by ``_run_on_backend``)."""
    return request.param


@pytest.fixture(autouse=True)
def _run_on_backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run a test parametrized by ``flexbn_backend`` on that backend, also for the processes it starts
    (``$FLEXBN_BACKEND``), whether or not the test asks for the fixture itself."""
    callspec = getattr(request.node, "callspec", None)
    name = None if callspec is None else callspec.params.get("flexbn_backend")
    if name is None:
        yield
        flexbn.set_backend(None)  # a test's process-wide choice does not reach the next test
        return
    before = os.environ.get("FLEXBN_BACKEND")
    os.environ["FLEXBN_BACKEND"] = name
    try:
        with flexbn.use_backend(name):
            yield
    finally:
        if before is None:
            del os.environ["FLEXBN_BACKEND"]
        else:
            os.environ["FLEXBN_BACKEND"] = before
