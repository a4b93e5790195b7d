"""The paper's 2D decaying turbulence: vorticity form on a periodic square, over a window of
implicit time steps."""
import time

import numpy as np
import firedrake as fd

from ..errors import InputError
from ..problem import ConstrainedProblem, mesh_of
from .base import PDE, CLASSICAL_SOLVER_PARAMETERS
from .reaction_diffusion import find_mesh


class DecayingTurbulence(PDE):
    r"""Incompressible Navier-Stokes in vorticity-streamfunction form on the periodic unit
    square, unforced, from a random initial vorticity (the paper's 2D Navier-Stokes problem)::

        dw/dt + u . grad w = nu lap w,   -lap psi = w,   u = (dpsi/dy, -dpsi/dx)

    with nu = 1 / Re (Re = 1e4 by default: unit length and a velocity of order one).

    **Window of implicit steps.** The horizon [0, T] (T = 5 by default) is cut into ``steps`` steps
    of dt = T / steps of the theta method, and the constrained unknown is the whole trajectory:
    (w_1, ..., w_n, psi_1, ..., psi_n), two vector-valued P1 fields with one component per time
    level (a mixed space of 2 n components). The residual is the sum of the n steps' Galerkin forms,
    so a hard constraint makes the output satisfy every step at once, as the paper constrains its
    whole space-time grid. ``theta`` = 1 (the default) is backward Euler: first order, and it damps
    what the mesh cannot resolve — at Re = 1e4 the physical viscosity is far below the mesh's (h =
    1/16) resolution, and the discrete dynamics are those of the large scales with the scheme's own
    dissipation. ``theta`` = 1/2 is Crank-Nicolson: the advection and diffusion terms are the mean
    of the two levels', second order in time, and no dissipation of its own; the streamfunction
    solves -lap psi = w at every level.

    **Gauge.** On a periodic domain psi is defined up to a constant; the residual uses
    -lap psi + gauge psi = w with ``gauge`` = 1e-2, which fixes psi's mean to that of w (zero: the
    discrete dynamics conserve the mean vorticity) and changes the velocity of the slowest mode
    (‖k‖ = 2 pi) by gauge / (4 pi^2) = 2.5e-4 relative.

    **Weight of the streamfunction rows.** The Poisson rows are multiplied by ``stream_weight``
    / dt, so that both blocks of the residual measure a vorticity error in the same unit (per
    time step). Scaling an equation changes no root, only what a least-squares objective or a
    physics loss weighs: unscaled, the Poisson rows weigh a vorticity error dt times less than
    the vorticity rows, and training found the cheap way out — leave w at w_0 and bend psi
    until u is tangent to w_0's level sets (u . grad w_0 = 0, a steady state of the vorticity
    rows), breaking the Poisson rows instead; measured at T = 1 in training (the residual
    halved while the vorticity hardly moved and psi's error rose above persistence's).

    **Initial vorticity.** w_0 = sum_k s_k (a_k cos 2 pi k.x + b_k sin 2 pi k.x) over the
    wavevectors k of the half plane with max(‖k_x‖, ‖k_y‖) <= ``modes`` (12 of them for modes =
    2), a_k, b_k ~ N(0, amplitude^2): a random field of zero mean whose spectrum s_k is
    ``initial``'s. "fourier" (the default): s_k = 1 / ‖k‖^2, a smooth field. "grf": the truncated
    Karhunen-Loeve expansion of the Gaussian random field N(0, sigma^2 (-lap + tau^2)^(-alpha))
    on the unit torus, s_k = sqrt(2) sigma (4 pi^2 ‖k‖^2 + tau^2)^(-alpha / 2), with the
    neural-operator literature's Navier-Stokes inputs (Li et al.'s FNO data generator: alpha =
    2.5, tau = 7, sigma = tau^((2 alpha - 2) / 2)) as defaults; with ``amplitude`` = 1 it is that
    field (its mean mode removed), truncated to the modes a mesh of h = 1 / (8 ``modes``) still
    resolves. The backbone sees (a, b) / amplitude. The lifting is w_0 held constant in time,
    with its streamfunction: the constrained unknown is the change from it.

    Options: ``mesh`` (default "periodic_square", a gmsh mesh periodic in x and y), ``refine``,
    ``re``, ``t_end``, ``steps``, ``theta`` (1: backward Euler, 1/2: Crank-Nicolson), ``modes``,
    ``amplitude`` (default 2: velocities up to about 0.5 with the "fourier" spectrum),
    ``initial`` ("fourier" or "grf"), ``alpha`` and ``tau`` (the "grf" covariance's), ``gauge``,
    ``stream_weight``.
    """
    name = "decaying_turbulence"
    options = dict(mesh="periodic_square", refine=0, re=1e4, t_end=5.0, steps=10, theta=1.0,
                   modes=2, amplitude=2.0, initial="fourier", alpha=2.5, tau=7.0, gauge=1e-2,
                   stream_weight=1.0)
    spectra = ("fourier", "grf")
    lifted = True

    def __init__(self, **options):
        super().__init__(**options)
        theta = self.opts["theta"]
        if not 0.5 <= theta <= 1:      # below 1/2 the theta method is unstable for diffusion
            raise InputError(f"decaying_turbulence: theta must lie in [1/2, 1] (1/2: "
                             f"Crank-Nicolson, 1: backward Euler), got {theta}")
        if self.opts["initial"] not in self.spectra:
            raise InputError(f"decaying_turbulence: initial must be one of {self.spectra}, got "
                             f"{self.opts['initial']!r}")

    @property
    def wavevectors(self):
        m = self.opts["modes"]
        return [(kx, ky) for kx in range(-m, m + 1) for ky in range(-m, m + 1)
                if (kx, ky) > (0, 0)]         # one of each +-k pair: cos and sin cover both

    @property
    def plot_field(self):
        return (0, self.opts["steps"] - 1, f"vorticity at t = {self.opts['t_end']:g}")

    @property
    def n_params(self):
        return 2 * len(self.wavevectors)

    def mesh(self, comm):
        mesh = fd.Mesh(find_mesh(self.opts["mesh"]), comm=comm)
        if self.opts["refine"]:
            mesh = fd.MeshHierarchy(mesh, self.opts["refine"])[-1]
        return mesh

    def spaces(self, mesh):
        n = self.opts["steps"]
        Q = fd.VectorFunctionSpace(mesh, "CG", 1, dim=n)
        return Q * Q

    @property
    def dt(self):
        return self.opts["t_end"] / self.opts["steps"]

    def step_form(self, w, w_previous, p, p_previous, phi, chi):
        """One step's residual: vorticity w and streamfunction p at the new time level (from
        w_previous, p_previous), tested by phi and chi; the theta method in time."""
        nu, gauge, theta = 1.0 / self.opts["re"], self.opts["gauge"], self.opts["theta"]

        def rate(w, p):     # advection and diffusion of w, weak form
            u = fd.as_vector([p.dx(1), -p.dx(0)])
            return fd.dot(u, fd.grad(w)) * phi + nu * fd.inner(fd.grad(w), fd.grad(phi))

        change = (w - w_previous) / self.dt * phi + theta * rate(w, p)
        if theta != 1:
            change += (1 - theta) * rate(w_previous, p_previous)
        return (change + self.opts["stream_weight"] / self.dt
                * (fd.inner(fd.grad(p), fd.grad(chi)) + gauge * p * chi - w * chi)) * fd.dx

    def problem(self, mesh, **kwargs):
        W = self.spaces(mesh)

        def residual(dz, t, m):
            (w0, p0), (dw, dp) = fd.split(m[0]), fd.split(dz)
            w, p = w0 + dw, p0 + dp
            phi, chi = fd.split(t)
            return sum(self.step_form(w[i], w0[0] if i == 0 else w[i - 1], p[i],
                                      p0[0] if i == 0 else p[i - 1], phi[i], chi[i])
                       for i in range(self.opts["steps"]))

        return ConstrainedProblem(W, residual, data_spaces=W, **kwargs)

    def classical_solve(self, problem, data, solver_parameters=None):
        """Time marching: one Newton solve (MUMPS) per step, from the previous step: the same
        discrete equations as the window's residual (whose Jacobian is block lower triangular
        in time), solved as a classical code would. Returns the window's unknown (the change
        from the lifting)."""
        mesh, ell = mesh_of(problem.V), data[0]
        V = fd.FunctionSpace(mesh, "CG", 1)
        z, previous = fd.Function(V * V), fd.Function(V * V)
        previous.subfunctions[0].dat.data[:] = ell.subfunctions[0].dat.data_ro[:, 0]
        previous.subfunctions[1].dat.data[:] = ell.subfunctions[1].dat.data_ro[:, 0]
        z.assign(previous)
        (w, p), (w_previous, p_previous) = fd.split(z), fd.split(previous)
        phi, chi = fd.TestFunctions(V * V)
        params = {**CLASSICAL_SOLVER_PARAMETERS, **(solver_parameters or {})}
        form = self.step_form(w, w_previous, p, p_previous, phi, chi)
        solver = fd.NonlinearVariationalSolver(
            fd.NonlinearVariationalProblem(form, z),
            solver_parameters=params, options_prefix="classical_")
        out, iterations = fd.Function(problem.V), 0
        t0 = time.perf_counter()
        for i in range(self.opts["steps"]):
            solver.solve()
            iterations += solver.snes.getIterationNumber()
            for j in range(2):
                out.subfunctions[j].dat.data[:, i] = (z.subfunctions[j].dat.data_ro
                                                      - ell.subfunctions[j].dat.data_ro[:, i])
            previous.assign(z)
        return out, time.perf_counter() - t0, iterations

    def sample(self, rng, n):
        return rng.normal(0.0, self.opts["amplitude"], size=(n, self.n_params))

    def inputs(self, params):
        return np.asarray(params, dtype=np.float64) / self.opts["amplitude"]

    @property
    def spectrum(self):
        """s_k, the initial vorticity's weight of each wavevector's cos and sin (see above)."""
        k2 = (np.asarray(self.wavevectors, dtype=np.float64) ** 2).sum(axis=1)
        if self.opts["initial"] == "fourier":
            return 1.0 / k2
        alpha, tau = self.opts["alpha"], self.opts["tau"]
        sigma = tau ** (alpha - 1.0)      # tau^((2 alpha - d) / 2) in d = 2 dimensions
        return np.sqrt(2.0) * sigma * (4 * np.pi ** 2 * k2 + tau ** 2) ** (-alpha / 2)

    def input_fields(self, points):
        """The initial vorticity's modes at ``points``: the inputs times them sum to w_0 /
        amplitude (one field). Evaluated in closed form, as :meth:`_fourier_modes` on a mesh."""
        x = np.asarray(points, dtype=np.float64)
        k = np.asarray(self.wavevectors, dtype=np.float64)                 # [n_k, 2]
        phase, s = 2 * np.pi * x @ k.T, self.spectrum                       # [n, n_k], [n_k]
        modes = np.concatenate([np.cos(phase) * s, np.sin(phase) * s], axis=1)
        return modes.T[:, None, :]

    def _fourier_modes(self, V):
        """cos and sin of 2 pi k.x times s_k for every wavevector, by one kernel (the wavevector
        and its weight are Constants)."""
        x, k, weight = fd.SpatialCoordinate(V.mesh()), fd.Constant((0.0, 0.0)), fd.Constant(0.0)
        phase, mode, modes = 2 * np.pi * fd.dot(k, x), fd.Function(V), []
        for trig in (fd.cos, fd.sin):
            for (kx, ky), s in zip(self.wavevectors, self.spectrum):
                k.assign((kx, ky))
                weight.assign(s)
                modes.append(mode.interpolate(trig(phase) * weight).dat.data_ro.copy())
        return modes

    def initial_vorticity(self, mesh, params):
        """w_0 for one parameter vector, a P1 Function on ``mesh``."""
        return self.mode_sum(fd.FunctionSpace(mesh, "CG", 1), params, "fourier",
                             self._fourier_modes,
                             name="initial vorticity")

    def data(self, problem, params):
        W = problem.data_spaces[0]
        w0 = self.initial_vorticity(mesh_of(W), params)
        V = w0.function_space()
        psi0 = fd.Function(V)
        p, q = fd.TrialFunction(V), fd.TestFunction(V)
        a = (fd.inner(fd.grad(p), fd.grad(q)) + self.opts["gauge"] * p * q) * fd.dx
        fd.solve(a == w0 * q * fd.dx,
                 psi0, solver_parameters={"ksp_type": "preonly", "pc_type": "lu",
                                          "pc_factor_mat_solver_type": "mumps"})
        ell = fd.Function(W)
        n = self.opts["steps"]
        ell.subfunctions[0].dat.data[:] = np.repeat(w0.dat.data_ro[:, None], n, axis=1)
        ell.subfunctions[1].dat.data[:] = np.repeat(psi0.dat.data_ro[:, None], n, axis=1)
        return (ell,)
