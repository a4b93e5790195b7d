"""The shipped PDE families: their discrete problems, data and classical solvers."""
import numpy as np
import pytest
import torch
import firedrake as fd
from mpi4py import MPI
from pytest_mpi import parallel_assert

import fem_moe
from fem_moe import pdes
from fem_moe.errors import InputError
from fem_moe.expert import dirichlet_dofs
from fem_moe.problem import owned_values


def _turbulence(steps=2):
    # dt = 0.5, as in the demo (much longer steps make Newton's line search fail).
    pde = pdes.get("decaying_turbulence", steps=steps, t_end=0.5 * steps)
    problem = pde.problem(pde.mesh(MPI.COMM_WORLD))
    params = pde.sample(np.random.default_rng(4), 1)[0]
    return pde, problem, pde.data(problem, params)


def _residual_norm(problem, u, data):
    F = problem.residual(u, fd.TestFunction(problem.V), tuple(data))
    with fd.assemble(F).dat.vec_ro as r:
        return r.norm()


@pytest.mark.parallel([1, 2])
def test_turbulence_marching_solves_the_whole_window():
    """The classical solver marches step by step; its trajectory is the root of the window's
    residual (all steps at once), which the hard constraints enforce."""
    pde, problem, data = _turbulence(steps=3)
    u, seconds, iterations = pde.classical_solve(problem, data)
    start = _residual_norm(problem, fd.Function(problem.V), data)
    end = _residual_norm(problem, u, data)
    parallel_assert(end < 1e-9 * start and iterations >= 3 and seconds > 0,
                    f"residual {end:.2e} of {start:.2e} after {iterations} Newton iterations")
    # Something happened: the trajectory moved away from the initial vorticity.
    change = np.sqrt(problem.comm.allreduce((owned_values(u) ** 2).sum()))
    parallel_assert(change > 1e-2
                    * np.sqrt(problem.comm.allreduce((owned_values(data[0]) ** 2).sum())),
                    f"the flow did not evolve: change {change:.2e}")


@pytest.mark.parallel([1, 2])
def test_turbulence_data_is_a_periodic_zero_mean_vorticity_and_its_streamfunction():
    pde, problem, data = _turbulence()
    ell = data[0]
    assert np.allclose(fem_moe.Partition(problem.mesh, 1).periods, [1.0, 1.0])
    V = fd.FunctionSpace(problem.mesh, "CG", 1)
    w0, psi0 = fd.Function(V), fd.Function(V)
    w0.dat.data[:] = ell.subfunctions[0].dat.data_ro[:, 0]
    psi0.dat.data[:] = ell.subfunctions[1].dat.data_ro[:, 0]
    for j in range(2):      # the lifting holds the initial state at every time level
        levels = ell.subfunctions[j].dat.data_ro
        assert np.array_equal(levels, np.repeat(levels[:, :1], levels.shape[1], axis=1))
    size = np.sqrt(fd.assemble(w0 * w0 * fd.dx))
    assert abs(fd.assemble(w0 * fd.dx)) < 1e-3 * size, "the initial vorticity has a mean"
    q = fd.TestFunction(V)
    r = fd.assemble((fd.inner(fd.grad(psi0), fd.grad(q)) + pde.opts["gauge"] * psi0 * q - w0 * q)
                    * fd.dx)
    with r.dat.vec_ro as vec:
        assert vec.norm() < 1e-10 * size, "the streamfunction lifting does not solve its equation"


@pytest.mark.parametrize("initial", ["fourier", "grf"])
def test_turbulence_input_fields_are_the_initial_vorticity(initial):
    """What an operator backbone sees: the inputs times ``input_fields`` at any points is the
    initial vorticity over the amplitude (checked at the mesh's vertices, and across the seam)."""
    pde = pdes.get("decaying_turbulence", initial=initial)
    mesh = pde.mesh(MPI.COMM_SELF)
    params = pde.sample(np.random.default_rng(2), 2)
    V = fd.FunctionSpace(mesh, "CG", 1)
    X = fd.Function(fd.VectorFunctionSpace(mesh, "CG",
                                           1)).interpolate(fd.SpatialCoordinate(mesh)).dat.data_ro
    fields = pde.input_fields(X)
    assert fields.shape == (pde.n_params, 1, len(X))
    assert np.allclose(fields, pde.input_fields(X + np.array([1.0, -1.0])), atol=1e-12)
    for p, inputs in zip(params, pde.inputs(params)):
        w0 = pde.initial_vorticity(mesh, p).dat.data_ro
        assert V.dim() == len(X) and np.allclose(inputs @ fields[:, 0], w0 / pde.opts["amplitude"],
                                                 atol=1e-12)


