"""The coupled mixture: it is the global layer given the experts' block basis, so it nests the
global layer (never a larger residual), recovers what every block spans, does not depend on the
number of ranks, has exact gradients, and fails on every rank at once."""
import numpy as np
import pytest
import torch
import firedrake as fd
from mpi4py import MPI
from pytest_mpi import parallel_assert

import fem_moe
from problems import (distributed_matches_serial, nonlinear_diffusion, random_basis, smooth_basis,
                      source)


def inflow_channel(nx=16, ny=8, comm=MPI.COMM_WORLD):
    """Linear advection-diffusion in [0, 2] x [0, 1] driven only by its inflow: u = sin(pi y) at
    x = 0, u = 0 on the walls, natural outflow at x = 2; no source. Experts downstream see no
    boundary data: independent experts there have nothing tying them to the inflow."""
    mesh = fd.RectangleMesh(nx, ny, 2.0, 1.0, comm=comm)
    V = fd.FunctionSpace(mesh, "CG", 1)
    x, y = fd.SpatialCoordinate(mesh)

    def residual(u, v, m):
        return (0.05 * fd.inner(fd.grad(u), fd.grad(v)) + u.dx(0) * v) * fd.dx

    bcs = [fd.DirichletBC(V, fd.sin(np.pi * y), 1), fd.DirichletBC(V, 0, (3, 4))]
    return fem_moe.ConstrainedProblem(V, residual, bcs=bcs)


def _residual_norm(problem, u, data=None):
    r = fem_moe.residual_rows(problem, u, data)
    return np.sqrt(problem.comm.allreduce(float((r ** 2).sum())))


def _block_basis(layer, basis):
    """The experts' block basis [batch, K N, n]: block k is the basis on the dofs k owns."""
    owner = torch.tensor(layer.dof_experts())
    return torch.cat([basis * (owner == k) for k in range(layer.n_experts)], dim=1)


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("mode,norm",
                         [("lstsq", "euclidean"), ("galerkin", None), ("lstsq", "dual")])
def test_coupled_is_the_global_layer_on_the_block_basis(mode, norm):
    """For a linear PDE (a unique solution of the reduced problem) the coupled mixture's output
    and gradients are those of the global layer fed the K N block fields, in the Euclidean norm
    and in the whole mesh's dual norm (norm="dual": the mixture's W couples every row)."""
    problem = inflow_channel()
    N, K = 3, 4
    basis = smooth_basis(problem, N).requires_grad_()
    layer = fem_moe.MoEHardConstraint(problem, N, n_experts=K, mode=mode, norm=norm)
    u = layer(basis)
    weight = torch.tensor(np.cos(3 * problem.dof_coordinates()[:, 0]))
    g, = torch.autograd.grad((u[0] * weight).pow(2).sum(), basis)
    glob = fem_moe.HardConstraint(problem, K * N, mode=mode, norm=norm)
    u_ref = glob(_block_basis(layer, basis))
    g_ref, = torch.autograd.grad((u_ref[0] * weight).pow(2).sum(), basis)
    err_u = problem.comm.allreduce(float((u - u_ref).detach().abs().max()), op=MPI.MAX)
    scale = problem.comm.allreduce(float(g_ref.abs().max()), op=MPI.MAX)
    err_g = problem.comm.allreduce(float((g - g_ref).abs().max()), op=MPI.MAX) / scale
    parallel_assert(err_u < 1e-8 and err_g < 1e-7,
                    f"output differs by {err_u:.2e}, gradient by {err_g:.2e}")


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("n_experts", [2, 4, 8])
def test_coupled_nests_the_global_layer(n_experts):
    """Any fixed basis, a linear PDE driven only by an inflow: the coupled mixture's global
    residual is no larger than the global layer's (w_k = w for all k is one of its choices);
    independent experts, which nothing ties to the inflow, do worse than both."""
    problem = inflow_channel()
    basis = smooth_basis(problem, 4)
    glob = _residual_norm(problem, fem_moe.HardConstraint(problem, 4)(basis))
    coupled = fem_moe.MoEHardConstraint(problem, 4, n_experts=n_experts)
    r_coupled = _residual_norm(problem, coupled(basis))
    independent = fem_moe.MoEHardConstraint(problem, 4, n_experts=n_experts, coupled=False,
                                            ridge_always=True)
    r_independent = _residual_norm(problem, independent(basis))
    parallel_assert(r_coupled <= glob * (1 + 1e-10),
                    f"coupled residual {r_coupled:.6e} > global layer's {glob:.6e}")
    parallel_assert(r_independent > glob, f"independent {r_independent:.3e}, global {glob:.3e}: "
                    "the problem does not discriminate")
    info = coupled.all_diagnostics().coupling[0]
    parallel_assert(info.reason.startswith("CONVERGED") and info.residual_after
                    <= info.residual_before,
                    f"{info}")


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_coupled_recovers_what_every_block_spans(mode):
    """Nonlinear PDE; the classical solution in every block's span: recovered to 1e-8, also
    without the experts' first stage (from w = 0)."""
    from problems import classical_solution
    from fem_moe.expert import dirichlet_dofs
    problem = nonlinear_diffusion(n=8, degree=2)
    data = source(problem, 3.0)
    exact = classical_solution(problem, data[0].numpy())
    _, g = dirichlet_dofs(problem)
    basis = torch.cat([torch.tensor(exact - g)[None, None], smooth_basis(problem, 2)], dim=1)
    for local_first in (True, False):
        layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=3, mode=mode,
                                          local_first=local_first)
        u = layer(basis, data)
        err = problem.comm.allreduce(float((u[0] - torch.tensor(exact)).abs().max()), op=MPI.MAX)
        parallel_assert(err < 1e-8, f"local_first={local_first}: max error {err:.2e}")


