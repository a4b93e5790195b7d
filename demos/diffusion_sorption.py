# Diffusion-sorption in space-time: the paper's first benchmark on finite elements
# ==================================================================================
#
# PDEBench's 1D diffusion-sorption problem, as in Chalapathi et al. (2024): a solute diffuses
# into a porous medium where it is retarded by nonlinear (Freundlich) sorption::
#
#     du/dt = D / R(u) d2u/dx2,   R(u) = 1 + (1 - phi)/phi rho_s k_f n_f u^(n_f - 1),
#
# x in [0, 1], t in [0, T = 500], u(0, t) = 1, PDEBench's outflow condition at x = 1, and a
# constant initial state u0 ~ U(0, 0.2) (``fem_moe.pdes.DiffusionSorption`` documents the
# constants and how the singular u^(n_f - 1) is kept finite). As the paper constrains its whole
# (x, t) grid, we constrain the whole space-time window: the mesh is the rectangle (x, t/500)
# and the residual the continuous Galerkin space-time form, so a hard constraint makes the
# network's output satisfy the discrete PDE over the entire window. The initial and inflow
# values are imposed exactly by a lifting. Run it as::
#
#     python demos/diffusion_sorption.py
#     mpiexec -n 2 python demos/diffusion_sorption.py
#     python demos/diffusion_sorption.py --nx 64 --nt 32 --steps 400     # larger
#
# Besides the comparison table it measures **extrapolation in time**. The models are trained on
# [0, T] only; we then ask each for [0, T'] (``--extrapolate-to``, default 2T) -- the backbone
# sees later times than it was trained on, and the hard constraints are imposed on the longer
# window -- and measure the error on [T, T'] against the classical solver. The paper's protocol
# (train on t <= 400 s, test on 400 < t <= 500 s) at PDEBench's resolution is::
#
#     mpiexec -n 2 python demos/diffusion_sorption.py --paper --t-end 400 --extrapolate-to 500
#
# For accuracy at PDEBench's size, time levels graded towards the start and a lifting that
# carries the inflow's front (``demos/results/diffusion_sorption_paper``), with the cheaper
# training step's options (a degree-2 quadrature of the residual, a float32 backbone)::
#
#     mpiexec -n 2 python demos/diffusion_sorption.py --paper --grading 3 --lifting erfc \
#         --quadrature-degree 2 --dtype float32 --steps 600 \
#         --models "PI-HC galerkin,MoE K=4 galerkin"
import os
import sys

from fem_moe import arguments

parser = arguments.demo_parser("Diffusion-sorption in space-time: soft constraint, PI-HC and the "
                               "mixture of experts, and extrapolation in time",
                               out="results/diffusion_sorption", steps=150, n_train=32, n_test=8,
                               experts=4)
parser.add_argument("--nx", type=int, default=32, help="cells in x")
parser.add_argument("--nt", type=int, default=16, help="cells in t over [0, T]")
parser.add_argument("--t-end", type=float, default=500.0, help="T: the training window [0, T]")
parser.add_argument("--grading", type=float, default=1.0,
                    help="time levels graded towards t = 0: tau = T (s / s_end)^g (the PDE's "
                         "option; 1: uniform). The start's sqrt(t) front is what uniform levels "
                         "leave unresolved (benchmarks/studies/reference_convergence.py)")
parser.add_argument("--lifting", default="constant", choices=["constant", "erfc"],
                    help="the lifting of the initial and inflow values (the PDE's option): "
                         "'erfc' carries the start's front, the fields the rest")
parser.add_argument("--quadrature-degree", type=int, default=None,
                    help="of the residual's integrals (the PDE's option; default UFL's estimate, "
                         "5): 2 halves an assembly at PDEBench's size")
parser.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                    help="the backbone's (train.dtype; the solves are float64)")
parser.add_argument("--extrapolate-to", type=float, default=None,
                    help="T' > T: the window [0, T'] of the extrapolation test (default 2T)")
parser.add_argument("--backbone", default="deeponet", choices=["deeponet", "fno"],
                    help="the models' backbone (fem_moe.backbones)")
parser.add_argument("--seed", type=int, default=0,
                    help="of the initial weights and the batch order (train.seed)")
parser.add_argument("--residual-norm", default="dual", choices=["dual", "lumped", "l2"],
                    help="the physics loss's norm of the residual (train.residual_norm)")
parser.add_argument("--fresh", action="store_true",
                    help="a new batch of inputs every step (train.fresh_inputs)")
parser.add_argument("--no-extrapolation", action="store_true")
parser.add_argument("--paper", action="store_true",
                    help="PDEBench's resolution: 1024 cells in x, a time level every 5 s "
                         "(100 cells on [0, 500]), 16 test inputs")
args = arguments.parse(parser)   # before Firedrake is imported: the rest are PETSc's options
if args.tiny:
    args.nx, args.nt, args.n_train, args.n_test, args.steps = 8, 4, 4, 2, 3
    args.n_basis, args.experts = 4, 2
if args.paper:
    args.nx, args.nt, args.n_test = 1024, round(args.t_end / 5.0), max(args.n_test, 16)
