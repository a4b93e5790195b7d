"""The mixture of experts: K = 1 is the global layer, results do not depend on the number of
ranks, gradients are exact, experts meet their tolerance, errors reach every rank."""
import numpy as np
import pytest
import torch
from mpi4py import MPI
from pytest_mpi import parallel_assert

import fem_moe
from problems import (distributed_matches_serial, nonlinear_diffusion, random_basis, smooth_basis,
                      source)


@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
@pytest.mark.parametrize("degree", [1, 2])
def test_one_expert_is_the_global_layer(mode, degree, coupled):
    problem = nonlinear_diffusion(n=6, degree=degree)
    basis, data = random_basis(problem, 4, batch=2), source(problem).repeat(2, 1)
    basis.requires_grad_(), data.requires_grad_()
    outs = []
    for layer in (fem_moe.HardConstraint(problem, 4, mode=mode),
                  fem_moe.MoEHardConstraint(problem, 4, n_experts=1, mode=mode, coupled=coupled)):
        u = layer(basis, data)
        gb, gd = torch.autograd.grad((u ** 3).sum(), (basis, data))
        outs.append((u.detach(), gb, gd))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("n_experts", [2, 3])
@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_gradcheck_independent(n_experts, mode):
    problem = nonlinear_diffusion(n=7, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=n_experts, mode=mode, coupled=False)
    basis = random_basis(problem, 3).requires_grad_()
    data = source(problem).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_experts_meet_tolerance_and_partition_is_sane():
    problem = nonlinear_diffusion(n=8, degree=2)
    layer = fem_moe.MoEHardConstraint(problem, 6, n_experts=4, local_first=True)
    u = layer(random_basis(problem, 6), source(problem))
    assert torch.isfinite(u).all()
    diags = layer.all_diagnostics()
    assert [d["expert"] for d in diags] == [0, 1, 2, 3]
    # Every dof is owned by exactly one expert; the subdomains overlap by one cell layer.
    assert sum(d["owned_dofs"] for d in diags) == problem.V.dim()
    assert all(d["dofs"] > d["owned_dofs"] for d in diags)
    counts = np.bincount(layer.partition.cell_expert)
    assert counts.min() > 0.7 * counts.mean()
    for s in [d["samples"][0] for d in diags] + diags.coupling:
        assert s.reason.startswith("CONVERGED") and s.residual_after <= s.residual_before


def test_k_experts_on_the_global_layer_problem_reduce_residual_per_expert():
    """Each expert minimises its own rows: its owned-row residual is no larger than that of the
    global layer's output restricted to the same rows."""
    problem = nonlinear_diffusion(n=8, degree=1)
    basis, data = random_basis(problem, 5), source(problem, 4.0)
    moe = fem_moe.MoEHardConstraint(problem, 5, n_experts=3, coupled=False)
    glob = fem_moe.HardConstraint(problem, 5)
    moe(basis, data), glob(basis, data)
    for d in moe.all_diagnostics():
        assert d["samples"][0].residual_after <= glob.diagnostics[0].residual_after + 1e-12


def test_strips_are_slabs_across_x():
    problem = nonlinear_diffusion(n=8, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 4, n_experts=4, partitioner_type="strips")
    p = layer.partition
    x = p.vertex_coords[p.cell_vertices].mean(axis=1)[:, 0]
    ranges = [(x[p.cell_expert == k].min(), x[p.cell_expert == k].max()) for k in range(4)]
    assert all(ranges[k][1] <= ranges[k + 1][0] for k in range(3)), ranges
    assert np.bincount(p.cell_expert).tolist() == [32] * 4
    u = layer(smooth_basis(problem, 4), source(problem))
    assert torch.isfinite(u).all()