@pytest.mark.parallel([2, 3])
@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
@pytest.mark.parametrize("n_experts", [2, 4])
def test_coupled_rank_count_does_not_matter(n_experts, mode):
    distributed_matches_serial(lambda problem: fem_moe.MoEHardConstraint(problem, 5,
                                                                         n_experts=n_experts,
                                                                         mode=mode))


@pytest.mark.parametrize("n_experts", [2, 3])
@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_coupled_gradcheck_nonlinear(n_experts, mode):
    problem = nonlinear_diffusion(n=7, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=n_experts, mode=mode)
    basis = random_basis(problem, 3).requires_grad_()
    data = source(problem).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parallel([1, 2])
def test_coupled_batch_gradient_is_each_samples_own_with_its_ridge():
    """A batch whose samples' blocks differ (their bases, so the paper's ridge on each block,
    which the backward holds fixed): each sample's backward takes its own forward's block
    transforms and ridges (``CoupledSolver.prepare``'s ``blocks``, not computed again), so a
    sample's gradient in a batch is its gradient alone."""
    problem = nonlinear_diffusion(n=7, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=2, mode="galerkin", ridge_always=True)
    basis = random_basis(problem, 3, batch=2)
    data = torch.cat([source(problem, 1.0), source(problem, 3.0)])

    def gradient(b, d):
        b = b.clone().requires_grad_()
        layer(b, d).square().sum().backward()
        return b.grad
    together = gradient(basis, data)
    for i in range(2):
        alone = gradient(basis[i:i + 1], data[i:i + 1])[0]
        scale = MPI.COMM_WORLD.allreduce(float(alone.abs().max()), op=MPI.MAX)
        gap = MPI.COMM_WORLD.allreduce(float((together[i] - alone).abs().max()), op=MPI.MAX)
        parallel_assert(gap < 1e-10 * scale, f"sample {i}: {gap:.2e} of {scale:.2e}")


@pytest.mark.parametrize("norm", ["dual", "dual_blocks"])
@pytest.mark.parametrize("n_experts", [2, 3])
def test_coupled_gradcheck_dual_norm(n_experts, norm):
    """The whole mesh's dual norm (dense reduced matrix) or each expert's block of it (its rows'
    own Riesz solve) in the coupled problem's gradient, Gauss-Newton matrix, second-order term
    and backward."""
    problem = nonlinear_diffusion(n=7, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=n_experts, norm=norm)
    basis = random_basis(problem, 3).requires_grad_()
    data = source(problem).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("norm", ["dual", "dual_blocks"])
