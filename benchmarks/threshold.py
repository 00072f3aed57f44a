"""Where ``auto`` should hand small training batches to torch's own batch norm (``flexbn._core.TORCH_BELOW``):
flexbn's kernels against torch's, per layout and size, and what torch's kernel costs in accuracy there.

    python benchmarks/threshold.py [--threads 1] [--repeat 9] [--runs 3]

For each layout (NCHW, channels_last, (N, C), (N, C, L)) and input size from 2^12 to 2^21 values, a
standard training forward+backward through ``flexbn.batch_norm`` is timed both ways -- routed to torch's
operator and to the ``cpp`` kernels (the same call, flexbn's validation included in both) -- in
interleaved samples of the process's CPU time (wall time with more than one thread), and the ratio
kernels / torch printed, median over the repeats (and over ``--runs`` processes). The crossover is the
smallest size from which the kernels are faster at every larger size measured.

Then, at the largest size ``auto`` routes to torch under the thresholds in force, torch's float32
variance error on input of mean 1e4 and std 0.1 per channel (against float64 from the same values), and
the kernels' -- what that routing costs in accuracy (``docs/numerics.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import flexbn
import flexbn._core as core

SIZES = [2**k for k in range(12, 22)]
C = 64


def make(layout: str, elements: int) -> torch.Tensor:
    """An input of ``elements`` values in ``layout`` (C = 64; 8 samples of a square-ish image for the
    4-D layouts, 8 samples of a sequence for (N, C, L))."""
    if layout == "(N,C)":
        return torch.randn(elements // C, C)
    if layout == "(N,C,L)":
        return torch.randn(8, C, elements // (8 * C))
    positions = elements // (8 * C)
    h = 1 << (positions.bit_length() - 1) // 2
    x = torch.randn(8, C, h, positions // h)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


LAYOUTS = ("NCHW", "channels_last", "(N,C)", "(N,C,L)")


def _threshold(layout: str) -> Callable[[], int]:
    """The threshold in force for ``layout`` (a per-layout table, or one number)."""
    below = core.TORCH_BELOW
    key = {"NCHW": "contiguous", "(N,C,L)": "contiguous", "(N,C)": "channels_last"}.get(
        layout, layout
    )
    return lambda: below[key] if isinstance(below, dict) else below


def ratio(layout: str, elements: int, repeat: int, clock: Callable[[], float]) -> float:
    """Median over ``repeat`` interleaved samples of (kernels time / torch time)."""
    x = make(layout, elements).requires_grad_()
    w = torch.rand(C, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    dy = torch.randn_like(x)
    inner = max(2, int(1e6 // elements))  # samples of 10-40 ms
    saved = core.TORCH_BELOW

    def timed(route: int) -> float:
        core.TORCH_BELOW = route
        try:
            start = clock()
            for _ in range(inner):
                y = flexbn.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
                torch.autograd.grad(y, (x, w, b), dy)
            return (clock() - start) / inner
        finally:
            core.TORCH_BELOW = saved

    torch_route, kernel_route = 1 << 62, 0
    with flexbn.use_backend("auto"):
        for route in (torch_route, kernel_route):
            timed(route)  # warm-up
        samples = []
        for r in range(repeat):
            order = (torch_route, kernel_route) if r % 2 == 0 else (kernel_route, torch_route)
            t = {route: timed(route) for route in order}
            samples.append(t[kernel_route] / t[torch_route])
    return statistics.median(samples)


def ratios(layout: str, repeat: int, clock: Callable[[], float]) -> dict[int, float]:
    return {elements: ratio(layout, elements, repeat, clock) for elements in SIZES}


def crossover(by_size: dict[int, float]) -> int | None:
    """The smallest size from which every measured ratio is below 1."""
    found = None
    for size in sorted(by_size, reverse=True):
        if by_size[size] >= 1.0:
            break
        found = size
    return found


def variance_error(layout: str, elements: int, kernels: bool) -> float:
    """Relative error of the float32 batch variance (the running variance after one step with
    momentum 1), mean 1e4 and std 0.1 per channel, against float64 from the same values."""
    torch.manual_seed(0)
    x = make(layout, elements) * 0.1 + 1e4
    rm, rv = torch.zeros(C), torch.ones(C)
    if kernels:
        with flexbn.use_backend("cpp"):
            flexbn.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
    else:
        torch.nn.functional.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
    dims = (0, *range(2, x.dim()))
    var = x.double().var(dims, unbiased=True)
    return ((rv.double() - var) / var).abs().max().item()


def measure(repeat: int) -> dict[str, dict[int, float]]:
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    return {layout: ratios(layout, repeat, clock) for layout in LAYOUTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--runs", type=int, default=1, help="processes (the median over them)")
    parser.add_argument("--json", metavar="PATH", help="write one process's ratios (internal)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(measure(args.repeat), f)
        return 0
    if args.runs == 1:
        runs = [measure(args.repeat)]
    else:
        import tempfile

        runs = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                path = f"{tmp}/{i}.json"
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--repeat",
                       str(args.repeat), "--json", path]  # fmt: skip
                subprocess.run(cmd, check=True)
                with open(path, encoding="utf-8") as f:
                    runs.append(
                        {k: {int(s): v for s, v in d.items()} for k, d in json.load(f).items()}
                    )
    clock = "CPU time" if args.threads == 1 else "wall time"
    load = ", ".join(f"{v:.1f}" for v in __import__("os").getloadavg())
    print(
        f"{args.threads} thread(s), {clock}, load {load}, {args.runs} process(es) x {args.repeat} "
        f"repeats, torch {torch.__version__}: kernels / torch, training forward+backward (below 1: "
        "the kernels are faster); in brackets the lowest and highest process"
    )
    print(f"{'values':>9} " + " ".join(f"{name:>20}" for name in LAYOUTS))
    combined = {}
    for layout in LAYOUTS:
        combined[layout] = {s: statistics.median(r[layout][s] for r in runs) for s in SIZES}
    for size in SIZES:
        cells = []
        for layout in LAYOUTS:
            values = [r[layout][size] for r in runs]
            spread = f" ({min(values):.2f}-{max(values):.2f})" if len(runs) > 1 else ""
            cells.append(f"{combined[layout][size]:.2f}{spread}")
        print(f"{size:>9} " + " ".join(f"{c:>20}" for c in cells))
    print("crossover: " + ", ".join(f"{k} {crossover(v)}" for k, v in combined.items()))
    print("at the largest size routed to torch (TORCH_BELOW in force), float32 variance error:")
    for layout in LAYOUTS:
        below = _threshold(layout)()
        routed = [s for s in SIZES if s < below]
        if not routed:
            print(f"  {layout}: nothing routed to torch")
            continue
        size = max(routed)
        torch_err, kernel_err = (
            variance_error(layout, size, False),
            variance_error(layout, size, True),
        )
        print(f"  {layout} at {size} values: torch {torch_err:.1e}, kernels {kernel_err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
