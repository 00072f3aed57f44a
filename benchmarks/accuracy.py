"""Accuracy of the batch statistics and output at a large per-channel offset: flexbn vs torch, every layout.

    python benchmarks/accuracy.py [--mean 1e4] [--std 0.1] [--threads N]

Input: float32 with the given mean and std per channel. Reference: float64 recomputation from the same
float32 values. Prints the relative error of the batch variance (read from the running variance after one
training step with momentum=1) and the max abs error of the normalized training output.
"""

from __future__ import annotations

import argparse

import torch

import flexbn

LAYOUTS = {
    "NCHW (64,4,32,32)": lambda: torch.randn(64, 4, 32, 32),
    "channels_last (64,4,32,32)": lambda: torch.randn(64, 4, 32, 32).to(
        memory_format=torch.channels_last
    ),
    "(N,C) (65536,4)": lambda: torch.randn(65536, 4),
    "(N,C,L) (256,4,256)": lambda: torch.randn(256, 4, 256),
}


def measure(batch_norm, x: torch.Tensor) -> tuple[float, float]:
    c = x.shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    y = batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5)
    xd = x.double()
    dims = (0, *range(2, x.dim()))
    var = xd.var(dims, unbiased=True)
    mean = xd.mean(dims, keepdim=True)
    yd = (xd - mean) / torch.sqrt(xd.var(dims, unbiased=False, keepdim=True) + 1e-5)
    var_err = ((rv.double() - var) / var).abs().max().item()
    out_err = (y.double() - yd).abs().max().item()
    return var_err, out_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mean", type=float, default=1e4)
    parser.add_argument("--std", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"float32 input, mean {args.mean:g}, std {args.std:g}, {args.threads} threads, torch {torch.__version__}"
    )
    print(
        f"{'layout':<28} {'var rel. err torch':>19} {'flexbn':>10} {'output abs. err torch':>22} {'flexbn':>10}"
    )
    for name, make in LAYOUTS.items():
        x = make() * args.std + args.mean
        tv, to = measure(torch.nn.functional.batch_norm, x)
        fv, fo = measure(flexbn.batch_norm, x)
        print(f"{name:<28} {tv:>19.1e} {fv:>10.1e} {to:>22.1e} {fo:>10.1e}")


if __name__ == "__main__":
    main()