def test_coupled_one_expert_dual_norm_is_the_global_layer(norm):
    """K = 1: the expert's rows are every non-Dirichlet row, so its block of the dual norm is
    the whole mesh's: the coupled output and gradient are the global layer's."""
    problem = nonlinear_diffusion(n=6, degree=1)
    data = source(problem).requires_grad_()
    basis = random_basis(problem, 4, seed=5).requires_grad_()
    outs = []
    for layer in (fem_moe.HardConstraint(problem, 4, norm="dual"),
                  fem_moe.MoEHardConstraint(problem, 4, n_experts=1, norm=norm)):
        u = layer(basis, data)
        (g,) = torch.autograd.grad((u ** 3).sum(), basis)
        outs.append((u.detach().numpy(), g.numpy()))
    err_u = problem.comm.allreduce(np.abs(outs[0][0] - outs[1][0]).max(), op=MPI.MAX)
    err_g = problem.comm.allreduce(np.abs(outs[0][1] - outs[1][1]).max(), op=MPI.MAX)
    parallel_assert(err_u < 1e-10 and err_g < 1e-8, f"{err_u:.2e} {err_g:.2e}")


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("norm", ["dual_blocks", "lumped"])
def test_interface_block_of_the_norm_or_weighed_columns_agree(norm, monkeypatch):
    """The other blocks' Gauss-Newton blocks through W's interface block (kept once per expert)
    or, past INTERFACE_WEIGHT_ROWS, through a Riesz solve of their columns at every matrix: the
    same outputs and gradients (the backward's exact Hessian carries the difference)."""
    import fem_moe.coupling
    outs = []
    problem = nonlinear_diffusion(n=8, degree=1)     # one mesh: its distribution may vary
    for cap in (fem_moe.coupling.INTERFACE_WEIGHT_ROWS, 0):
        monkeypatch.setattr(fem_moe.coupling, "INTERFACE_WEIGHT_ROWS", cap)
        layer = fem_moe.MoEHardConstraint(problem, 4, n_experts=3, norm=norm)
        basis = random_basis(problem, 4, seed=2).requires_grad_()
        data = source(problem).requires_grad_()
        u = layer(basis, data)
        (u ** 3).sum().backward()
        kept = [getattr(r, "_S", None) is not None for r in layer.coupling.rows.values()]
        outs.append((u.detach().numpy(), basis.grad.numpy(), data.grad.numpy(), kept))
    parallel_assert(all(outs[0][3]) and not any(outs[1][3]),
                    "the interface block was not used as asked")
    for a, b in zip(outs[0][:3], outs[1][:3]):
        err = problem.comm.allreduce(np.abs(a - b).max() / np.abs(b).max(), op=MPI.MAX)
        parallel_assert(err < 1e-10, f"{err:.2e}")


def test_whole_mesh_dual_norm_refused_for_many_experts():
    problem = nonlinear_diffusion(n=8, degree=1)
    with pytest.raises(fem_moe.errors.InputError, match="dual_blocks"):
        fem_moe.MoEHardConstraint(problem, 2, n_experts=16, norm="dual")


def test_coupled_block_sparse_system_and_options(petsc_options):
    """The coupled matrix has a block only between experts sharing a row's stencil (no dense
    K N x K N matrix), and the coupled SNES/KSP take their options from the ``moe_`` prefix."""
    problem = inflow_channel(nx=32, ny=4)
    petsc_options(moe_ksp_type="cg", moe_pc_type="bjacobi", moe_ksp_rtol=1e-14)
    layer = fem_moe.MoEHardConstraint(problem, 2, n_experts=8, partitioner_type="strips",
                                      norm="euclidean")
    solver = layer.coupling
    assert solver.snes.getKSP().getType() == "cg"
    assert solver.snes.getKSP().getPC().getType() == "bjacobi"
    u = layer(smooth_basis(problem, 2))
    A = solver.A
    nnz_blocks = A.getInfo()["nz_used"] / 4
    # Strips in x: each expert's rows couple it to itself and its two neighbours (lstsq: and
    # their neighbours' through shared rows), far fewer than the 64 blocks of a dense matrix.
    assert nnz_blocks <= 8 + 2 * 7 + 2 * 6, nnz_blocks
    exact_ref = fem_moe.HardConstraint(problem, 16, norm="euclidean")(
        _block_basis(layer, smooth_basis(problem, 2)))
    assert (u - exact_ref).abs().max() < 1e-8


