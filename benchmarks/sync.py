"""Cost of synchronised statistics on CPU: flexbn.SyncBatchNorm over gloo processes vs local flexbn batch norm
on each rank's batch (training forward + backward), interleaved, medians.

    python benchmarks/sync.py [--nproc 2] [--repeat 30]

torch.nn.SyncBatchNorm has no CPU path to compare with. Each rank runs with one thread.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexbn

SHAPES = [(16, 64, 28, 28), (8, 256, 14, 14), (512, 1024), (8, 128, 512)]


def _step(bn: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    start = time.perf_counter()
    y = bn(x)
    y.backward(g)
    dist.barrier()  # both variants end on a barrier, so the collective waits are counted fairly
    return time.perf_counter() - start


def _worker(rank: int, world: int, init: str, repeat: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        local = flexbn.BatchNorm2d(shape[1]) if len(shape) == 4 else flexbn.BatchNorm1d(shape[1])
        synced = flexbn.SyncBatchNorm(shape[1])
        times: dict[str, list[float]] = {"local": [], "sync": []}
        for i in range(repeat + 3):
            for name, bn in (
                (("local", local), ("sync", synced))
                if i % 2
                else (("sync", synced), ("local", local))
            ):
                t = _step(bn, x, g)
                if i >= 3:
                    times[name].append(t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append((shape, med["local"], med["sync"]))
    if rank == 0:
        print(
            f"{world} gloo processes, 1 thread each; per-rank batch; training forward+backward, ms"
        )
        print(f"{'shape':>20}  {'local':>8}  {'sync':>8}  {'sync/local':>10}")
        for shape, lo, sy in rows:
            print(f"{shape!s:>20}  {lo:8.2f}  {sy:8.2f}  {sy / lo:10.2f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker,
            args=(args.nproc, os.path.join(tmp, "rdv"), args.repeat),
            nprocs=args.nproc,
            start_method="spawn",
        )


if __name__ == "__main__":
    main()
