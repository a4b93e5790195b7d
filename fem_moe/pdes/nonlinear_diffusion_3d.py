"""A nonlinear elliptic problem on a 3D part with holes: the scale-out benchmark's PDE."""
import numpy as np
import firedrake as fd

from ..problem import ConstrainedProblem
from .base import PDE, UniformAmplitudes
from .reaction_diffusion import find_mesh

#: Newton-Krylov with algebraic multigrid: what a Firedrake user picks for a 3D elliptic problem
#: of a million dofs (the Jacobian of (1 + u^2) grad u is not symmetric: GMRES).
NEWTON_KRYLOV_PARAMETERS = {
    "snes_type": "newtonls",
    "snes_linesearch_type": "bt",
    "snes_rtol": 1e-10,
    "snes_atol": 1e-12,
    "snes_max_it": 50,
    "ksp_type": "gmres",
    "ksp_rtol": 1e-10,
    "ksp_max_it": 500,
    "pc_type": "gamg",
}


class NonlinearDiffusion3D(UniformAmplitudes, PDE):
    r"""-div((1 + u^2) grad u) = f in a block with two cylindrical holes
    (``meshes/block_with_holes.msh``: [0, 1] x [0, 1] x [0, 0.5]); u = 0 on the block's faces
    (marker 1), zero flux on the holes' walls (marker 2).

    The source is random: f = sum_{a,b,c = 1..modes} theta_abc sin(pi a x) sin(pi b y)
    sin(2 pi c z), theta_abc ~ U(-amplitude, amplitude) (``modes**3`` parameters; the backbone
    sees theta / amplitude). The data is f, in the same space as u.

    The classical solver is Newton-Krylov (GMRES + PETSc's GAMG, rtol 1e-10:
    :data:`NEWTON_KRYLOV_PARAMETERS`); ``classical_solve(..., solver_parameters=
    CLASSICAL_SOLVER_PARAMETERS)`` gives the MUMPS reference.

    Options: ``mesh`` (a .msh file or a name in meshes/), ``refine`` (uniform refinements, 8x
    the cells each), ``degree``, ``modes``, ``amplitude``.
    """
    name = "nonlinear_diffusion_3d"
    options = dict(mesh="block_with_holes", refine=1, degree=1, modes=2, amplitude=20.0)
    classical_parameters = NEWTON_KRYLOV_PARAMETERS

    @property
    def n_params(self):
        return self.opts["modes"] ** 3

    def mesh(self, comm):
        mesh = fd.Mesh(find_mesh(self.opts["mesh"]), comm=comm)
        if self.opts["refine"]:
            mesh = fd.MeshHierarchy(mesh, self.opts["refine"])[-1]
        return mesh

    def problem(self, mesh, **kwargs):
        V = fd.FunctionSpace(mesh, "CG", self.opts["degree"])

        def residual(u, v, m):
            return ((1 + u**2) * fd.inner(fd.grad(u), fd.grad(v)) - m[0] * v) * fd.dx

        return ConstrainedProblem(V, residual, bcs=fd.DirichletBC(V, 0.0, 1), data_spaces=V,
                                  **kwargs)

    @property
    def _modes(self):
        k = range(1, self.opts["modes"] + 1)
        return [(a, b, c) for a in k for b in k for c in k]

    def data(self, problem, params):
        def modes(V):
            x = fd.SpatialCoordinate(V.mesh())
            return [fd.Function(V).interpolate(fd.sin(np.pi * a * x[0]) * fd.sin(np.pi * b * x[1])
                                               * fd.sin(2 * np.pi * c * x[2])).dat.data_ro
                    for a, b, c in self._modes]
        return (self.mode_sum(problem.data_spaces[0], params, "sines", modes),)
