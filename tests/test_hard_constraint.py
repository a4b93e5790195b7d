"""The hard-constraint layer (K = 1): exactness, IFT gradients, robustness, memory."""
import numpy as np
import pytest
import scipy.optimize
import torch
import firedrake as fd
from pytest_mpi import parallel_assert

import fem_moe
from fem_moe.expert import dirichlet_dofs
from fem_moe.problem import owned_size
from mpi4py import MPI
from problems import (nonlinear_diffusion, channel_flow, source, random_basis, classical_solution,
                      distributed_matches_serial)


@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
@pytest.mark.parametrize("degree,n", [(1, 4), (2, 2)])
def test_gradcheck(mode, degree, n):
    problem = nonlinear_diffusion(n=n, degree=degree)
    layer = fem_moe.HardConstraint(problem, 3, mode=mode)
    basis = random_basis(problem, 3).requires_grad_()
    data = source(problem).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_ridge_always(mode):
    """The paper's regularised objective: rho w^T w on every solve. rho (1e-4 x the mean
    Gauss-Newton diagonal at w = 0, so it moves with the basis) is reported; the output moves by
    O(rho); the gradient is that of the problem with rho held fixed: it matches central
    differences to about the ridge factor, relative (measured 1.2e-4), not to round-off."""
    problem = nonlinear_diffusion(n=3, degree=1)
    plain = fem_moe.HardConstraint(problem, 3, mode=mode)
    ridged = fem_moe.HardConstraint(problem, 3, mode=mode, ridge_always=True)
    basis = random_basis(problem, 3).requires_grad_()
    data = source(problem).requires_grad_()
    u0, u1 = plain(basis, data), ridged(basis, data)
    rho = ridged.diagnostics[0].ridge
    assert rho > 0 and plain.diagnostics[0].ridge == 0
    assert 0 < (u1 - u0).abs().max() < 1e-2 * u0.abs().max()
    J = torch.autograd.functional.jacobian(lambda b: ridged(b, data.detach()), basis.detach())
    J = J.reshape(u1.numel(), -1)
    b, h = basis.detach(), 1e-6
    Jn = torch.stack([((ridged(b + h * e, data.detach()) - ridged(b - h * e, data.detach()))
                       / (2 * h)).reshape(-1)
                      for e in torch.eye(b.numel(), dtype=b.dtype).reshape(-1, *b.shape)], dim=1)
    assert (J - Jn).norm() < 1e-3 * Jn.norm()


def test_gradcheck_vector_valued():
    problem = nonlinear_diffusion(n=3, degree=1, vector=True)
    layer = fem_moe.HardConstraint(problem, 3)
    basis = random_basis(problem, 3).requires_grad_()
    data = source(problem).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
@pytest.mark.parametrize("degree", [1, 2])
def test_basis_spanning_the_solution_recovers_it(mode, degree):
    problem = nonlinear_diffusion(n=6, degree=degree)
    data = source(problem, scale=3.0)
    exact = classical_solution(problem, data[0].numpy())
    layer = fem_moe.HardConstraint(problem, 4, mode=mode)
    basis = random_basis(problem, 4)
    basis[0, 1] = torch.tensor(exact) * 0.7    # the lifting's boundary values are masked away
    u = layer(basis, data)
    err = np.abs(u[0].numpy() - exact).max()
    assert err < 1e-10, err
    info = layer.diagnostics[0]
    assert info.reason.startswith("CONVERGED")
    assert info.residual_after < 1e-10 * info.residual_before


def test_lstsq_at_least_as_good_as_scipy():
    problem = nonlinear_diffusion(n=5, degree=1)
    data = source(problem, scale=5.0)
    layer = fem_moe.HardConstraint(problem, 5, norm="euclidean")
    basis = random_basis(problem, 5, seed=3)
    u = layer(basis, data)
    ours = fem_moe.residual_loss(problem, u, data).item()

    e = layer.expert
    Phi = np.where(e.col_mask, basis[0].numpy(), 0.0)

    def residual(w):
        e._set(e.u, e.g_vec + w @ Phi)
        return e._assemble_residual()[e.row_mask]

    ref = scipy.optimize.least_squares(residual, np.zeros(5), method="lm", xtol=1e-15,
                                       ftol=1e-15, gtol=1e-15)
    theirs = float(ref.fun @ ref.fun)
    assert ours <= theirs * (1 + 1e-9) + 1e-14, (ours, theirs)


