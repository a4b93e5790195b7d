"""The distributed partition (fem_moe.distributed): no rank gathers the mesh, every dof is owned
by one expert, each expert's rows are the global residual's rows, the mixture recovers what its
basis spans and its gradients are exact, on 1, 2 and 3 ranks."""
import os
import pickle

import numpy as np
import pytest
import torch
from mpi4py import MPI
from pytest_mpi import parallel_assert

import fem_moe
from fem_moe.distributed import DistributedPartition
from problems import channel_flow, classical_solution, nonlinear_diffusion, random_basis, source
from test_moe import _max_error, _periodic_problem, _periodic_source, _spanning_basis


def _case(name, repo):
    """(problem, data) of each kind of space and mesh the mixture supports."""
    import firedrake as fd
    if name == "P1":
        problem = nonlinear_diffusion(n=8, degree=1)
    elif name == "P2 vector":
        problem = nonlinear_diffusion(n=6, degree=2, vector=True)
    elif name == "Taylor-Hood":
        problem = channel_flow(n=4)
        return problem, source(problem)
    elif name == "periodic gmsh":
        return _periodic(_periodic_problem(fd.Mesh(os.path.join(repo, "meshes",
                                                                "periodic_square.msh")), 2))
    elif name == "plate with markers":
        mesh = fd.Mesh(os.path.join(repo, "meshes", "plate_with_holes.msh"))
        V = fd.FunctionSpace(mesh, "CG", 1)

        def residual(u, v, m):
            return ((1 + u**2) * fd.inner(fd.grad(u), fd.grad(v)) - m[0]
                    * v) * fd.dx + 5 * u * v * fd.ds(2)

        problem = fem_moe.ConstrainedProblem(V, residual, bcs=fd.DirichletBC(V, 0, 1),
                                             data_spaces=V)
        return problem, torch.ones(1, problem.n_dofs, dtype=torch.float64) * 20
    return problem, source(problem, 3.0)


def _periodic(problem):
    return problem, _periodic_source(problem)


CASES = ["P1", "P2 vector", "Taylor-Hood", "periodic gmsh", "plate with markers"]


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("case,n_experts",
                         [("P1", 2), ("P1", 4), ("P2 vector", 4), ("Taylor-Hood", 3),
                                            ("periodic gmsh", 4), ("plate with markers", 3)])
