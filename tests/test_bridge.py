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