def test_two_forwards_then_one_backward():
    problem = nonlinear_diffusion(n=4, degree=1)
    layer = fem_moe.HardConstraint(problem, 3)
    data = source(problem)
    b1, b2 = random_basis(problem, 3, seed=1), random_basis(problem, 3, seed=2)

    def grads(pairs):
        leaves = [b.clone().requires_grad_() for b, _ in pairs]
        loss = sum((layer(b, data * s) ** 2).sum() for b, (_, s) in zip(leaves, pairs))
        loss.backward()
        return [b.grad for b in leaves]

    together = grads([(b1, 1.0), (b2, 2.0)])
    alone = grads([(b1, 1.0)]) + grads([(b2, 2.0)])
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_batch_dtype_and_float32():
    problem = nonlinear_diffusion(n=4, degree=1)
    layer = fem_moe.HardConstraint(problem, 3)
    basis, data = random_basis(problem, 3, batch=3), source(problem).repeat(3, 1)
    data[1] *= 2
    u64 = layer(basis, data)
    assert u64.shape == (3, problem.n_dofs) and u64.dtype == torch.float64
    assert len(layer.diagnostics) == 3
    for b in range(3):   # a batch is its samples
        assert torch.allclose(layer(basis[b:b + 1], data[b:b + 1])[0], u64[b], atol=1e-12)
    u32 = layer(basis.float().requires_grad_(), data.float())
    assert u32.dtype == torch.float32
    u32.sum().backward()


@pytest.mark.parametrize("norm", ["l2", "dual"])
def test_residual_loss_gradcheck_and_value(norm):
    problem = nonlinear_diffusion(n=3, degree=1)
    # Two samples: the backward reuses each sample's rows from the forward.
    data = torch.cat([source(problem), source(problem, 2.0)]).requires_grad_()
    u = random_basis(problem, 1, batch=2)[:, 0].requires_grad_()
    assert torch.autograd.gradcheck(lambda u, d: fem_moe.residual_loss(problem, u, d, norm=norm),
                                    (u, data))
    exact = torch.tensor(classical_solution(problem, data[0].detach().numpy()))[None]
    data = data[:1]
    assert fem_moe.residual_loss(problem, exact, data, norm=norm).item() < 1e-20


@pytest.mark.parallel([1, 2])
def test_dual_residual_norm_is_the_h1_dual_norm():
    """||R||_* = sup_v R(v)/||v||_H1 over v in V0: R(y) with y the H1 Riesz representative,
    solved here by Firedrake directly; plus the Dirichlet misfit, zero at a field that meets
    the boundary values."""
    from firedrake import (DirichletBC, Function, TestFunction, TrialFunction, assemble, dx, grad,
                           inner, solve)
    problem = nonlinear_diffusion(n=6, degree=2)
    data = source(problem)
    V = problem.V
    u = Function(V)
    x = fd.SpatialCoordinate(V.mesh())
    u.interpolate(x[0] + x[1] + x[0] * x[1] * (1 - x[0]) * (1 - x[1]))
    m = Function(problem.data_spaces[0])
    with m.dat.vec_wo as vec:
        vec.array[:] = data[0].numpy()
    F = problem.residual(u, TestFunction(V), (m,))
    y, w, v = Function(V), TrialFunction(V), TestFunction(V)
    solve((inner(grad(w), grad(v)) + w * v) * dx == F, y, bcs=DirichletBC(V, 0, "on_boundary"),
          solver_parameters={"ksp_type": "preonly", "pc_type": "lu",
                             "pc_factor_mat_solver_type": "mumps"})
    expected = assemble(fd.replace(F, {v: y}))
    with u.dat.vec_ro as vec:
        ut = torch.tensor(vec.array_r.copy())[None]
    ours = fem_moe.residual_loss(problem, ut, data, norm="dual").item()
    assert abs(ours - expected) < 1e-10 * abs(expected), (ours, expected)


@pytest.mark.parametrize("norm", ["lumped", "dual"])
def test_gradcheck_weighted_norms(norm):
    """Least squares in a weighted norm: W enters the Gauss-Newton matrix, the second-order term
    and the backward's multipliers (fem_moe.norms)."""
    problem = nonlinear_diffusion(n=4, degree=1)
    layer = fem_moe.HardConstraint(problem, 3, norm=norm)
    basis = random_basis(problem, 3).requires_grad_()
    data = source(problem).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parallel([1, 2])
