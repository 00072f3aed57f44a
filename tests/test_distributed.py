"""flexbn.SyncBatchNorm across real processes: 2 and 3 gloo ranks on CPU, compared with single-process flexbn
on the concatenation of all ranks' batches (outputs, input and stats_input gradients, local weight and bias
gradients, running statistics, on every rank), misconfigured ranks, and a short DistributedDataParallel run.

Each world size is one spawn (a module-scoped fixture, bounded in time) running every case; each case is then
reported by its own test, so a failure names the case and the rank.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import flexbn
from conftest import assert_close

SPAWN_TIMEOUT_S = 240
SIZES = {2: [5, 3], 3: [4, 0, 3]}  # uneven batches; with 3 ranks one is empty
REF_CLASS = {
    2: flexbn.BatchNorm1d,
    3: flexbn.BatchNorm1d,
    4: flexbn.BatchNorm2d,
    5: flexbn.BatchNorm3d,
}


def _rank_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _compare(
    rank: int,
    world: int,
    *,
    spatial: tuple[int, ...] = (5,),
    channels: int = 3,
    channels_last: bool = False,
    detach_mean: bool = False,
    detach_var: bool = False,
    mask: bool = False,
    groups: bool = False,
    stats_input: bool = False,
    momentum: float | None = 0.1,
    affine: bool = True,
    dtype: torch.dtype = torch.float32,
    offset: float = 0.0,
    scale: float = 1.0,
    steps: int = 2,
    **extra: Any,
) -> None:
    """SyncBatchNorm on this rank's slice == flexbn on the whole batch, for ``steps`` training steps."""
    sizes = SIZES[world]
    part = _rank_slice(sizes, rank)
    gen = torch.Generator().manual_seed(1234)  # the same global data on every rank
    n = sum(sizes)
    options = {"detach_mean": detach_mean, "detach_var": detach_var, **extra}
    sync = flexbn.SyncBatchNorm(channels, momentum=momentum, affine=affine, **options).to(dtype)
    ref = REF_CLASS[2 + len(spatial)](channels, momentum=momentum, affine=affine, **options).to(
        dtype
    )
    if affine:
        with torch.no_grad():
            sync.weight.copy_(torch.randn(channels, generator=gen))
            sync.bias.copy_(torch.randn(channels, generator=gen))
    ref.load_state_dict(sync.state_dict())
    failures: list[str] = []  # every step runs on every rank (their collectives stay paired)
    for step in range(steps):
        shape = (n, channels, *spatial)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kwargs: dict[str, Any] = {}
        if mask:
            kwargs["mask"] = torch.rand((n, *spatial), generator=gen) > 0.3
            kwargs["mask"][:, 0] = True  # every sample has real elements
        if groups:
            kwargs["groups"] = torch.tensor([7, -3, 7, 100, -3, 100, 7, -3])[
                :n
            ]  # bags spread over ranks
        z = None
        if stats_input:
            z = (x.double() + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(
                dtype
            )
        g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

        x_ref = x.detach().clone().requires_grad_()
        z_ref = None if z is None else z.detach().clone().requires_grad_()
        ref_kwargs = dict(kwargs, stats_input=z_ref) if z is not None else kwargs
        before = copy.deepcopy(ref)  # for the local weight and bias gradients, below
        y_ref = ref(x_ref, **ref_kwargs)
        (y_ref * g).sum().backward()

        x_loc = x[part].detach().clone().requires_grad_()
        z_loc = None if z is None else z[part].detach().clone().requires_grad_()
        loc_kwargs = {k: v[part] for k, v in kwargs.items()}
        if z is not None:
            loc_kwargs["stats_input"] = z_loc
        sync.zero_grad()
        y = sync(x_loc, **loc_kwargs)
        (y * g[part]).sum().backward()

        try:
            assert y.shape == x_loc.shape
            assert y.dtype == dtype
            layout_ok = y.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert layout_ok or not y.numel()
            assert_close(y, y_ref[part], msg="output")
            assert_close(x_loc.grad, x_ref.grad[part], msg="input gradient")
            if z is not None:
                assert_close(z_loc.grad, z_ref.grad[part], msg="stats_input gradient")
            if affine:  # local: the reference with the output gradient of this rank's samples only
                g_local = torch.zeros_like(g)
                g_local[part] = g[part]
                detached = {k: v.detach() for k, v in ref_kwargs.items()}
                (before(x_ref.detach(), **detached) * g_local).sum().backward()
                if sizes[rank]:
                    assert_close(sync.weight.grad, before.weight.grad, msg="local weight gradient")
                    assert_close(sync.bias.grad, before.bias.grad, msg="local bias gradient")
                else:  # an empty batch contributes nothing
                    for p in (sync.weight.grad, sync.bias.grad):
                        assert p is None or not p.abs().any()
        except AssertionError as err:
            failures.append(f"step {step}: {err}")
    assert not failures, "\n".join(failures)
    assert_close(sync.running_mean, ref.running_mean, msg="running mean")
    assert_close(sync.running_var, ref.running_var, msg="running var")
    assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked) == steps


