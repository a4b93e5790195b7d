"""The backbone's share of a training step, and the bridge's, in both layouts of the ranks.

    mpiexec -n P python benchmarks/backbone_serving.py [--points 103525] [--n-basis 16]
        [--batch 4] [--backbones deeponet fno] [--layouts all served] [--dtype float64]
        [--steps 5] [--out benchmarks/results/backbone_serving.json]

Torch and MPI only (no Firedrake: fem_moe.bridge and fem_moe.backbones import without it), so it
runs on a GPU node where the FEM stack is not installed. What it measures is what the trainer
does to the backbone in a step: each rank's ``--points / P`` dof coordinates (random in the unit
square here: the backbone's cost does not depend on where they are) -> basis fields
[batch, N, n] through ``BackboneRanks.evaluate`` -> a backward from a fixed gradient (what the
constraint layer's backward hands back) -> ``allreduce_gradients``. The constraint layer's
solves are not here (they are on the CPU in every layout: ``benchmarks/training_step.py``).

Layouts: ``all`` -- every rank a replica, on its GPU when torch sees one (``local rank mod
#GPUs``), else its CPU; ``served`` -- the default backbone ranks (one per GPU on each node) when
torch sees a GPU, rank 0 alone on CPU-only machines; each serves its node's other ranks over MPI.

Columns, per step, slowest rank: ``forward`` (evaluate, the fields' transfer included),
``backward`` (the backward, the gradients' return and the all-reduce), ``backbone`` (on a
backbone rank: the backbone's forward and backward at every point it serves, no transfer),
``bridge`` = forward + backward - backbone: what serving and syncing cost. ``max diff`` checks
the layout: fields and backbone gradients against every rank evaluating its own points on a CPU
copy of the same weights, relative to the largest entry.
"""
import os
import sys
import time


import numpy as np
import torch
from mpi4py import MPI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import benchmark_parser, print_table, write_json  # noqa: E402
from fem_moe import bridge  # noqa: E402
from fem_moe.backbones import DeepONetBasis, ParametricFNOBasis  # noqa: E402

N_INPUTS = 8


def build(kind, n_basis):
    """The trainer's default backbone of each kind (config.py's model defaults) in 2D."""
    if kind == "deeponet":
        return DeepONetBasis(N_INPUTS, n_basis, 2, latent=64, width=64, depth=3)
    return ParametricFNOBasis(N_INPUTS, n_basis, [0.0, 0.0], [1.0, 1.0], grid=32, modes=8,
                              width=64, layers=3)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slowest(comm, seconds):
    return comm.allreduce(seconds, op=MPI.MAX)