def test_dual_norm_least_squares_minimises_the_h1_dual_residual():
    """norm="dual": the output is the minimiser of the residual's H1-dual norm over the basis's
    span (the quantity test_dual_residual_norm_is_the_h1_dual_norm checks against Firedrake):
    its gradient is orthogonal to every basis field, and no other mode's output has a smaller
    dual residual."""
    problem = nonlinear_diffusion(n=6, degree=1)
    data = source(problem)
    basis = random_basis(problem, 5, seed=3)
    outputs = {(mode, norm): fem_moe.HardConstraint(problem, 5, mode=mode, norm=norm)(basis, data)
               for mode, norm in [("lstsq", "dual"), ("lstsq", "euclidean"),
                                  ("galerkin", "euclidean")]}
    u = outputs[("lstsq", "dual")].detach().requires_grad_()
    loss = fem_moe.residual_loss(problem, u, data, norm="dual")
    (grad,) = torch.autograd.grad(loss, u)
    bc, _ = dirichlet_dofs(problem)
    phi = basis[0].numpy()[:, ~bc]
    projected = problem.comm.allreduce(phi @ grad[0].numpy()[~bc])
    scale = np.sqrt(problem.comm.allreduce(float((grad[0].numpy() ** 2).sum()))) * np.sqrt(
        problem.comm.allreduce((phi ** 2).sum(axis=1))).max()
    parallel_assert(np.abs(projected).max() < 1e-8 * scale, f"{projected} (scale {scale:.2e})")
    values = {key: fem_moe.residual_loss(problem, out, data, norm="dual").item()
              for key, out in outputs.items()}
    best = values[("lstsq", "dual")]
    parallel_assert(all(best <= v * (1 + 1e-10) for v in values.values()), f"{values}")


@pytest.mark.parallel([1, 2, 3])
def test_dual_norm_riesz_solver_from_its_options_prefix(petsc_options):
    """The Riesz solve takes its KSP from <prefix>riesz_: the default (MUMPS; on one rank PETSc's LU
    for vectors), CG + GAMG, and PETSc's own LU on every rank (PCREDUNDANT's layout, the default
    past BLOCKED_RIESZ_ROWS rows; on several ranks each solves its share of a block's columns,
    norms.SplitColumns), give the direct solve's output; a Riesz solve that fails is a
    SolverDivergedError naming its prefix, on every rank."""
    from fem_moe.errors import SolverDivergedError
    base = nonlinear_diffusion(n=6, degree=1)
    problems = {name: fem_moe.ConstrainedProblem(base.V, base.residual, bcs=base.bcs,
                                                 data_spaces=base.data_spaces,
                                                 options_prefix=name + "_")
                for name in ("direct", "iterative", "redundant", "failing", "failingredundant")}
    petsc_options(iterative_riesz_ksp_type="cg", iterative_riesz_pc_type="gamg",
                  iterative_riesz_ksp_rtol=1e-13, redundant_riesz_pc_type="redundant",
                  redundant_riesz_redundant_pc_type="lu", failing_riesz_ksp_type="cg",
                  failing_riesz_pc_type="none", failing_riesz_ksp_max_it=1,
                  failingredundant_riesz_pc_type="redundant",
                  failingredundant_riesz_redundant_ksp_type="cg",
                  failingredundant_riesz_redundant_pc_type="none",
                  failingredundant_riesz_redundant_ksp_max_it=1)
    direct, iterative, redundant, failing, failing_redundant = (
        fem_moe.HardConstraint(p, 4, norm="dual") for p in problems.values())
    problem = problems["direct"]
    data, basis = source(problem), random_basis(problem, 4, seed=2)
    assert iterative.expert.row_norm._ksp.getType() == "cg"
    assert direct.expert.row_norm._blocked and not redundant.expert.row_norm._blocked
    assert redundant.expert.row_norm._split is not None
    # One rank: MUMPS for blocks, PETSc's LU for vectors (the objective's).
    assert (direct.expert.row_norm._vector_ksp is not None) == (problem.comm.size == 1)

    def forward_backward(layer):
        b = basis.clone().requires_grad_()
        u = layer(b, data)
        (u ** 2).sum().backward()      # the backward's Hessian holds W J Phi^T's columns
        return u.detach(), b.grad

    u0, g0 = forward_backward(direct)
    for other in (iterative, redundant):
        u1, g1 = forward_backward(other)
        err = problem.comm.allreduce(float((u0 - u1).abs().max()), op=MPI.MAX)
        parallel_assert(err < 1e-8 * float(u0.abs().max()), f"{err:.2e}")
        err = problem.comm.allreduce(float((g0 - g1).abs().max()), op=MPI.MAX)
        parallel_assert(err < 1e-7 * float(g0.abs().max()), f"gradients: {err:.2e}")
    with pytest.raises(SolverDivergedError, match="failing_riesz_"):
        failing(basis, data)
    with pytest.raises(SolverDivergedError, match="failingredundant_riesz_"):
        failing_redundant(basis, data)


