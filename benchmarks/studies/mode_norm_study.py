"""Which reduced problem and which residual norm? Every mode x norm of the hard-constraint
layers, the global layer (PI-HC) and the coupled mixture, trained the same way on one demo's
problem (physics-informed loss, no solutions), then evaluated on held-out inputs.

    python benchmarks/studies/mode_norm_study.py --pde reaction_diffusion --steps 150
    mpiexec -n 2 python benchmarks/studies/mode_norm_study.py --pde diffusion_sorption --experts 4

Prints a table (relative L2 error against the classical solver, residual, step time) and writes
``benchmarks/studies/results/mode_norm_<pde>_K<K>_<steps>steps.json``. The demos' configurations:
``reaction_diffusion`` (the gmsh plate with holes), ``diffusion_sorption`` (the space-time window),
``flow_past_obstacle`` (steady Navier-Stokes, Taylor-Hood), ``decaying_turbulence`` (periodic, a
window of steps).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py
from common import benchmark_parser, parse_arguments  # noqa: E402

parser = benchmark_parser(__doc__)
parser.add_argument("--pde", default="reaction_diffusion",
                    choices=["reaction_diffusion", "diffusion_sorption", "flow_past_obstacle",
                             "decaying_turbulence"])
parser.add_argument("--steps", type=int, default=150)
parser.add_argument("--experts", type=int, default=4)
parser.add_argument("--n-basis", type=int, default=16)
parser.add_argument("--n-train", type=int, default=32)
parser.add_argument("--n-test", type=int, default=8)
parser.add_argument("--loss-norm", default="dual",
                    help="the physics loss's norm (train.residual_norm)")
parser.add_argument("--no-warm-start", action="store_true",
                    help="solve every training sample cold (model.warm_start = false)")
parser.add_argument("--only", default=None, help="comma-separated labels to run (default: all)")
parser.add_argument("--fresh", action="store_true",
                    help="a new batch of inputs every step (train.fresh_inputs; physics loss) "
                         "instead of the --n-train fixed ones; its own JSON (..._fresh.json)")
parser.add_argument("--fourier-features", type=int, default=0,
                    help="the DeepONet trunk's random Fourier features (model.fourier_features); "
                         "> 0: its own JSON (..._ff<M>.json)")
parser.add_argument("--fourier-scale", type=float, default=3.0, help="model.fourier_scale")
parser.add_argument("--ridge-factor", type=float, default=None,
                    help="model.ridge_factor (the ridge of a rank-deficient basis); its own JSON "
                         "(..._ridge<factor>.json)")
parser.add_argument("--backbone", default="deeponet", choices=["deeponet", "fno"],
                    help="model.backbone (fno: the turbulence demo's); fno: its own JSON "
                         "(..._fno.json)")
parser.add_argument("--global-steps", type=int, default=0,
                    help="the mixtures' model.global_steps (their basis first trained through the "
                         "global layer); > 0: its own JSON (..._global<S>.json)")
parser.add_argument("--fno-products", action="store_true",
                    help="model.fno_products (the FNO's layers form pointwise products); its own "
                         "JSON (..._products.json)")
parser.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate (cosine schedule)")
parser.add_argument("--options", default=None,
                    help="PDE options over the study's, e.g. steps=5,t_end=0.3; its own JSON "
                         "(..._<options>.json)")
parser.add_argument("--out", default=None)
args = parse_arguments(parser)   # before Firedrake is imported: the rest are PETSc's options

from mpi4py import MPI  # noqa: E402
from fem_moe import study  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
from common import merged_rows, parse_options  # noqa: E402
out = os.path.abspath(args.out or os.path.join("results", f"mode_norm_{args.pde}"))
PDE_OPTIONS = {
    "reaction_diffusion": {"mesh": "plate_with_holes"},
    "diffusion_sorption": {"nx": 32, "nt": 16, "t_end": 500.0},
    "flow_past_obstacle": {},
    "decaying_turbulence": {"steps": 10, "t_end": 0.6},     # the demo's window
}
config = {
    "pde": {"name": args.pde, "options": {**PDE_OPTIONS[args.pde], **parse_options(args.options)}},
    "data": {"path": os.path.join(out, "data.h5"), "n_train": args.n_train, "n_val": 4,
             "n_test": args.n_test, "seed": 0},
    "model": {"n_basis": args.n_basis, "width": 64, "depth": 3, "latent": 64,
              "warm_start": not args.no_warm_start, "fourier_features": args.fourier_features,
              "fourier_scale": args.fourier_scale, "backbone": args.backbone,
              "fno_products": args.fno_products,
              **({} if args.ridge_factor is None else {"ridge_factor": args.ridge_factor})},
    "train": {"loss": "physics", "residual_norm": args.loss_norm, "steps": args.steps,
              "batch_size": 4, "lr": args.lr, "val_every": max(args.steps // 5, 1),
              "checkpoint_every": args.steps, "progress": False, "resume": False,
              "fresh_inputs": args.fresh},
}
K = args.experts
models = [("soft", {"kind": "soft"})]
for kind, label in (("pihc", "PI-HC"), ("moe", f"coupled K={K}")):
    extra = {"n_experts": K, "global_steps": args.global_steps} if kind == "moe" else {}
    models += [(f"{label} lstsq euclidean",
                {"kind": kind, "mode": "lstsq", "norm": "euclidean", **extra}),
               (f"{label} lstsq lumped",
                {"kind": kind, "mode": "lstsq", "norm": "lumped", **extra}),
               (f"{label} lstsq dual", {"kind": kind, "mode": "lstsq", "norm": "dual", **extra}),
               *([(f"{label} lstsq dual_blocks",
                   {"kind": kind, "mode": "lstsq", "norm": "dual_blocks",
                                                  **extra})] if kind == "moe" else []),
               (f"{label} galerkin", {"kind": kind, "mode": "galerkin", **extra})]
models = study.select(models, args.only)

study.ensure_dataset(config, MPI.COMM_WORLD, progress=False)
rows, _ = study.compare(config, models, out)
if MPI.COMM_WORLD.rank == 0:
    features = f", {args.fourier_features} Fourier features" if args.fourier_features else ""
    features += ", FNO" if args.backbone == "fno" else ""
    features += " with products" if args.fno_products else ""
    fresh = " on fresh inputs" if args.fresh else ""
    title = (f"{args.pde}: mode x norm, {args.steps} steps{fresh}{features}, "
             f"physics loss ({args.loss_norm} norm), {MPI.COMM_WORLD.size} rank(s)")
    study.print_table(rows, title)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    # The file's name says how this run differs from the defaults.
    options = args.options.replace("=", "").replace(",", "_") if args.options else ""
    tags = [f"{args.steps}steps", "fresh" if args.fresh else "",
            f"ff{args.fourier_features}" if args.fourier_features else "",
            "fno" if args.backbone == "fno" else "", "products" if args.fno_products else "",
            f"global{args.global_steps}" if args.global_steps else "", options,
            f"lr{args.lr:g}" if args.lr != 2e-3 else "",
            f"ridge{args.ridge_factor:g}" if args.ridge_factor is not None else ""]
    name = os.path.join(HERE, "results",
                        f"mode_norm_{args.pde}_K{K}_{'_'.join(t for t in tags if t)}.json")
    # Rows of earlier runs (other --only selections) stay, unless measured again now.
    rows = merged_rows(name, rows, lambda row: row["label"])
    study.write_json(name, rows,
                     title=title, steps=args.steps, experts=K,
                     ranks=MPI.COMM_WORLD.size)
