"""The headline figure: forward+backward cost of the mixture of experts versus the global layer.

    python benchmarks/moe_scaling.py [--sizes 32 64 128 192] [--n-basis 16] [--batch 2] [--repeat 3]
                                     [--experts 1 2 4 8] [--ranks 1 2] [--kinds coupled moe]
                                     [--out benchmarks/results/moe_scaling.json] [--plot PNG]

Inference is the forward pass (the constrained solves); a training step of the constraint is the
forward plus the backward (the IFT solves). ``--plot`` draws both against dofs, per layer, K and
rank count.

For each mesh size (P1 on an n x n unit square, -div((1 + u^2) grad u) = m, least squares) and
each rank count P, a fresh ``mpiexec -n P`` process measures the global layer (HardConstraint on
the distributed mesh) and, in separate processes, MoEHardConstraint with K experts. Times are the
slowest rank's, best of ``repeat`` (after a warm-up pass that compiles kernels); memory is each
rank's resident high-water mark above its level before the timed passes, the largest over ranks.
Ratios are against K = 1 on 1 rank of the first of ``--kinds`` (the coupled mixture by default),
measured in the same invocation. For the coupled mixture the table adds its coupled SNES
iterations, the coupled solve's share of the forward, and the coupling's own share: the coupled
solve less the work each expert does on its own rows coupled or not (its residual, Jacobian and
second-derivative assemblies, its norm's Riesz solves, the dense products with its basis) — the
scatters of neighbours' coefficients, the K N x K N system's assembly, factorisations and
solves, the inertia checks, the SNES's own work and the ranks' agreement.
"""
import argparse
import json
import os
import sys

from common import benchmark_parser, parse_arguments

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(n, kind, K, n_basis, batch, repeat):
    from common import Timer, forward_backward, nonlinear_diffusion, reset_peak, peak_above, rss_mb
    import numpy as np
    import torch
    from mpi4py import MPI
    import fem_moe

    comm = MPI.COMM_WORLD
    problem, data = nonlinear_diffusion(n)
    with Timer() as setup:
        if kind == "global":
            layer = fem_moe.HardConstraint(problem, n_basis)
        else:
            layer = fem_moe.MoEHardConstraint(problem, n_basis, n_experts=K,
                                              coupled=kind == "coupled")
    X = problem.dof_coordinates()
    k = np.arange(1, n_basis + 1)[:, None]
    # Smooth, partition-independent basis fields: the same problem on any rank count.
    fields = np.sin(k * np.pi * X[:, 0] / 3 + 0.3 * k) * np.cos((k % 5)
                                                                * X[:, 1]) + 0.05 * k * X[:, 1]
    basis = torch.tensor(fields)[None].repeat(batch, 1, 1)
    data = data.repeat(batch, 1) * torch.linspace(1, 2, batch, dtype=torch.float64)[:, None]

    def run():
        return forward_backward(layer, basis, data, comm)

    run()
    base = rss_mb()
    reset_peak()
    times, coupling, overhead = [], [], []
    for _ in range(repeat):
        times.append(run())
        if kind == "coupled":
            coupling.append(sum(s.time for s in layer.coupling_diagnostics))
            overhead.append(sum(s.coupling_time for s in layer.coupling_diagnostics))
    peak = comm.allreduce(peak_above(base), MPI.MAX)
    coupled_its = float("nan")
    if kind == "global":
        its = [s.iterations for s in layer.diagnostics]
    else:
        diags = layer.all_diagnostics()
        its = [s.iterations for d in diags for s in d["samples"]]
        if kind == "coupled":
            coupled_its = float(np.mean([s.iterations for s in diags.coupling]))
    best = min(range(repeat), key=lambda i: times[i][0] + times[i][1])
    return {"cells": n, "dofs": problem.V.dim(), "ranks": comm.size, "kind": kind,
            "experts": 1 if kind == "global" else K, "n_basis": n_basis, "batch": batch,
            "setup_s": comm.allreduce(setup.seconds, MPI.MAX),
            "forward_s": min(t[0] for t in times), "backward_s": min(t[1] for t in times),
            "step_s": min(t[0] + t[1] for t in times), "peak_mb_per_rank": peak,
            "mean_snes_iterations": float(np.mean(its)), "coupled_iterations": coupled_its,
            # The coupled stage: its forward solve (slowest rank) and its share of the forward;
            # the coupled backward is all of the backward.
            "coupling_s": comm.allreduce(coupling[best], MPI.MAX) if coupling else float("nan"),
            "coupling_share_forward": (comm.allreduce(coupling[best], MPI.MAX) / times[best][0]
                                       if coupling else float("nan")),
            # Of that, the coupling's own cost (the coupled solve less the experts' own row work:
            # assemblies, Riesz solves, dense products), as a share of the forward.
            "coupling_overhead_share": (overhead[best] / times[best][0] if overhead
                                        else float("nan"))}


