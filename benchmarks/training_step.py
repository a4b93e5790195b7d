"""Where a physics-informed training step goes: backbone, constraint layer, loss, bridge.

    mpiexec -n 2 python benchmarks/training_step.py [--n 48] [--experts 2] [--n-basis 16]
                                                    [--batch 2] [--steps 5]
                                                    [--out benchmarks/results/training_step.json]

One step = DeepONet basis at this rank's dofs -> MoEHardConstraint -> residual_loss (the global
residual) -> backward -> bridge.allreduce_gradients -> Adam. Each phase is timed on every rank
after a barrier; the table shows the slowest rank's time per phase (mean over steps after one
warm-up step) and its share of the step.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--n-basis", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "training_step.json"))
    args, _ = parser.parse_known_args()
    sys.path.insert(0, HERE)
    import numpy as np
    import torch
    from mpi4py import MPI
    import fem_moe
    from fem_moe import bridge
    from fem_moe.backbones import DeepONetBasis
    from common import Timer, nonlinear_diffusion, print_table, write_json

    comm = MPI.COMM_WORLD
    bridge.init_process_group(comm)
    problem, data = nonlinear_diffusion(args.n)
    data = data.repeat(args.batch, 1) * torch.linspace(1, 2, args.batch, dtype=torch.float64)[:, None]
    params = torch.linspace(1, 2, args.batch, dtype=torch.float64)[:, None]
    torch.manual_seed(0)
    net = DeepONetBasis(1, args.n_basis, dim=2, width=64, depth=3).double().to(bridge.device_for_rank(comm))
    bridge.broadcast_parameters(net)
    layer = fem_moe.MoEHardConstraint(problem, args.n_basis, n_experts=args.experts)
    points = torch.tensor(problem.dof_coordinates())
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    phases = ["backbone", "constraint forward", "loss forward", "backward", "bridge all-reduce", "optimiser"]
    times = {p: [] for p in phases}

    def timed(name, fn):
        comm.Barrier()
        with Timer() as t:
            out = fn()
        times[name].append(comm.allreduce(t.seconds, MPI.MAX))
        return out

    for step in range(args.steps + 1):
        basis = timed("backbone", lambda: net(params, points))
        u = timed("constraint forward", lambda: layer(basis, data))
        loss = timed("loss forward", lambda: fem_moe.residual_loss(problem, u, data))
        optimiser.zero_grad()
        timed("backward", loss.backward)
        timed("bridge all-reduce", lambda: bridge.allreduce_gradients(net))
        timed("optimiser", optimiser.step)
        if step == 0:
            times = {p: [] for p in phases}    # the warm-up step compiles kernels
    total = sum(np.mean(times[p]) for p in phases)
    rows = [{"phase": p, "seconds": float(np.mean(times[p])), "share": float(np.mean(times[p]) / total)}
            for p in phases]
    if comm.rank == 0:
        print(f"{comm.size} ranks, {problem.V.dim()} dofs, K = {layer.n_experts}, N = {args.n_basis}, "
              f"batch {args.batch}: {total:.3f} s per step")
        print_table(rows, [("phase", "phase", "{}"), ("seconds", "s (slowest rank)", "{:.4f}"),
                           ("share", "share", "{:.1%}")])
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        write_json(args.out, "training_step", rows, ranks=comm.size, dofs=problem.V.dim(),
                   experts=layer.n_experts, n_basis=args.n_basis, batch=args.batch, steps=args.steps)


if __name__ == "__main__":
    main()