@pytest.mark.parallel([1, 2])
def test_random_subdomains_are_balanced_and_scattered():
    """The control partition: cells dealt at random, each dof owned by exactly one expert,
    owned dofs balanced; the subdomains are not spatial (each expert's submesh spans most of
    the mesh); outputs on 1 and 2 ranks agree (partition seeded)."""
    problem = nonlinear_diffusion(n=8, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 4, n_experts=4, partitioner_type="random")
    u = layer(smooth_basis(problem, 4), source(problem))
    diags = layer.all_diagnostics()
    owned = [d["owned_dofs"] for d in diags]
    parallel_assert(sum(owned) == problem.V.dim() and min(owned) > 0.6 * np.mean(owned), f"{owned}")
    n_cells = len(layer.partition.cell_expert)
    parallel_assert(all(d["cells"] > 0.4 * n_cells for d in diags),
                    f"random subdomains look spatial: {[d['cells'] for d in diags]} of {n_cells} "
                    "cells")
    norm = problem.comm.allreduce(float((u ** 2).sum()))
    serial = fem_moe.MoEHardConstraint(nonlinear_diffusion(n=8, degree=1, comm=MPI.COMM_SELF), 4,
                                       n_experts=4, partitioner_type="random")
    problem1 = serial.problem
    u1 = serial(smooth_basis(problem1, 4), source(problem1))
    parallel_assert(abs(norm - float((u1 ** 2).sum())) < 1e-10 * norm)


@pytest.mark.parallel([2, 3])
@pytest.mark.parametrize("n_experts", [2, 4])
def test_rank_count_does_not_matter(n_experts):
    """Fixed K, independent experts: the distributed run equals the run on one rank (each rank
    alone), outputs and gradients to 1e-10 (the coupled mixture: test_coupled.py)."""
    distributed_matches_serial(lambda problem: fem_moe.MoEHardConstraint(problem, 5,
                                                                         n_experts=n_experts,
                                                                         coupled=False))


@pytest.mark.parallel(2)
def test_bad_input_on_one_rank_raises_everywhere():
    problem = nonlinear_diffusion(n=6, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3)
    basis, data = random_basis(problem, 3), source(problem)
    if MPI.COMM_WORLD.rank == 1:
        basis[0, 0, 0] = float("nan")
    with pytest.raises(fem_moe.InputError, match=r"\[rank 1\] basis has 1 non-finite"):
        layer(basis, data)


@pytest.mark.parallel(2)
def test_diverging_expert_raises_everywhere(petsc_options):
    """Only expert 1 is starved of iterations (its own options prefix): every rank raises,
    naming expert 1, the sample and PETSc's reason."""
    petsc_options(expert_1_snes_max_it=1)
    problem = nonlinear_diffusion(n=6, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, coupled=False)
    with pytest.raises(fem_moe.SolverDivergedError,
                       match="expert 1: .*sample 0 .*DIVERGED_MAX_IT") as err:
        layer(random_basis(problem, 3), source(problem, 30.0))
    parallel_assert(err.value.expert == 1 and err.value.reason == "DIVERGED_MAX_IT", str(err.value))


def test_shared_expert_options_apply_to_every_expert(capfd, petsc_options):
    """-expert_... applies to every expert_<k>_ (petsctools' shared option set), an option under
    one expert's own prefix wins over it."""
    petsc_options(expert_snes_max_it=1, expert_0_snes_max_it=100, expert_snes_converged_reason=None)
    problem = nonlinear_diffusion(n=6, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=3, coupled=False)
    with pytest.raises(fem_moe.SolverDivergedError, match="expert 1: .*DIVERGED_MAX_IT"):
        layer(random_basis(problem, 3), source(problem, 30.0))
    out = capfd.readouterr().out
    assert "expert_0_ solve converged" in out and "expert_1_ solve did not converge" in out, out
    assert layer.experts[0].expert.snes.getTolerances()[3] == 100
    assert layer.experts[2].expert.snes.getTolerances()[3] == 1


def test_solver_parameters_are_in_the_database_during_the_solve(capfd):
    """Options PETSc reads during SNESSolve itself (-snes_view), given as solver_parameters:
    petsctools' manager inserts them for the solve and removes them after."""
    from firedrake.petsc import PETSc
    problem = nonlinear_diffusion(n=4, degree=1, solver_parameters={"snes_view": None})
    layer = fem_moe.HardConstraint(problem, 3)
    assert "fem_moe_snes_view" not in PETSc.Options().getAll()
    layer(random_basis(problem, 3), source(problem))
    assert "SNES Object: (fem_moe_)" in capfd.readouterr().out
    assert "fem_moe_snes_view" not in PETSc.Options().getAll()


@pytest.mark.parallel([1, 2, 3])
def test_partition_is_deterministic_and_rank_independent():
    import firedrake as fd
    here = fem_moe.Partition(fd.UnitSquareMesh(24, 24), 3).cell_expert
    again = fem_moe.Partition(fd.UnitSquareMesh(24, 24), 3).cell_expert
    alone = fem_moe.Partition(fd.UnitSquareMesh(24, 24, comm=MPI.COMM_SELF), 3).cell_expert
    parallel_assert(np.array_equal(here, again) and np.array_equal(here, alone),
                    "the partition changed between calls or with the number of ranks")
    parallel_assert(np.bincount(here).min() >= 0.9 * len(here) / 3,
                    f"unbalanced: {np.bincount(here)}")


