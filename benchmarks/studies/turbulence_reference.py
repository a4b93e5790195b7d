"""How accurate is the classical reference of decaying turbulence at the paper's setting? Its
trajectory under time-step and mesh refinement.

The paper's Navier-Stokes benchmark: Re = 1e4 on the periodic unit square, h = 1/64, t in
[0, 5], initial vorticity a Gaussian random field. ``fem_moe.pdes.DecayingTurbulence`` marches
the theta method (``--theta``: 1/2 Crank-Nicolson, 1 backward Euler) on the gmsh periodic square
refined ``r`` times (h = 1/16 / 2^r). For each of ``--samples`` inputs, each (refinement, steps)
of ``--runs`` is solved by time marching, and its vorticity at its time levels is compared with
the finest run's at the same instants (on the finest mesh: meshes of one hierarchy are nested, so
coarse fields are prolonged exactly). Reported per run: the relative L2 error of the vorticity
over space and time (sqrt of the sums over the shared levels of the L2 norms squared over the
domain), its mean and max over the inputs, the same for persistence (the initial vorticity held),
the space-time dofs and the solve's seconds.

    mpiexec -n 2 python benchmarks/studies/turbulence_reference.py
    python benchmarks/studies/turbulence_reference.py --runs 2:25 2:50 2:100 --samples 1

Prints a table; writes ``benchmarks/studies/results/turbulence_reference.json``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py
from common import benchmark_parser, parse_arguments  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
parser = benchmark_parser(__doc__, out="turbulence_reference.json",
                          results=os.path.join(HERE, "results"))
parser.add_argument("--runs", nargs="+", default=["2:25", "2:50", "2:100", "2:200", "3:200"],
                    help="refinement:steps of each run; the last is the reference")
parser.add_argument("--theta", type=float, default=0.5, help="the time scheme (1/2: CN)")
parser.add_argument("--t-end", type=float, default=5.0)
parser.add_argument("--initial", default="grf", choices=["fourier", "grf"])
parser.add_argument("--modes", type=int, default=8, help="the initial vorticity's modes per axis")
parser.add_argument("--amplitude", type=float, default=1.0)
parser.add_argument("--samples", type=int, default=3, help="inputs, drawn as the datasets do")
parser.add_argument("--seed", type=int, default=0)
args = parse_arguments(parser)   # before Firedrake is imported: the rest are PETSc's options

import numpy as np  # noqa: E402
import firedrake as fd  # noqa: E402
from mpi4py import MPI  # noqa: E402

from common import print_table, write_json  # noqa: E402
from fem_moe import pdes  # noqa: E402


def main():
    comm = MPI.COMM_WORLD
    runs = [tuple(int(x) for x in run.split(":")) for run in args.runs]
    options = dict(t_end=args.t_end, theta=args.theta, initial=args.initial, modes=args.modes,
                   amplitude=args.amplitude)
    base = pdes.get("decaying_turbulence", **options)
    coarsest = base.mesh(comm)
    hierarchy = fd.MeshHierarchy(coarsest, max(r for r, _ in runs))
    params = base.sample(np.random.default_rng(args.seed), args.samples)
    ref_r, ref_n = runs[-1]
    fine_space = fd.FunctionSpace(hierarchy[ref_r], "CG", 1)
    errors = {run: [] for run in runs}
    persistence, seconds, dofs = {run: [] for run in runs}, {run: [] for run in runs}, {}
    for sample, p in enumerate(params):
        trajectories = {}
        for r, n in runs:
            pde = pdes.get("decaying_turbulence", steps=n, **options)
            problem = pde.problem(hierarchy[r])
            data = pde.data(problem, p)
            u, time, _ = pde.classical_solve(problem, data)
            V = fd.FunctionSpace(hierarchy[r], "CG", 1)
            levels = []
            for j in range(n):
                w = fd.Function(V)
                w.dat.data[:] = (u.subfunctions[0].dat.data_ro[:, j]
                                 + data[0].subfunctions[0].dat.data_ro[:, j])
                levels.append(_on(w, fine_space))
            w0 = fd.Function(V)
            w0.dat.data[:] = data[0].subfunctions[0].dat.data_ro[:, 0]
            trajectories[(r, n)] = (levels, _on(w0, fine_space))
            seconds[(r, n)].append(comm.allreduce(time, op=MPI.MAX))
            dofs[(r, n)] = problem.V.dim()
            if comm.rank == 0:
                print(f"input {sample}: refinement {r}, {n} steps: {time:.1f} s", flush=True)
        reference, _ = trajectories[runs[-1]]
        for (r, n), (levels, w0) in trajectories.items():
            stride = ref_n // n
            pairs = [(levels[j], reference[(j + 1) * stride - 1]) for j in range(n)]
            size = sum(fd.assemble(b * b * fd.dx) for _, b in pairs)
            errors[(r, n)].append(np.sqrt(sum(fd.errornorm(b, a) ** 2 for a, b in pairs) / size))
            persistence[(r, n)].append(np.sqrt(sum(fd.errornorm(b, w0) ** 2 for _, b in pairs)
                                               / size))
    rows = [{"refine": r, "h": 1 / (16 * 2 ** r), "steps": n, "dt": args.t_end / n,
             "space_time_dofs": dofs[(r, n)],
             "rel_l2_mean": float(np.mean(errors[(r, n)])),
             "rel_l2_max": float(np.max(errors[(r, n)])),
             "rel_l2_samples": [float(e) for e in errors[(r, n)]],
             "persistence_mean": float(np.mean(persistence[(r, n)])),
             "seconds_mean": float(np.mean(seconds[(r, n)]))} for r, n in runs]
    if comm.rank == 0:
        print_table(rows, [("refine", "refine", "{}"), ("h", "h", "{:.4f}"),
                           ("steps", "steps", "{}"), ("space_time_dofs", "dofs", "{}"),
                           ("rel_l2_mean", "rel. L2 mean", "{:.2%}"),
                           ("rel_l2_max", "rel. L2 max", "{:.2%}"),
                           ("persistence_mean", "persistence", "{:.2%}"),
                           ("seconds_mean", "s/input", "{:.1f}")],
                    title=f"decaying turbulence, Re {base.opts['re']:g}, T = {args.t_end:g}, "
                          f"theta = {args.theta:g}, {args.initial} inputs: each run against "
                          f"refinement {ref_r} with {ref_n} steps ({comm.size} rank(s))")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        write_json(args.out, "turbulence_reference", rows, ranks=comm.size, **options,
                   samples=args.samples, re=base.opts["re"])


def _on(f, space):
    """``f`` on ``space``'s mesh, a refinement of f's in the same hierarchy (exact for P1)."""
    if f.function_space().mesh() is space.mesh():
        return f
    out = fd.Function(space)
    fd.prolong(f, out)
    return out


if __name__ == "__main__":
    main()