def test_riesz_solver_by_size():
    """The Riesz solve's defaults, chosen by measurement (norms.py): MUMPS's block solves on
    small Gram matrices, PETSc's LU (redundant on several ranks) on larger ones, CG + GAMG past
    the direct limit."""
    from fem_moe import norms
    small, large, huge = 6060, norms.BLOCKED_RIESZ_ROWS + 1, norms.DIRECT_RIESZ_ROWS + 1
    assert norms._riesz_parameters(small, 2)["pc_factor_mat_solver_type"] == "mumps"
    assert norms._riesz_parameters(large, 1) == norms.DEFAULT_RIESZ_PARAMETERS
    assert norms._riesz_parameters(large, 3)["pc_type"] == "redundant"
    assert norms._riesz_parameters(huge, 1)["pc_type"] == "gamg"


def test_memory_flat_over_500_calls():
    from firedrake.adjoint import get_working_tape
    problem = nonlinear_diffusion(n=4, degree=1)
    layer = fem_moe.HardConstraint(problem, 4)
    data = source(problem)

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def step(i):
        basis = random_basis(problem, 4, seed=i).requires_grad_()
        (layer(basis, data) ** 2).sum().backward()

    for i in range(50):
        step(i)
    before = rss_mb()
    for i in range(500):
        step(i)
    growth = rss_mb() - before
    assert len(get_working_tape().get_blocks()) == 0
    assert growth < 8.0, f"resident memory grew by {growth:.1f} MB over 500 calls"


@pytest.fixture(scope="module")
def setup():
    problem = nonlinear_diffusion(n=3, degree=1)
    return problem, fem_moe.HardConstraint(problem, 3), source(problem)


class TestBadInput:
    def test_wrong_shape(self, setup):
        problem, layer, data = setup
        with pytest.raises(fem_moe.InputError,
                           match=r"basis has shape \[1, 2, 16\], expected \[\*, 3, 16\]"):
            layer(torch.zeros(1, 2, problem.n_dofs, dtype=torch.float64), data)
        with pytest.raises(fem_moe.InputError, match="data has shape"):
            layer(random_basis(problem, 3), data[:, :-1])

    def test_dtype(self, setup):
        problem, layer, data = setup
        with pytest.raises(fem_moe.InputError, match="float32 or float64"):
            layer(torch.zeros(1, 3, problem.n_dofs, dtype=torch.int64), data)
        with pytest.raises(fem_moe.InputError, match="data has dtype torch.float32"):
            layer(random_basis(problem, 3), data.float())

    def test_missing_and_extra_data(self, setup):
        problem, layer, data = setup
        with pytest.raises(fem_moe.InputError, match="data is required"):
            layer(random_basis(problem, 3))

    @pytest.mark.parametrize("what", ["basis", "data"])
    def test_non_finite(self, setup, what):
        problem, layer, data = setup
        basis = random_basis(problem, 3)
        if what == "basis":
            basis[0, 1, 5] = float("nan")
        else:
            data = data.clone()
            data[0, 2] = float("inf")
        with pytest.raises(fem_moe.InputError, match=f"{what} has 1 non-finite values"):
            layer(basis, data)

    def test_finite_values_whose_sum_overflows_pass_the_check(self, setup):
        from fem_moe.layer import check_tensor
        problem, _, _ = setup
        x = torch.full((2, 3), 1e308, dtype=torch.float64)
        check_tensor(problem.comm, "x", x, (None, 3))
        x[1, 2] = -float("inf")
        with pytest.raises(fem_moe.InputError, match="x has 1 non-finite values"):
            check_tensor(problem.comm, "x", x, (None, 3))

    def test_rank_deficient_basis(self, setup):
        problem, layer, data = setup
        basis = random_basis(problem, 3)
        basis[0, 2] = 2 * basis[0, 0] - basis[0, 1]
        with pytest.warns(fem_moe.RankDeficientBasisWarning, match="numerical rank 2.*ridge"):
            u = layer(basis, data)
        assert torch.isfinite(u).all() and layer.diagnostics[0].rank == 2
        strict = fem_moe.HardConstraint(problem, 3, on_rank_deficient="raise")
        with pytest.raises(fem_moe.InputError, match="numerical rank 2"):
            strict(basis, data)

    def test_snes_divergence_names_the_sample(self):
        problem = nonlinear_diffusion(n=3, degree=1, solver_parameters={"snes_max_it": 1})
        layer = fem_moe.HardConstraint(problem, 3)
        basis = random_basis(problem, 3, batch=2)
        with pytest.raises(fem_moe.SolverDivergedError, match="sample 0 .*DIVERGED_MAX_IT") as err:
            layer(basis, source(problem, 50.0).repeat(2, 1))
        assert err.value.sample == 0 and err.value.expert is None