t_long = 2 * args.t_end if args.extrapolate_to is None else args.extrapolate_to
if t_long <= args.t_end:
    parser.error(f"--extrapolate-to ({t_long}) must be later than --t-end ({args.t_end})")

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fem_moe import study  # noqa: E402
from fem_moe.data import Dataset  # noqa: E402
from fem_moe.pdes.diffusion_sorption import DiffusionSorption  # noqa: E402

comm = MPI.COMM_WORLD
out = os.path.abspath(args.out)
pde_options = {"nx": args.nx, "nt": args.nt, "t_end": args.t_end}
if args.grading != 1.0:      # absent = uniform: datasets made before the option stay current
    pde_options["grading"] = args.grading
if args.lifting != "constant":
    pde_options["lifting"] = args.lifting
if args.quadrature_degree is not None:
    pde_options["quadrature_degree"] = args.quadrature_degree

# Training
# --------
# The same backbone (DeepONet-style: the branch sees u0, the trunk (x, t)), data, optimiser and
# budget for the three models; the loss is the physics-informed one (the relative residual of
# the output in the dual norm of H1 over the space-time mesh). No solutions are used in training.
config = {
    "pde": {"name": "diffusion_sorption", "options": pde_options},
    "data": {"path": os.path.join(out, "data.h5"), "n_train": args.n_train, "n_val": 4,
             "n_test": args.n_test, "seed": 0},
    "model": {"n_basis": args.n_basis, "width": 64, "depth": 3, "latent": 64,
              "backbone": args.backbone},
    "train": {"loss": "physics", "steps": args.steps, "batch_size": 4, "lr": 2e-3,
              "val_every": max(args.steps // 5, 1), "checkpoint_every": args.steps,
              "progress": not args.tiny, "resume": False, "fresh_inputs": args.fresh,
              "residual_norm": args.residual_norm, "seed": args.seed, "dtype": args.dtype},
}
# The models (``fem_moe.study.standard_models``): soft, PI-HC and the coupled mixture in both
# modes, the paper's independent experts; and the paper's own split beside PETSc's graph
# partitioner: "strips" cuts the (x, t) rectangle into K slabs across x that each span the whole
# window (the paper's 4 experts in x). PETSc's partitioner cuts it into K blobs, so experts
# downstream in time hold no initial values of their own: coupled, they take them from their
# neighbours; independent, their rows leave directions of w free, which the paper's ridge
# settles.
K = args.experts
models = study.standard_models(K) + [
    (f"MoE K={K} galerkin strips", {"kind": "moe", "n_experts": K, "mode": "galerkin",
                                    "partitioner": "strips"})]
models = study.select(models, args.models)
rows, trainers = study.run(config, models, out, f"diffusion-sorption, space-time window [0, T] "
                           f"({comm.size} rank(s))", figures=not args.no_figures)

# Extrapolation to [T, T']
# ------------------------
if args.no_extrapolation:
    sys.exit(0)
# The classical solver makes the reference on the window [0, T'] (the same inputs as the test
# split: same seed and sample count), with the same cells per unit time. Each trained model is
# applied there through ``study.relative_l2_where``: the backbone is reused as it is, the
# constraint layers are built anew on the longer mesh (for the mixture: K experts over it).
long = dict(config, pde={"name": "diffusion_sorption",
                         "options": dict(pde_options, nt=round(args.nt * t_long / args.t_end),
                                         t_end=t_long)},
            data=dict(config["data"], path=os.path.join(out, f"data_{t_long:g}.h5")))
study.ensure_dataset(long, comm, progress=not args.tiny)
extrapolation = Dataset(long["data"]["path"], comm)
test = slice(args.n_train + 4, args.n_train + 4 + args.n_test)
t_split = args.t_end / DiffusionSorption.time_unit     # the mesh's second coordinate is t / 500 s
results = []
for label, trainer in trainers.items():
    errors, residuals = study.relative_l2_where(trainer, extrapolation,
                                                lambda X: X[:, 1] > t_split + 1e-12)
    results.append({"label": label, "rel_l2_T_2T": float(np.nanmean(errors[test])),
                    "rel_l2_T_2T_std": float(np.nanstd(errors[test])),
                    "residual_0_2T": float(np.nanmean(residuals[test])),
                    "failed": int(np.isnan(errors[test]).sum()),
                    "rel_l2_0_T": next(r["rel_l2"] for r in rows if r["label"] == label)})
if comm.rank == 0:
    print(f"\nextrapolation: trained on [0, {args.t_end:g}], evaluated on [{args.t_end:g}, "
          f"{t_long:g}] (test inputs)")
    print(f"{'model':>26}  {'rel. L2 on [0,T]':>16}  {'rel. L2 on [T,T1]':>17}  "
          f"{'residual on [0,T1]':>18}  failed")
    for r in results:
        print(f"{r['label']:>26}  {r['rel_l2_0_T']:16.3e}  {r['rel_l2_T_2T']:17.3e}  "
              f"{r['residual_0_2T']:18.3e}  {r['failed']:6d}")
    study.write_json(os.path.join(out, "extrapolation.json"), results, ranks=comm.size,
                     config=long)
    print(f"results, figures and ParaView files in {out}")