def _large_mean(rank: int, world: int) -> None:
    """A channel with mean 1e4 and std 0.1 in float32: the combination keeps the float64 reference's
    output to ~1e-6 of the std (an E[x^2] - E[x]^2 all-reduce would lose the variance entirely)."""
    sizes = SIZES[world]
    gen = torch.Generator().manual_seed(5)
    x64 = torch.randn(sum(sizes), 3, 64, generator=gen, dtype=torch.float64) * 0.1 + 1e4
    x64[:, :, 0] += torch.arange(sum(sizes)).reshape(-1, 1)  # the ranks' means differ
    x = x64.float()
    x64 = x.double()  # the reference sees the same (rounded) values
    sync = flexbn.SyncBatchNorm(3)
    y = sync(x[_rank_slice(sizes, rank)])
    expected = torch.nn.functional.batch_norm(x64, None, None, training=True)
    err = (y.double() - expected[_rank_slice(sizes, rank)]).abs().max().item() if y.numel() else 0.0
    assert err < 1e-4, f"output error {err}"
    var = x64.var((0, 2))
    assert_close(sync.running_var.double(), 0.9 + 0.1 * var, dtype=torch.float32)


def _expect_error(match: str, call: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def _mismatch(option: str) -> Callable[[int, int], None]:
    """One rank's configuration differs: every rank raises the same ValueError (no hang, no garbage)."""

    def case(rank: int, world: int) -> None:
        x = torch.randn(4, 3, 5)
        odd = rank == world - 1
        kwargs: dict[str, Any] = {}
        module_options: dict[str, Any] = {}
        if option == "options":
            module_options["detach_var"] = odd
        elif option == "eps":
            module_options["eps"] = 1e-3 if odd else 1e-5
        elif option == "mask" and odd:
            kwargs["mask"] = torch.ones(4, 5, dtype=torch.bool)
        elif option == "groups" and odd:
            kwargs["groups"] = torch.tensor([0, 0, 1, 1])
        elif option == "dtype" and odd:
            x = x.double()
        elif (
            option == "channels" and odd
        ):  # a different packet size: gloo aborted the process before
            x = torch.randn(4, 4, 5)
        elif option == "momentum":
            module_options["momentum"] = 0.2 if odd else 0.1
        elif option == "renorm":
            module_options.update(renorm=True, rmax=2.0 if odd else 3.0)
        bn = flexbn.SyncBatchNorm(x.shape[1], **module_options).to(x.dtype)
        field = {"mask": "options", "groups": "options", "renorm": "renorm rmax"}.get(
            option, option
        )
        _expect_error(f"disagree on the {field}", lambda: bn(x, **kwargs))
        # Nothing changed on any rank: the call was refused before the running statistics moved.
        assert int(bn.num_batches_tracked) == 0
        assert_close(bn.running_mean, torch.zeros_like(bn.running_mean))

    return case


def _skipped_call(rank: int, world: int) -> None:
    """A rank catches a local error and skips a call of the layer: at the next call every rank raises
    (the others' collectives would otherwise pair with another step's), instead of silently mixing steps."""
    bn = flexbn.SyncBatchNorm(3)
    bn(torch.randn(4, 3, 5))  # call 1, together
    if rank == 0:
        with pytest.raises(ValueError, match="mask must have shape"):
            bn(
                torch.randn(4, 3, 5), mask=torch.ones(3, 5, dtype=torch.bool)
            )  # skipped after an error
    _expect_error("disagree on the layer call", lambda: bn(torch.randn(4, 3, 5)))


def _errors(rank: int, world: int) -> None:
    """Bad input across ranks: a bag with one value, and no value at all, raise on every rank."""
    bn = flexbn.SyncBatchNorm(3)
    groups = torch.tensor([rank, 10, 10])  # bags 0..world-1 have one sample each
    _expect_error("more than 1 value", lambda: bn(torch.randn(3, 3), groups=groups))
    _expect_error("more than 1 value", lambda: bn(torch.randn(0, 3, 4)))
    _expect_error(
        "more than 1 value", lambda: bn(torch.randn(0, 3, 4), groups=torch.zeros(0).long())
    )
    hidden = torch.tensor([[True, True], [False, False]])  # bag 5: no real element on any rank
    _expect_error(
        "more than 1 value",
        lambda: bn(torch.randn(2, 3, 2), groups=torch.tensor([4, 5]), mask=hidden),
    )
    huge = torch.tensor([2**60 if rank == 0 else 1, 1, 2, 2])  # one rank's ids float64 cannot carry
    _expect_error("groups ids must lie in", lambda: bn(torch.randn(4, 3), groups=huge))
    # One value per channel locally is fine when the global batch has more.
    assert bn(torch.randn(1, 3)).shape == (1, 3)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        flexbn.SyncBatchNorm(3, virtual_batch_size=4)


def _eval_is_local(rank: int, world: int) -> None:
    """Eval mode uses the running statistics and no collective (ranks may call it any number of times)."""
    bn = flexbn.SyncBatchNorm(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(2 + rank, 3, 4)
    for _ in range(rank + 1):
        y = bn(x)
    expected = torch.nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias
    )
    assert_close(y, expected)


def _timeout(rank: int, world: int) -> None:
    """A rank that never joins: the others get the process group's timeout error, not a hang."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=2))
    if rank == 0:
        bn = flexbn.SyncBatchNorm(3, process_group=group)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"[Tt]imed out|timeout"):
            bn(torch.randn(4, 3))
        assert 1.5 < time.monotonic() - start < 30
    else:
        time.sleep(4)  # alive, but not joining


def _ddp(rank: int, world: int) -> None:
    """Data-parallel training with DistributedDataParallel gives the parameters and running statistics of
    single-process training on the whole batch (equal local batches: DDP averages the local mean losses)."""
    gen = torch.Generator().manual_seed(7)

    def make() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 3),
        )

    model = nn.parallel.DistributedDataParallel(flexbn.convert(make(), sync=True))
    single = flexbn.convert(make())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, single)]
    per_rank = 4
    for _ in range(3):
        x = torch.randn(per_rank * world, 2, 6, 6, generator=gen)
        target = torch.randint(0, 3, (per_rank * world,), generator=gen)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        for m, opt, xb, tb in (
            (model, opts[0], x[part], target[part]),
            (single, opts[1], x, target),
        ):
            opt.zero_grad()
            nn.functional.cross_entropy(m(xb), tb).backward()
            opt.step()
    synced = model.module.state_dict()
    for name, value in single.state_dict().items():
        assert_close(synced[name], value, dtype=torch.float32, msg=name)


CASES: dict[str, Callable[[int, int], None]] = {
    "standard-2d": lambda r, w: _compare(r, w, spatial=()),
    "standard-3d": lambda r, w: _compare(r, w),
    "standard-NCHW": lambda r, w: _compare(r, w, spatial=(3, 4)),
    "channels_last": lambda r, w: _compare(r, w, spatial=(3, 4), channels_last=True),
    "float64": lambda r, w: _compare(r, w, dtype=torch.float64),
    "no-affine-momentum-None": lambda r, w: _compare(r, w, affine=False, momentum=None, steps=3),
    "detach_mean": lambda r, w: _compare(r, w, detach_mean=True),
    "detach_var": lambda r, w: _compare(r, w, detach_var=True),
    "detach_both": lambda r, w: _compare(r, w, detach_mean=True, detach_var=True),
    "mask": lambda r, w: _compare(r, w, mask=True),
    "groups": lambda r, w: _compare(r, w, groups=True),
    "groups-mask-detach_var": lambda r, w: _compare(r, w, groups=True, mask=True, detach_var=True),
    "stats_input": lambda r, w: _compare(r, w, stats_input=True),
    "stats_input-detach_mean": lambda r, w: _compare(r, w, stats_input=True, detach_mean=True),
    "offset-float32": lambda r, w: _compare(r, w, offset=50.0, scale=0.5),
    "renorm": lambda r, w: _compare(r, w, offset=0.5, steps=3, renorm=True, rmax=1.2, dmax=0.1),
    "large-mean": _large_mean,
    "mismatch-options": _mismatch("options"),
    "mismatch-eps": _mismatch("eps"),
    "mismatch-mask": _mismatch("mask"),
    "mismatch-groups": _mismatch("groups"),
    "mismatch-dtype": _mismatch("dtype"),
    "mismatch-channels": _mismatch("channels"),
    "mismatch-momentum": _mismatch("momentum"),
    "mismatch-renorm": _mismatch("renorm"),
    "skipped-call": _skipped_call,
    "errors": _errors,
    "eval-is-local": _eval_is_local,
    "ddp": _ddp,
    "timeout": _timeout,  # last: it leaves a timed-out group behind
}


def _worker(rank: int, world: int, init_file: str, out_dir: str, backend: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    flexbn.set_backend(backend)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, str] = {}
    for name, case in CASES.items():
        torch.manual_seed(rank)  # nothing may depend on it: the data comes from generators
        try:
            case(rank, world)
            results[name] = ""
        except Exception:
            results[name] = traceback.format_exc()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        if name != "timeout":  # after it the group's connections may be closed
            dist.barrier()
    # Leave without the C++ destructors: tearing down gloo's threads at interpreter exit can abort the
    # process ("terminate called without an active exception"); the results are written.
    os._exit(0)


WORLDS = [
    pytest.param((world, name), id=f"{world}-ranks-{name}")
    for world in (2, 3)
    for name in ("reference", "cpp")
]


@pytest.fixture(scope="module", params=WORLDS)
def world_results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every case on ``world`` gloo processes, each running ``backend`` (the module-scoped processes are
    started once per world and backend, so the backend is their parameter, not the per-test one)."""
    world, name = request.param
    if name == "cpp" and not flexbn._core.backend.cpp_available():
        pytest.skip("no C++ compiler for the kernels")
    out = tmp_path_factory.mktemp(f"sync{world}{name}")
    ctx = mp.start_processes(
        _worker, args=(world, str(out / "rendezvous"), str(out), name), nprocs=world, join=False
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} gloo processes did not finish within {SPAWN_TIMEOUT_S} s")
    return world, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.one_backend  # the processes' backend is world_results' parameter
@pytest.mark.parametrize("case", list(CASES))
def test_sync_matches_single_process(world_results: Any, case: str) -> None:
    _, results = world_results
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(results) if res[case]]
    assert not failures, "\n".join(failures)


