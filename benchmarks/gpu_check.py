"""Everything flexbn checks and measures on a CUDA GPU, in one call of under 8 minutes.

    python benchmarks/gpu_check.py --out gpu-results       # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry-run               # the steps it would run, anywhere

Run it from the repository root, with flexbn importable (installed, or ``PYTHONPATH=src``) and Triton
installed (``pip install 'flexbn[cuda]'``; CUDA builds of torch bring their own). Each step writes its files
into ``--out`` and its outcome into ``summary.json``; a failing step does not stop the next ones:

1. ``environment`` -- ``environment.json``: torch, CUDA, cuDNN, the GPU, Triton, flexbn.
2. ``tests`` -- ``tests/test_triton.py`` on CUDA tensors: the compiled Triton kernels against the float64
   reference for every statistics set, layout, gradient mode and dtype, and the default standard path's
   bitwise equality with torch's (``tests.log``, ``tests.xml``).
3. ``nccl`` -- ``flexbn.SyncBatchNorm`` over NCCL, forward and backward, on the default backend and on
   ``triton``, against local batch norm (``nccl.json``). NCCL refuses two ranks on one GPU, so with one GPU
   the group has one rank, and the collective path (``all_gather`` of the statistics, ``all_reduce`` of
   the backward's sums), which flexbn skips for a single rank, is forced. Several GPUs: one rank each.
4. ``bench`` -- ``flexbn.bench.run`` on CUDA: torch/cuDNN (``native``) against flexbn's default path
   (``auto``) and the Triton kernels (``triton``), every variant, forward, backward, forward+backward and
   eval, memory saved for backward and peak memory, first-call cost, in float32 then bfloat16; a small
   shape last, where the time is the per-call cost (``rows.json``, ``rows.csv``, ``bench.md`` with the
   tables and the targets). Shapes run in order of importance while the time budget lasts.
5. ``model`` -- a ResNet-style training step (convolutions, batch norms, SGD) with torch's batch norm,
   flexbn's standard path and a flexbn variant (``detach_var``) on each backend (``model.json``).

Without a CUDA device it says so, writes ``summary.json`` with the reason and exits 0 (``--require-gpu``:
1). ``docs/cuda.md`` says how to read the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("environment", "tests", "nccl", "bench", "model")
BUDGET_S = (
    450.0  # the whole call: under 8 minutes, with room for the interpreter's start and the files
)
TESTS_S = 180.0  # at most, for the CUDA tests (Triton compiles each kernel configuration once)
NCCL_S = 90.0
MODEL_S = 45.0  # kept back for the model step while the bench runs
# The bench's blocks, most important first: the targets' shapes in float32, then bfloat16, then
# channels_last, then a small shape whose time is the per-call cost.
BENCH_PLAN = (
    ("32x64x56x56", "float32"),
    ("64x256x14x14", "float32"),
    ("32x64x56x56", "bfloat16"),
    ("64x256x14x14", "bfloat16"),
    ("32x64x56x56:cl", "float32"),
    ("8x16x14x14", "float32"),
)


class Step(NamedTuple):
    """One step of the check: its name, what it runs (for ``--dry-run``) and the function that runs it."""

    name: str
    description: str
    run: Callable[[argparse.Namespace, Path, float], dict[str, Any]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-results", help="folder for the results")
    parser.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"comma-separated subset of {','.join(STEPS)} (default: all)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="time for the whole call, in seconds"
    )
    parser.add_argument(
        "--backends",
        default="auto,triton",
        help="flexbn backends the bench and the model step run (default: auto,triton)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="bench repeats per candidate")
    parser.add_argument("--sample-ms", type=float, default=5.0, help="bench timing sample, in ms")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument(
        "--require-gpu", action="store_true", help="exit 1 (not 0) when there is no CUDA device"
    )
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {list(STEPS)}")
    args.steps = [s for s in STEPS if s in steps]
    args.backends = [b for b in args.backends.split(",") if b]
    if args.budget_s <= 0 or args.repeat < 1 or args.sample_ms <= 0:
        parser.error("--budget-s, --repeat and --sample-ms must be positive")
    return args


def no_gpu_reason() -> str:
    """Why this machine cannot run the check (``""``: it can)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return ""


