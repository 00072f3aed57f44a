"""flexbn.convert(sync=True) on a model whose batch norms are subclasses (timm's BatchNormAct2d), in 2 real
gloo processes on CPU: data-parallel training equals one process on the concatenated batch -- which it did
not before subclasses were converted -- and timm's SyncBatchNormAct (a torch.nn.SyncBatchNorm subclass,
which raises on CPU) synchronises through flexbn. One spawn, bounded in time; each case is its own test.
"""

from __future__ import annotations

import copy
import datetime
import json
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
import model_zoo
from conftest import assert_close

pytestmark = pytest.mark.one_backend  # each process runs the default backend
SPAWN_TIMEOUT_S = 240
WORLD = 2
PER_RANK = 4


def _train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, target in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def _batches(rank: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)  # the same global data on every rank
    out = []
    for _ in range(3):
        x = torch.randn(PER_RANK * WORLD, *model_zoo.INPUT_SHAPE[1:], generator=gen)
        target = torch.randint(0, 10, (PER_RANK * WORLD,), generator=gen)
        part = slice(None) if rank is None else slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        out.append((x[part], target[part]))
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _subclass_ddp(rank: int, world: int) -> dict[str, float]:
    """timm-style EfficientNet (every batch norm a BatchNormAct2d): DDP with convert(sync=True) trains as
    one process on the whole batch; without sync (the subclass left unsynchronised) it does not."""
    torch_model = model_zoo.efficientnet()
    synced = nn.parallel.DistributedDataParallel(
        flexbn.convert(copy.deepcopy(torch_model), sync=True)
    )
    local = nn.parallel.DistributedDataParallel(flexbn.convert(copy.deepcopy(torch_model)))
    single = flexbn.convert(copy.deepcopy(torch_model))
    assert all(
        type(m)._flexbn_sync for m in synced.modules() if isinstance(m, model_zoo.BatchNormAct2d)
    )
    losses = _train(synced, _batches(rank))
    local_losses = _train(local, _batches(rank))
    single_losses = _train(single, _batches(None))
    # DDP averages the ranks' mean losses: equal local batches make that the global mean.
    mean_losses = []
    for loss in losses:
        t = torch.tensor(loss, dtype=torch.float64)
        dist.all_reduce(t)
        mean_losses.append(float(t) / world)
    torch.testing.assert_close(mean_losses, single_losses, atol=1e-5, rtol=1e-5)
    state, reference = synced.module.state_dict(), single.state_dict()
    for name, value in reference.items():
        assert_close(state[name], value, dtype=torch.float32, msg=name)
    unsynced = _max_diff(local.module.state_dict(), reference)
    assert unsynced > 1e-3, unsynced  # negative check: without sync the training differs
    loss_gap = max(abs(a - b) for a, b in zip(local_losses, single_losses, strict=True))
    return {"unsynced_state_diff": unsynced, "unsynced_loss_gap": loss_gap}


def _sync_batch_norm_subclass(rank: int, world: int) -> dict[str, float]:
    """timm's SyncBatchNormAct raises on CPU tensors; converted, it is synchronised by flexbn."""
    gen = torch.Generator().manual_seed(3)
    torch_layer = model_zoo.randomize(model_zoo.SyncBatchNormAct(4), seed=4)
    torch_layer.act = nn.ReLU(inplace=True)
    x = torch.randn(PER_RANK * world, 4, 3, 3, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
        torch_layer(x[part])  # torch's: why converting matters
    layer = flexbn.convert(copy.deepcopy(torch_layer), detach_var=True)
    reference = flexbn.BatchNorm2d(4, detach_var=True)
    reference.load_state_dict(torch_layer.state_dict())
    xl = x[part].clone().requires_grad_()
    y = layer(xl)
    (y * g[part]).sum().backward()
    xr = x.clone().requires_grad_()
    yr = torch.relu(reference(xr))
    (yr * g).sum().backward()
    assert_close(y, yr[part], msg="output")
    assert_close(xl.grad, xr.grad[part], msg="input gradient")
    assert_close(layer.running_mean, reference.running_mean, msg="running_mean")
    assert_close(layer.running_var, reference.running_var, msg="running_var")
    return {}


CASES: dict[str, Callable[[int, int], dict[str, float]]] = {
    "subclass-ddp": _subclass_ddp,
    "sync-batch-norm-subclass": _sync_batch_norm_subclass,
}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, Any] = {}
    for name, case in CASES.items():
        try:
            results[name] = {"error": "", **case(rank, world)}
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    os._exit(0)  # as in test_distributed.py: gloo's teardown at exit can abort the process


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("convert-sync")
    ctx = mp.start_processes(
        _worker, args=(WORLD, str(out / "rendezvous"), str(out)), nprocs=WORLD, join=False
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{WORLD} gloo processes did not finish within {SPAWN_TIMEOUT_S} s")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_sync_on_subclasses_matches_single_process(
    results: list[dict[str, Any]], case: str
) -> None:
    failures = [
        f"rank {r}:\n{res[case]['error']}" for r, res in enumerate(results) if res[case]["error"]
    ]
    assert not failures, "\n".join(failures)
