"""Cost of the hard-constraint layer (K = 1) versus dofs and the number of basis fields.

    python benchmarks/constraint_layer.py [--sizes 32 64 128] [--n-basis 8 32 128] [--repeat 3]
                                          [--out benchmarks/results/constraint_layer.json]

Problem: -div((1 + u^2) grad u) = m on the unit square (P1, n x n cells), u = x + y on the
boundary, least squares (and Galerkin with --mode galerkin); random basis, batch 1. For each
configuration a fresh process builds the layer, runs one warm-up forward+backward (kernel
compilation, assembler set-up), then times ``repeat`` forward and backward passes and reads the
resident high-water mark above the pre-forward level (the memory the solve itself needs).
"""
import argparse
import json
import os
import sys

from common import benchmark_parser, parse_arguments

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(n, n_basis, mode, repeat):
    from common import Timer, nonlinear_diffusion, reset_peak, peak_above, rss_mb
    import torch
    import fem_moe

    problem, data = nonlinear_diffusion(n)
    layer = fem_moe.HardConstraint(problem, n_basis, mode=mode)
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(1, n_basis, problem.n_dofs, generator=gen, dtype=torch.float64)

    def run():
        b = basis.clone().requires_grad_()
        with Timer() as tf:
            u = layer(b, data)
        with Timer() as tb:
            (u ** 2).sum().backward()
        return tf.seconds, tb.seconds

    run()
    base = rss_mb()
    reset_peak()
    times = [run() for _ in range(repeat)]
    info = layer.diagnostics[0]
    return {"cells": n, "dofs": problem.V.dim(), "n_basis": n_basis, "mode": mode,
            "forward_s": min(t[0] for t in times), "backward_s": min(t[1] for t in times),
            "peak_extra_mb": peak_above(base), "snes_iterations": info.iterations,
            "residual_ratio": info.residual_after / info.residual_before}


def main():
    parser = benchmark_parser(__doc__, out="constraint_layer.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--n-basis", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--mode", default="lstsq", choices=["lstsq", "galerkin"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--single", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parse_arguments(parser)
    if args.single:
        print(json.dumps(measure(*args.single, args.mode, args.repeat)))
        return
    from common import print_table, run_child, write_json
    rows = []
    for n in args.sizes:
        for nb in args.n_basis:
            rows.append(run_child([sys.executable, __file__, "--single", str(n), str(nb),
                                   "--mode", args.mode, "--repeat", str(args.repeat)]))
            print(f"  measured {rows[-1]['dofs']} dofs, N = {nb}", file=sys.stderr)
    print_table(rows, [("dofs", "dofs", "{}"), ("n_basis", "N", "{}"), ("mode", "mode", "{}"),
                       ("forward_s", "forward s", "{:.4f}"), ("backward_s", "backward s", "{:.4f}"),
                       ("peak_extra_mb", "peak MiB", "{:.1f}"),
                       ("snes_iterations", "SNES its", "{}"),
                       ("residual_ratio", "|r|/|r0|", "{:.1e}")])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out, "constraint_layer", rows, repeat=args.repeat)


if __name__ == "__main__":
    main()