@pytest.mark.parallel([1, 2])
def test_turbulence_experts_recover_the_trajectory():
    """Mixed, vector-valued, periodic, nonlinear: where the basis spans the classical trajectory,
    K = 3 experts on subdomains of the periodic square (some crossing the seam) find it."""
    pde, problem, data = _turbulence(steps=2)
    u, _, _ = pde.classical_solve(problem, data)
    exact = owned_values(u)
    gen = torch.Generator().manual_seed(problem.comm.rank)
    basis = torch.cat([torch.tensor(exact)[None, None],
                       torch.randn(1, 2, problem.n_dofs, generator=gen, dtype=torch.float64)],
                      dim=1)
    layer = fem_moe.MoEHardConstraint(problem, 3, n_experts=3)
    out = layer(basis, torch.tensor(owned_values(data[0]))[None])
    err = problem.comm.allreduce(float((out[0] - torch.tensor(exact)).abs().max()), op=MPI.MAX)
    scale = problem.comm.allreduce(float(np.abs(exact).max()), op=MPI.MAX)
    parallel_assert(err < 1e-8 * scale, f"max error {err:.2e} (scale {scale:.2e})")


@pytest.mark.parallel([1, 2])
def test_3d_part_with_holes_classical_solvers_agree_and_the_mixture_recovers_the_solution():
    """The scale benchmark's 3D PDE: Newton-Krylov (GMRES + GAMG) converges to MUMPS's solution;
    the global layer and a distributed mixture recover it from a basis that spans it (1e-8)."""
    from fem_moe.expert import dirichlet_dofs
    pde = pdes.get("nonlinear_diffusion_3d", refine=0)
    problem = pde.problem(pde.mesh(MPI.COMM_WORLD))
    data = pde.data(problem, pde.sample(np.random.default_rng(1), 1)[0])
    krylov, _, its = pde.classical_solve(problem, data)
    direct, _, _ = pde.classical_solve(problem, data,
                                       solver_parameters=pdes.CLASSICAL_SOLVER_PARAMETERS)
    exact = owned_values(direct)
    scale = problem.comm.allreduce(float(np.abs(exact).max()), op=MPI.MAX)
    gap = problem.comm.allreduce(float(np.abs(owned_values(krylov) - exact).max()), op=MPI.MAX)
    parallel_assert(scale > 1e-2 and gap < 1e-8 * scale and its < 20,
                    f"Newton-Krylov {gap:.2e} from MUMPS (|u| {scale:.2e}) in {its} iterations")
    _, g = dirichlet_dofs(problem)
    gen = torch.Generator().manual_seed(problem.comm.rank)
    basis = torch.cat([torch.tensor(exact - g)[None, None],
                       torch.randn(1, 2, problem.n_dofs, generator=gen, dtype=torch.float64)],
                      dim=1)
    m = torch.tensor(owned_values(data[0]))[None]
    for layer in (fem_moe.HardConstraint(problem, 3),
                  fem_moe.MoEHardConstraint(problem, 3, n_experts=3, partition="distributed")):
        u = layer(basis, m)
        err = problem.comm.allreduce(float((u[0] - torch.tensor(exact)).abs().max()), op=MPI.MAX)
        parallel_assert(err < 1e-8 * scale, f"{type(layer).__name__}: max error {err:.2e}")