def main():
    parser = benchmark_parser(__doc__, out="moe_scaling.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 192])
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--kinds", nargs="+", default=["coupled", "moe"],
                        help="mixtures to measure beside the global layer: coupled (the default "
                             "mixture) and moe (independent experts)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n-basis", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plot", help="a PNG of the step and inference times against dofs")
    parser.add_argument("--single", nargs=3, help=argparse.SUPPRESS)
    args = parse_arguments(parser)
    if args.single:
        n, kind, K = int(args.single[0]), args.single[1], int(args.single[2])
        row = measure(n, kind, K, args.n_basis, args.batch, args.repeat)
        from mpi4py import MPI
        if MPI.COMM_WORLD.rank == 0:
            print(json.dumps(row))
        return
    from common import print_table, run_child, write_json
    rows = []
    for n in args.sizes:
        for P in args.ranks:
            for kind, K in [("global", 1)] + [(kind, K) for kind in args.kinds
                                              for K in args.experts]:
                cmd = ["mpiexec", "-n", str(P), "--oversubscribe", "--bind-to", "none",
                       sys.executable, __file__, "--single", str(n), kind, str(K),
                       "--n-basis", str(args.n_basis), "--batch", str(args.batch),
                       "--repeat", str(args.repeat)]
                rows.append(run_child(cmd))
                print(f"  measured n={n} P={P} {kind} K={K}: {rows[-1]['step_s']:.3f} s",
                      file=sys.stderr)
    for n in args.sizes:
        ref = next(r for r in rows if r["cells"] == n and r["kind"] == args.kinds[0]
                   and r["experts"] == 1 and r["ranks"] == 1)
        glob = {r["ranks"]: r for r in rows if r["cells"] == n and r["kind"] == "global"}
        for r in rows:
            if r["cells"] == n:
                r["time_vs_K1_1rank"] = r["step_s"] / ref["step_s"]
                global_mb = max(glob[r["ranks"]]["peak_mb_per_rank"], 1e-9)
                r["memory_vs_global"] = r["peak_mb_per_rank"] / global_mb
    print_table(rows, [("dofs", "dofs", "{}"), ("ranks", "ranks", "{}"), ("kind", "layer", "{}"),
                       ("experts", "K", "{}"), ("forward_s", "fwd s", "{:.3f}"),
                       ("backward_s", "bwd s", "{:.3f}"), ("step_s", "step s", "{:.3f}"),
                       ("time_vs_K1_1rank", "t/t(K=1,P=1)", "{:.2f}"),
                       ("peak_mb_per_rank", "peak MiB/rank", "{:.1f}"),
                       ("memory_vs_global", "mem/global", "{:.2f}"),
                       ("mean_snes_iterations", "SNES its", "{:.1f}"),
                       ("coupled_iterations", "coupled its", "{:.1f}"),
                       ("coupling_share_forward", "coupling/fwd", "{:.2f}"),
                       ("coupling_overhead_share", "its own/fwd", "{:.2f}"),
                       ("setup_s", "setup s", "{:.2f}")])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out, "moe_scaling", rows, n_basis=args.n_basis, batch=args.batch,
               repeat=args.repeat)
    if args.plot:
        plot(rows, args.plot)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["kind"], r["experts"], r["ranks"]) for r in rows})
    for ax, key, title in ((axes[0], "step_s", "training step (forward + backward)"),
                           (axes[1], "forward_s", "inference (forward)")):
        for kind, K, P in series:
            pts = sorted((r["dofs"], r[key]) for r in rows
                         if (r["kind"], r["experts"], r["ranks"]) == (kind, K, P))
            label = {"global": "PI-HC (global)", "moe": f"independent K={K}",
                     "coupled": f"coupled K={K}"}[kind] + f", {P} rank(s)"
            ax.loglog(*zip(*pts), "o-" if P == 1 else "s--", label=label)
        ax.set_xlabel("dofs")
        ax.set_ylabel("seconds (batch of %d)" % rows[0]["batch"])
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
