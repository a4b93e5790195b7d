"""A short MPI job that goes through every collective path of fem_moe a user's script takes, then
ends: ``mpiexec -n P python tests/exit_job.py [workdir]``.

It takes a training step with the trainer (its dataset, checkpoint and metrics written under
``workdir``) and a backbone evaluation through the bridge; solves a nonlinear P2 problem on a
disk whose residual closes over the mesh's coordinates with Firedrake's own ``solve``;
constrains a basis spanning that solution with the global layer (least squares and Galerkin)
and the coupled mixture (canonical and distributed partitions, K = 1, 2, 4, default and
Euclidean norms), takes the physics loss and its gradients; gives three bad inputs, each of
which must raise ``InputError`` on every rank; and leaves by ``sys.exit(0)``. Every rank prints
``done`` before it leaves, so that a run that printed it on every rank and then did not end is a
hang at exit.

Python's cycle collector runs when each rank's own allocations say so, at different moments on
different ranks. The job makes that happen where it matters: after Firedrake's solve (which
leaves reference cycles holding PETSc objects on the mesh's communicator) rank 0 collects and
the others do not, before the layers run; and every rank collects at the end, as the collector
would by then.

``tests/test_exit.py`` and ``benchmarks/exit_stress.py`` run it many times under ``mpiexec``.
"""
import gc
import os
import shutil
import sys
import tempfile

import firedrake as fd
import torch
from mpi4py import MPI

import fem_moe
from fem_moe import pdes
from fem_moe.bridge import BackboneRanks
from fem_moe.data import generate
from fem_moe.train import Trainer

comm = MPI.COMM_WORLD


def disk_problem():
    """-div((1 + u^2) grad u) = m (1 + |x|^2) on the unit disk, u = x0 on its boundary; m is P1."""
    mesh = fd.UnitDiskMesh(2, comm=comm)
    V = fd.FunctionSpace(mesh, "CG", 2)
    Vd = fd.FunctionSpace(mesh, "CG", 1)
    x = fd.SpatialCoordinate(mesh)

    def residual(u, v, m):
        return ((1 + u**2) * fd.inner(fd.grad(u), fd.grad(v))
                - m[0] * (1 + fd.inner(x, x)) * v) * fd.dx

    bcs = fd.DirichletBC(V, x[0], "on_boundary")
    return fem_moe.ConstrainedProblem(V, residual, bcs=bcs, data_spaces=Vd)


def classical(problem, m):
    u = fd.Function(problem.V)
    fd.solve(problem.residual(u, fd.TestFunction(problem.V), (m,)) == 0, u, bcs=problem.bcs,
             solver_parameters={"snes_rtol": 1e-12, "ksp_type": "preonly", "pc_type": "lu",
                                "pc_factor_mat_solver_type": "mumps"})
    return u


def expect_input_error(what, call):
    try:
        call()
    except fem_moe.InputError:
        return
    raise AssertionError(f"rank {comm.rank}: {what} did not raise InputError")


def constrained_layers(problem, data, spanning, random):
    for mode in ("lstsq", "galerkin"):
        u = fem_moe.HardConstraint(problem, spanning.shape[1], mode=mode)(spanning, data)
        assert torch.isfinite(u).all()
    for partition in ("canonical", "distributed"):
        for K in (1, 2, 4):
            for norm in (None, "euclidean"):
                layer = fem_moe.MoEHardConstraint(problem, random.shape[1], n_experts=K,
                                                  norm=norm, partition=partition)
                basis = random.clone().requires_grad_(True)
                loss = fem_moe.residual_loss(problem, layer(basis, data), data).sum()
                loss.backward()
                assert torch.isfinite(basis.grad).all()
    layer = fem_moe.HardConstraint(problem, random.shape[1])
    bad = random.clone()
    bad[0, 0, 0] = float("nan")
    expect_input_error("a NaN basis", lambda: layer(bad, data))
    expect_input_error("a basis of the wrong length", lambda: layer(random[..., :-1], data))
    expect_input_error("a basis without its batch axis", lambda: layer(random[0], data))


def training_step(work):
    path = os.path.join(work, "data.h5")
    generate(pdes.get("reaction_diffusion", n=4), path, 4, seed=1, comm=comm, progress=False)
    config = {"pde": {"name": "reaction_diffusion", "options": {"n": 4}},
              "data": {"path": path, "n_train": 2, "n_val": 1, "n_test": 1},
              "model": {"kind": "moe", "n_basis": 3, "n_experts": 2, "width": 8, "depth": 1,
                        "latent": 4},
              "train": {"steps": 2, "batch_size": 2, "val_every": 2, "checkpoint_every": 2,
                        "out": os.path.join(work, "run"), "progress": False}}
    Trainer(config).fit()


def bridge_evaluation():
    ranks = BackboneRanks(comm)
    backbone = torch.nn.Linear(2, 3, dtype=torch.float64)
    ranks.broadcast_parameters(backbone)
    points = torch.rand(5, 2, dtype=torch.float64)
    out = ranks.evaluate(lambda inputs, pts: backbone(pts).T[None], torch.zeros(1), points)
    out.sum().backward()
    ranks.allreduce_gradients(backbone)


def main():
    work = sys.argv[1] if len(sys.argv) > 1 else None
    made = work is None
    if made:
        work = comm.bcast(tempfile.mkdtemp(prefix="fem_moe_exit_") if comm.rank == 0 else None)
    training_step(work)
    bridge_evaluation()
    problem = disk_problem()
    m = fd.Function(problem.data_spaces[0]).interpolate(fd.Constant(2.0))
    u = classical(problem, m)
    if comm.rank == 0:
        gc.collect()
    data = torch.tensor(m.dat.data_ro.copy())[None]
    lifting = fd.Function(problem.V)
    problem.bcs[0].apply(lifting)
    g = problem.tensor(lifting, dtype=torch.float64)
    gen = torch.Generator().manual_seed(comm.rank)
    random = torch.randn(1, 6, problem.n_dofs, generator=gen, dtype=torch.float64)
    spanning = random.clone()
    spanning[0, 0] = problem.tensor(u, dtype=torch.float64) - g
    constrained_layers(problem, data, spanning, random)
    comm.Barrier()
    if made and comm.rank == 0:
        shutil.rmtree(work, ignore_errors=True)
    print(f"rank {comm.rank}: done", flush=True)


if __name__ == "__main__":
    main()
    gc.collect()
    sys.exit(0)
