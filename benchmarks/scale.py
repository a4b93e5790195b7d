"""Scale-out: the mixture's setup per rank against mesh size (canonical and distributed
partitions), and inference at a million dofs in 3D against the classical solver.

    python benchmarks/scale.py setup [--sizes2d 128 256 512 1024] [--refine3d 1 2 3]
                                     [--ranks 1 2] [--experts 4]
                                     [--partitions canonical distributed]
                                     [--plot benchmarks/results/scale_setup.png]
    python benchmarks/scale.py inference [--refine 3] [--degree 2] [--ranks 2] [--n-basis 16]
                                         [--experts 4]

``setup``: for each mesh (P1 on an n x n unit square; P2 (``--degree3d``) on
``meshes/block_with_holes.msh`` refined r times), rank count and partition, a fresh ``mpiexec -n P``
process builds a mixture on the smallest mesh of the kind (compiling the kernels), makes the mesh
and problem, then measures building ``MoEHardConstraint(problem, 16, n_experts=K, mode="galerkin",
partition=...)`` (Galerkin: the least-squares default's dual norm would add each expert's Gram
factorisation, which in 3D P2 dominates everything else): the slowest rank's time and the largest
rank's resident high-water mark above its level before (the mesh itself is not counted). Rows to
``benchmarks/results/scale_setup.json``; the slope of log(memory) against log(dofs) per series;
``--plot`` draws them (log-log).

``inference``: on 3D mesh of ``--refine`` refinements at ``--degree``, one input: the forward
and backward of the global layer (Galerkin) and of the coupled mixture (Galerkin, distributed
partition) with an N-field smooth basis, against the classical Newton-Krylov (GMRES + GAMG) and
Newton + MUMPS solves of the same discrete problem. Rows to
``benchmarks/results/scale_inference.json``.
"""
import argparse
import json
import os
import sys

from common import benchmark_parser

HERE = os.path.dirname(os.path.abspath(__file__))


def _problem(dim, size, degree):
    import fem_moe.pdes
    from mpi4py import MPI
    if dim == 2:
        pde = fem_moe.pdes.get("reaction_diffusion", n=size, degree=degree)
    else:
        pde = fem_moe.pdes.get("nonlinear_diffusion_3d", refine=size, degree=degree)
    problem = pde.problem(pde.mesh(MPI.COMM_WORLD))
    return pde, problem


def measure_setup(dim, size, partition, K, degree=1):
    from common import Timer, reset_peak, peak_above, rss_mb
    from mpi4py import MPI
    import fem_moe
    comm = MPI.COMM_WORLD
    # A first mixture on the smallest mesh of the kind compiles the kernels (their memory and
    # time are the same at any size and would swamp the small meshes' setup).
    fem_moe.MoEHardConstraint(_problem(dim, 8 if dim == 2 else 0, degree)[1], 16, n_experts=K,
                              mode="galerkin", partition=partition)
    pde, problem = _problem(dim, size, degree)
    cells = comm.allreduce(problem.mesh.cell_set.size)
    comm.Barrier()
    base = rss_mb()
    reset_peak()
    with Timer() as t:
        layer = fem_moe.MoEHardConstraint(problem, 16, n_experts=K, mode="galerkin",
                                          partition=partition)
    memory = comm.allreduce(peak_above(base), op=MPI.MAX)
    seconds = comm.allreduce(t.seconds, op=MPI.MAX)
    local = comm.allreduce(sum(len(e.ids) for e in layer.experts.values()), op=MPI.MAX)
    return dict(dim=dim, size=size, degree=degree, partition=partition, ranks=comm.size, experts=K,
                dofs=int(comm.allreduce(problem.n_dofs)), cells=int(cells), setup_s=float(seconds),
                setup_peak_mib=float(memory), expert_dofs_max_rank=int(local))


def _smooth_basis(problem, N):
    import numpy as np
    import torch
    X = problem.dof_coordinates()
    k = np.arange(1, N + 1)[:, None]
    fields = (np.sin(k * np.pi * X[:, 0] / 3 + 0.3 * k) * np.cos((k % 5) * X[:, 1])
              * np.cos((k % 3) * X[:, -1]) + 0.05 * k * X[:, 1])
    return torch.tensor(fields)[None]


