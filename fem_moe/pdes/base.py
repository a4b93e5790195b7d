"""What a shipped PDE is: a mesh, a constrained problem, an input distribution and the classical
solver that makes reference data. Training, data generation and the demos only use this."""
import time

import numpy as np
import firedrake as fd

from ..errors import InputError
from ..problem import owned_values

__all__ = ["PDE", "CLASSICAL_SOLVER_PARAMETERS", "UniformAmplitudes"]

#: Firedrake's Newton with a direct solve: the reference the networks are measured against.
CLASSICAL_SOLVER_PARAMETERS = {
    "snes_type": "newtonls",
    "snes_linesearch_type": "bt",
    "snes_rtol": 1e-12,
    "snes_atol": 1e-12,
    "snes_max_it": 50,
    "ksp_type": "preonly",
    "pc_type": "lu",
    "pc_factor_mat_solver_type": "mumps",
}


class PDE:
    """A family of problems: one residual form, inputs drawn from a documented distribution.

    Subclasses set ``name``, ``options`` (the option names and defaults; an instance takes them as
    keyword arguments, unknown names raise InputError), ``n_params`` and implement
    :meth:`mesh`, :meth:`problem`, :meth:`sample` and :meth:`data`. An input is a parameter
    vector ``[n_params]`` (what the backbone sees, after :meth:`inputs`); :meth:`data` turns it
    into the problem data fields on any mesh of the family.

    The constrained unknown may be a deviation from a data-dependent lifting (e.g. an initial
    condition imposed exactly): then :meth:`physical` adds that lifting, and errors are measured
    on the physical field.
    """
    name = None
    options = {}
    n_params = 0
    lifted = False      # True: the first data field is the lifting the unknown is relative to
    #: The classical solver's options (``classical_solve``): Newton + MUMPS unless a PDE says
    #: otherwise.
    classical_parameters = CLASSICAL_SOLVER_PARAMETERS
    #: What the figures show of a solution: (subspace of a mixed space, component or None for a
    #: vector's magnitude, a caption).
    plot_field = (0, None, "")

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise InputError(f"unknown option(s) {unknown} for PDE {self.name!r}; it takes "
                             f"{sorted(self.options)}")
        self.opts = {**self.options, **options}

    # ---------------------------------------------------------------- to implement
    def mesh(self, comm):
        """The family's mesh, distributed over ``comm``. Collective."""
        raise NotImplementedError

    def problem(self, mesh, **kwargs):
        """The ConstrainedProblem on ``mesh`` (kwargs go to ConstrainedProblem). Collective."""
        raise NotImplementedError

    def sample(self, rng, n):
        """``n`` parameter vectors from the input distribution, ``[n, n_params]`` (numpy
        Generator ``rng``; the same on every rank for the same seed)."""
        raise NotImplementedError

    def data(self, problem, params):
        """The data Functions (one per data space of ``problem``) for one parameter vector."""
        raise NotImplementedError

    # ---------------------------------------------------------------- defaults
    def inputs(self, params):
        """What the backbone sees for parameter vectors ``[n, n_params]``: by default the
        parameters themselves."""
        return np.asarray(params, dtype=np.float64)

    def input_fields(self, points):
        """When the backbone's inputs (:meth:`inputs`) are the coefficients of fields: those
        fields at ``points`` [n, gdim], ``[n_inputs, C, n]`` (the problem's C input fields are
        sum_i inputs_i fields[i]); None otherwise. An operator backbone (the FNO) then sees the
        input as a field on its grid. Not collective: any points, any rank."""
        return None

    def lifting(self, problem, data):
        """The field added to the constrained unknown to give the physical field (owned dofs),
        or None. ``data``: the data Functions; for a family with ``lifted = True`` the first is
        the lifting itself."""
        return owned_values(data[0]) if self.lifted else None

    def initial_guess(self, problem, data):
        """Starting point of the classical Newton solve."""
        return fd.Function(problem.V)

    def classical_solve(self, problem, data, solver_parameters=None):
        """Firedrake's own Newton solve of the same discrete problem (``classical_parameters``,
        updated by ``solver_parameters``): returns (u Function, seconds, Newton iterations).
        Collective."""
        from ..expert import residual_quadrature_degree
        u = self.initial_guess(problem, data)
        F = problem.residual(u, fd.TestFunction(problem.V), tuple(data))
        params = {**self.classical_parameters, **(solver_parameters or {})}
        # The Jacobian at the residual's quadrature degree, as the layers assemble both: left to
        # UFL, the derivative of a non-polynomial residual gets a higher degree, Newton's
        # Jacobian is then not the derivative of the assembled residual, and Newton converges
        # linearly -- on diffusion-sorption's graded time levels and small u0 it did not
        # converge in 50 iterations. (The residual is then assembled at the largest degree over
        # its integrals, also as the layers do.)
        degree = {"quadrature_degree": residual_quadrature_degree(F)}
        solver = fd.NonlinearVariationalSolver(
            fd.NonlinearVariationalProblem(F, u, bcs=problem.bcs, form_compiler_parameters=degree),
            solver_parameters=params, options_prefix="classical_")
        t0 = time.perf_counter()
        solver.solve()
        seconds = time.perf_counter() - t0
        return u, seconds, solver.snes.getIterationNumber()

    def mode_sum(self, space, coefficients, key, make_modes, name=None):
        """sum_k c_k f_k, a Function on ``space``, for ``coefficients`` [n_modes]. The mode fields
        (``make_modes(space)``: their node values, a list) are made once per space and ``key``
        and kept on the PDE: an expression per sample would compile a kernel per sample."""
        cache = self.__dict__.setdefault("_mode_fields", {})
        if (space, key) not in cache:
            cache[(space, key)] = [np.array(m) for m in make_modes(space)]
        out = fd.Function(space, name=name)
        for c, mode in zip(coefficients, cache[(space, key)]):
            out.dat.data[:] += float(c) * mode
        return out

    def describe(self):
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.opts.items())})"


class UniformAmplitudes:
    """Inputs for a PDE whose parameters are mode amplitudes theta ~ U(-amplitude, amplitude)
    independently (option ``amplitude``); the backbone sees theta / amplitude."""

    def sample(self, rng, n):
        a = self.opts["amplitude"]
        return rng.uniform(-a, a, size=(n, self.n_params))

    def inputs(self, params):
        return np.asarray(params, dtype=np.float64) / self.opts["amplitude"]


def sine_modes(space, modes):
    """sin(pi a x) sin(pi b y) on ``space`` for each (a, b) in ``modes``: node values, a list."""
    x = fd.SpatialCoordinate(space.mesh())
    return [fd.Function(space).interpolate(fd.sin(np.pi * a * x[0])
                                           * fd.sin(np.pi * b * x[1])).dat.data_ro
            for a, b in modes]