@pytest.mark.parametrize("name,options", [
    ("reaction_diffusion", {"mesh": "plate_with_holes"}),
                                          ("diffusion_sorption", {"nx": 8, "nt": 4}),
    ("flow_past_obstacle", {}), ("decaying_turbulence", {"steps": 2, "t_end": 1.0})])
def test_new_inputs_compile_no_new_kernels(name, options, monkeypatch):
    """Training on fresh inputs calls ``pde.data`` with new parameters every step: the data's
    kernels must take them as values (Constants, arrays), not as literals compiled into a new
    kernel each time (0.2 s and a shared library per input on the channel). PyOP2 builds a
    kernel's library through ``compilation.make_so`` on a miss of its in-memory cache: counted
    here (the real function runs)."""
    import pyop2.compilation
    built = []
    make_so = pyop2.compilation.make_so
    monkeypatch.setattr(pyop2.compilation, "make_so", lambda *a,
                        **k: built.append(1) or make_so(*a, **k))
    pde = pdes.get(name, **options)
    problem = pde.problem(pde.mesh(MPI.COMM_WORLD))
    first, second = pde.sample(np.random.default_rng(0), 2)
    pde.data(problem, first)
    before = len(built)
    pde.data(problem, second)
    assert len(built) == before, f"{len(built) - before} kernel(s) built for a new input"


@pytest.mark.parallel([1, 2])
def test_diffusion_sorption_graded_time_levels_resolve_the_start():
    """``grading`` = g puts the time levels at tau_end (j / nt)^g; the front the inflow starts at
    (0, 0) then is resolved, and a coarse graded solution is much closer to a fine one than
    the uniform solution of the same size (the reason the reference for the PDE is graded)."""
    comm = MPI.COMM_WORLD
    with pytest.raises(fem_moe.InputError, match="grading"):
        pdes.get("diffusion_sorption", grading=-1.0).mesh(comm)
    graded = pdes.get("diffusion_sorption", nx=4, nt=4, grading=3.0)
    tau = np.unique(np.round(comm.allreduce(list(graded.mesh(comm).coordinates.dat.data_ro[:, 1])),
                             12))
    parallel_assert(np.allclose(tau, np.round(np.linspace(0.0, 1.0, 5) ** 3, 12)), f"{tau}")

    def solution(nx, nt, grading):
        pde = pdes.get("diffusion_sorption", nx=nx, nt=nt, grading=grading)
        problem = pde.problem(pde.mesh(comm))
        data = pde.data(problem, [0.1])
        du, _, _ = pde.classical_solve(problem, data)
        return fd.Function(problem.V).assign(du + data[0])

    fine = solution(256, 32, 3.0)
    V = fine.function_space()
    distance = {g: fd.errornorm(fine, fd.assemble(fd.interpolate(solution(64, 8, g), V)))
                / fd.norm(fine)
                for g in (1.0, 3.0)}
    parallel_assert(distance[3.0] < distance[1.0] / 4, f"{distance}")


@pytest.mark.parallel([1, 2])
def test_classical_newton_converges_quadratically_on_graded_levels():
    """A small u0 on graded time levels: the retardation's steep (u^2 + eps^2)^p is where a
    Jacobian integrated at another quadrature degree than the residual's stops Newton's
    quadratic convergence (50 iterations without converging at 128 x 16, u0 = 0.003, before
    the classical solve pinned the degree)."""
    pde = pdes.get("diffusion_sorption", nx=128, nt=16, grading=3.0)
    problem = pde.problem(pde.mesh(MPI.COMM_WORLD))
    _, _, iterations = pde.classical_solve(problem, pde.data(problem, [0.003]))
    parallel_assert(iterations <= 8, f"{iterations} Newton iterations")