def test_double_backward_is_refused():
    problem = nonlinear_diffusion(n=4, degree=1)
    for layer in (fem_moe.HardConstraint(problem, 2),
                  fem_moe.MoEHardConstraint(problem, 2, n_experts=2)):
        basis = random_basis(problem, 2).requires_grad_()
        u = layer(basis, source(problem))
        g, = torch.autograd.grad(u.pow(2).sum(), basis, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable|twice"):
            g.sum().backward()


@pytest.mark.parallel(2)
@pytest.mark.parametrize("coupled", [True, False])
def test_failing_backward_on_one_rank_raises_everywhere(coupled, monkeypatch):
    """A numpy LinAlgError in one expert's backward on rank 1 only: every rank raises (before the
    collective error check, rank 0 waited in the next exchange for ever)."""
    from fem_moe.coupling import CoupledSolver
    from fem_moe.expert import Expert
    problem = nonlinear_diffusion(n=6, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=2, coupled=coupled)
    basis = random_basis(problem, 3).requires_grad_()
    u = layer(basis, source(problem))

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix (injected)")

    if MPI.COMM_WORLD.rank == 1:
        if coupled:
            monkeypatch.setattr(CoupledSolver, "_expert_vjp", broken)
        else:
            monkeypatch.setattr(Expert, "vjp", broken)
    with pytest.raises(fem_moe.FemMoeError,
                       match=r"\[rank 1\] LinAlgError: Singular matrix \(injected\)"):
        u.pow(2).sum().backward()


@pytest.mark.parallel(2)
def test_diverging_coupled_solve_raises_everywhere(petsc_options):
    petsc_options(moe_snes_max_it=1)
    problem = nonlinear_diffusion(n=6, degree=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=3, local_first=False)
    with pytest.raises(fem_moe.SolverDivergedError, match="coupled .*sample 0 .*DIVERGED_MAX_IT"):
        layer(random_basis(problem, 3), source(problem, 30.0))


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("mat_type", ["aij", "baij"])
@pytest.mark.parametrize("n_experts", [1, 3])
def test_exact_hessian_throughout_reaches_the_same_solution(n_experts, mat_type):
    """The coupled SNES with the exact Hessian from the first iteration (its inertia checked by a
    MUMPS Cholesky at every Jacobian, on every rank count, for an AIJ or a BAIJ matrix) finds
    what the default Gauss-Newton-then-exact sequence finds."""
    problem = nonlinear_diffusion(n=8, degree=1)
    basis, data = smooth_basis(problem, 4), source(problem, 8.0)
    exact = fem_moe.MoEHardConstraint(problem, 4, n_experts=n_experts,
                                      coupling_parameters={"gauss_newton_rtol": 0.0,
                                                           "mat_type": mat_type})
    default = fem_moe.MoEHardConstraint(problem, 4, n_experts=n_experts)
    u_exact, u_default = exact(basis, data), default(basis, data)
    err = problem.comm.allreduce(float((u_exact - u_default).abs().max()), op=MPI.MAX)
    info = exact.all_diagnostics().coupling[0]
    parallel_assert(err < 1e-8 and info.reason.startswith("CONVERGED"), f"{err:.2e}, {info}")


@pytest.mark.parallel([1, 2, 3])
def test_small_coupled_matrix_factored_on_every_rank(petsc_options):
    """Below REDUNDANT_EXPERTS experts on several ranks every rank factors a copy of the coupled
    matrix (PCREDUNDANT, and the inertia check of its copy), which follows the matrix as it
    changes; ``-moe_pc_type`` still chooses; at or past the limit the factorisation stays
    distributed."""
    from fem_moe.coupling import REDUNDANT_EXPERTS
    problem = nonlinear_diffusion(n=8, degree=1)
    basis, data = smooth_basis(problem, 3), source(problem, 8.0)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=3)
    u = layer(basis, data)
    solver = layer.coupling
    several = problem.comm.size > 1
    pc = solver.snes.getKSP().getPC().getType()
    parallel_assert(pc == ("redundant" if several else "lu"), pc)
    # The last Jacobian is positive definite; its negative is not, and back again: the copy
    # is refreshed from the distributed matrix at every check.
    seen = [solver._positive_definite()]
    solver.A.scale(-1.0)
    seen.append(solver._positive_definite())
    solver.A.scale(-1.0)
    seen.append(solver._positive_definite())
    parallel_assert(seen == [True, False, True], str(seen))
    # The same outputs as a distributed factorisation, and as on one rank (sorted values).
    petsc_options(moe_pc_type="lu")
    distributed = fem_moe.MoEHardConstraint(problem, 3, n_experts=3)
    parallel_assert(distributed.coupling.snes.getKSP().getPC().getType() == "lu")
    err = problem.comm.allreduce(float((distributed(basis, data) - u).abs().max()), op=MPI.MAX)
    parallel_assert(err < 1e-10, f"{err:.2e}")
    many = fem_moe.MoEHardConstraint(nonlinear_diffusion(n=16, degree=1), 2,
                                     n_experts=REDUNDANT_EXPERTS)
    parallel_assert(not many.coupling._redundant)


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_coupled_solve_does_not_depend_on_the_residual_scale(mode):
    """A residual in small units (diffusion-sorption's is ~1e-5 per row) makes the coupled
    matrix's entries tiny: a factorisation with an absolute zero-pivot threshold (PETSc's own LU,
    2.2e-14) called them zero pivots and failed most training steps. The solve must give the
    same field for the residual times 1e-7 (absolute tolerances off, as they are scale-bound)."""
    problem = nonlinear_diffusion(n=6)
    basis, data = random_basis(problem, 4), source(problem)
    outputs = []
    for scale in (1.0, 1e-7):
        scaled = fem_moe.ConstrainedProblem(
            problem.V, lambda u, v, m, scale=scale: scale * problem.residual(u, v, m),
            bcs=problem.bcs, data_spaces=problem.data_spaces)
        layer = fem_moe.MoEHardConstraint(scaled, 4, n_experts=3, mode=mode,
                                          coupling_parameters={"snes_atol": 0.0})
        outputs.append(layer(basis, data))
    assert torch.allclose(outputs[0], outputs[1], rtol=0, atol=1e-8 * outputs[0].abs().max())