def test_every_dof_has_one_owner_and_expert_rows_are_global_rows(repo, case, n_experts):
    """Each dof belongs to exactly one expert; each expert's residual rows, assembled on its
    submesh from a random field, equal the global residual's rows at those dofs (1e-12)."""
    problem, data = _case(case, repo)
    comm = problem.comm
    layer = fem_moe.MoEHardConstraint(problem, 2, n_experts=n_experts, partition="distributed")
    parallel_assert(isinstance(layer.partition, DistributedPartition),
                    "not the distributed partition")
    n_global = comm.allreduce(problem.n_dofs)
    owners = np.bincount(layer.dof_experts(), minlength=n_experts)
    owners = comm.allreduce(owners)
    parallel_assert(owners.sum() == n_global and owners.min() > 0, f"dofs per expert {owners}")
    # Every dof is a row of the expert owning it and of no other.
    numbers = layer.plan.scatter(layer.layout.owned_numbers().astype(float)[:, None])
    rows = {k: numbers[k][e.rows, 0] for k, e in layer.experts.items()}
    everywhere = np.sort(np.concatenate([np.concatenate(list(part.values()) or [np.zeros(0)])
                                         for part in comm.allgather(rows)]))
    parallel_assert(np.array_equal(everywhere, np.arange(n_global)),
                    "rows are not a partition of the dofs")
    # Rows equal the global residual's.
    u = torch.randn(1, problem.n_dofs, generator=torch.Generator().manual_seed(comm.rank),
                    dtype=torch.float64)
    r = fem_moe.residual_rows(problem, u, data)[0]
    U = layer.plan.scatter(np.column_stack([u[0].numpy(), r]))
    D = layer._scatter_data(data.numpy())
    worst = 0.0
    for k, e in layer.experts.items():
        ex = e.expert
        ex._set(ex.u, U[k][:, 0])
        ex.set_data(D[k][0])
        mine = ex._assemble_residual()
        scale = max(1.0, np.abs(U[k][:, 1]).max())
        worst = max(worst, np.abs(mine - U[k][:, 1])[ex.row_mask].max() / scale)
    worst = comm.allreduce(worst, op=MPI.MAX)
    parallel_assert(worst < 1e-12, f"expert rows differ from the global rows by {worst:.2e}")


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("case,mode", zip(CASES, ["lstsq", "galerkin"] * 3))
def test_distributed_mixture_recovers_what_its_basis_spans(repo, case, mode):
    problem, data = _case(case, repo)
    exact = classical_solution(problem, data[0].numpy())
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=3, mode=mode, partition="distributed")
    u = layer(_spanning_basis(problem, exact, 2), data)
    err = _max_error(problem, u[0], exact)
    parallel_assert(err < 1e-8, f"max error {err:.2e}")


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("partitioner", [None, "strips", "random"])
def test_distributed_partitioners_give_k_nonempty_experts(partitioner):
    problem = nonlinear_diffusion(n=12)
    p = DistributedPartition(problem.mesh, 4, partitioner)
    sizes = problem.comm.allreduce(np.bincount(p.cell_expert, minlength=4))
    parallel_assert(sizes.sum() == 288 and sizes.min() > 0, f"cells per expert {sizes}")
    if partitioner == "strips":    # slabs across x: each expert's x-range is disjoint from the next
        x = problem.mesh.coordinates.dat.data_ro_with_halos[
            problem.mesh.coordinates.cell_node_map().values[:p.n_cells]].mean(axis=1)[:, 0]
        lo, hi = np.empty(4), np.empty(4)
        problem.comm.Allreduce(np.array([x[p.cell_expert == k].min(initial=9) for k in range(4)]),
                               lo, op=MPI.MIN)
        problem.comm.Allreduce(np.array([x[p.cell_expert == k].max(initial=-9) for k in range(4)]),
                               hi, op=MPI.MAX)
        parallel_assert((hi[:-1] < lo[1:]).all(), f"strips overlap: {lo}, {hi}")
    if partitioner is None:       # a graph partition: each expert's cells are facet-connected
        parallel_assert(sizes.max() <= 1.2 * sizes.mean(), f"unbalanced {sizes}")


def _directional_check(layer, basis, data, seed=3):
    """<d loss/d(basis, data), direction> from autograd against a central difference, on the
    mesh communicator (gradcheck perturbs one entry per rank at once: not usable in parallel)."""
    comm = layer.problem.comm
    gen = torch.Generator().manual_seed(seed + comm.rank)
    weights = torch.randn(basis.shape[0], basis.shape[2], generator=gen, dtype=torch.float64)
    dB = torch.randn(basis.shape, generator=gen, dtype=torch.float64)
    dD = torch.randn(data.shape, generator=gen, dtype=torch.float64) * 0.1

    def loss(B, D):
        return comm.allreduce(float((layer(B, D) * weights).sum()))

    B, D = basis.clone().requires_grad_(), data.clone().requires_grad_()
    (layer(B, D) * weights).sum().backward()
    exact = comm.allreduce(float((B.grad * dB).sum() + (D.grad * dD).sum()))
    eps = 1e-6
    numeric = (loss(basis + eps * dB, data + eps * dD)
               - loss(basis - eps * dB, data - eps * dD)) / (2 * eps)
    return exact, numeric


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
@pytest.mark.parametrize("n_experts", [2, 3])
def test_distributed_mixture_gradients(n_experts, mode):
    problem = nonlinear_diffusion(n=6, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=n_experts, mode=mode,
                                      partition="distributed")
    exact, numeric = _directional_check(layer, random_basis(problem, 3), 0.5 * source(problem))
    # The central difference carries the solves' tolerance over eps (~1e-11 / 1e-6).
    parallel_assert(abs(exact - numeric) < 1e-4 * max(1.0, abs(exact)),
                    f"directional derivative {exact} against {numeric}")