def measure_inference(refine, degree, N, K, mumps=True):
    from common import Timer, forward_backward
    import numpy as np
    import torch
    from mpi4py import MPI
    import fem_moe
    import fem_moe.pdes
    from fem_moe.problem import owned_values
    comm = MPI.COMM_WORLD
    with Timer() as tm:
        pde, problem = _problem(3, refine, degree)
    data_fields = pde.data(problem, pde.sample(np.random.default_rng(0), 1)[0])
    data = torch.tensor(owned_values(data_fields[0]))[None]
    rows = []
    common = dict(refine=refine, degree=degree, ranks=comm.size,
                  dofs=int(comm.allreduce(problem.n_dofs)),
                  cells=int(comm.allreduce(problem.mesh.cell_set.size)), mesh_s=tm.seconds)
    classical = [("classical Newton-Krylov (GMRES + GAMG)", None)]
    if mumps:
        classical.append(("classical Newton + MUMPS", fem_moe.pdes.CLASSICAL_SOLVER_PARAMETERS))
    for label, params in classical:
        comm.Barrier()
        _, seconds, its = pde.classical_solve(problem, data_fields, solver_parameters=params)
        rows.append(dict(common, model=label, forward_s=comm.allreduce(seconds, op=MPI.MAX),
                         iterations=int(its)))
        print(json.dumps(rows[-1]), flush=True) if comm.rank == 0 else None
    basis = _smooth_basis(problem, N)
    for label, make in (("PI-HC galerkin",
                         lambda: fem_moe.HardConstraint(problem, N, mode="galerkin")),
                        (f"coupled MoE K={K} galerkin (distributed)",
                         lambda: fem_moe.MoEHardConstraint(problem, N, n_experts=K, mode="galerkin",
                                                           partition="distributed"))):
        with Timer() as ts:
            layer = make()
        # The first pass compiles the kernels.
        times = [forward_backward(layer, basis, data, comm) for _ in range(2)]
        extra = {}
        if hasattr(layer, "plan"):       # dof values a rank receives from other ranks per field
            plan = layer.plan
            off = int(sum(c for r, c in enumerate(plan.recv_counts) if r != comm.rank))
            extra = dict(halo_values_max_rank=comm.allreduce(off, op=MPI.MAX),
                         owned_dofs_max_rank=comm.allreduce(problem.n_dofs, op=MPI.MAX),
                         coupled_iterations=[int(i.iterations) for i in layer.coupling_diagnostics])
        rows.append(dict(common, model=label, n_basis=N,
                         setup_s=comm.allreduce(ts.seconds, op=MPI.MAX),
                         forward_s=times[-1][0], backward_s=times[-1][1],
                         first_forward_s=times[0][0], **extra))
        print(json.dumps(rows[-1]), flush=True) if comm.rank == 0 else None
    return rows


def _slopes(rows):
    import numpy as np
    out = {}
    for key in sorted({(r["dim"], r["partition"], r["ranks"]) for r in rows}):
        series = sorted((r["dofs"], r["setup_peak_mib"], r["setup_s"]) for r in rows
                        if (r["dim"], r["partition"], r["ranks"]) == key)
        if len(series) >= 2:
            d, m, s = (np.log(np.array(x, dtype=float)) for x in zip(*series))
            out[key] = (float(np.polyfit(d[-2:], m[-2:], 1)[0]),
                        float(np.polyfit(d[-2:], s[-2:], 1)[0]))
    return out


