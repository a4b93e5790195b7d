"""The dual norm's Riesz solve: which direct solver, at which size (fem_moe.norms' defaults).

    mpiexec -n P python benchmarks/studies/riesz_solve.py
        [--pdes decaying_turbulence diffusion_sorption] [--squares 128 320] [--columns 16]
        [--repeats 5] [--out benchmarks/studies/results/riesz_solve.json]

For each PDE's space at its paper size (turbulence: the 10-step window, 6060 rows;
diffusion-sorption: 1024 x 100 space-time cells, 103,525 rows) the H1 Gram matrix is factored
with MUMPS and with PETSc's own LU (on several ranks inside PCREDUNDANT: every rank factors the
whole matrix; and, on several ranks, as fem_moe.norms.SplitColumns lays it out: every rank
factors the whole matrix and solves its share of a block's columns); ``--squares n ...`` adds
P1 on n x n unit squares (moe_scaling.py's spaces). The table gives the factorisation, one
solve, and ``--columns`` right-hand sides solved as one block (KSPMatSolve) and one column at a
time, slowest rank. A Gauss-Newton
matrix in the dual norm needs one block of N columns (W J Phi^T), every objective one column.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py
from common import benchmark_parser, parse_arguments  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("FIREDRAKE_DISABLE_OPTIONS_LEFT", "1")

OPTIONS = {"decaying_turbulence": {"steps": 10, "t_end": 0.6},
           "diffusion_sorption": {"nx": 1024, "nt": 100}}


def timed(comm, fn, repeats):
    from mpi4py import MPI
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return comm.allreduce((time.perf_counter() - t0) / repeats, op=MPI.MAX)


def measure(pde_name, solver, args):
    import numpy as np
    from mpi4py import MPI
    from firedrake.petsc import PETSc
    from fem_moe import pdes
    from fem_moe.norms import _h1_gram
    if pde_name.startswith("square"):
        import firedrake as fd
        V = fd.FunctionSpace(fd.UnitSquareMesh(int(pde_name[6:]), int(pde_name[6:])), "CG", 1)
    else:
        pde = pdes.get(pde_name, **OPTIONS[pde_name])
        V = pde.problem(pde.mesh(MPI.COMM_WORLD)).V
    G = _h1_gram(V)
    comm = G.getComm().tompi4py()
    if solver == "split":
        return measure_split(pde_name, G, comm, args)
    ksp = PETSc.KSP().create(comm=comm)
    ksp.setOperators(G)
    ksp.setType("preonly")
    pc = ksp.getPC()
    if solver == "mumps":
        pc.setType("lu")
        pc.setFactorSolverType("mumps")
    elif comm.size == 1:
        pc.setType("lu")
        pc.setFactorSolverType("petsc")
    else:
        ksp.setOptionsPrefix("riesz_benchmark_")
        PETSc.Options()["riesz_benchmark_redundant_pc_type"] = "lu"
        pc.setType("redundant")
        pc.setFromOptions()
    factor = timed(comm, ksp.setUp, 1)
    rows = G.getLocalSize()[0]
    B = PETSc.Mat().createDense(((rows, None), (None, args.columns)), comm=comm)
    B.setUp()
    B.getDenseArray()[:] = np.random.default_rng(comm.rank).random((rows, args.columns))
    B.assemble()
    X = B.duplicate()
    x, y = G.createVecs()
    x.setRandom()
    ksp.solve(x, y)                                              # the first solve's setup
    ksp.matSolve(B, X)
    one = timed(comm, lambda: ksp.solve(x, y), args.repeats)
    block = timed(comm, lambda: ksp.matSolve(B, X), args.repeats)
    size = G.getSize()[0]
    for obj in (ksp, B, X, x, y, G):
        obj.destroy()
    return dict(pde=pde_name, rows=size, ranks=comm.size,
                solver=solver if solver == "mumps"
                else ("petsc" if comm.size == 1 else "redundant petsc"),
                factor_ms=1e3 * factor, solve_ms=1e3 * one, block_ms=1e3 * block,
                columns_ms=1e3 * one * args.columns, columns=args.columns)


def measure_split(pde_name, G, comm, args):
    """fem_moe.norms.SplitColumns: PETSc's LU on every rank, a block's columns shared out."""
    import numpy as np
    from fem_moe.norms import SplitColumns
    made = []
    factor = timed(comm, lambda: made.append(SplitColumns(G, "riesz_benchmark_split_", {})), 1)
    solver = made[0]
    rng = np.random.default_rng(comm.rank)
    rows = G.getLocalSize()[0]
    b, B = rng.random(rows), rng.random((rows, args.columns))
    solver.solve(b)
    one = timed(comm, lambda: solver.solve(b), args.repeats)
    block = timed(comm, lambda: solver.solve(B), args.repeats)
    size = G.getSize()[0]
    solver.destroy()
    G.destroy()
    return dict(pde=pde_name, rows=size, ranks=comm.size, solver="split petsc",
                factor_ms=1e3 * factor, solve_ms=1e3 * one, block_ms=1e3 * block,
                columns_ms=float("nan"), columns=args.columns)


def main():
    parser = benchmark_parser(__doc__, out="riesz_solve.json",
                              results=os.path.join(HERE, "results"))
    parser.add_argument("--pdes", nargs="*", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--squares", type=int, nargs="*", default=[],
                        help="also P1 on n x n unit squares (the names square<n>)")
    parser.add_argument("--columns", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_arguments(parser)
    from mpi4py import MPI
    from common import merged_rows, print_table, write_json
    spaces = args.pdes + [f"square{n}" for n in args.squares]
    solvers = ("mumps", "petsc") + (("split",) if MPI.COMM_WORLD.size > 1 else ())
    rows = [measure(p, s, args) for p in spaces for s in solvers]
    if MPI.COMM_WORLD.rank == 0:
        print_table(rows, [("pde", "pde", "{}"), ("rows", "rows", "{}"), ("ranks", "ranks", "{}"),
                           ("solver", "solver", "{}"), ("factor_ms", "factor ms", "{:.0f}"),
                           ("solve_ms", "1 solve ms", "{:.2f}"),
                           ("block_ms", f"{args.columns} as a block ms", "{:.1f}"),
                           ("columns_ms", f"{args.columns} one by one ms", "{:.1f}")],
                    title="the H1 Gram matrix's direct solves (slowest rank)")
        # One file for every space and rank count: the rows measured again replaced.
        write_json(args.out, "riesz_solve",
                   merged_rows(args.out, rows, lambda r: (r["pde"], r["ranks"], r["solver"])))


if __name__ == "__main__":
    main()
