"""Where a coupled mixture's training step goes, against the global layer: the constraint's
forward + backward for one batch, with and without the experts' own solves as the first stage.

    python benchmarks/coupled_step.py [--pde reaction_diffusion] [--experts 4] [--n-basis 16]
                                      [--batch 4] [--repeat 3] [--mode galerkin]

The problem is a demo's (the gmsh plate by default), its data drawn from the PDE's input
distribution, the basis an untrained DeepONet's (seeded). Prints, per layer, the mean seconds of
forward + backward (after a warm-up that compiles kernels), the coupled SNES iterations per
sample, and writes ``benchmarks/results/coupled_step.json``.
"""
import os
import time

from common import benchmark_parser, parse_arguments

HERE = os.path.dirname(os.path.abspath(__file__))
parser = benchmark_parser(__doc__)
parser.add_argument("--pde", default="reaction_diffusion")
parser.add_argument("--mesh", default="plate_with_holes", help="reaction_diffusion's mesh option")
parser.add_argument("--experts", type=int, default=4)
parser.add_argument("--n-basis", type=int, default=16)
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--repeat", type=int, default=3)
parser.add_argument("--mode", default="galerkin", choices=["lstsq", "galerkin"])
args = parse_arguments(parser)   # before Firedrake is imported: the rest are PETSc's options

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

import fem_moe  # noqa: E402
from fem_moe.backbones import DeepONetBasis  # noqa: E402
from fem_moe.pdes import REGISTRY  # noqa: E402
from fem_moe.problem import owned_values  # noqa: E402

from common import print_table, write_json  # noqa: E402

comm = MPI.COMM_WORLD
pde = REGISTRY[args.pde](**({"mesh": args.mesh} if args.pde == "reaction_diffusion" else {}))
problem = pde.problem(pde.mesh(comm))
params = pde.sample(np.random.default_rng(0), args.batch)
data = torch.tensor(np.stack([np.concatenate([owned_values(f) for f in pde.data(problem, p)])
                              for p in params]))
inputs = torch.tensor(pde.inputs(params))
torch.manual_seed(0)
net = DeepONetBasis(inputs.shape[1], args.n_basis, dim=problem.mesh.geometric_dimension,
                    n_components=problem.n_components).double()
points = torch.tensor(problem.dof_coordinates())
extra = (torch.tensor(problem.dof_components()),) if problem.n_components > 1 else ()
basis = net(inputs, points, *extra).detach()
K, N = args.experts, args.n_basis
layers = [("PI-HC", fem_moe.HardConstraint(problem, N, mode=args.mode)),
          (f"coupled K={K}", fem_moe.MoEHardConstraint(problem, N, n_experts=K, mode=args.mode)),
          (f"coupled K={K}, experts' solves first",
           fem_moe.MoEHardConstraint(problem, N, n_experts=K, mode=args.mode, local_first=True))]


def step(layer):
    b = basis.clone().requires_grad_()
    comm.Barrier()
    t0 = time.perf_counter()
    u = layer(b, data)
    t1 = time.perf_counter()
    (u ** 2).sum().backward()
    t2 = time.perf_counter()
    return comm.allreduce(t1 - t0, op=MPI.MAX), comm.allreduce(t2 - t1, op=MPI.MAX)


rows = []
for label, layer in layers:
    step(layer)
    times = np.array([step(layer) for _ in range(args.repeat)]).mean(axis=0)
    row = {"layer": label, "forward_s": times[0], "backward_s": times[1], "step_s": times.sum(),
           "coupled_iterations": float("nan"), "first_stage_s": float("nan")}
    if isinstance(layer, fem_moe.MoEHardConstraint):
        diags = layer.all_diagnostics()
        row["coupled_iterations"] = float(np.mean([s.iterations for s in diags.coupling]))
        row["coupling_s"] = comm.allreduce(sum(s.time for s in diags.coupling), op=MPI.MAX)
        row["first_stage_s"] = max(d["solve_time"] for d in diags) if layer.local_first else 0.0
    rows.append(row)
if comm.rank == 0:
    print(f"{args.pde}, {problem.V.dim()} dofs, N = {N}, batch {args.batch}, {args.mode}, "
          f"{comm.size} rank(s); mean of {args.repeat} steps")
    print_table(rows, [("layer", "layer", "{}"), ("forward_s", "forward s", "{:.3f}"),
                       ("backward_s", "backward s", "{:.3f}"), ("step_s", "step s", "{:.3f}"),
                       ("coupled_iterations", "coupled its/sample", "{:.1f}")])
    write_json(os.path.join(HERE, "results", "coupled_step.json"), "coupled_step", rows,
               ranks=comm.size, pde=args.pde, dofs=problem.V.dim(), n_basis=N, batch=args.batch,
               mode=args.mode)