@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_distributed_mixture_gradcheck(mode):
    problem = nonlinear_diffusion(n=5, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=3, mode=mode, partition="distributed")
    basis = random_basis(problem, 3).requires_grad_()
    data = (0.5 * source(problem)).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


class _GatherCounter(MPI.Intracomm):
    """The mesh's communicator, counting the bytes that gathers and broadcasts bring to a rank
    (the calls a whole-mesh gather would be made of)."""
    __module__ = "mpi4py.MPI"     # petsc4py takes mpi4py's communicators by their type's module
    gathered = 0

    def _count(self, n):
        type(self).gathered += int(n)

    def allgather(self, obj):
        out = super().allgather(obj)
        self._count(sum(len(pickle.dumps(x)) for x in out))
        return out

    def gather(self, obj, root=0):
        out = super().gather(obj, root)
        self._count(sum(len(pickle.dumps(x)) for x in out or ()))
        return out

    def bcast(self, obj, root=0):
        out = super().bcast(obj, root)
        self._count(len(pickle.dumps(out)))
        return out

    def Allgather(self, sendbuf, recvbuf):
        super().Allgather(sendbuf, recvbuf)
        self._count(np.asarray(recvbuf[0] if isinstance(recvbuf, (list, tuple))
                               else recvbuf).nbytes)

    def Allgatherv(self, sendbuf, recvbuf):
        super().Allgatherv(sendbuf, recvbuf)
        self._count(np.asarray(recvbuf[0] if isinstance(recvbuf, (list, tuple))
                               else recvbuf).nbytes)

    def Bcast(self, buf, root=0):
        super().Bcast(buf, root)
        self._count(np.asarray(buf[0] if isinstance(buf, (list, tuple)) else buf).nbytes)


def _gathered_in_setup(n, partition):
    problem = nonlinear_diffusion(n=n, degree=1)
    topology = problem.mesh.topology
    comm = topology.user_comm
    topology.user_comm = _GatherCounter(comm)
    _GatherCounter.gathered = 0
    try:
        fem_moe.MoEHardConstraint(problem, 3, n_experts=4, partition=partition)
    finally:
        topology.user_comm = comm
    return comm.allreduce(_GatherCounter.gathered, op=MPI.MAX)


@pytest.mark.parallel([2, 3])
def test_setup_gathers_no_mesh():
    """What the setup gathers and broadcasts does not grow with the mesh (16x the cells): the
    distributed partition exchanges only what neighbours share. The canonical partition, which
    gathers the mesh, is the control that shows the counter sees a gather."""
    small, large = (_gathered_in_setup(n, "distributed") for n in (8, 32))
    parallel_assert(large <= small + 256,
                    f"distributed: {small} bytes gathered at 8x8, {large} at 32x32")
    small, large = (_gathered_in_setup(n, "canonical") for n in (8, 32))
    parallel_assert(large > 8 * small,
                    f"canonical (the control): {small} bytes at 8x8, {large} at 32x32")


def test_default_partition_follows_the_mesh_size(monkeypatch):
    import fem_moe.moe
    problem = nonlinear_diffusion(n=4)
    assert isinstance(fem_moe.MoEHardConstraint(problem, 2, n_experts=2).partition,
                      fem_moe.Partition)
    monkeypatch.setattr(fem_moe.moe, "CANONICAL_MAX_CELLS", 16)
    assert isinstance(fem_moe.MoEHardConstraint(problem, 2, n_experts=2).partition,
                      DistributedPartition)
    with pytest.raises(fem_moe.InputError, match="partition must be one of"):
        fem_moe.MoEHardConstraint(problem, 2, n_experts=2, partition="global")