def test_options_prefix_from_command_line(petsc_options):
    petsc_options(myprefix_snes_max_it=1)
    problem = nonlinear_diffusion(n=3, degree=1, options_prefix="myprefix_")
    layer = fem_moe.HardConstraint(problem, 3)
    assert layer.expert.snes.getTolerances()[3] == 1


@pytest.mark.parallel([2, 3])
@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_distributed_equals_serial(mode):
    """The global layer on a distributed mesh gives the serial output and gradients."""
    distributed_matches_serial(lambda problem: fem_moe.HardConstraint(problem, 5, mode=mode), n=6)


def _taped_inputs(problem, norm):
    """An expert ("galerkin", or least squares in ``norm``, None: its default), three basis
    Functions, the data Function and a direction for each, for the pyadjoint tests."""
    mode = "galerkin" if norm == "galerkin" else "lstsq"
    expert = fem_moe.Expert(problem, 3, mode=mode, norm=None if mode == "galerkin" else norm)
    V, Vd = problem.V, problem.data_spaces[0]
    x, y = fd.SpatialCoordinate(V.mesh())
    basis = [fd.Function(V).interpolate(e) for e in (fd.sin(x) * y, x * x + y, fd.cos(3 * x * y))]
    m = fd.Function(Vd).interpolate(2 + x * y)
    dirs = [fd.Function(V).interpolate(e) for e in (x, y * y, fd.sin(x + y))]
    dirs.append(fd.Function(Vd).interpolate(fd.cos(x) + y))
    return expert, basis, m, dirs


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("norm,data_in_jacobian", [("euclidean", False), ("dual", False),
                                                   ("galerkin", False), ("dual", True),
                                                   ("galerkin", True)])
def test_pyadjoint_tangent_linear(norm, data_in_jacobian):
    """The block's tangent linear model: the tape's forward-mode derivative of J in a direction
    of the basis and the data equals the adjoint gradient paired with it (two independent
    computations: Expert.jvp and Expert.vjp), and a central difference of the solve. With
    ``data_in_jacobian`` the data enters the residual nonlinearly (a coefficient of the
    diffusion), so the tangent's dJ/dm terms count."""
    from firedrake.adjoint import (Control, ReducedFunctional, continue_annotation,
                                   pause_annotation, set_working_tape)
    problem = nonlinear_diffusion(n=5, degree=2)
    if data_in_jacobian:
        problem = fem_moe.ConstrainedProblem(
            problem.V, lambda u, v, m: ((1 + m[0] ** 2 * u ** 2) * fd.inner(fd.grad(u), fd.grad(v))
                                        - 10 * v) * fd.dx,
            bcs=problem.bcs, data_spaces=problem.data_spaces)
    expert, basis, m, dirs = _taped_inputs(problem, norm)
    functional = lambda u: fd.assemble((u**2 + u) * u * fd.dx)
    with set_working_tape() as tape:
        continue_annotation()
        u = fem_moe.constrained_solve(expert, basis, [m])
        J = functional(u)
        pause_annotation()
        for f, d in zip(basis + [m], dirs):
            f.block_variable.tlm_value = d
        tape.evaluate_tlm()
        tlm = float(J.block_variable.tlm_value)
        Jhat = ReducedFunctional(J, [Control(f) for f in basis + [m]])
        grads = Jhat.derivative()
        tape.clear_tape()
    adjoint = 0.0
    for g, d in zip(grads, dirs):
        with g.dat.vec_ro as gv, d.dat.vec_ro as dv:
            adjoint += gv.dot(dv)
    h = 1e-5
    moved = lambda f, d, t: fd.Function(f.function_space()).assign(f + t * d)
    shifted = lambda t: functional(fem_moe.constrained_solve(
        expert, [moved(f, d, t) for f, d in zip(basis, dirs)], [moved(m, dirs[-1], t)]))
    fd_value = (shifted(h) - shifted(-h)) / (2 * h)
    parallel_assert(abs(tlm - adjoint) < 1e-9 * abs(adjoint), f"tlm {tlm!r} adjoint {adjoint!r}")
    parallel_assert(abs(tlm - fd_value) < 1e-6 * abs(tlm),
                    f"tlm {tlm!r} central difference {fd_value!r}")


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("norm", ["euclidean", "dual", "galerkin"])
def test_pyadjoint_taylor(norm):
    """The constrained solve on a pyadjoint tape (taylor_to_dict, with respect to the basis and
    the data together): second-order Taylor convergence with the adjoint gradient, third-order
    with ReducedFunctional.hessian."""
    from firedrake.adjoint import (Control, ReducedFunctional, continue_annotation,
                                   pause_annotation, set_working_tape, taylor_to_dict)
    problem = nonlinear_diffusion(n=5, degree=2)
    expert, basis, m, dirs = _taped_inputs(problem, norm)
    with set_working_tape() as tape:
        continue_annotation()
        u = fem_moe.constrained_solve(expert, basis, [m])
        J = fd.assemble((u**2 + u) * u * fd.dx)
        Jhat = ReducedFunctional(J, [Control(f) for f in basis + [m]])
        pause_annotation()
        rates = taylor_to_dict(Jhat, basis + [m], dirs)
        tape.clear_tape()
    r1, r2 = min(rates["R1"]["Rate"]), min(rates["R2"]["Rate"])
    parallel_assert(r1 > 1.9 and r2 > 2.8, f"Taylor rates: gradient {rates['R1']['Rate']}, "
                                           f"Hessian {rates['R2']['Rate']}")