def measure(comm, kind, layout, args, dtype):
    ranks = "all" if layout == "all" else (None if torch.cuda.is_available() else [0])
    served = bridge.BackboneRanks(comm, ranks)
    device = served.device
    torch.manual_seed(0)
    reference = build(kind, args.n_basis).to(dtype)                       # the CPU copy
    net = build(kind, args.n_basis).to(dtype)
    net.load_state_dict(reference.state_dict())
    net = net.to(device)
    served.broadcast_parameters(net)
    n = args.points // comm.size + (comm.rank < args.points % comm.size)
    rng = np.random.default_rng(1 + comm.rank)
    points_cpu = torch.tensor(rng.random((n, 2)), dtype=dtype)
    inputs_cpu = torch.tensor(np.random.default_rng(0).standard_normal((args.batch, N_INPUTS)),
                              dtype=dtype)
    upstream_cpu = torch.tensor(rng.standard_normal((args.batch, args.n_basis, n)), dtype=dtype)
    points, inputs = points_cpu.to(device), inputs_cpu.to(device)

    forward, backward = [], []
    for step in range(args.steps + 1):                                   # the first one warms up
        net.zero_grad(set_to_none=True)
        comm.Barrier()
        synchronize(device)
        t0 = time.perf_counter()
        fields = served.evaluate(net, inputs, points)
        synchronize(device)
        t1 = time.perf_counter()
        (fields * upstream_cpu.to(fields.device)).sum().backward()
        served.allreduce_gradients(net)
        synchronize(device)
        t2 = time.perf_counter()
        if step:
            forward.append(slowest(comm, t1 - t0))
            backward.append(slowest(comm, t2 - t1))

    # The layout's answer against each rank's own CPU evaluation with the same weights.
    ref_fields = reference(inputs_cpu, points_cpu)
    (ref_fields * upstream_cpu).sum().backward()
    ref_fields = ref_fields.detach()
    scale = comm.allreduce(float(ref_fields.abs().max()), op=MPI.MAX)
    diff_fields = comm.allreduce(float((fields.detach().cpu() - ref_fields).abs().max()),
                                 op=MPI.MAX)
    diff_grads, largest = 0.0, 0.0
    for p, q in zip(net.parameters(), reference.parameters()):
        total = np.empty_like(q.grad.numpy())
        comm.Allreduce(np.ascontiguousarray(q.grad.numpy()), total)
        largest = max(largest, float(np.abs(total).max()))
        if served.is_backbone:
            diff_grads = max(diff_grads, float(np.abs(p.grad.cpu().numpy() - total).max()))
    largest = comm.allreduce(largest, op=MPI.MAX)
    diff_grads = comm.allreduce(diff_grads, op=MPI.MAX)

    # The backbone alone, on each backbone rank, at every point it serves.
    served_points = served.group.allreduce(n) if not served.everywhere else n
    alone = 0.0
    if served.is_backbone:
        pts = torch.tensor(np.random.default_rng(2).random((served_points, 2)), dtype=dtype,
                           device=device)
        for step in range(args.steps + 1):
            net.zero_grad(set_to_none=True)
            synchronize(device)
            t0 = time.perf_counter()
            net(inputs, pts).sum().backward()
            synchronize(device)
            if step:
                alone += (time.perf_counter() - t0) / args.steps
    alone = slowest(comm, alone)
    f, b = float(np.mean(forward)), float(np.mean(backward))
    return dict(backbone_kind=kind, layout=layout, ranks=comm.size,
                backbone_ranks=len(served.ranks),
                device=str(device) if served.is_backbone else "cpu",
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                points=args.points, n_basis=args.n_basis, batch=args.batch, dtype=args.dtype,
                forward_s=f, backward_s=b, step_s=f + b, backbone_s=alone,
                bridge_s=max(f + b - alone, 0.0), max_diff_fields=diff_fields / scale,
                max_diff_grads=diff_grads / largest, steps=args.steps)


def main():
    parser = benchmark_parser(__doc__, out="backbone_serving.json")
    parser.add_argument("--points", type=int, default=103525,
                        help="dofs over all ranks (default: diffusion-sorption at the paper's "
                             "size)")
    parser.add_argument("--n-basis", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backbones", nargs="+", default=["deeponet", "fno"],
                        choices=["deeponet", "fno"])
    parser.add_argument("--layouts", nargs="+", default=["all", "served"],
                        choices=["all", "served"])
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after one warm-up)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    dtype = getattr(torch, args.dtype)
    rows = [measure(comm, kind, layout, args, dtype) for kind in args.backbones
            for layout in args.layouts]
    if comm.rank == 0:
        print_table(rows, [("backbone_kind", "backbone", "{}"), ("layout", "layout", "{}"),
                           ("ranks", "ranks", "{}"), ("backbone_ranks", "bb ranks", "{}"),
                           ("device_name", "device (rank 0)", "{}"),
                           ("forward_s", "forward s", "{:.4f}"),
                           ("backward_s", "backward s", "{:.4f}"),
                           ("backbone_s", "backbone s", "{:.4f}"),
                           ("bridge_s", "bridge s", "{:.4f}"),
                           ("max_diff_fields", "max diff fields", "{:.1e}"),
                           ("max_diff_grads", "max diff grads", "{:.1e}")],
                    title=f"backbone and bridge per step: {args.points} dofs on {comm.size} ranks, "
                          f"N = {args.n_basis}, batch {args.batch}, {args.dtype}")
        write_json(args.out, "backbone_serving", rows, cuda=torch.cuda.is_available(),
                   torch=torch.__version__, mpi=MPI.Get_library_version().splitlines()[0])


if __name__ == "__main__":
    main()