def main():
    parser = benchmark_parser(__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--sizes2d", type=int, nargs="*", default=[128, 256, 512, 1024])
    s.add_argument("--refine3d", type=int, nargs="*", default=[1, 2, 3])
    s.add_argument("--degree3d", type=int, default=2,
                   help="3D: P2 reaches 1.9e6 dofs at 3 refinements")
    s.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    s.add_argument("--experts", type=int, default=4)
    s.add_argument("--partitions", nargs="+", default=["canonical", "distributed"])
    s.add_argument("--out", default=os.path.join(HERE, "results", "scale_setup.json"))
    s.add_argument("--plot", default=None)
    s.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    i = sub.add_parser("inference")
    i.add_argument("--refine", type=int, default=3)
    i.add_argument("--degree", type=int, default=2)
    i.add_argument("--ranks", type=int, default=2)
    i.add_argument("--n-basis", type=int, default=16)
    i.add_argument("--experts", type=int, default=4)
    i.add_argument("--no-mumps", action="store_true", help="skip the MUMPS reference solve")
    i.add_argument("--out", default=os.path.join(HERE, "results", "scale_inference.json"))
    i.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from common import print_table, run_child, write_json

    if args.what == "inference":
        if args.child:
            rows = measure_inference(args.refine, args.degree, args.n_basis, args.experts,
                                     not args.no_mumps)
            from mpi4py import MPI
            if MPI.COMM_WORLD.rank == 0:
                print(json.dumps({"rows": rows}), flush=True)
            return
        cmd = ["mpiexec", "-n", str(args.ranks), sys.executable, os.path.abspath(__file__),
               "inference",
               "--refine", str(args.refine), "--degree", str(args.degree), "--n-basis",
               str(args.n_basis), "--experts", str(args.experts), "--child"] + (
                   ["--no-mumps"] if args.no_mumps else [])
        rows = run_child(cmd)["rows"]
        print_table(rows,
                    [("model", "model", "{}"), ("dofs", "dofs", "{}"), ("ranks", "ranks", "{}"),
                           ("forward_s", "forward s", "{:.2f}"),
                           ("backward_s", "backward s", "{:.2f}"),
                           ("iterations", "Newton its", "{}"), ("setup_s", "setup s", "{:.2f}")])
        write_json(args.out, "scale_inference", rows, refine=args.refine, degree=args.degree)
        return

    if args.child:
        dim, size, partition = args.child
        row = measure_setup(int(dim), int(size), partition, args.experts,
                            1 if int(dim) == 2 else args.degree3d)
        from mpi4py import MPI
        if MPI.COMM_WORLD.rank == 0:
            print(json.dumps(row), flush=True)
        return
    rows = []
    cases = [(2, n) for n in args.sizes2d] + [(3, r) for r in args.refine3d]
    for dim, size in cases:
        for partition in args.partitions:
            for P in args.ranks:
                cmd = ["mpiexec", "-n", str(P), sys.executable, os.path.abspath(__file__), "setup",
                       "--experts", str(args.experts), "--degree3d", str(args.degree3d),
                       "--child", str(dim), str(size), partition]
                rows.append(run_child(cmd))
                r = rows[-1]
                print(f"{dim}D {size}: {partition} on {P} rank(s): {r['dofs']} dofs, "
                      f"{r['setup_s']:.2f} s, {r['setup_peak_mib']:.0f} MiB", flush=True)
                write_json(args.out, "scale_setup", rows, experts=args.experts)
    print_table(rows,
                [("dim", "dim", "{}"), ("dofs", "dofs", "{}"), ("partition", "partition", "{}"),
                       ("ranks", "ranks", "{}"), ("setup_s", "setup s", "{:.2f}"),
                       ("setup_peak_mib", "setup peak MiB/rank", "{:.0f}"),
                       ("expert_dofs_max_rank", "expert dofs/rank", "{}")])
    for (dim, partition, P), (memory, time) in _slopes(rows).items():
        print(f"{dim}D {partition}, {P} rank(s): memory ~ dofs^{memory:.2f}, "
              f"time ~ dofs^{time:.2f} (last two sizes)")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for key in sorted({(r["dim"], r["partition"], r["ranks"]) for r in rows}):
            series = sorted((r["dofs"], r["setup_peak_mib"], r["setup_s"]) for r in rows
                            if (r["dim"], r["partition"], r["ranks"]) == key)
            d, m, s = zip(*series)
            style = "-" if key[1] == "distributed" else "--"
            label = f"{key[0]}D {key[1]}, {key[2]} rank(s)"
            axes[0].loglog(d, [max(x, 0.1) for x in m], style, marker="o", label=label)
            axes[1].loglog(d, s, style, marker="o", label=label)
        axes[0].set(xlabel="dofs", ylabel="setup peak MiB per rank (above the mesh)")
        axes[1].set(xlabel="dofs", ylabel="setup s (slowest rank)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
