# Flow past a cylinder with random inflows: a hard constraint on a mixed space
# =============================================================================
#
# Steady incompressible Navier-Stokes in velocity-pressure form (Taylor-Hood P2-P1) on the DFG
# channel with a cylinder, meshed by gmsh (``meshes/make_meshes.py``), with a random parabolic
# inflow of random speed and skew (``fem_moe.pdes.FlowPastObstacle``). The constrained output
# is the whole (u, p) pair: one basis field is a velocity *and* a pressure, and the hard
# constraint makes the output satisfy the discrete momentum and continuity equations at once.
# Run it as::
#
#     python demos/flow_past_obstacle.py
#     mpiexec -n 2 python demos/flow_past_obstacle.py -fem_moe_snes_monitor
#
# The comparison is soft constraint vs PI-HC vs the mixture of K experts (coupled, in least
# squares and Galerkin mode, and the paper's independent experts): each expert owns the (u, p)
# coefficients of a subdomain of the channel, so its residual rows are momentum *and* continuity
# rows of the dofs it owns. Independent experts downstream of the inlet see no inflow and output
# no flow; coupled, every expert's coefficients are chosen for the whole channel's residual.
import os

from fem_moe import arguments

parser = arguments.demo_parser("Steady flow past a cylinder: soft constraint, PI-HC and the "
                               "mixture of experts", out="results/flow_past_obstacle", steps=600,
                               n_train=24, n_test=6, experts=4)
parser.add_argument("--nu", type=float, default=0.02, help="viscosity (Re = U 0.1 / nu)")
parser.add_argument("--fourier-features", type=int, default=32,
                    help="random Fourier features of the coordinates the DeepONet trunk sees "
                         "(model.fourier_features; 0: the plain trunk)")
args = arguments.parse(parser)   # before Firedrake is imported: the rest are PETSc's options
if args.tiny:
    args.n_train, args.n_test, args.steps, args.n_basis = 4, 2, 2, 4

from mpi4py import MPI  # noqa: E402
from fem_moe import study  # noqa: E402

# The backbone sees the inflow's speed and skew; its trunk sees the dof coordinates and which
# field a dof belongs to (u_x, u_y or p), so one network outputs mixed basis fields. The trunk
# also sees random Fourier features of the coordinates: a plain MLP on coordinates is slow to
# learn the boundary layers and the cylinder's wake (the span of its fields leaves 11 % of the
# solutions, with the features 2 %). Training is physics-informed: the relative residual of the
# output in the dual norm of H1.
out = os.path.abspath(args.out)
config = {
    "pde": {"name": "flow_past_obstacle", "options": {"nu": args.nu}},
    "data": {"path": os.path.join(out, "data.h5"), "n_train": args.n_train, "n_val": 2,
             "n_test": args.n_test, "seed": 0},
    "model": {"n_basis": args.n_basis, "width": 64, "depth": 3, "latent": 64,
              "fourier_features": args.fourier_features},
    "train": {"loss": "physics", "steps": args.steps, "batch_size": 4 if not args.tiny else 2,
              "lr": 2e-3, "val_every": max(args.steps // 5, 1), "checkpoint_every": args.steps,
              "progress": not args.tiny, "resume": False},
}
K = args.experts
models = study.select(study.standard_models(K), args.models)
rows, trainers = study.run(config, models, out, "flow past a cylinder, Taylor-Hood "
                           f"({MPI.COMM_WORLD.size} rank(s))", figures=not args.no_figures)
if MPI.COMM_WORLD.rank == 0:
    print(f"results, figures and ParaView files in {out}")
