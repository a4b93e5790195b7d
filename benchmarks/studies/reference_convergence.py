"""Is the classical reference converged? Diffusion-sorption's space-time solution under refinement.

The demos and the paper-scale table measure every model against Firedrake's Newton solve of the
*same* discrete problem (space-time P1 on nx x nt cells). That is the right reference for what a
hard constraint does (it solves that discrete problem), but a claim about the PDE needs the
discrete solution itself to be close to the PDE's: this script solves the same inputs on a
sequence of uniformly refined space-time meshes (each level halves the cells of the last in x
and in t; uniform meshes are nested, so a coarse P1 field is exactly a fine one, graded ones
(``--grading``) nearly so: fields move between levels by interpolation) and reports each
level's relative L2 distance (over the physical field, initial and inflow values included) to
the finest and to the next level, the observed order between consecutive distances, and
Richardson's estimate of each level's own error from the PDE's solution (the finest level's
too, which no finer solve measures: 8192 x 800 cells, 6.6e6 dofs, needs more than this
machine's 24 GB with MUMPS on one rank).

    python benchmarks/studies/reference_convergence.py            # 256x25 ... 2048x200
    mpiexec -n 2 python benchmarks/studies/reference_convergence.py --levels 4   # to 4096 x 400

Prints a table and writes ``benchmarks/studies/results/reference_convergence.json``.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py
from common import benchmark_parser, parse_arguments, provenance  # noqa: E402

parser = benchmark_parser(__doc__)
parser.add_argument("--nx", type=int, default=256, help="cells in x of the coarsest level")
parser.add_argument("--nt", type=int, default=25,
                    help="cells in t over [0, T] of the coarsest level")
parser.add_argument("--levels", type=int, default=3, help="refinements above the coarsest")
parser.add_argument("--t-end", type=float, default=500.0)
parser.add_argument("--grading", type=float, default=1.0,
                    help="the meshes' time grading (the PDE's option: levels crowd towards t = 0)")
parser.add_argument("--samples", type=int, default=3, help="inputs u0, drawn as the datasets do")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "reference_convergence.json"))
args = parse_arguments(parser)   # before Firedrake is imported: the rest are PETSc's options

import numpy as np  # noqa: E402
import firedrake as fd  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_moe import pdes  # noqa: E402
from fem_moe.report import print_table  # noqa: E402
from common import relative_distance  # noqa: E402

comm = MPI.COMM_WORLD
params = pdes.get("diffusion_sorption").sample(np.random.default_rng(args.seed), args.samples)
levels = [(args.nx * 2 ** i, args.nt * 2 ** i) for i in range(args.levels + 1)]
solutions, seconds = [], []
for nx, nt in levels:
    pde = pdes.get("diffusion_sorption", nx=nx, nt=nt, t_end=args.t_end, grading=args.grading)
    problem = pde.problem(pde.mesh(comm))
    fields, spent = [], 0.0
    for p in params:
        data = pde.data(problem, p)
        du, t, _ = pde.classical_solve(problem, data)
        spent += t
        fields.append(fd.Function(problem.V).assign(du + data[0]))   # the physical field
    solutions.append(fields)
    seconds.append(spent / len(params))
    if comm.rank == 0:
        print(f"{nx} x {nt}: {problem.V.dim()} dofs, {seconds[-1]:.2f} s per classical solve",
              flush=True)


def distances(fields, finer):
    """Relative L2 distances of one level's solutions to a finer level's (on the finer mesh)."""
    return [relative_distance(fine, coarse) for coarse, fine in zip(fields, finer)]


finest = solutions[-1]
rows = []
for i, ((nx, nt), fields, t) in enumerate(zip(levels, solutions, seconds)):
    last = i + 1 == len(levels)
    errors = [0.0] * len(fields) if last else distances(fields, finest)
    rows.append({"nx": nx, "nt": nt, "dofs": (nx + 1) * (nt + 1), "seconds": t,
                 "rel_l2_to_finest": float(np.mean(errors)), "max": float(np.max(errors))})
    if not last:     # to the next level (the finest: the same): what Richardson's estimate needs
        to_next = errors if i + 2 == len(levels) else distances(fields, solutions[i + 1])
        rows[-1]["rel_l2_to_next"] = float(np.mean(to_next))
for coarse, fine in zip(rows[:-2], rows[1:-1]):
    fine["order"] = float(np.log2(coarse["rel_l2_to_next"] / fine["rel_l2_to_next"]))
# Richardson: with e(h) = C h^p, the distance of level h to h/2 is e(h) (1 - 2^-p), so each
# level's own error (from the PDE's solution) is about its distance to the next / (1 - 2^-p),
# and the finest level's about the last distance times 2^-p / (1 - 2^-p) (p observed between
# the last two distances).
if len(rows) >= 3:
    p = rows[-2]["order"]
    for row in rows[:-1]:
        row["error_estimate"] = row["rel_l2_to_next"] / (1 - 2 ** -p)
    rows[-1]["error_estimate"] = rows[-2]["rel_l2_to_next"] * 2 ** -p / (1 - 2 ** -p)
if comm.rank == 0:
    print_table(rows, [("nx", "nx", "{}"), ("nt", "nt", "{}"), ("dofs", "dofs", "{}"),
                       ("rel_l2_to_finest", "rel. L2 to finest (mean)", "{:.3e}"),
                       ("max", "max", "{:.3e}"), ("rel_l2_to_next", "to the next level", "{:.3e}"),
                       ("order", "observed order", "{:.2f}"),
                       ("error_estimate", "its error (Richardson)", "{:.2e}"),
                       ("seconds", "s per solve", "{:.2f}")])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({**provenance(comm.size), "ranks": comm.size, "t_end": args.t_end,
                   "grading": args.grading,
                   "params": params.tolist(), "rows": rows}, f, indent=1)