def _write(out: Path, name: str, data: Any) -> None:
    (out / name).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def _env() -> dict[str, str]:
    """The environment of the child processes: flexbn importable from this checkout."""
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
    env.pop("FLEXBN_BACKEND", None)
    return env


# ------------------------------------------------------------------------------------------------ steps


def environment(args: argparse.Namespace, out: Path, seconds: float) -> dict[str, Any]:
    import torch

    import flexbn

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device": torch.cuda.get_device_name(0),
        "devices": torch.cuda.device_count(),
        "capability": list(torch.cuda.get_device_capability(0)),
        "flexbn": flexbn.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as err:
        info["triton"] = f"unavailable: {err}"
    _write(out, "environment.json", info)
    return {"ok": True, **info}


def tests_command(out: Path) -> list[str]:
    """The pytest call of the ``tests`` step: the CUDA cases of the Triton tests (and the standard path)."""
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_triton.py",
        "-k",
        "cuda",
        f"--junitxml={out / 'tests.xml'}",
    ]


def tests(args: argparse.Namespace, out: Path, seconds: float) -> dict[str, Any]:
    command = tests_command(out)
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=min(TESTS_S, seconds),
            check=False,
        )
        log, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        log, code = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {err.timeout} s", -1
    (out / "tests.log").write_text(log if isinstance(log, str) else log.decode(), encoding="utf-8")
    lines = [line for line in str(log).splitlines() if line.strip()]
    # pytest's exit code 5 is "no test ran": the CUDA cases were not collected, a failure here
    return {"ok": code == 0, "exit_code": code, "summary": lines[-1] if lines else ""}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nccl_command(world: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--nccl-worker", str(world)]


def nccl(args: argparse.Namespace, out: Path, seconds: float) -> dict[str, Any]:
    import torch

    world = torch.cuda.device_count()
    env = _env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), FLEXBN_CHECK_OUT=str(out))
    procs = []
    for rank in range(world):
        procs.append(
            subprocess.Popen(
                [*nccl_command(world), str(rank)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs, codes = [], []
    deadline = time.monotonic() + min(NCCL_S, seconds)
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0] + "\ntimed out")
        codes.append(p.returncode)
    (out / "nccl.log").write_text("\n".join(logs), encoding="utf-8")
    result: dict[str, Any] = {"ok": all(c == 0 for c in codes), "ranks": world, "exit_codes": codes}
    if (out / "nccl.json").exists():
        result["cases"] = json.loads((out / "nccl.json").read_text(encoding="utf-8"))
    return result


def nccl_worker(world: int, rank: int) -> int:
    """One rank: flexbn.SyncBatchNorm with the collective path forced, against local batch norm."""
    import datetime

    import torch
    import torch.distributed as dist

    from flexbn._core import sync

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    group = dist.group.WORLD
    real = sync.active_group
    sync.active_group = lambda g: g if g is not None and dist.is_initialized() else real(g)
    cases = []
    try:
        for backend in ("auto", "triton"):
            for options in ({}, {"detach_var": True}, {"mask": True}):
                cases.append(_nccl_case(backend, options, group, rank, world))
    finally:
        sync.active_group = real
        dist.destroy_process_group()
    if rank == 0:
        out = Path(os.environ.get("FLEXBN_CHECK_OUT", "."))
        _write(out, "nccl.json", cases)
    print(json.dumps(cases))
    return 0 if all(c["ok"] for c in cases) else 1


def _nccl_case(
    backend: str, options: dict[str, Any], group: Any, rank: int, world: int
) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import flexbn

    torch.manual_seed(0)  # every rank the same batch (world x its own part below)
    full = torch.randn(4 * world, 16, 12, 12, device="cuda") * 2 + 1
    grad = torch.randn(full.shape, device="cuda")
    mask = torch.rand(4 * world, 12, 12, device="cuda") > 0.2 if options.get("mask") else None
    part = slice(4 * rank, 4 * rank + 4)
    flags = {k: v for k, v in options.items() if k != "mask"}
    case: dict[str, Any] = {"backend": backend, "options": sorted(options), "rank": rank}
    try:
        sbn = flexbn.SyncBatchNorm(16, process_group=group, **flags).cuda()
        ref = flexbn.BatchNorm2d(16, **flags).cuda().double()
        with flexbn.use_backend(backend):
            x = full[part].clone().requires_grad_()
            extra = {} if mask is None else {"mask": mask[part]}
            y = sbn(x, **extra)
            y.backward(grad[part])
        dist.barrier()
        with flexbn.use_backend("reference"):  # the whole batch in one process, float64
            xr = full.double().requires_grad_()
            yr = ref(xr, **({} if mask is None else {"mask": mask.clone()}))
            yr.backward(grad.double())
        errors = {
            "output": (y.double() - yr[part]).abs().max().item(),
            "grad_input": (x.grad.double() - xr.grad[part]).abs().max().item(),
            "running_var": (sbn.running_var.double() - ref.running_var).abs().max().item(),
        }
        case.update(errors=errors, ok=all(e < 1e-4 for e in errors.values()))
    except Exception as err:  # reported, and the other cases still run
        case.update(ok=False, error=f"{type(err).__name__}: {err}")
    return case


def _targets() -> Any:
    """``benchmarks/targets.py`` (the project's targets, judged on the bench's rows), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("targets", ROOT / "benchmarks" / "targets.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["targets"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def bench(args: argparse.Namespace, out: Path, seconds: float) -> dict[str, Any]:
    import torch

    from flexbn import bench as fb

    deadline = time.monotonic() + seconds - (MODEL_S if "model" in args.steps else 0.0)
    rows: list[Any] = []
    done, skipped = [], []
    for shape, dtype in BENCH_PLAN:  # the budget is checked before each block
        if time.monotonic() > deadline:
            skipped.append(f"{shape} {dtype}")
            continue
        started = time.monotonic()
        rows += fb.run(
            [shape],
            passes=fb.PASSES,
            repeat=args.repeat,
            compile_composition=False,  # a cold torch.compile per block would take the whole budget
            device="cuda",
            dtype=getattr(torch, dtype),
            backends=args.backends,
            sample_ms=args.sample_ms,
        )
        done.append({"block": f"{shape} {dtype}", "seconds": round(time.monotonic() - started, 1)})
        fb.write_json(rows, out / "rows.json")  # after every block: a cut-off run keeps what it has
    if rows:
        fb.write_csv(rows, out / "rows.csv")
    judge = _targets()
    met = judge.targets(rows, judge.GPU_RULES) if rows else []
    if rows:
        report = [fb.format_table(rows), "", judge.format_targets(met)]
        (out / "bench.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    return {
        "ok": bool(rows),
        "blocks": done,
        "skipped": skipped,
        "targets_met": sum(bool(t.met) for t in met),
        "targets": len(met),
    }


def model(args: argparse.Namespace, out: Path, seconds: float) -> dict[str, Any]:
    import torch

    results = []
    for dtype in (torch.float32, torch.bfloat16):
        results.append(_model_step("torch", "native", {}, dtype))
        for backend in args.backends:
            results.append(_model_step("flexbn", backend, {}, dtype))
            results.append(_model_step("flexbn", backend, {"detach_var": True}, dtype))
    native = {r["dtype"]: r["ms"] for r in results if r["bn"] == "torch"}
    for r in results:
        r["ratio_native"] = round(r["ms"] / native[r["dtype"]], 3) if r.get("ms") else None
    _write(out, "model.json", results)
    return {"ok": all(r.get("ms") for r in results), "steps": results}


def resnet_like(channels: int = 64) -> Any:
    """A small ResNet: a stem and four residual blocks (two of them downsampling), torch batch norms."""
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(cout),
                )
                self.skip = (
                    nn.Identity()
                    if stride == 1 and cin == cout
                    else nn.Sequential(
                        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                    )
                )

            def forward(self, x: Any) -> Any:
                return (self.body(x) + self.skip(x)).relu()

        return Block()

    c = channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, 1, 1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        block(c, c, 1),
        block(c, 2 * c, 2),
        block(2 * c, 2 * c, 1),
        block(2 * c, 4 * c, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * c, 10),
    )


def _model_step(
    bn: str, backend: str, options: dict[str, Any], dtype: Any, batch: int = 64, size: int = 56
) -> dict[str, Any]:
    import torch

    import flexbn

    torch.manual_seed(0)
    net = resnet_like()
    if bn == "flexbn":
        net = flexbn.convert(net, **options)
    net = net.to("cuda", dtype).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device="cuda", dtype=dtype).to(
        memory_format=torch.channels_last
    )
    target = torch.randint(0, 10, (batch,), device="cuda")
    label = {"bn": bn, "backend": backend, "options": sorted(options), "dtype": str(dtype)}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x).float(), target)
        loss.backward()
        opt.step()

    try:
        with flexbn.use_backend(backend if bn == "flexbn" else "auto"):
            for _ in range(5):
                step()
            times = []
            for _ in range(20):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        return {**label, "ms": round(statistics.median(times), 4)}
    except Exception as err:
        return {**label, "ms": None, "error": f"{type(err).__name__}: {err}"}


STEP_LIST = (
    Step(
        "environment",
        "torch, CUDA, cuDNN, the GPU, Triton, flexbn -> environment.json",
        environment,
    ),
    Step("tests", "pytest tests/test_triton.py -k cuda -> tests.log, tests.xml", tests),
    Step(
        "nccl",
        "SyncBatchNorm over NCCL (collective path forced), auto and triton -> nccl.json",
        nccl,
    ),
    Step(
        "bench", "flexbn.bench.run on CUDA: native vs flexbn backends -> rows.json, bench.md", bench
    ),
    Step("model", "a ResNet-style training step, torch vs flexbn backends -> model.json", model),
)


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps this call runs, in order."""
    return [s for s in STEP_LIST if s.name in args.steps]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--nccl-worker"]:
        return nccl_worker(int(argv[1]), int(argv[2]))
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        for s in steps:
            print(f"{s.name:12s} {s.description}")
        if "tests" in args.steps:
            print("  " + " ".join(tests_command(Path(args.out))))
        if "bench" in args.steps:
            print("  bench blocks: " + ", ".join(f"{s} {d}" for s, d in BENCH_PLAN))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    why = no_gpu_reason()
    if why:
        print(f"gpu_check: skipped: {why}")
        _write(out, "summary.json", {"skipped": why})
        return 1 if args.require_gpu else 0
    start = time.monotonic()
    summary: dict[str, Any] = {}
    for s in steps:
        left = args.budget_s - (time.monotonic() - start)
        if left <= 10:
            summary[s.name] = {"ok": False, "skipped": "time budget spent"}
            continue
        began = time.monotonic()
        print(f"gpu_check: {s.name} ...", flush=True)
        try:
            summary[s.name] = s.run(args, out, left)
        except Exception as err:  # the next steps still run
            summary[s.name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        summary[s.name]["seconds"] = round(time.monotonic() - began, 1)
        print(f"gpu_check: {s.name}: {'ok' if summary[s.name].get('ok') else 'FAILED'}", flush=True)
        _write(out, "summary.json", summary)
    return 0 if all(r.get("ok") for r in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
