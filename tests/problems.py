"""Small problems shared by the tests (test helpers, not fixtures of the package)."""
import numpy as np
import firedrake as fd
import torch
from mpi4py import MPI

import fem_moe


def nonlinear_diffusion(n=4, degree=1, comm=MPI.COMM_WORLD, vector=False, mesh=None, **kwargs):
    """-div((1 + |u|^2) grad u) = m on the unit square, u = x + y (each component) on the
    boundary; m, the source, is the data (a function in the same space). ``mesh``: that mesh
    instead of a new n x n one (two problems whose dofs must be compared: two meshes built
    alike may be distributed differently over the ranks)."""
    mesh = fd.UnitSquareMesh(n, n, comm=comm) if mesh is None else mesh
    if vector:
        V = fd.VectorFunctionSpace(mesh, "CG", degree)
    else:
        V = fd.FunctionSpace(mesh, "CG", degree)
    Vd = fd.FunctionSpace(mesh, "CG", degree)
    x, y = fd.SpatialCoordinate(mesh)
    g = fd.as_vector([x + y, x - y]) if vector else x + y

    def residual(u, v, m):
        f = m[0] * fd.as_vector([1, 0.5]) if vector else m[0]
        return ((1 + fd.inner(u, u)) * fd.inner(fd.grad(u), fd.grad(v)) - fd.inner(f, v)) * fd.dx

    bcs = fd.DirichletBC(V, g, "on_boundary")
    return fem_moe.ConstrainedProblem(V, residual, bcs=bcs, data_spaces=Vd, **kwargs)


def source(problem, scale=1.0):
    """A data tensor [1, n_data] for nonlinear_diffusion: m = scale * (1 + 10 x y)."""
    Vd = problem.data_spaces[0]
    x, y = fd.SpatialCoordinate(Vd.mesh())
    m = fd.Function(Vd).interpolate(scale * (1 + 10 * x * y))
    return torch.tensor(m.dat.data_ro.copy())[None]


def random_basis(problem, n_basis, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * problem.comm.rank)
    return torch.randn(batch, n_basis, problem.n_dofs, generator=gen, dtype=torch.float64)


def smooth_basis(problem, n_basis):
    """Basis fields given by formulas, [1, n_basis, n_dofs]: the same fields on any partition."""
    X = problem.dof_coordinates()
    k = np.arange(1, n_basis + 1)[:, None]
    fields = np.sin(k * np.pi * X[:, 0] / 2) * np.cos((k % 3) * X[:, 1]) + 0.1 * k * X[:, 1] ** 2
    return torch.tensor(fields)[None]


def classical_solution(problem, data):
    """Firedrake's own Newton solve of the same discrete problem: the dof vector [n_dofs]."""
    V = problem.V
    m = tuple(fd.Function(Vd) for Vd in problem.data_spaces)
    for mk, values in zip(m, problem.split_data(data)):
        with mk.dat.vec_wo as vec:
            vec.array[:] = values
    u = fd.Function(V)
    fd.solve(problem.residual(u, fd.TestFunction(V), m) == 0, u, bcs=problem.bcs,
             solver_parameters={"snes_rtol": 1e-14, "snes_atol": 1e-15, "ksp_type": "preonly",
                                "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"})
    with u.dat.vec_ro as vec:
        return vec.array_r.copy()


def allen_cahn_step(n=4, dt=0.1, eps=0.1, comm=MPI.COMM_WORLD):
    """One implicit Euler step of Allen-Cahn, (u - u_prev)/dt - eps^2 lap u + u^3 - u = 0, with
    zero Neumann conditions: the data is the previous time level u_prev (same space)."""
    mesh = fd.UnitSquareMesh(n, n, comm=comm)
    V = fd.FunctionSpace(mesh, "CG", 1)

    def residual(u, v, m):
        return ((u - m[0]) / dt * v + eps**2 * fd.inner(fd.grad(u), fd.grad(v))
                + (u**3 - u) * v) * fd.dx

    return fem_moe.ConstrainedProblem(V, residual, data_spaces=V)


def distributed_matches_serial(make_layer, n=8, degree=2, n_basis=5, tol=1e-10):
    """Run ``make_layer(problem)`` on nonlinear_diffusion distributed over COMM_WORLD and on each
    rank alone (COMM_SELF); compare output, basis and data gradients at matching dof coordinates,
    relative to the largest entry (summation order differs with the rank count). Collective."""
    from pytest_mpi import parallel_assert
    results = []
    for comm in (MPI.COMM_WORLD, MPI.COMM_SELF):
        problem = nonlinear_diffusion(n=n, degree=degree, comm=comm)
        layer = make_layer(problem)
        basis = smooth_basis(problem, n_basis).requires_grad_()
        data = source(problem).requires_grad_()
        u = layer(basis, data)
        X = problem.dof_coordinates()
        (u[0] * torch.tensor(np.cos(X[:, 0]) + X[:, 1])).pow(2).sum().backward()
        results.append((X, u[0].detach().numpy(), basis.grad[0].numpy(), data.grad[0].numpy()))
    (Xp, up, gbp, gdp), (Xs, us, gbs, gds) = results
    index = {tuple(np.round(x, 10)): i for i, x in enumerate(Xs)}
    match = np.array([index[tuple(np.round(x, 10))] for x in Xp])
    for name, a, b in (("outputs", up, us[match]), ("basis gradients", gbp, gbs[:, match]),
                       ("data gradients", gdp, gds[match])):
        err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
        parallel_assert(err < tol, f"{name} differ by {err:.2e} (relative)")


def channel_flow(n=3, nu=0.5, comm=MPI.COMM_WORLD):
    """Steady Navier-Stokes in the unit square as a channel (Taylor-Hood P2-P1, a mixed space):
    parabolic inflow at x = 0, no slip at y = 0, 1, natural outflow at x = 1 (which fixes the
    pressure); the data is a scalar body force along x."""
    mesh = fd.UnitSquareMesh(n, n, comm=comm)
    W = fd.VectorFunctionSpace(mesh, "CG", 2) * fd.FunctionSpace(mesh, "CG", 1)
    Vd = fd.FunctionSpace(mesh, "CG", 1)
    x, y = fd.SpatialCoordinate(mesh)

    def residual(w, t, m):
        u, p = fd.split(w)
        v, q = fd.split(t)
        return (nu * fd.inner(fd.grad(u), fd.grad(v)) + fd.inner(fd.dot(fd.grad(u), u), v)
                - p * fd.div(v) - q * fd.div(u) - fd.inner(fd.as_vector([m[0], 0]), v)) * fd.dx

    bcs = [fd.DirichletBC(W.sub(0), fd.as_vector([4 * y * (1 - y), 0]), 1),
           fd.DirichletBC(W.sub(0), fd.Constant((0, 0)), (3, 4))]
    return fem_moe.ConstrainedProblem(W, residual, bcs=bcs, data_spaces=Vd)


def write_config(path, **sections):
    """A run configuration as a TOML file, the way a user writes one: ``sections`` maps each
    section to its entries (strings, numbers, booleans; a dict is an inline table)."""
    def value(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)
    with open(path, "w") as f:
        for section, entries in sections.items():
            f.write(f"[{section}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in entries.items()))
