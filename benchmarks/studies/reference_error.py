"""How far are trained models from the PDE? Their test errors against a refined classical reference.

The demos measure each model against the classical solution of the *same* discrete problem (what a
hard constraint solves). This script measures the trained models of a diffusion-sorption run against
the classical solution on its space-time mesh refined ``--refine`` times (each refinement halves the
cells in x and in t), with its time levels graded towards t = 0 (``--grading``, the PDE's option; 1:
uniform, and the meshes are nested) — the error a user of the prediction sees against the PDE. The
reference integrates the residual at UFL's estimated degree even where the run chose another
(diffusion_sorption's ``quadrature_degree``). A model's P1 field moves to the reference's mesh by
interpolation (exact on nested meshes). ``benchmarks/studies/reference_convergence.py`` (same
``--grading``) says how far that reference is from the PDE.

    mpiexec -n 2 python benchmarks/studies/reference_error.py \\
        results/diffusion_sorption_paper --refine 1 --grading 3

Every subdirectory of the run holding a ``checkpoint.pt`` is a trained model (``--models``: some of
them); the run's ``data.h5`` holds the test inputs. Any number of ranks. Prints a table and writes
``benchmarks/studies/results/reference_error_<run>.json``: per model the relative L2 error against
the refined reference and against the same-mesh classical solution, mean, standard deviation and max
over the test inputs, and the distance of the same-mesh classical solution itself to the refined
one. Errors are L2 norms over the space-time domain (``firedrake.errornorm``) of the physical field,
initial and inflow values included — not the demos' norm of dof vectors, which on these uniform
meshes is close to it.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py
from common import benchmark_parser, parse_arguments, provenance  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
parser = benchmark_parser(__doc__)
parser.add_argument("run",
                    help="a diffusion-sorption run's output directory (data.h5, "
                         "<model>/checkpoint.pt)")
parser.add_argument("--refine", type=int, default=1,
                    help="refinements of the run's mesh (each halves h and dt)")
parser.add_argument("--grading", type=float, default=3.0,
                    help="the reference mesh's time grading (diffusion_sorption's option; "
                         "1: uniform)")
parser.add_argument("--models", default=None,
                    help="comma-separated subdirectories (default: every trained one)")
parser.add_argument("--split", default="test")
parser.add_argument("--out", default=None)
args = parse_arguments(parser)   # before Firedrake is imported: the rest are PETSc's options

import numpy as np  # noqa: E402
import torch  # noqa: E402
import firedrake as fd  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_moe import checkpoint, pdes  # noqa: E402
from fem_moe.errors import InputError  # noqa: E402
from fem_moe.report import print_table  # noqa: E402
from fem_moe.train import CHECKPOINT, Trainer  # noqa: E402
from common import relative_distance  # noqa: E402

comm = MPI.COMM_WORLD
run = os.path.abspath(args.run)
names = (args.models.split(",") if args.models else
         sorted(d for d in os.listdir(run) if os.path.isfile(os.path.join(run, d, CHECKPOINT))))
if not names:
    raise InputError(f"no trained model (a subdirectory with {CHECKPOINT}) in {run}")


def trainer_of(name):
    """The model trained in ``run/name``, resumed from its checkpoint, on the run's data."""
    config = checkpoint.load(os.path.join(run, name, CHECKPOINT), map_location="cpu")["config"]
    if config["pde"]["name"] != "diffusion_sorption":
        raise InputError(f"{name}: a {config['pde']['name']} run; this script refines "
                         "diffusion-sorption's space-time mesh")
    config["data"]["path"] = os.path.join(run, "data.h5")
    config["train"].update(out=os.path.join(run, name), resume=True, progress=False)
    return Trainer(config, comm)


def physical(trainer, values):
    """A physical field's owned values (a tensor) on the trainer's mesh as a Function."""
    return trainer.problem.function(values.detach().cpu().double())


trainers = [trainer_of(name) for name in names]
first = trainers[0]
options = first.config["pde"]["options"]
idx = first.splits[args.split]
params = first.dataset.params[idx]
scale = 2 ** args.refine
# The reference integrates the residual at UFL's estimate whatever quadrature the run chose
# (its quadrature_degree): it stands for the PDE, not for the run's discrete problem.
fine_options = {k: v for k, v in options.items() if k != "quadrature_degree"}
fine_pde = pdes.get("diffusion_sorption", **{**fine_options, "nx": options["nx"] * scale,
                                             "nt": options["nt"] * scale, "grading": args.grading})
fine_problem = fine_pde.problem(fine_pde.mesh(comm))
V_fine = fine_problem.V


# The refined reference per test input, and the same-mesh classical solution's distance to it.
references, same_mesh, seconds = [], [], []
for i, p in zip(idx, params):
    data = fine_pde.data(fine_problem, p)
    du, t, _ = fine_pde.classical_solve(fine_problem, data)
    seconds.append(t)
    references.append(fd.Function(V_fine).assign(du + data[0]))
    classical = physical(first, first.physical_target(np.array([i]))[0])
    same_mesh.append(relative_distance(references[-1], classical))
    if comm.rank == 0:
        print(f"input {i}: refined reference in {t:.1f} s; the classical solution on the run's "
              f"mesh is {same_mesh[-1]:.3e} from it", flush=True)


def summary(errors):
    e = np.asarray(errors)
    return {"mean": float(e.mean()), "std": float(e.std()), "max": float(e.max()),
            "samples": [float(x) for x in e]}


rows = [{"model": "classical, run's mesh", "to_refined": summary(same_mesh), "to_same_mesh": None}]
for name, trainer in zip(names, trainers):
    trainer.model.eval()
    to_refined, to_same_mesh = [], []
    for start in range(0, len(idx), 4):
        batch = idx[start:start + 4]
        with torch.no_grad():
            predictions, targets = trainer.predict(batch), trainer.physical_target(batch)
        for u, target, ref in zip(predictions, targets, references[start:start + 4]):
            u, target = physical(trainer, u), physical(trainer, target)
            to_refined.append(relative_distance(ref, u))
            to_same_mesh.append(relative_distance(target, u))
    rows.append({"model": name, "step": trainer.step, "to_refined": summary(to_refined),
                 "to_same_mesh": summary(to_same_mesh)})

if comm.rank == 0:
    table = [{"model": r["model"], "refined": r["to_refined"]["mean"],
              "refined_std": r["to_refined"]["std"], "refined_max": r["to_refined"]["max"],
              "same": r["to_same_mesh"]["mean"] if r["to_same_mesh"] else float("nan")}
             for r in rows]
    print(f"\n{run}: {args.split} inputs against the classical solution on "
          f"{fine_pde.opts['nx']} x {fine_pde.opts['nt']} cells, time grading {args.grading:g} "
          f"({V_fine.dim()} dofs, "
          f"{np.mean(seconds):.1f} s per solve)")
    print_table(table,
                [("model", "model", "{}"), ("refined", "rel. L2 to refined (mean)", "{:.3e}"),
                        ("refined_std", "std", "{:.2e}"), ("refined_max", "max", "{:.3e}"),
                        ("same", "rel. L2 to the run's classical (mean)", "{:.3e}")])
    out = args.out or os.path.join(HERE, "results", f"reference_error_{os.path.basename(run)}.json")
    with open(out, "w") as f:
        json.dump({**provenance(comm.size), "ranks": comm.size, "refine": args.refine,
                   "grading": args.grading,
                   "reference_cells": [fine_pde.opts["nx"], fine_pde.opts["nt"]],
                   "reference_dofs": V_fine.dim(), "reference_seconds": float(np.mean(seconds)),
                   "split": args.split, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