def test_boundary_markers_reach_the_experts(repo):
    """A residual with a Robin term on one marked boundary (ds(2), the holes of the gmsh plate):
    one expert on a rebuilt mesh must still see the marker, and K = 3 experts must agree with the
    global layer's residual where a basis spans the solution."""
    import os
    import firedrake as fd
    mesh = fd.Mesh(os.path.join(repo, "meshes", "plate_with_holes.msh"))
    V = fd.FunctionSpace(mesh, "CG", 1)

    def residual(u, v, m):
        return ((1 + u**2) * fd.inner(fd.grad(u), fd.grad(v)) - m[0]
                * v) * fd.dx + 5 * u * v * fd.ds(2)

    problem = fem_moe.ConstrainedProblem(V, residual, bcs=fd.DirichletBC(V, 0, 1), data_spaces=V)
    data = torch.ones(1, problem.n_dofs, dtype=torch.float64) * 20
    basis = random_basis(problem, 4)
    glob = fem_moe.HardConstraint(problem, 4)(basis, data)
    one = fem_moe.MoEHardConstraint(problem, 4, n_experts=1)(basis, data)
    assert torch.allclose(glob, one, atol=1e-10, rtol=0)
    from problems import classical_solution
    exact = torch.tensor(classical_solution(problem, data[0].numpy()))
    basis[0, 0] = exact
    three = fem_moe.MoEHardConstraint(problem, 4, n_experts=3)(basis, data)
    assert (three[0] - exact).abs().max() < 1e-9


@pytest.mark.parallel(2)
def test_experts_are_balanced_over_ranks_by_owned_dofs():
    problem = nonlinear_diffusion(n=12, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=4)
    load = MPI.COMM_WORLD.allgather(sum(int(e.rows.sum()) for e in layer.experts.values()))
    parallel_assert(len(layer.experts) == 2, f"{len(layer.experts)} experts on this rank")
    parallel_assert(sum(load) == problem.V.dim() and min(load) > 0.8 * max(load), f"loads {load}")


@pytest.mark.parametrize("kind", ["soft", "hard", "moe"])
def test_a_backbone_trains_through_the_layer(kind):
    """Physics-informed: a DeepONet basis, the layer, the global residual as the loss; a few Adam
    steps lower it (soft constraint: the backbone's first field is the output)."""
    from fem_moe.backbones import DeepONetBasis
    torch.manual_seed(0)
    problem = nonlinear_diffusion(n=6, degree=1)
    points = torch.tensor(problem.dof_coordinates())
    data = torch.cat([source(problem, s) for s in (1.0, 3.0)])
    net = DeepONetBasis(problem.n_data_dofs, 4, dim=2, width=32, depth=2).double()
    layer = {"soft": None, "hard": fem_moe.HardConstraint(problem, 4),
             "moe": fem_moe.MoEHardConstraint(problem, 4, n_experts=2)}[kind]
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        basis = net(data / 10, points)
        u = basis[:, 0] if layer is None else layer(basis, data)
        loss = fem_moe.residual_loss(problem, u, data)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("degree", [1, 2])
def test_interface_rows_are_the_only_rows_mixing_experts(degree):
    """Away from the interface rows the stitched output's residual is its owner expert's own
    residual; at interface rows it is not (the price of the mixture, which this measures)."""
    problem = nonlinear_diffusion(n=8, degree=degree)
    layer = fem_moe.MoEHardConstraint(problem, 4, n_experts=3, coupled=False)
    assert not fem_moe.MoEHardConstraint(problem, 4, n_experts=1).interface_mask().any()
    data = source(problem, 3.0)
    u = layer(random_basis(problem, 4), data)
    stitched = fem_moe.residual_rows(problem, u, data)[0]
    own = np.zeros(layer.layout.n_global)
    for e in layer.experts.values():     # each expert's residual at its rows, last sample
        own[e.ids[e.rows]] = e.expert._cache["r"][e.rows]
    own = own[layer.layout.owned_ids]
    interface = layer.interface_mask()
    assert 0 < interface.sum() < problem.n_dofs
    assert np.abs(stitched - own)[~interface].max() < 1e-10
    assert np.abs(stitched - own)[interface].max() > 1e-6


