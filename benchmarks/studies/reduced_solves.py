"""How robust and how fast are the reduced solves' defaults? Random reduced problems, solved
by the global layer and the coupled mixture (K = 2, 3) under the default solver options and
under each ``--variant`` (PETSc options given to both layers' prefixes).

    python benchmarks/studies/reduced_solves.py --variant "snes_tr_t1 0.25"

Each problem: -div((1 + u^2) grad u) = m on a 16 x 16 unit square, P1 and P2, u = x + y on the
boundary, N = 8 random smooth basis fields (9 seeds) and two source scales (m of size 1 and
20: the second strongly nonlinear). Prints, per variant and layer, the solves that diverged and
the mean iterations of the others; writes ``benchmarks/studies/results/reduced_solves.json``.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py
from common import benchmark_parser, parse_arguments  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIXES = ("fem_moe_", "moe_")     # the global layer's and the coupled mixture's


def measure(variant):
    """One variant's rows, in this process (its options set before the layers are built)."""
    import numpy as np
    import torch
    import firedrake as fd
    from firedrake.petsc import PETSc
    import fem_moe

    from common import nonlinear_diffusion

    words = variant.split()
    for prefix in PREFIXES:
        for name, value in zip(words[::2], words[1::2]):
            PETSc.Options()[prefix + name.lstrip("-")] = value
    rows = []
    for degree in (1, 2):
        problem, _ = nonlinear_diffusion(16, degree)
        V = problem.V
        x, y = fd.SpatialCoordinate(V.mesh())
        X = problem.dof_coordinates()
        layers = [("global", fem_moe.HardConstraint(problem, 8))] + [
            (f"coupled K={K}", fem_moe.MoEHardConstraint(problem, 8, n_experts=K)) for K in (2, 3)]
        for seed in range(9):
            rng = np.random.default_rng(seed)
            k, phase = rng.uniform(0.5, 4, (8, 2)), rng.uniform(0, 6, (8, 2))
            fields = (np.sin(k[:, :1] * np.pi * X[:, 0] + phase[:, :1])
                      * np.cos(k[:, 1:] * np.pi * X[:, 1] + phase[:, 1:])
                      + rng.normal(0, 0.1, (8, 1)) * X[:, 0])
            basis = torch.tensor(fields)[None]
            for scale in (1.0, 20.0):
                m = fd.Function(V).interpolate(scale * (1 + 10 * x * y * rng.uniform(0.5, 2)))
                data = torch.tensor(m.dat.data_ro.copy())[None]
                for label, layer in layers:
                    try:
                        with torch.no_grad():
                            layer(basis, data)
                        diags = (layer.diagnostics if label == "global"
                                 else layer.all_diagnostics().coupling)
                        rows.append({"layer": label, "degree": degree, "seed": seed, "scale": scale,
                                     "iterations": diags[-1].iterations, "failed": False})
                    except fem_moe.SolverDivergedError:
                        rows.append({"layer": label, "degree": degree, "seed": seed, "scale": scale,
                                     "iterations": None, "failed": True})
    return rows


def summary(rows):
    out = {}
    for label in sorted({r["layer"] for r in rows}) + ["all"]:
        mine = [r for r in rows if label in ("all", r["layer"])]
        its = [r["iterations"] for r in mine if not r["failed"]]
        out[label] = {"solves": len(mine), "failed": sum(r["failed"] for r in mine),
                      "mean_iterations": sum(its) / max(len(its), 1)}
    return out


def main():
    parser = benchmark_parser(__doc__, out="reduced_solves.json",
                              results=os.path.join(HERE, "results"))
    parser.add_argument("--variant", action="append", default=[],
                        help='PETSc options without prefix, e.g. "snes_tr_t1 0.25" (repeatable)')
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parse_arguments(parser)
    if args.single is not None:
        print(json.dumps({"rows": measure(args.single)}))
        return
    from common import run_child, write_json
    results = []
    for variant in [""] + args.variant:
        # A fresh process per variant: options are read when the layers' solvers are made.
        rows = run_child([sys.executable, __file__, "--single", variant])["rows"]
        results.append({"variant": variant or "default", "summary": summary(rows), "rows": rows})
        for label, s in results[-1]["summary"].items():
            print(f"{results[-1]['variant']:>24s}  {label:>12s}: {s['failed']} of {s['solves']} "
                  f"diverged, {s['mean_iterations']:.2f} iterations on average")
    write_json(args.out, "reduced_solves", results)


if __name__ == "__main__":
    main()