@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_time_step_residual(mode):
    """A time-stepping residual (no Dirichlet conditions; the data is the previous level)."""
    from problems import allen_cahn_step
    problem = allen_cahn_step()
    layer = fem_moe.HardConstraint(problem, 3, mode=mode)
    basis = random_basis(problem, 3).requires_grad_()
    X = problem.dof_coordinates()
    u_prev = torch.tensor(np.cos(3 * X[:, 0]) * X[:, 1])[None].requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, u_prev), eps=1e-6, atol=1e-6, rtol=1e-4)
    exact = classical_solution(problem, u_prev[0].detach().numpy())
    basis = basis.detach().clone()
    basis[0, 0] = torch.tensor(exact)
    assert np.abs(layer(basis, u_prev.detach())[0].numpy() - exact).max() < 1e-10


def test_reduced_gradient_is_the_derivative_of_the_objective_for_non_polynomial_residuals():
    """The least-squares objective, its reduced gradient G and Hessian agree with central
    differences to round-off for a residual with a non-polynomial coefficient (diffusion-
    sorption's retardation): every derived form uses the residual's quadrature. (With UFL's
    own estimates per form, G was off by 6e-9 relative and trust regions collapsed.)"""
    from fem_moe import pdes
    pde = pdes.get("diffusion_sorption", nx=8, nt=4)
    problem = pde.problem(pde.mesh(MPI.COMM_WORLD))
    expert = fem_moe.Expert(problem, 4)
    expert.set_data(pde.data(problem, [0.05])[0].dat.data_ro.copy())
    X = problem.dof_coordinates()
    Phi = np.where(expert.col_mask, np.stack([np.sin((k + 1) * X[:, 0]) * X[:, 1] ** (k % 2 + 1)
                                              for k in range(4)]), 0.0)
    expert._Phi, expert._Phi_petsc, expert.rho = Phi, expert._phi_mat(Phi), 0.0

    def state(w):
        s = expert._evaluate_residual(w, Phi)
        expert._complete(s, Phi, expert._Phi_petsc, True)
        return s
    rng = np.random.default_rng(0)
    w, d, h = 0.1 * rng.standard_normal(4), rng.standard_normal(4), 1e-5
    s = state(w)
    slope = (state(w + h * d)["objective"] - state(w - h * d)["objective"]) / (2 * h)
    assert abs(slope - s["G"] @ d) < 1e-10 * abs(slope)
    dG = (state(w + h * d)["G"] - state(w - h * d)["G"]) / (2 * h)
    assert np.linalg.norm(dG - s["A"] @ d) < 1e-9 * np.linalg.norm(dG)


def test_stall_test_tells_the_round_off_floor_from_a_real_stop():
    """stall_rtol accepts a collapsed trust region only where the Newton step promises no
    decrease above round-off: true at the solution of a solved sample, false at its start."""
    problem = nonlinear_diffusion(n=4, degree=1)
    layer = fem_moe.HardConstraint(problem, 4)
    basis, data = random_basis(problem, 4), source(problem)
    layer(basis, data)
    expert = layer.expert
    assert layer.diagnostics[0].reason.startswith("CONVERGED")
    g_start = 1.0
    assert expert._stalled(g_start)                     # at the converged coefficients
    expert._wvec.set(0.0)                               # back at w = 0: far from the minimum
    expert._cache = None
    assert not expert._stalled(g_start)


