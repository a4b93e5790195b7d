"""Steady incompressible flow past a cylinder in a channel, with random inflows."""
import numpy as np
import firedrake as fd

from ..problem import ConstrainedProblem
from .base import PDE
from .reaction_diffusion import find_mesh


class FlowPastObstacle(PDE):
    r"""Steady Navier-Stokes, nu Laplacian and convection, in velocity-pressure form with
    Taylor-Hood elements (P2-P1, a mixed space)::

        -nu lap u + (u . grad) u + grad p = 0,   div u = 0

    on the DFG channel with a cylinder (``meshes/channel_with_cylinder.msh``: inlet 1, outlet
    2, walls 3, cylinder 4); no slip on the walls and the cylinder, natural outflow (which fixes
    the pressure) and a random inflow
    u = (U 4 y (H - y) / H^2 (1 + a (2 y / H - 1)), 0) with U ~ U(0.5, 1.5) and a ~ U(-0.5, 0.5)
    (speed and skew; the two parameters the backbone sees, centred and scaled to [-1, 1]).
    Reynolds number U D / nu from 2.5 to 7.5 with the default nu = 0.02 (D = 0.1): steady.

    The inflow is imposed exactly through a lifting, as for diffusion-sorption: the data is the
    mixed field ``ell`` holding the inflow velocity on the inlet nodes (zero elsewhere), the
    constrained unknown is (u, p) - ell, zero on the inlet, walls and cylinder.

    Options: ``mesh`` (default "channel_with_cylinder"), ``nu``.
    """
    name = "flow_past_obstacle"
    options = dict(mesh="channel_with_cylinder", nu=0.02)
    n_params = 2
    lifted = True
    height = 0.41

    def mesh(self, comm):
        return fd.Mesh(find_mesh(self.opts["mesh"]), comm=comm)

    def problem(self, mesh, **kwargs):
        W = fd.VectorFunctionSpace(mesh, "CG", 2) * fd.FunctionSpace(mesh, "CG", 1)
        nu = self.opts["nu"]

        def residual(dw, t, m):
            (u0, p0), (du, dp) = fd.split(m[0]), fd.split(dw)
            u, p = u0 + du, p0 + dp
            v, q = fd.split(t)
            return (nu * fd.inner(fd.grad(u), fd.grad(v)) + fd.inner(fd.dot(fd.grad(u), u), v)
                    - p * fd.div(v) - q * fd.div(u)) * fd.dx

        zero = fd.Constant((0.0, 0.0))
        bcs = [fd.DirichletBC(W.sub(0), zero, (1, 3, 4))]
        return ConstrainedProblem(W, residual, bcs=bcs, data_spaces=W, **kwargs)

    def sample(self, rng, n):
        return np.column_stack([rng.uniform(0.5, 1.5, n), rng.uniform(-0.5, 0.5, n)])

    def inputs(self, params):
        params = np.asarray(params, dtype=np.float64)
        return np.column_stack([2 * (params[:, 0] - 1.0), 2 * params[:, 1]])

    def data(self, problem, params):
        W = problem.data_spaces[0]
        y, H = fd.SpatialCoordinate(W.mesh())[1], self.height
        # Constants, not float literals: a literal compiles a new kernel for every input (0.2 s
        # and a shared library each, with fresh inputs every training step).
        U, a = fd.Constant(float(params[0])), fd.Constant(float(params[1]))
        inflow = fd.as_vector([U * 4 * y * (H - y) / H**2 * (1 + a * (2 * y / H - 1)), 0])
        ell = fd.Function(W)
        fd.DirichletBC(W.sub(0), inflow, 1).apply(ell)
        return (ell,)