@pytest.mark.parallel([1, 2])
def test_diffusion_sorption_erfc_lifting_carries_the_front_and_keeps_the_solution():
    """The "erfc" lifting has the constant one's Dirichlet values, so the discrete solution is
    the same; it carries the start's front, so it lies far closer to that solution than the
    constant lifting does (0.10 against 0.80 at u0 = 0.1, 64 x 16 graded cells)."""
    fields, problem = {}, None
    for lifting in ("constant", "erfc"):
        pde = pdes.get("diffusion_sorption", nx=64, nt=16, grading=3.0, lifting=lifting)
        # One mesh for both (two meshes may be distributed differently over the ranks).
        problem = problem or pde.problem(pde.mesh(MPI.COMM_WORLD))
        data = pde.data(problem, [0.1])
        du, _, _ = pde.classical_solve(problem, data)
        fields[lifting] = (owned_values(du) + owned_values(data[0]), owned_values(data[0]))
    comm = MPI.COMM_WORLD

    def norm(x):
        return np.sqrt(comm.allreduce((x ** 2).sum()))
    (u, constant), (u_erfc, erfc) = fields["constant"], fields["erfc"]
    bc, _ = dirichlet_dofs(problem)
    parallel_assert(np.array_equal(erfc[bc], constant[bc]), "the liftings' Dirichlet values differ")
    parallel_assert(norm(u_erfc - u) < 1e-8 * norm(u),
                    f"solutions differ by {norm(u_erfc - u):.2e}")
    near, far = norm(erfc - u) / norm(u), norm(constant - u) / norm(u)
    parallel_assert(near < far / 4,
                    f"erfc lifting {near:.3f} from the solution, constant {far:.3f}")
    with pytest.raises(InputError, match="lifting must be one of"):
        pde = pdes.get("diffusion_sorption", nx=4, nt=4, lifting="linear")
        pde.mesh(comm)


@pytest.mark.parallel([1, 2])
def test_diffusion_sorption_quadrature_degree_is_the_residuals_and_a_consistent_discretisation():
    """``quadrature_degree`` integrates every term of the residual (and so its derivatives)
    at that degree instead of the default, UFL's estimate for the retardation's power (5 at
    P1): the residual is the default one assembled at that degree; the classical solution
    moves, by less the finer the time levels near the start, where u_t ~ t^(-1/2) (1e-3 at 8 graded
    levels, 2e-4 at 32, 8e-6 at 1024 x 100: the quadrature's error vanishes with the
    discretisation's)."""
    import firedrake as fd
    import ufl
    from ufl.algorithms import estimate_total_polynomial_degree
    comm = MPI.COMM_WORLD

    def norm(x):
        return np.sqrt(comm.allreduce((x ** 2).sum()))

    moved = []
    for nx, nt in ((64, 8), (64, 32)):
        mesh = pdes.get("diffusion_sorption", nx=nx, nt=nt, grading=3.0).mesh(comm)
        fields = {}
        for q in (None, 2):
            pde = pdes.get("diffusion_sorption", nx=nx, nt=nt, grading=3.0, quadrature_degree=q)
            problem = pde.problem(mesh)
            data = pde.data(problem, [0.05])
            du, _, _ = pde.classical_solve(problem, data)
            fields[q] = owned_values(du)
            x, tau = fd.SpatialCoordinate(mesh)
            u = fd.Function(problem.V).interpolate(0.3 * x * (1 + tau))     # R(u) u_t is nonzero
            v = fd.TestFunction(problem.V)
            F = problem.residual(u, v, tuple(data))
            fields[q, "R"] = owned_values(fd.assemble(F))
            degrees = {itg.metadata()["quadrature_degree"] for itg in F.integrals()}
            if q is None:
                # UFL's estimate for the retardation written as a power (the PDE writes it as
                # exp(p ln s), which UFL estimates two degrees higher).
                power = (u ** 2 + pde.opts["eps"] ** 2) ** ((pde.n_f - 1) / 2) * u.dx(1) * v
                parallel_assert(degrees == {estimate_total_polynomial_degree(power)} == {5},
                                str(degrees))
                at_2 = ufl.Form([itg.reconstruct(metadata={"quadrature_degree": 2})
                                 for itg in F.integrals()])
                R2 = owned_values(fd.assemble(at_2))
            else:
                parallel_assert(degrees == {q}, str(degrees))
        parallel_assert(norm(fields[2, "R"] - R2) < 1e-14 * norm(R2),
                        "not the residual at degree 2")
        parallel_assert(norm(fields[2, "R"] - fields[None, "R"]) > 1e-12 * norm(R2),
                        "degree 2 and UFL's estimate assemble the same residual")
        moved.append(norm(fields[2] - fields[None]) / norm(fields[None]))
    parallel_assert(moved[0] < 3e-3 and moved[1] < moved[0] / 3,
                    f"the classical solution moved by {moved[0]:.2e}, then {moved[1]:.2e} on 4x "
                    "the levels")
    with pytest.raises(InputError, match="quadrature_degree must be a positive integer"):
        pde = pdes.get("diffusion_sorption", nx=4, nt=4, quadrature_degree=0)
        pde.problem(pde.mesh(comm))