def _spanning_basis(problem, exact, n_random):
    """The exact solution (less the lifting) as basis field 0, random fields after it."""
    from fem_moe.expert import dirichlet_dofs
    _, g = dirichlet_dofs(problem)
    return torch.cat([torch.tensor(exact - g)[None, None], random_basis(problem, n_random)], dim=1)


def _max_error(problem, u, exact):
    return problem.comm.allreduce(float((u - torch.tensor(exact)).abs().max()), op=MPI.MAX)


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("n_experts", [2, 3])
def test_mixed_space_experts_recover_navier_stokes(n_experts):
    """Velocity-pressure (Taylor-Hood, a mixed space): where a basis spans the classical (u, p),
    every expert finds it on its subdomain and the stitched output is it."""
    from problems import channel_flow, classical_solution
    problem = channel_flow(n=4)
    data = source(problem)
    exact = classical_solution(problem, data[0].numpy())
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=n_experts)
    u = layer(_spanning_basis(problem, exact, 2), data)
    err = _max_error(problem, u[0], exact)
    parallel_assert(err < 1e-8, f"max error {err}")
    owned = [d["owned_dofs"] for d in layer.all_diagnostics()]
    parallel_assert(sum(owned) == problem.V.dim() and min(owned) > 0, f"owned dofs {owned}")


@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_mixed_space_gradcheck(mode):
    from problems import channel_flow
    problem = channel_flow(n=2)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=2, mode=mode)
    basis = random_basis(problem, 3).requires_grad_()
    data = (0.5 * source(problem)).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


def _periodic_problem(mesh, degree, bcs_markers=None):
    """u - lap u + u^3 = f on a periodic mesh (no boundary, or Dirichlet on ``bcs_markers``)."""
    import firedrake as fd
    V = fd.FunctionSpace(mesh, "CG", degree)

    def residual(u, v, m):
        return (fd.inner(fd.grad(u), fd.grad(v)) + u * v + u**3 * v - m[0] * v) * fd.dx

    bcs = fd.DirichletBC(V, 0, bcs_markers) if bcs_markers else None
    return fem_moe.ConstrainedProblem(V, residual, bcs=bcs, data_spaces=V)


def _periodic_source(problem):
    import firedrake as fd
    x, y = fd.SpatialCoordinate(problem.mesh)
    f = fd.Function(problem.V).interpolate(10 * fd.sin(2 * np.pi * x) * fd.cos(2 * np.pi * y) + 3)
    return torch.tensor(fem_moe.problem.owned_values(f))[None]


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("mesh_kind", ["gmsh_periodic_square", "periodic_in_x"])
def test_periodic_mesh_experts_connect_across_the_seam(repo, mesh_kind):
    """On a periodic mesh (unstructured from gmsh, or Firedrake's periodic in x only) the periods
    are found, subdomains cross the seam, and K experts recover the solution a basis spans."""
    import os
    import firedrake as fd
    from problems import classical_solution
    if mesh_kind == "gmsh_periodic_square":
        mesh = fd.Mesh(os.path.join(repo, "meshes", "periodic_square.msh"))
        problem, periods = _periodic_problem(mesh, 2), [1.0, 1.0]
    else:
        mesh = fd.PeriodicRectangleMesh(8, 6, 1.0, 0.7, direction="x")
        problem, periods = _periodic_problem(mesh, 1, (3, 4)), [1.0, 0.0]
    partition = fem_moe.Partition(mesh, 3)
    parallel_assert(np.allclose(partition.periods, periods), f"periods {partition.periods}")
    # Canonical vertices are the mesh's topological vertices (a seam vertex once).
    n_vertices = fd.FunctionSpace(mesh, "CG", 1).dim()
    parallel_assert(len(partition.vertex_coords) == n_vertices,
                    f"{len(partition.vertex_coords)} canonical vertices, the mesh has {n_vertices}")
    data = _periodic_source(problem)
    exact = classical_solution(problem, data[0].numpy())
    for K in (1, 3):
        layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=K)
        u = layer(_spanning_basis(problem, exact, 2), data)
        err = _max_error(problem, u[0], exact)
        parallel_assert(err < 1e-9, f"K={K}: max error {err}")
    # Some expert holds cells on both sides of the seam x = 0 = 1, so its submesh wraps around.
    left = partition.cell_centres[:, 0] < 0.1
    right = partition.cell_centres[:, 0] > 0.9
    crossing = set(partition.cell_expert[left]) & set(partition.cell_expert[right])
    parallel_assert(bool(crossing), "no subdomain crosses the seam: the test tests nothing")


