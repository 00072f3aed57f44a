"""Speed of flexbn against torch's native batch norm and the hand-written composition, side by side.

    python benchmarks/speed.py [--repeats 7] [--quick] [--json rows.json]

For each configuration every variant is timed in turn, round after round (interleaved, so drift of a noisy
machine hits all alike); the table reports each variant's median time and its ratio to torch native. Inputs
and upstream gradients are created outside the timed region.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import flexbn

SHAPES = {
    "(32,64,56,56)": ((32, 64, 56, 56), False),
    "(32,64,56,56) CL": ((32, 64, 56, 56), True),
    "(64,256,14,14)": ((64, 256, 14, 14), False),
    "(4096,1024)": ((4096, 1024), False),
    "(16,128,512)": ((16, 128, 512), False),
}
QUICK_SHAPES = {"(8,32,28,28)": ((8, 32, 28, 28), False), "(512,256)": ((512, 256), False)}


def composition(x, w, b, detach: bool):
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    if detach:
        mean, var = mean.detach(), var.detach()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + 1e-5) * w.view(shape) + b.view(shape)


def loop_per_segment(x, w, b, ids: list[torch.Tensor]):
    """The hand-written alternative for per-bag / ghost statistics: one batch norm per segment."""
    y = torch.empty_like(x)
    for idx in ids:
        y = y.index_copy(0, idx, torch.nn.functional.batch_norm(x[idx], None, None, w, b, True))
    return y


def statistics_variants(shape: tuple[int, ...]) -> dict[str, Callable]:
    """The statistics-set variants (issue 3) next to flexbn's standard path and torch."""
    n, c = shape[:2]
    rm, rv = torch.zeros(c), torch.ones(c)
    mask = torch.rand((n, *shape[2:])) > 0.1
    groups = torch.randint(0, 8, (n,))
    bags = [(groups == g).nonzero().flatten() for g in range(8)]
    chunks = list(torch.arange(n).tensor_split(4))
    return {
        "torch": lambda x, w, b: torch.nn.functional.batch_norm(x, rm, rv, w, b, True),
        "flexbn": lambda x, w, b: flexbn.batch_norm(x, rm, rv, w, b, True),
        "flexbn mask": lambda x, w, b: flexbn.batch_norm(x, rm, rv, w, b, True, mask=mask),
        "flexbn groups=8": lambda x, w, b: flexbn.batch_norm(x, rm, rv, w, b, True, groups=groups),
        "loop of torch per bag": lambda x, w, b: loop_per_segment(x, w, b, bags),
        "flexbn ghost (4)": lambda x, w, b: flexbn.batch_norm(
            x, rm, rv, w, b, True, virtual_batch_size=n // 4
        ),
        "loop of torch per chunk": lambda x, w, b: loop_per_segment(x, w, b, chunks),
        # statistics from another tensor that depends on x (as pre-dropout activations do)
        "flexbn stats_input": lambda x, w, b: flexbn.batch_norm(
            x, rm, rv, w, b, True, stats_input=x + 0
        ),
    }


def gradient_variants(shape: tuple[int, ...]) -> dict[str, Callable]:
    c = shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    return {
        "torch": lambda x, w, b: torch.nn.functional.batch_norm(x, rm, rv, w, b, True),
        "flexbn": lambda x, w, b: flexbn.batch_norm(x, rm, rv, w, b, True),
        "flexbn detached": lambda x, w, b: flexbn.batch_norm(
            x, rm, rv, w, b, True, detach_mean=True, detach_var=True
        ),
        "composition": lambda x, w, b: composition(x, w, b, False),
        "composition detached": lambda x, w, b: composition(x, w, b, True),
    }


def step(f: Callable, x, w, b, dy, backward: bool) -> None:
    y = f(x, w, b)
    if backward:
        torch.autograd.grad(y, (x, w, b), dy)


def timed(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def run(shapes: dict, repeats: int, inner: int, variant_set: Callable) -> list[dict]:
    rows = []
    for name, (shape, cl) in shapes.items():
        c = shape[1]
        x = torch.randn(shape)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.rand(c).add_(0.5).requires_grad_()
        b = torch.randn(c).requires_grad_()
        dy = torch.randn_like(x)
        fns = variant_set(shape)
        for phase in ("forward", "forward+backward"):
            samples: dict[str, list[float]] = {k: [] for k in fns}
            backward = phase == "forward+backward"
            for _ in range(repeats):
                for key, f in fns.items():
                    call = functools.partial(step, f, x, w, b, dy, backward)
                    call()  # warm-up of this variant's allocations
                    samples[key].append(timed(call, inner))
            base = statistics.median(samples["torch"])
            standard = statistics.median(samples["flexbn"])
            for key, s in samples.items():
                med = statistics.median(s)
                rows.append(
                    {
                        "shape": name,
                        "phase": phase,
                        "variant": key,
                        "median_ms": round(med * 1e3, 3),
                        "ratio_to_torch": round(med / base, 3),
                        "ratio_to_flexbn": round(med / standard, 3),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument(
        "--json", help="also write the rows (with device and versions) to this file"
    )
    parser.add_argument(
        "--set",
        choices=["gradient", "statistics"],
        default="gradient",
        help="gradient: detach modes vs the hand composition; statistics: mask/groups/ghost/stats_input",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    variant_set = gradient_variants if args.set == "gradient" else statistics_variants
    rows = run(QUICK_SHAPES if args.quick else SHAPES, args.repeats, args.inner, variant_set)
    meta = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "flexbn": flexbn.__version__,
        "dtype": "float32",
        "set": args.set,
    }
    print(", ".join(f"{k}={v}" for k, v in meta.items()))
    print(
        f"{'shape':<18} {'phase':<17} {'variant':<24} {'median ms':>10} {'x torch':>8} {'x flexbn':>9}"
    )
    for r in rows:
        print(
            f"{r['shape']:<18} {r['phase']:<17} {r['variant']:<24} "
            f"{r['median_ms']:>10.2f} {r['ratio_to_torch']:>8.2f} {r['ratio_to_flexbn']:>9.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