def test_a_failed_linear_solve_is_a_convergence_error_naming_its_cause():
    """PETSc's own LU on a residual scaled by 1e-7 meets "zero" pivots (the failure MUMPS now
    avoids): the error is Firedrake's ConvergenceError and says why the linear solve failed."""
    from firedrake.exceptions import ConvergenceError
    problem = nonlinear_diffusion(n=6)
    scaled = fem_moe.ConstrainedProblem(
        problem.V, lambda u, v, m: 1e-7 * problem.residual(u, v, m), bcs=problem.bcs,
        data_spaces=problem.data_spaces)
    # Serial: PETSc's own LU is sequential.
    params = {"snes_atol": 0.0, "pc_factor_mat_solver_type": "petsc"}
    layer = fem_moe.MoEHardConstraint(scaled, 4, n_experts=3, coupling_parameters=params)
    with pytest.raises(ConvergenceError) as info:
        layer(random_basis(problem, 4), source(problem))
    assert isinstance(info.value, fem_moe.SolverDivergedError)
    assert "DIVERGED_LINEAR_SOLVE" in str(info.value)
    message = str(info.value)
    assert "linear solve: DIVERGED_PCSETUP_FAILED (FACTOR_NUMERIC_ZEROPIVOT)" in message, message


@pytest.mark.parametrize("layer_kind", ["global", "coupled"])
def test_trust_region_grows_after_a_cut_step(layer_kind):
    """A strongly nonlinear sample (source x 5) whose reduced solve cuts its first steps to the
    trust region's radius. With PETSc's own shrink factor (a rejected step quarters the region)
    and ``preonly``, newtontr never learnt that a step was cut (only CG reports
    KSP_CONVERGED_STEP_LENGTH), so the region never grew again and the solve crawled at its
    radius (13 iterations on both instances); CG preconditioned by the factorisation enlarges it
    after good steps (10 and 8); the default, which also only halves the region after a rejected
    step, takes fewer still (6 on both)."""
    n, K = (8, 1) if layer_kind == "global" else (16, 2)
    its = {}
    for label, params in (("preonly, quartered", {"ksp_type": "preonly", "snes_tr_t1": 0.25}),
                          ("cg, quartered", {"snes_tr_t1": 0.25}), ("default", None)):
        if layer_kind == "global":
            problem = nonlinear_diffusion(n=n, solver_parameters=params)
            layer = fem_moe.HardConstraint(problem, 16)
        else:
            problem = nonlinear_diffusion(n=n)
            layer = fem_moe.MoEHardConstraint(problem, 16, n_experts=K, coupling_parameters=params)
        layer(smooth_basis(problem, 16), source(problem, scale=5.0))
        diags = layer.diagnostics if layer_kind == "global" else layer.all_diagnostics().coupling
        its[label] = diags[0].iterations
    assert its["cg, quartered"] <= its["preonly, quartered"] - 3, its
    assert its["default"] < its["cg, quartered"], its


