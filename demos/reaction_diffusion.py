# Soft constraint, PI-HC and mixture of experts on a plate with holes
# =====================================================================
#
# The question of the paper, asked on finite elements: with the same backbone and the same
# training budget, how do a *soft* physics constraint (the PDE only in the loss), a *hard*
# constraint over the whole mesh (PI-HC, one expert) and a *mixture of hard-constraint experts*
# (PI-HC-MoE, K subdomains) compare -- in accuracy against the classical solver, in how well
# their outputs satisfy the PDE, and in cost? Run it as::
#
#     python demos/reaction_diffusion.py                 # the default: minutes on 2 cores
#     mpiexec -n 2 python demos/reaction_diffusion.py    # the same study on 2 ranks
#     python demos/reaction_diffusion.py --refine 1 --steps 1000 --experts 16  # larger
#
# PETSc options pass through: ``-moe_snes_monitor`` shows the coupled mixture's solves.
#
# The PDE
# -------
# A nonlinear reaction-diffusion problem on the unit square with two circular holes, meshed by
# gmsh (``meshes/make_meshes.py``)::
#
#     -div((1 + u^2) grad u) + u^3 = f,   u = 0 on the outer square, zero flux on the holes,
#
# with a random source f = sum_{a,b=1,2} theta_ab sin(pi a x) sin(pi b y), theta_ab ~ U(-20, 20):
# the input distribution of ``fem_moe.pdes.ReactionDiffusion``. P1 elements. The classical
# solver (Firedrake's Newton with MUMPS) makes the reference solutions; the networks see only
# theta and, in training, only the PDE: the loss is the relative squared residual of their
# output in the dual norm of H1 (``train.loss = "physics"``), no solutions.
import os

from fem_moe import arguments

# The default budget: what the coupled Galerkin mixture needs to reach 1 % on this plate
# (benchmarks/studies/mode_norm_study.py, K = 8: 0.69 % after 600 steps; K = 4 after 150: 2.8 %).
parser = arguments.demo_parser("Soft constraint, PI-HC and the mixture of experts on a gmsh "
                               "plate with holes", out="results/reaction_diffusion", steps=600,
                               n_train=32, n_test=8, experts=8)
parser.add_argument("--refine", type=int, default=0, help="uniform refinements of the gmsh mesh")
args = arguments.parse(parser)   # before Firedrake is imported: the rest are PETSc's options

from mpi4py import MPI  # noqa: E402
from fem_moe import study  # noqa: E402
if args.tiny:
    args.n_train, args.n_test, args.steps, args.n_basis, args.experts = 4, 2, 3, 4, 2

# The run
# -------
# One configuration for all three models: the backbone (a DeepONet-style network whose branch
# sees theta and whose trunk sees the dof coordinates, so it serves any mesh and partition), the
# data, the optimiser (Adam, cosine schedule) and the number of steps are the same; only
# ``model.kind`` differs. Everything a config file for ``python -m fem_moe`` can say, a dict can.
out = os.path.abspath(args.out)
config = {
    "pde": {"name": "reaction_diffusion",
            "options": {"mesh": "plate_with_holes", "refine": args.refine}},
    "data": {"path": os.path.join(out, "data.h5"), "n_train": args.n_train, "n_val": 4,
             "n_test": args.n_test, "seed": 0},
    "model": {"n_basis": args.n_basis, "width": 64, "depth": 3, "latent": 64},
    "train": {"loss": "physics", "steps": args.steps, "batch_size": 4, "lr": 2e-3,
              "val_every": max(args.steps // 5, 1), "checkpoint_every": args.steps,
              "progress": not args.tiny, "resume": False},
}
# The models: the soft constraint, the global layer (PI-HC) and the coupled mixture of K experts,
# each in least squares and in Galerkin mode, and the paper's independent experts (least
# squares with its ridge on w); ``fem_moe.study.standard_models`` lists them.
models = study.standard_models(args.experts) + [
    # The control: the same K, cells dealt to the experts at random. Is the gain (or loss) of
    # the mixture from *spatial* subdomains, or just from K blocks of coefficients?
    (f"MoE K={args.experts} galerkin random", {"kind": "moe", "n_experts": args.experts,
                                               "mode": "galerkin", "partitioner": "random"})]

# ``study.run`` makes the dataset if it is missing, trains and evaluates each model on the
# held-out test inputs, prints the table and writes ``results.json``, ParaView files
# (``fields.pvd``: the classical solution, each prediction and its error; ``partition.pvd``)
# and PNG figures into ``out``.
models = study.select(models, args.models)
rows, trainers = study.run(config, models, out, "reaction-diffusion on the plate with holes "
                           f"({MPI.COMM_WORLD.size} rank(s))", figures=not args.no_figures)

# Reading the table
# -----------------
# ``rel. L2`` is the relative L2 error of the dof vector against the classical solution on the
# test inputs; ``residual`` the relative squared residual (the training loss) of the output.
# For the mixture, ``res. interface`` and ``res. elsewhere`` are RMS residual rows at the dofs
# whose equation couples two experts' fields and at all others, relative to the residual of the
# zero field: inside its subdomain an expert satisfies the PDE as well as PI-HC does, and the
# interface rows are what the mixture gives up. ``train s/step`` is the median wall time of a
# training step (batch of 4), ``infer s/sample`` the batched inference time per input, and
# ``classical s/sample`` the Newton solve's time per input when the data was made. The last row,
# random subdomains, has the same K and cells per expert as the mixture above it, but each
# expert's cells are scattered over the whole plate: its submesh (the cells touching its dofs)
# is most of the mesh, and almost every row is an interface row.
if MPI.COMM_WORLD.rank == 0:
    for moe in (r for r in rows if r["label"] == f"MoE K={args.experts} galerkin"):
        print(f"\nMoE: interface rows {moe['interface_dofs']} of {moe['dofs']} dofs; RMS residual "
              f"there {moe['residual_interface']:.2e} vs {moe['residual_interior']:.2e} elsewhere.")
    print(f"results, figures and ParaView files in {out}")
