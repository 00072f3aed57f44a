"""Data-parallel training on CPU with synchronised batch statistics: does it equal training on one process?

A small CNN with two ``BatchNorm2d`` layers is converted with ``flexbn.convert(model, sync=True)`` and
trained with ``DistributedDataParallel`` over gloo processes on CPU, each rank taking an uneven share of
every batch (torch's own ``SyncBatchNorm`` refuses CPU tensors, and DDP refuses it in CPU models). Rank 0
trains the same model on the whole batches in a single process alongside, and the experiment reports how
far the two runs' parameters and running statistics drift apart -- to rounding, when batch statistics are
the global batch's.

Run it either way::

    torchrun --nproc-per-node 2 -m flexbn.lab.ddp       # torchrun's env:// rendezvous
    python -m flexbn.lab.ddp --nproc 3                   # spawns the gloo processes itself
    flexbn lab --only ddp                                # the lab experiment, 2 processes

Each rank's loss is the sum of its samples' losses divided by the *global* batch size, times the world size:
DDP averages gradients over ranks, so the average is the gradient of the global mean loss even though the
ranks' shares differ.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import flexbn

from . import Result

BATCH, STEPS, CLASSES = 24, 5, 4
QUICK_STEPS = 3


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, CLASSES),
    )


def _shares(world: int) -> list[int]:
    """Uneven shares of each batch: rank r gets about (r + 1) parts."""
    weights = list(range(1, world + 1))
    shares = [BATCH * w // sum(weights) for w in weights]
    shares[-1] += BATCH - sum(shares)
    return shares


ABOUT = f"""**Question.** Does data-parallel training with `flexbn.SyncBatchNorm` over CPU processes equal
training on one process with the whole batch? (torch's `SyncBatchNorm` refuses CPU tensors.)

**Setup.** A small CNN with two batch norms, `flexbn.convert(model, sync=True)`,
`DistributedDataParallel` over 2 gloo processes with uneven shares ({" and ".join(map(str, _shares(2)))} of
{BATCH} samples), {STEPS} SGD steps (`--quick`: {QUICK_STEPS}), against the same model trained on the
whole batches in one process. `ok` requires parameters and running statistics within 1e-4 of the
single-process run (float32 rounding is ~1e-7). Run it alone: `python -m flexbn.lab.ddp --nproc 3`, or
under `torchrun`."""


def _train(rank: int, world: int, seed: int, steps: int) -> dict[str, Any]:
    """This rank's part of the run; on rank 0 also the single-process reference. Returns rank 0's rows."""
    torch.manual_seed(seed)
    init = _model()
    model = nn.parallel.DistributedDataParallel(flexbn.convert(_clone(init), sync=True))
    single = flexbn.convert(_clone(init)) if rank == 0 else None
    gen = torch.Generator().manual_seed(seed + 1)
    shares = _shares(world)
    start = sum(shares[:rank])
    part = slice(start, start + shares[rank])
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    opt_single = (
        None if single is None else torch.optim.SGD(single.parameters(), lr=0.2, momentum=0.9)
    )
    rows = []
    for step in range(steps):
        x = torch.randn(BATCH, 3, 8, 8, generator=gen)
        target = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        x[:, 0] += target.reshape(-1, 1, 1).float()  # something to learn
        opt.zero_grad()
        local = nn.functional.cross_entropy(model(x[part]), target[part], reduction="sum")
        (local * world / BATCH).backward()  # DDP averages: the gradient of the global mean loss
        opt.step()
        total = local.detach().clone()
        dist.all_reduce(total)
        if single is not None and opt_single is not None:
            opt_single.zero_grad()
            loss = nn.functional.cross_entropy(single(x), target)
            loss.backward()
            opt_single.step()
            synced, alone = model.module.state_dict(), single.state_dict()
            drift = max((synced[k].double() - alone[k].double()).abs().max().item() for k in alone)
            rows.append(
                {
                    "step": step + 1,
                    "loss_ddp": total.item() / BATCH,
                    "loss_single": loss.item(),
                    "drift": drift,
                }
            )
    return {"world": world, "shares": shares, "rows": rows}


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _worker(rank: int, world: int, init_file: str, seed: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    result = _train(rank, world, seed, steps)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()  # every rank is done with every collective
    # Leave without running the C++ destructors: tearing down gloo's threads (with DDP's reducer) at
    # interpreter exit intermittently aborts the process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(nproc: int = 2, seed: int = 0, steps: int = STEPS) -> dict[str, Any]:
    """Run the experiment on ``nproc`` local gloo processes; rank 0's rows."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        args = (nproc, os.path.join(tmp, "rendezvous"), seed, steps, out)
        mp.start_processes(_worker, args=args, nprocs=nproc, start_method="spawn")
        return json.loads(Path(out).read_text())


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['world']} gloo processes on CPU, batch shares {result['shares']} of {BATCH}",
        "",
        f"{'step':>4}  {'loss, DDP + sync BN':>20}  {'loss, one process':>18}  {'max |param diff|':>17}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['step']:>4}  {r['loss_ddp']:>20.6f}  {r['loss_single']:>18.6f}  {r['drift']:>17.2e}"
        )
    return "\n".join(lines)