def test_mixed_space_layout():
    """Velocity-pressure: coordinates and components per owned dof, Dirichlet dofs only in the
    velocity block."""
    problem = channel_flow(n=2)
    X, comp = problem.dof_coordinates(), problem.dof_components()
    nu = owned_size(problem.V[0])
    assert X.shape == (problem.n_dofs, 2) and comp.shape == (problem.n_dofs,)
    assert problem.n_components == 3 and set(comp[:nu]) == {0, 1} and set(comp[nu:]) == {2}
    mask, g = dirichlet_dofs(problem)
    assert mask[:nu].any() and not mask[nu:].any()
    inflow = mask & (np.abs(X[:, 0]) < 1e-12) & (comp == 0)
    assert np.allclose(g[inflow], 4 * X[inflow, 1] * (1 - X[inflow, 1]))


@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
def test_mixed_space_gradcheck(mode):
    problem = channel_flow(n=2)
    layer = fem_moe.HardConstraint(problem, 3, mode=mode)
    basis = random_basis(problem, 3).requires_grad_()
    data = (0.5 * source(problem)).requires_grad_()
    assert torch.autograd.gradcheck(layer, (basis, data), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parallel([1, 2])
def test_mixed_space_spanning_basis_recovers_navier_stokes():
    """With the classical (u, p) among the basis fields, the constrained output is it."""
    problem = channel_flow(n=4)
    data = source(problem)
    exact = classical_solution(problem, data[0].numpy())
    _, g = dirichlet_dofs(problem)
    basis = torch.cat([torch.tensor(exact - g)[None, None], random_basis(problem, 2)], dim=1)
    u = fem_moe.HardConstraint(problem, 3)(basis, data)
    err = problem.comm.allreduce(float((u[0] - torch.tensor(exact)).abs().max()), op=MPI.MAX)
    parallel_assert(err < 1e-8, f"max error {err}")


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("which", ["scalar", "vector", "mixed"])
def test_function_and_tensor_conversions(which):
    """problem.function(u) and problem.tensor(f): a layer's tensors as Firedrake Functions and
    back, batched, on any rank count; the Function holds the field whose dofs the tensor lists
    (checked against interpolation at problem.dof_coordinates())."""
    problem = {"scalar": lambda: nonlinear_diffusion(n=4),
               "vector": lambda: nonlinear_diffusion(n=4, vector=True),
               "mixed": lambda: channel_flow(n=2)}[which]()
    X, comp = problem.dof_coordinates(), problem.dof_components()
    u = torch.tensor(np.stack([np.sin(X[:, 0] + comp) * X[:, 1], X[:, 0] + 2 * comp]))
    fs = problem.function(u, name="u")
    assert isinstance(fs, list) and len(fs) == 2 and fs[0].name() == "u"
    back = problem.tensor(fs)
    assert back.shape == u.shape and torch.equal(back, u)
    assert torch.equal(problem.tensor(problem.function(u[1])), u[1])
    # The second field is x + 2 * (component index): its Function evaluated by UFL agrees.
    f = fs[1]
    x = fd.SpatialCoordinate(problem.mesh)
    if which == "scalar":
        expr = x[0]
    elif which == "vector":
        expr = fd.as_vector([x[0], x[0] + 2])
    else:
        expr = None
    if expr is not None:
        err = fd.assemble(fd.inner(f - expr, f - expr) * fd.dx) ** 0.5
        assert err < 1e-12
    else:       # velocity x + 2c (c = 0, 1), pressure x + 4
        vel, p = f.subfunctions
        err = fd.errornorm(fd.as_vector([x[0], x[0] + 2]), vel) + fd.errornorm(x[0] + 4, p)
        assert err < 1e-12
    with pytest.raises(fem_moe.InputError, match="owned dofs"):
        problem.function(u[:, :-1])
    other = fd.Function(fd.FunctionSpace(problem.mesh, "DG", 0))
    with pytest.raises(fem_moe.InputError, match="not the problem's space"):
        problem.tensor(other)


def _petsc_garbage(comm, capfd):
    """How many released PETSc objects wait for a collective destroy on ``comm`` (this rank's
    count, read from ``PETSc.garbage_view``)."""
    from petsc4py import PETSc
    capfd.readouterr()
    PETSc.garbage_view(comm)
    text = capfd.readouterr().out
    counts = [int(line.split("Total entries:")[1]) for line in text.splitlines()
              if "Total entries:" in line]
    return counts[0] if counts else 0


@pytest.mark.parallel([2])
def test_training_steps_leave_no_petsc_garbage(capfd):
    """On 2 ranks petsc4py parks every released object of a parallel communicator until a
    collective cleanup: the layers and the physics loss do it after each forward and backward,
    so repeated training steps do not pile objects up (they did, ~15 MiB per step at paper
    size)."""
    problem = nonlinear_diffusion(6)
    comm = problem.comm
    data = source(problem)
    layers = [fem_moe.HardConstraint(problem, 4),
              fem_moe.MoEHardConstraint(problem, 4, n_experts=2)]

    def steps(n):
        for i in range(n):
            for layer in layers:
                basis = random_basis(problem, 4, seed=i).requires_grad_(True)
                u = layer(basis, data)
                fem_moe.residual_loss(problem, u, data, norm="dual").backward()

    steps(2)
    before = _petsc_garbage(comm, capfd)
    steps(4)
    after = _petsc_garbage(comm, capfd)
    parallel_assert(after <= before,
                    f"{after - before} PETSc objects left to collect after 4 steps")


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("kind", ["pihc", "coupled", "independent", "loss"])
def test_no_data_gradient_assembled_where_none_is_asked(kind, monkeypatch):
    """Training's data are constants: a backward skips the data derivative's assembly then,
    and gives the same basis gradient as when the data's gradient is asked for too."""
    from fem_moe.expert import Expert
    problem = nonlinear_diffusion(n=6)
    layer = {"pihc": lambda: fem_moe.HardConstraint(problem, 3),
             "coupled": lambda: fem_moe.MoEHardConstraint(problem, 3, n_experts=3),
             "independent": lambda: fem_moe.MoEHardConstraint(problem, 3, n_experts=3,
                                                              coupled=False, ridge_always=True),
             "loss": lambda: (lambda b,
                              d: fem_moe.residual_loss(problem, b[:, 0], d,
                                                       reduction="none"))}[kind]()
    calls = []
    derivative = Expert._data_derivative
    monkeypatch.setattr(Expert, "_data_derivative",
                        lambda self: calls.append(1) or derivative(self))
    basis, data = random_basis(problem, 3,
                               batch=2), torch.cat([source(problem), source(problem, 2.0)])
    grads = []
    for asked in (True, False):
        b, d = basis.clone().requires_grad_(), data.clone().requires_grad_(asked)
        calls.clear()
        layer(b, d).square().sum().backward()
        grads.append(b.grad)
        parallel_assert(bool(calls) == asked, f"data derivatives assembled: {len(calls)}")
        parallel_assert((d.grad is not None) == asked)
    scale = grads[0].abs().max()
    parallel_assert(torch.allclose(grads[0], grads[1], rtol=0, atol=1e-12 * scale))


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("mode", ["galerkin", "lstsq"])
@pytest.mark.parametrize("kind", ["pihc", "coupled"])
def test_a_float32_output_is_solved_to_float32s_precision(kind, mode):
    """A float32 basis gets a float32 output: its reduced solves (the global layer's, the
    coupled mixture's) stop where the next step would change the field by less than float32's
    epsilon (relative to the field, dof l2 norm), in fewer iterations than the float64 solves
    to the options' tolerance, and the output is the float64 one to float32's precision."""
    problem = nonlinear_diffusion(n=8)
    basis = random_basis(problem, 4, batch=2).float()
    data = torch.cat([source(problem, 4.0), source(problem, 7.0)])
    if kind == "pihc":
        single, double = (fem_moe.HardConstraint(problem, 4, mode=mode) for _ in range(2))
        g = torch.tensor(single.expert.g_vec)
        solves = lambda layer: layer.diagnostics
    else:
        single, double = (fem_moe.MoEHardConstraint(problem, 4, n_experts=3, mode=mode)
                          for _ in range(2))
        g = torch.tensor(fem_moe.expert.dirichlet_dofs(problem)[1])
        solves = lambda layer: layer.coupling_diagnostics
    u32 = single(basis, data.float()).double()
    u64 = double(basis.double(), data)
    norm = lambda x: float(np.sqrt(MPI.COMM_WORLD.allreduce(float((x ** 2).sum()))))
    eps = torch.finfo(torch.float32).eps
    for b in range(2):
        err = norm(u32[b] - u64[b])
        bound = eps * (norm(u64[b] - g) + norm(u64[b]))
        parallel_assert(err <= bound, f"sample {b}: |u32 - u64| = {err:.3e} > {bound:.3e}")
    its = lambda layer: [i.iterations for i in solves(layer)]
    assert sum(its(single)) < sum(its(double)), (its(single), its(double))
    assert "CONVERGED_FIELD_PRECISION" in [i.reason for i in solves(single)]
    assert all(i.reason != "CONVERGED_FIELD_PRECISION" for i in solves(double))
