"""The bridge: backbone replicas on every rank stay bitwise identical while training through a
mixture of experts under mpiexec."""
import hashlib

import pytest
import torch
from mpi4py import MPI
from pytest_mpi import parallel_assert

import fem_moe
from fem_moe import bridge
from fem_moe.backbones import DeepONetBasis
from problems import nonlinear_diffusion, source


def digest(module):
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parallel([1, 2, 3])
def test_replicas_stay_identical_and_learn():
    """(On 3 ranks one rank hosts no expert: it still evaluates the backbone and exchanges.)"""
    comm = MPI.COMM_WORLD
    bridge.init_process_group(comm)
    device = bridge.device_for_rank(comm)
    torch.manual_seed(1234 + comm.rank)      # replicas start different on purpose
    problem = nonlinear_diffusion(n=8, degree=1)
    net = DeepONetBasis(1, 4, dim=2, width=32, depth=2).double().to(device)
    bridge.broadcast_parameters(net)
    layer = fem_moe.MoEHardConstraint(problem, 4, n_experts=2)
    points = torch.tensor(problem.dof_coordinates(), device=device)
    scales = torch.tensor([[1.0], [3.0]], dtype=torch.float64, device=device)
    data = torch.cat([source(problem, s) for s in (1.0, 3.0)])
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = fem_moe.residual_loss(problem, layer(net(scales, points), data), data)
        optimiser.zero_grad()
        loss.backward()
        bridge.allreduce_gradients(net)
        optimiser.step()
        losses.append(loss.item())
    digests = comm.allgather(digest(net))
    parallel_assert(len(set(digests)) == 1, f"replicas differ after 10 steps: {digests}")
    parallel_assert(len(set(comm.allgather(tuple(losses)))) == 1, "ranks saw different losses")
    parallel_assert(losses[-1] < 0.9 * losses[0], f"no learning: {losses}")


@pytest.mark.parallel(2)
def test_replicas_of_different_shapes_raise_everywhere():
    comm = MPI.COMM_WORLD
    bridge.init_process_group(comm)
    net = torch.nn.Linear(3 + comm.rank, 2)
    with pytest.raises(fem_moe.InputError, match="replicas differ across ranks"):
        bridge.broadcast_parameters(net)


def _train(problem, net, kind, ranks, steps):
    """``steps`` Adam steps of a NeuralSolver (physics loss); returns (first output, losses,
    gradients of the first step)."""
    import copy
    from fem_moe.model import NeuralSolver
    model = NeuralSolver(problem, copy.deepcopy(net), kind=kind, n_basis=4, n_experts=2,
                         backbone_ranks=ranks)
    scales = torch.tensor([[1.0], [2.5]], dtype=torch.float64)
    data = torch.cat([source(problem, s) for s in (1.0, 2.5)])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, first, grads = [], None, None
    for _ in range(steps):
        u = model(scales, data)
        loss = fem_moe.residual_loss(problem, u, data)
        optimiser.zero_grad()
        loss.backward()
        (ranks.allreduce_gradients if ranks is not None else bridge.allreduce_gradients)(model)
        if first is None:
            first = u.detach().clone()
            grads = {name: None if p.grad is None else p.grad.clone()
                     for name, p in model.named_parameters()}
        optimiser.step()
        losses.append(loss.item())
    return first, losses, grads


@pytest.mark.parallel([2, 3])
@pytest.mark.parametrize("kind,servers", [("soft", [0]), ("moe", [0]), ("moe", [0, 1])])
def test_one_backbone_rank_serves_every_rank(kind, servers):
    """Rank 0 alone holds the backbone and evaluates it at every rank's dofs: outputs, losses
    and gradients equal the all-replica run's (1e-12), and training lowers the loss alike
    (3 ranks: two clients of one server; with K = 2, one rank hosts no expert). Backbone ranks
    [0, 1] on 3 ranks: rank 0 serves rank 2, rank 1 serves no one."""
    comm = MPI.COMM_WORLD
    bridge.init_process_group(comm)
    torch.manual_seed(7)
    problem = nonlinear_diffusion(n=6, degree=1)
    net = DeepONetBasis(1, 4, dim=2, width=16, depth=2).double()
    bridge.broadcast_parameters(net)
    served = bridge.BackboneRanks(comm, ranks=servers)
    mine = comm.rank in servers
    parallel_assert(served.is_backbone == mine and served.server == (comm.rank if mine else 0),
                    "who serves whom")
    u0, losses0, grads0 = _train(problem, net, kind, None, 6)
    u1, losses1, grads1 = _train(problem, net, kind, served, 6)
    parallel_assert(float((u0 - u1).abs().max()) < 1e-12, "outputs differ")
    # The first step's loss to 1e-12; later steps to 1e-9, since the server's one backbone call
    # over every rank's points sums in another order than each rank's own call (1e-16), which
    # the nonlinear solves and Adam carry on.
    parallel_assert(abs(losses0[0] - losses1[0]) < 1e-12 * losses0[0]
                    and max(abs(a - b) for a, b in zip(losses0, losses1)) < 1e-9 * losses0[0],
                    f"losses differ: {losses0} against {losses1}")
    parallel_assert(losses1[-1] < 0.9 * losses1[0], f"no learning: {losses1}")
    # The backbone's gradients live on the backbone rank; a soft constraint's weights' are summed
    # over every rank.
    names = list(grads0) if served.is_backbone else [n for n in grads0
                                                     if not n.startswith("backbone.")]
    worst = max([float((grads0[n] - grads1[n]).abs().max()) for n in names], default=0.0)
    scale = max(float(g.abs().max()) for g in grads0.values())
    parallel_assert(worst < 1e-11 * scale, f"gradients differ by {worst:.2e} (largest {scale:.2e})")


@pytest.mark.parallel(2)
def test_backbone_ranks_must_hold_rank_0():
    with pytest.raises(fem_moe.InputError, match="must include rank 0"):
        bridge.BackboneRanks(MPI.COMM_WORLD, ranks=[1])
