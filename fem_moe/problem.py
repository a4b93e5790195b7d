"""The PDE a hard-constraint layer enforces, stated as a Firedrake user states it."""
from collections.abc import Sequence

import numpy as np
import firedrake as fd
import ufl

from .errors import InputError

__all__ = ["ConstrainedProblem"]


def owned_size(V):
    """The number of dofs of space V this rank owns."""
    return V.dof_dset.layout_vec.getLocalSize()


def _as_tuple(x):
    if x is None:
        return ()
    if isinstance(x, Sequence) and not isinstance(x, str):
        return tuple(x)
    return (x,)


class ConstrainedProblem:
    """A nonlinear residual F(u; v, m) = 0 on a function space, with Dirichlet conditions.

    Parameters
    ----------
    V : firedrake.FunctionSpace
        The space of the constrained output u (scalar or vector valued, any degree).
    residual : callable ``(u, v, m) -> ufl.Form``
        Returns the residual form: nonlinear in the Function ``u``, linear in the test function
        ``v``. ``m`` is a tuple of Functions, one per entry of ``data_spaces`` (empty if none):
        the problem data (previous time level, coefficient field, ...). The callable is called
        once per space the problem is built on (the whole mesh, or each expert's submesh), so it
        must only use its arguments and the mesh of ``u`` (e.g. ``SpatialCoordinate(u.function_space().mesh())``).
    bcs : DirichletBC or sequence of them, optional
        Imposed exactly: the output is ``g + sum_i w_i phi_i`` with ``g`` the lifting of these
        values and the basis fields phi_i zeroed on the boundary nodes; the residual rows of those
        nodes are left out of the constraint.
    data_spaces : FunctionSpace or sequence of them, optional
        The spaces of ``m``. A data tensor holds their dofs concatenated in this order.
    solver_parameters : dict, optional
        PETSc options for the reduced (N x N) SNES, without prefix; they update the defaults of
        :data:`fem_moe.expert.DEFAULT_SOLVER_PARAMETERS`.
    options_prefix : str, optional
        Prefix of the reduced SNES's options on the command line (default ``"fem_moe_"``;
        experts of a mixture use ``"expert_"``), so ``-fem_moe_snes_monitor`` just works.

    All ranks of ``V.mesh().comm`` must construct it.
    """

    def __init__(self, V, residual, bcs=None, data_spaces=None, solver_parameters=None,
                 options_prefix=None):
        if not callable(residual):
            raise InputError(f"residual must be a callable (u, v, m) -> form, got {type(residual).__name__}")
        if len(V) > 1:
            raise InputError("mixed function spaces (e.g. velocity-pressure) are not supported yet: "
                             "V must be a scalar or vector FunctionSpace")
        self.V = V
        self.residual = residual
        self.bcs = _as_tuple(bcs)
        for bc in self.bcs:
            if not isinstance(bc, fd.DirichletBC):
                raise InputError(f"bcs must be DirichletBCs, got {type(bc).__name__}")
            if bc.function_space().mesh() is not V.mesh():
                raise InputError("a boundary condition is on another mesh than V")
        self.data_spaces = _as_tuple(data_spaces)
        for Vd in self.data_spaces:
            if Vd.mesh() is not V.mesh():
                raise InputError("a data space is on another mesh than V: data must live on the mesh of V")
        self.solver_parameters = dict(solver_parameters or {})
        self.options_prefix = "fem_moe_" if options_prefix is None else options_prefix
        # Fail now, not inside a training loop, if the residual is not a form linear in v.
        u, v = fd.Function(V), fd.TestFunction(V)
        F = residual(u, v, tuple(fd.Function(Vd) for Vd in self.data_spaces))
        if not isinstance(F, ufl.form.Form) or len(F.arguments()) != 1:
            raise InputError("residual(u, v, m) must return a UFL form linear in the test function v "
                             f"(a 1-form); got {type(F).__name__}")

    # ----------------------------------------------------------------- sizes and layout
    @property
    def mesh(self):
        return self.V.mesh()

    @property
    def comm(self):
        return self.V.mesh().comm

    @property
    def n_dofs(self):
        """Dofs of u owned by this rank (the length of this rank's tensors)."""
        return owned_size(self.V)

    @property
    def n_data_dofs(self):
        """Owned dofs of all data spaces together (the length of this rank's data tensors)."""
        return sum(owned_size(Vd) for Vd in self.data_spaces)

    def split_data(self, data):
        """A data vector (owned dofs of the data spaces, concatenated) cut into one array per
        data space."""
        bounds = np.cumsum([0] + [owned_size(Vd) for Vd in self.data_spaces])
        return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def dof_coordinates(self, space=None):
        """Coordinates of this rank's owned dofs of ``space`` (default V), ``[n_dofs, gdim]``, in
        the order of the tensors (for a vector space each node's coordinates repeat per
        component). Backbones that act on coordinates use this. Collective over the mesh comm."""
        space = self.V if space is None else space
        mesh = space.mesh()
        Vc = fd.VectorFunctionSpace(mesh, space.ufl_element().sub_elements[0]
                                    if space.block_size > 1 else space.ufl_element())
        X = fd.Function(Vc).interpolate(fd.SpatialCoordinate(mesh))
        xy = X.dat.data_ro.reshape(-1, mesh.geometric_dimension)
        return np.repeat(xy, space.block_size, axis=0)

    def dof_components(self):
        """Component (0 .. block size - 1) of each of this rank's owned dofs of V, ``[n_dofs]``:
        with :meth:`dof_coordinates`, what a backbone needs to output a vector field."""
        return np.tile(np.arange(self.V.block_size), self.n_dofs // self.V.block_size)

    def __repr__(self):
        return (f"ConstrainedProblem(V={self.V.ufl_element()}, dofs={self.V.dim()}, "
                f"bcs={len(self.bcs)}, data_spaces={len(self.data_spaces)})")