@pytest.mark.parallel([1, 2])
def test_coupling_time_is_the_solve_less_the_experts_row_work(monkeypatch):
    """A coupled solve's diagnostics split its time: ``coupling_time`` is what coupling adds to
    the experts' own row work (benchmarks/moe_scaling.py's 'its own/fwd'). Slowing the experts'
    residual assembly leaves it where it was; slowing the neighbour exchange shows in it."""
    import time as clock
    from fem_moe.coupling import CoupledRows, CoupledSolver
    problem = nonlinear_diffusion(n=8, degree=1)
    basis, data = smooth_basis(problem, 4), source(problem)
    # One expert per rank on 2 ranks: a rank waiting for another's slower rows would count as
    # coupling (the slowest rank's figure; waiting is what coupling costs under imbalance).
    layer = fem_moe.MoEHardConstraint(problem, 4, n_experts=2)
    # Pauses long against the scheduling noise of a loaded machine (ranks that drift apart wait
    # for each other, which counts as coupling): the checks are shares of the injected time.
    pause = 0.1

    def infos():
        layer(basis, data)
        return layer.all_diagnostics().coupling[0]

    infos()     # the first solve also compiles and caches what every later one reuses
    base = infos()
    same = problem.comm.allgather((base.time, base.coupling_time))
    parallel_assert(0 < base.coupling_time < base.time and len({c for _, c in same}) == 1,
                    f"{same}")
    residual, exchange = CoupledRows.residual, CoupledSolver._neighbour_blocks
    monkeypatch.setattr(CoupledRows, "residual", lambda *a: (clock.sleep(pause), residual(*a))[1])
    slow_rows = infos()
    monkeypatch.setattr(CoupledRows, "residual", residual)
    monkeypatch.setattr(CoupledSolver, "_neighbour_blocks",
                        lambda *a: (clock.sleep(pause), exchange(*a))[1])
    slow_exchange = infos()
    injected = slow_rows.time - base.time
    parallel_assert(injected > 5 * pause
                    and slow_rows.coupling_time - base.coupling_time < 0.25 * injected,
                    f"row work counted as coupling: {base} {slow_rows}")
    injected = slow_exchange.time - base.time
    parallel_assert(injected > 5 * pause
                    and slow_exchange.coupling_time - base.coupling_time > 0.75 * injected,
                    f"the exchange not counted as coupling: {base} {slow_exchange}")


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("layer_kind", ["global", "coupled"])
def test_rank_deficient_ridge_leaves_the_solution(layer_kind):
    """A basis with a field repeated is rank deficient: the layer warns and adds a ridge to fix
    the free direction. By default the ridge is too small to move the solution (the output
    equals the full-rank basis's to 1e-8, relative); the paper's factor, 1e-4, moved it (on
    diffusion-sorption training, to a 10x worse basis that training never left). Asked to,
    both layers raise instead, on every rank."""
    problem = nonlinear_diffusion(n=8)
    basis = smooth_basis(problem, 4)
    repeated = torch.cat([basis, basis[:, :1]], dim=1)
    data = source(problem)

    def layer(n, **kwargs):
        if layer_kind == "global":
            return fem_moe.HardConstraint(problem, n, **kwargs)
        return fem_moe.MoEHardConstraint(problem, n, n_experts=2, **kwargs)

    full = layer(4)(basis, data)
    scale = float(np.sqrt(MPI.COMM_WORLD.allreduce(float(full.pow(2).sum()))))

    def moved(u):
        return float(np.sqrt(MPI.COMM_WORLD.allreduce(float((u - full).pow(2).sum())))) / scale

    with pytest.warns(fem_moe.RankDeficientBasisWarning, match="ridge"):
        default = layer(5)(repeated, data)
    with pytest.warns(fem_moe.RankDeficientBasisWarning, match="ridge"):
        papers = layer(5, ridge=1e-4)(repeated, data)
    parallel_assert(moved(default) < 1e-8 and moved(papers) > 1e-6,
                    f"{moved(default)} {moved(papers)}")
    with pytest.raises(fem_moe.InputError, match="numerical rank"):
        layer(5, on_rank_deficient="raise")(repeated, data)