def test_without_process_group_is_local_batch_norm() -> None:
    """No initialised process group: plain flexbn batch norm, in training too (torch's would raise on CPU
    only when a group is initialised)."""
    assert not dist.is_initialized()
    x = torch.randn(6, 3, 4, requires_grad=True)
    sync, local = flexbn.SyncBatchNorm(3, detach_var=True), flexbn.BatchNorm1d(3, detach_var=True)
    y, y_ref = sync(x), local(x)
    assert_close(y, y_ref)
    assert_close(sync.running_var, local.running_var)
    g = torch.randn_like(y)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


def test_process_group_excludes_ghost_batches_even_on_one_rank() -> None:
    """Code that passes on one process must not start failing when scaled out."""
    with pytest.raises(
        ValueError, match="virtual_batch_size cannot be combined with process_group"
    ):
        flexbn.batch_norm(
            torch.randn(8, 3),
            None,
            None,
            training=True,
            virtual_batch_size=4,
            process_group=object(),
        )


def test_module_interface_matches_torch() -> None:
    """Same constructor, parameters, buffers and state_dict keys as torch.nn.SyncBatchNorm; torch's checks.

    Not a subclass of torch's: DistributedDataParallel refuses every torch.nn.SyncBatchNorm on CPU."""
    ours, theirs = (
        flexbn.SyncBatchNorm(5, 1e-3, None, process_group=None),
        nn.SyncBatchNorm(5, 1e-3, None),
    )
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(ours, nn.SyncBatchNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours) == repr(theirs)
    assert math.isclose(ours.eps, 1e-3)
    assert ours.momentum is None
    assert ours.process_group is None
    with pytest.raises(ValueError, match="expected at least 2D input"):
        ours(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        flexbn.SyncBatchNorm(0)(torch.randn(2, 0, 3))