def _draw(result: dict[str, Any]) -> Any:
    """Loss per step of both runs, and the parameter drift between them (log scale)."""

    def draw(axes: Any) -> None:
        ax_loss, ax_drift = axes
        rows = result["rows"]
        steps = [r["step"] for r in rows]
        ax_loss.plot(
            steps,
            [r["loss_single"] for r in rows],
            "-",
            color="0.6",
            linewidth=7,
            solid_capstyle="butt",
            label="one process, whole batch",
        )
        ax_loss.plot(
            steps,
            [r["loss_ddp"] for r in rows],
            "o--",
            color="C0",
            label=f"DDP + flexbn.SyncBatchNorm, {result['world']} processes",
        )
        ax_loss.set(
            xlabel="SGD step",
            ylabel="training loss (cross-entropy)",
            title=f"{result['world']} processes vs one",
        )
        ax_loss.legend(loc="upper right")
        ax_drift.semilogy(
            steps,
            [max(r["drift"], 1e-12) for r in rows],
            "o-",
            color="C3",
            label="max |difference|, all parameters and running statistics",
        )
        ax_drift.axhline(
            1e-4, color="black", linestyle=":", linewidth=1, label="limit for ok (1e-4)"
        )
        ax_drift.set(
            xlabel="SGD step",
            ylabel="max |difference| (float32 values)",
            ylim=(1e-9, 1e-2),
            title="Distance between the two runs",
        )
        ax_drift.legend(loc="upper left")
        for ax in axes:
            ax.set_xticks(steps)

    return draw


def run(seed: int, *, quick: bool = False, out: Path | None = None) -> Result:
    """The lab experiment: 2 processes (3 steps when ``quick``); the figure ``out/ddp.png``."""
    result = spawn(2, seed, QUICK_STEPS if quick else STEPS)
    drift = max(r["drift"] for r in result["rows"])
    ok = drift < 1e-4
    verdict = "equals" if ok else "does NOT equal"
    conclusion = (
        f"Data-parallel training with flexbn.SyncBatchNorm on CPU {verdict} single-process training on "
        f"the whole batch: after {len(result['rows'])} steps with uneven shares the parameters and running "
        f"statistics differ by at most {drift:.1e} (float32 rounding)."
    )
    from ._common import save_figure

    return Result(
        "Data-parallel training with synchronised statistics",
        table(result),
        conclusion,
        ok,
        about=ABOUT,
        figures=save_figure(
            out,
            "ddp",
            _draw(result),
            ncols=2,
            size=(5.4, 4.0),
            note="The two loss curves coincide: the dashed one is drawn on the wide grey one.",
        ),
        data={"drift": drift, "shares": result["shares"], "rows": result["rows"]},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flexbn.lab.ddp", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
        try:
            result = _train(dist.get_rank(), dist.get_world_size(), args.seed, args.steps)
            if dist.get_rank() == 0:
                print(table(result))
        finally:
            dist.destroy_process_group()
        return 0
    if args.nproc < 2:
        parser.error("--nproc must be at least 2")
    print(table(spawn(args.nproc, args.seed, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