@pytest.mark.parallel([1, 2])
def test_turbulence_crank_nicolson_is_second_order_in_time():
    """With theta = 1/2 the trajectory's error at T halves twice as fast in dt as backward
    Euler's (against 4-8 times finer steps of the same scheme), and the window's residual of the
    theta = 1/2 trajectory vanishes (the constraint enforces the same scheme)."""
    mesh = pdes.get("decaying_turbulence").mesh(MPI.COMM_WORLD)    # one layout for every run

    def final_vorticity(theta, steps):
        pde = pdes.get("decaying_turbulence", steps=steps, t_end=0.5, theta=theta)
        problem = pde.problem(mesh)
        data = pde.data(problem, pde.sample(np.random.default_rng(4), 1)[0])
        u, _, _ = pde.classical_solve(problem, data)
        if steps == 8 and theta == 0.5:
            residual = _residual_norm(problem, u, data)
            start = _residual_norm(problem, fd.Function(problem.V), data)
            parallel_assert(residual < 1e-9 * start, f"window residual {residual:.2e}")
        w = u.subfunctions[0].dat.data_ro[:, -1] + data[0].subfunctions[0].dat.data_ro[:, -1]
        return w.copy()

    orders = {}
    for theta in (0.5, 1.0):
        fine = final_vorticity(theta, 64)
        errors = [np.sqrt(MPI.COMM_WORLD.allreduce(((final_vorticity(theta, n) - fine) ** 2).sum()))
                  for n in (8, 16)]
        orders[theta] = np.log2(errors[0] / errors[1])
    parallel_assert(orders[0.5] > 1.7 and orders[1.0] < 1.3, f"observed orders {orders}")
    with pytest.raises(InputError, match="theta must lie in"):
        pdes.get("decaying_turbulence", theta=0.3)


@pytest.mark.parallel([1, 2])
def test_turbulence_gaussian_random_field_has_the_covariance_it_states():
    """initial = "grf": one unit input (a_k = 1) gives s_k cos 2 pi k.x, whose mean square over
    the torus is the covariance's eigenvalue sigma^2 (4 pi^2 ‖k‖^2 + tau^2)^(-alpha) -- the
    Karhunen-Loeve expansion's normalisation -- with sigma = tau^(alpha - 1)."""
    pde = pdes.get("decaying_turbulence", initial="grf", amplitude=1.0, modes=3, refine=2)
    mesh = pde.mesh(MPI.COMM_WORLD)
    alpha, tau = 2.5, 7.0
    for j in (0, 5, len(pde.wavevectors) + 7):        # cos and sin modes of a few wavevectors
        params = np.zeros(pde.n_params)
        params[j] = 1.0
        w0 = pde.initial_vorticity(mesh, params)
        kx, ky = pde.wavevectors[j % len(pde.wavevectors)]
        k2 = kx ** 2 + ky ** 2
        eigenvalue = tau ** (2 * alpha - 2) * (4 * np.pi ** 2 * k2 + tau ** 2) ** -alpha
        parallel_assert(abs(fd.assemble(w0 * w0 * fd.dx) / eigenvalue - 1) < 1e-2,
                        f"mode {j}: mean square {fd.assemble(w0 * w0 * fd.dx):.4e}, "
                        f"eigenvalue {eigenvalue:.4e}")
    with pytest.raises(InputError, match="initial must be one of"):
        pdes.get("decaying_turbulence", initial="uniform")
