"""The GPU path: run where torch sees a GPU (skipped elsewhere, with the reason). Under mpiexec
with several ranks per GPU the default backbone ranks put one backbone on the GPU and serve the
other ranks of the node from it."""
import os

import pytest
import torch
from mpi4py import MPI
from pytest_mpi import parallel_assert

import fem_moe
from fem_moe import bridge
from problems import nonlinear_diffusion, random_basis, source

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="torch sees no GPU (torch.cuda.is_available() is False)")


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("kind", ["pihc", "moe"])
def test_layer_takes_and_returns_cuda_tensors(kind):
    problem = nonlinear_diffusion(n=6)
    layer = (fem_moe.HardConstraint(problem, 4) if kind == "pihc"
             else fem_moe.MoEHardConstraint(problem, 4, n_experts=2))
    basis, data = random_basis(problem, 4), source(problem)
    on_cpu = layer(basis, data)
    cuda = torch.device("cuda", 0)
    b = basis.to(cuda).requires_grad_()
    u = layer(b, data.to(cuda))
    parallel_assert(u.is_cuda and float((u.cpu() - on_cpu).abs().max()) < 1e-12,
                    "CUDA output differs")
    (u ** 2).sum().backward()
    parallel_assert(b.grad is not None and b.grad.is_cuda, "no CUDA gradient")


@pytest.mark.parallel([1, 2])
def test_training_step_with_the_backbone_on_cuda():
    import test_training
    base = test_training.shared_dir()
    trainer = fem_moe.Trainer(test_training.config(os.path.join(base, "gpu")))
    served = trainer.backbone_ranks
    parallel_assert(served.device.type == ("cuda" if served.is_backbone else "cpu"),
                    f"device {served.device} on a "
                    f"{'backbone' if served.is_backbone else 'client'} rank")
    trainer.fit(2)
    parallel_assert(all(h["loss"] == h["loss"] for h in trainer.history), "NaN loss")
    if served.is_backbone:
        assert next(trainer.model.backbone.parameters()).is_cuda
    parallel_assert(bridge.BackboneRanks(MPI.COMM_WORLD).ranks == served.ranks, "ranks differ")


@pytest.mark.parallel([1, 2])
def test_replicas_sharing_a_gpu_reduce_their_gradients():
    """Every rank a replica on the node's GPU (the replicated layout) with more ranks
    than GPUs: NCCL refuses two ranks on one GPU ("invalid usage", seen on an H200 with the
    backend chosen from CUDA alone), so the process group is gloo there, which reduces CUDA
    tensors; one rank per GPU keeps NCCL."""
    import torch.distributed as dist
    comm = MPI.COMM_WORLD
    bridge.init_process_group(comm)
    device = bridge.device_for_rank(comm)
    net = torch.nn.Linear(3, 2).double().to(device)
    bridge.broadcast_parameters(net)
    net(torch.ones(4, 3, dtype=torch.float64, device=device)).sum().backward()
    bridge.allreduce_gradients(net)
    sharing = comm.size > torch.cuda.device_count()
    parallel_assert(dist.get_backend() == ("gloo" if sharing else "nccl"), dist.get_backend())
    parallel_assert(float(net.bias.grad[0]) == 4.0 * comm.size, f"{net.bias.grad}")