def test_periodic_gradcheck(repo):
    import os
    import firedrake as fd
    problem = _periodic_problem(fd.Mesh(os.path.join(repo, "meshes", "periodic_square.msh")), 1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=3)
    basis = random_basis(problem, 3).requires_grad_()
    data = (0.1 * _periodic_source(problem)).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


def _recovers_classical(problem, data, n_experts=3, tol=1e-8):
    """K experts, coupled, with the classical solution in the basis: it is recovered."""
    from problems import classical_solution
    exact = classical_solution(problem, data[0].numpy())
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=n_experts)
    u = layer(_spanning_basis(problem, exact, 2), data)
    err = _max_error(problem, u[0], exact)
    parallel_assert(err < tol, f"max error {err:.2e}")


@pytest.mark.parallel([1, 2])
def test_residual_written_on_the_whole_mesh():
    """A residual as Firedrake users write it: the whole mesh's SpatialCoordinate, a Constant, a
    fixed material Function (DG0) and a vector Function (CG1) on the whole mesh, integrals with
    and without an explicit domain. The experts map them onto their submeshes."""
    import firedrake as fd
    mesh = fd.UnitSquareMesh(8, 8)
    V = fd.FunctionSpace(mesh, "CG", 1)
    x, y = fd.SpatialCoordinate(mesh)
    kappa = fd.Function(fd.FunctionSpace(mesh, "DG", 0), name="kappa").interpolate(
        1 + fd.conditional(fd.gt(x, 0.5), 4.0, 0.0))
    wind = fd.Function(fd.VectorFunctionSpace(mesh, "CG", 1), name="wind").interpolate(
        fd.as_vector([y, -x]))
    c = fd.Constant(2.0)

    def residual(u, v, m):
        return (kappa * (1 + u**2) * fd.inner(fd.grad(u), fd.grad(v)) + fd.inner(wind, fd.grad(u))
                * v
                - c * m[0] * (1 + x * y) * v) * fd.dx + u * v * fd.ds(1, domain=mesh)

    problem = fem_moe.ConstrainedProblem(V, residual, bcs=fd.DirichletBC(V, 0, (2, 3, 4)),
                                         data_spaces=V)
    _recovers_classical(problem, source(problem, 5.0))


def test_whole_mesh_function_that_cannot_be_mapped_is_named():
    import firedrake as fd
    mesh = fd.UnitSquareMesh(6, 6)
    V = fd.FunctionSpace(mesh, "CG", 1)
    field = fd.Function(fd.FunctionSpace(mesh, "N1curl", 1), name="wind")
    problem = fem_moe.ConstrainedProblem(
        V, lambda u, v, m: (fd.inner(fd.grad(u), fd.grad(v)) + fd.inner(field, fd.grad(u)) * v - v)
                                         * fd.dx,
        bcs=fd.DirichletBC(V, 0, "on_boundary"))
    with pytest.raises(fem_moe.InputError, match="'wind'.*cannot be copied onto the experts"):
        fem_moe.MoEHardConstraint(problem, 2, n_experts=2)


@pytest.mark.parallel([1, 2])
def test_mesh_with_moved_coordinates():
    """A skewed, stretched square (coordinates moved after the mesh was made), with a Robin term
    on one marked side: the markers are found at the moved vertices."""
    import firedrake as fd
    mesh = fd.UnitSquareMesh(8, 8)
    x, y = fd.SpatialCoordinate(mesh)
    moved = fd.Function(mesh.coordinates.function_space()).interpolate(
        fd.as_vector([2 * x + 0.4 * y, y * (1 + 0.3 * x)]))
    mesh.coordinates.assign(moved)
    V = fd.FunctionSpace(mesh, "CG", 1)

    def residual(u, v, m):
        return ((1 + u**2) * fd.inner(fd.grad(u), fd.grad(v)) - m[0]
                * v) * fd.dx + 3 * u * v * fd.ds(2)

    problem = fem_moe.ConstrainedProblem(V, residual, bcs=fd.DirichletBC(V, 0, (1, 3)),
                                         data_spaces=V)
    _recovers_classical(problem, source(problem, 5.0))
