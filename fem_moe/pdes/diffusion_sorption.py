"""PDEBench's 1D diffusion-sorption problem, constrained on its whole space-time window."""
import numpy as np
import firedrake as fd
import ufl

from ..errors import InputError
from ..problem import ConstrainedProblem
from .base import PDE


class DiffusionSorption(PDE):
    r"""du/dt = D / R(u) d2u/dx2 on x in [0, 1], t in [0, T] (PDEBench's constants):
    R(u) = 1 + (1 - phi)/phi rho_s k_f n_f u^(n_f - 1), D = 5e-4, phi = 0.29, rho_s = 2880,
    k_f = 3.5e-4, n_f = 0.874; u(0, t) = 1; at x = 1 PDEBench's outflow condition, whose weak form
    is the boundary term + u v; u(x, 0) = u0 ~ U(0, 0.2), a constant per sample as in PDEBench's
    generator (the parameter; the backbone sees u0 / 0.2).

    **Space-time.** The mesh is the rectangle (x, tau) in [0, 1] x [0, T / 500], tau = t / 500
    (PDEBench's horizon is the time unit, so a window [0, 2T] is a longer mesh, and a backbone
    trained on [0, T] sees later times as larger tau), and the residual is the continuous
    Galerkin space-time form
    int R(u) du/dtau v / 500 + D du/dx dv/dx dx dtau + int_{x=1} u v dtau,
    so a hard constraint holds over the whole window at once, as the paper constrains its whole
    (x, t) grid. The initial and left boundary values are imposed exactly through a lifting: the
    data is the field ``ell`` = 1 on x = 0 and u0 elsewhere, the constrained unknown is
    u - ell (zero on tau = 0 and x = 0) and :meth:`lifting` adds ``ell`` back.

    **The singular retardation.** u^(n_f - 1) = u^-0.126 is infinite at u = 0 and undefined
    below; we use (u^2 + eps^2)^((n_f - 1)/2), eps = ``eps`` (default 1e-3), equal to
    ‖u‖^(n_f - 1) to within 0.07 % for ‖u‖ > 1e-2 (4 % at ‖u‖ = 1e-3) and finite and smooth
    everywhere, so Newton and the reduced solves may pass through u <= 0 (space-time Galerkin
    undershoots slightly near the initial jump at x = 0). A smaller eps makes R's curvature near
    u = 0 grow like eps^(n_f - 3) (1e12 at 1e-6), which the reduced Newton solves then have to
    resolve wherever an output crosses 0; 1e-3 keeps it at 1e6.

    **Graded time levels** (``grading`` = g > 1): the mesh's time coordinate is tau_end (s /
    s_end)^g of the uniform one s, so the levels crowd towards t = 0. The inflow value 1 meets the
    initial u0 < 0.2 at (0, 0), and the front it starts moves like sqrt(t): u_t grows like t^(-1/2)
    there, and on uniform meshes the discrete solution converges to the PDE's at order 0.74 only
    (``benchmarks/studies/reference_convergence.py``); graded levels resolve the start, which is
    what a reference for the PDE's solution needs. The demo trains on uniform meshes by default (g =
    1); on g = 3 with the erfc lifting below, its coupled mixture is 0.72 % from the PDE at
    PDEBench's size
    (``benchmarks/studies/results/reference_error_diffusion_sorption_paper_*.json``).

    **The lifting** (``lifting``): "constant" (the default) is 1 at x = 0 and u0 elsewhere, so
    the network's fields carry the whole start, a front of width ~sqrt(D t / R) at time t,
    which a field of (x, t) resolves badly as t -> 0. "erfc" carries that front itself: u0 + (1
    - u0) erfc(x / (2 sqrt(D t / R_m))), the solution of the same start for the linear equation
    with the retardation frozen at R_m = R((1 + u0) / 2), at the dofs. It takes the same
    Dirichlet values, so the discrete problem and its solution are unchanged; the fields are left
    the nonlinear correction to a front they no longer have to make.

    **Quadrature** (``quadrature_degree``): by default UFL's estimate for the power, which for the
    non-polynomial retardation is the degree of the polynomial parts + 2 (5 for P1): 7 points per
    triangle, each evaluating R(u) (a power) and, in the Jacobian, R'(u). That arithmetic, not the
    sparse insertion, is most of an assembly at PDEBench's size (1 rank, 1024 x 100: residual 33 ms,
    Jacobian 93 ms at degree 5; 16 and 47 ms at degree 2, which integrates the linear terms of P1
    exactly; both with R written as a power, see :meth:`retardation`). A degree changes the discrete
    problem by as little as it changes its solution (``benchmarks/studies/reference_error.py``: the
    classical solutions at degrees 2 and 5, each against the same converged reference).

    Options: ``nx``, ``nt`` (cells in x and in t), ``t_end`` (T, default 500), ``eps``,
    ``degree``, ``grading``, ``lifting``, ``quadrature_degree``.
    """
    name = "diffusion_sorption"
    options = dict(nx=32, nt=16, t_end=500.0, eps=1e-3, degree=1, grading=1.0, lifting="constant",
                   quadrature_degree=None)
    liftings = ("constant", "erfc")
    n_params = 1
    lifted = True
    D, phi, rho_s, k_f, n_f = 5e-4, 0.29, 2880.0, 3.5e-4, 0.874
    time_unit = 500.0

    def __init__(self, **options):
        # The options are checked where the PDE is made: a mesh may come from elsewhere (another
        # instance's mesh()), and problem() and data() read them too.
        super().__init__(**options)
        o = self.opts
        if o["lifting"] not in self.liftings:
            raise InputError(f"diffusion_sorption: lifting must be one of {self.liftings}, got "
                             f"{o['lifting']!r}")
        if not o["grading"] > 0:
            raise InputError(f"diffusion_sorption: grading must be > 0, got {o['grading']}")
        q = o["quadrature_degree"]
        if q is not None and not (isinstance(q, (int, np.integer)) and q >= 1):
            raise InputError(f"diffusion_sorption: quadrature_degree must be a positive integer "
                             f"or None (UFL's estimate), got {q!r}")

    def mesh(self, comm):
        o = self.opts
        end = o["t_end"] / self.time_unit
        mesh = fd.RectangleMesh(o["nx"], o["nt"], 1.0, end, comm=comm)
        if o["grading"] != 1.0:
            tau = mesh.coordinates.dat.data[:, 1]
            tau[:] = end * (np.clip(tau, 0.0, end) / end) ** o["grading"]
        return mesh

    def retardation(self, u):
        c = (1 - self.phi) / self.phi * self.rho_s * self.k_f * self.n_f
        # s^p as exp(p ln s): UFL differentiates s**p into a second power, s**(p - 1), whereas
        # the derivative of exp(p ln s) reuses exp(p ln s) itself, and the Jacobian's kernel then
        # evaluates one exponential and one logarithm per quadrature point instead of two powers
        # (1 rank, 1024 x 100, degree 2: Jacobian 19 % and residual 13 % faster; the pow calls
        # were a quarter of the Jacobian's time). Floats (u0) go through UFL's constant folding.
        s = u**2 + self.opts["eps"]**2
        return 1 + c * ufl.exp((self.n_f - 1) / 2 * ufl.ln(s))

    def problem(self, mesh, **kwargs):
        V = fd.FunctionSpace(mesh, "CG", self.opts["degree"])
        T, D = self.time_unit, self.D

        q = self.opts["quadrature_degree"]
        if q is None:
            # UFL's estimate for the residual written with the power s**p (4 degree + 1), which
            # it estimates two degrees lower than the same function as exp(p ln s).
            q = 4 * self.opts["degree"] + 1
        dx, ds = fd.dx(degree=int(q)), fd.ds(degree=int(q))

        def residual(du, v, m):
            u = m[0] + du
            return ((self.retardation(u) * u.dx(1) / T) * v + D * u.dx(0) * v.dx(0)) * dx \
                + u * v * ds(2)

        # RectangleMesh tags: 1 x = 0, 2 x = 1, 3 tau = 0, 4 tau = T / 500.
        bcs = [fd.DirichletBC(V, 0.0, 1), fd.DirichletBC(V, 0.0, 3)]
        return ConstrainedProblem(V, residual, bcs=bcs, data_spaces=V, **kwargs)

    def sample(self, rng, n):
        return rng.uniform(0.0, 0.2, size=(n, 1))

    def inputs(self, params):
        return np.asarray(params, dtype=np.float64) / 0.2

    def data(self, problem, params):
        u0 = float(params[0])
        ell = fd.Function(problem.data_spaces[0]).assign(u0)
        if self.opts["lifting"] == "erfc":
            from scipy.special import erfc
            x, tau = problem.dof_coordinates(ell.function_space()).T
            spread = 2 * np.sqrt(self.D * self.time_unit * np.maximum(tau, 0.0)
                                 / float(self.retardation((1 + u0) / 2)))
            # At t = 0 the front has not started: erfc(x / 0) is 0 for x > 0 (1 at x = 0, the
            # inflow's corner, which the boundary condition below sets anyway).
            eta = np.divide(x, spread, out=np.where(x > 0, np.inf, 0.0), where=spread > 0)
            ell.dat.data[:] = u0 + (1 - u0) * erfc(eta)
        fd.DirichletBC(ell.function_space(), 1.0, 1).apply(ell)
        return (ell,)
