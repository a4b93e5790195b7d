"""A nonlinear reaction-diffusion problem on the unit square or on a gmsh mesh with holes."""
import os

import firedrake as fd

from ..errors import InputError
from ..problem import ConstrainedProblem
from .base import PDE, UniformAmplitudes, sine_modes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESH_DIR = os.path.join(REPO, "meshes")


def find_mesh(name):
    """A mesh file by path, or by name from the repository's meshes/ directory."""
    for path in (name, os.path.join(MESH_DIR, name), os.path.join(MESH_DIR, name + ".msh")):
        if os.path.isfile(path):
            return path
    raise InputError(f"mesh {name!r} not found (as a path, or in {MESH_DIR})")


class ReactionDiffusion(UniformAmplitudes, PDE):
    r"""-div((1 + u^2) grad u) + c u^3 = f, u = 0 on the outer boundary, zero flux on holes.

    The source is random: f = sum_{a,b = 1..modes} theta_ab sin(pi a x) sin(pi b y) with
    theta_ab ~ U(-amplitude, amplitude) independently (``modes**2`` parameters); the backbone
    sees theta / amplitude. The data is f, in the same space as u.

    Options: ``mesh`` ("unit_square", or a .msh file / a name in meshes/, e.g.
    "plate_with_holes": boundary tag 1 is Dirichlet, the other tags are free), ``n`` (cells per
    side of the unit square), ``refine`` (uniform refinements of a gmsh mesh), ``degree``,
    ``modes``, ``amplitude``, ``reaction`` (c).
    """
    name = "reaction_diffusion"
    options = dict(mesh="unit_square", n=8, refine=0, degree=1, modes=2, amplitude=20.0,
                   reaction=1.0)

    @property
    def n_params(self):
        return self.opts["modes"] ** 2

    def mesh(self, comm):
        o = self.opts
        if o["mesh"] == "unit_square":
            return fd.UnitSquareMesh(o["n"], o["n"], comm=comm)
        mesh = fd.Mesh(find_mesh(o["mesh"]), comm=comm)
        if o["refine"]:
            mesh = fd.MeshHierarchy(mesh, o["refine"])[-1]
        return mesh

    def problem(self, mesh, **kwargs):
        V = fd.FunctionSpace(mesh, "CG", self.opts["degree"])
        c = self.opts["reaction"]

        def residual(u, v, m):
            return ((1 + u**2) * fd.inner(fd.grad(u), fd.grad(v)) + c * u**3 * v - m[0] * v) * fd.dx

        boundary = "on_boundary" if self.opts["mesh"] == "unit_square" else 1
        return ConstrainedProblem(V, residual, bcs=fd.DirichletBC(V, 0.0, boundary),
                                  data_spaces=V, **kwargs)

    @property
    def _modes(self):
        k = range(1, self.opts["modes"] + 1)
        return [(a, b) for a in k for b in k]

    def data(self, problem, params):
        return (self.mode_sum(problem.data_spaces[0], params, "sines",
                              lambda V: sine_modes(V, self._modes)),)
