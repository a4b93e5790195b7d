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


def subspaces(V):
    """V's subspaces if V is mixed, else (V,)."""
    return tuple(V[i] for i in range(len(V))) if len(V) > 1 else (V,)


def mesh_of(V):
    """The mesh of a space, mixed or not (a mixed space's mesh() is a mesh sequence)."""
    return subspaces(V)[0].mesh()


def owned_values(f):
    """A copy of the values of this rank's owned dofs of Function or Cofunction ``f``, in the
    order of the tensors."""
    with f.dat.vec_ro as vec:
        return vec.array_r.copy()


def from_owned_values(space, values, name=None, cls=fd.Function):
    """A Function (or, with ``cls``, a Cofunction of ``space``) holding ``values`` [owned dofs]
    at this rank's owned dofs, in the order of the tensors; halos follow when read."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (owned_size(space),):
        raise InputError(f"{values.shape[0] if values.ndim == 1 else values.shape} values for "
                         f"{owned_size(space)} owned dofs of {space}")
    f = cls(space, name=name) if name is not None else cls(space)
    set_owned_values(f, values)
    return f


def set_owned_values(f, values):
    """Write ``values`` [owned dofs, in the order of the tensors] into Function ``f``."""
    with f.dat.vec_wo as vec:
        vec.array[:] = values


def as_array(u):
    """A tensor (any dtype or device) or array as float64 numpy."""
    if hasattr(u, "detach"):
        u = u.detach().cpu().double().numpy()
    return np.asarray(u, dtype=np.float64)


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
        The space of the constrained output u (scalar or vector valued, any degree, or mixed,
        e.g. velocity-pressure: a tensor then holds the subspaces' owned dofs one after the
        other).
    residual : callable ``(u, v, m) -> ufl.Form``
        Returns the residual form: nonlinear in the Function ``u``, linear in the test function
        ``v``. ``m`` is a tuple of Functions, one per entry of ``data_spaces`` (empty if none):
        the problem data (previous time level, coefficient field, ...). It may also use the
        mesh's ``SpatialCoordinate``, Constants and fixed Functions on the mesh, as Firedrake
        users write forms: the mixture of experts carries such a form onto each expert's
        submesh (see :class:`fem_moe.MoEHardConstraint`).
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
            raise InputError("residual must be a callable (u, v, m) -> form, got "
                             f"{type(residual).__name__}")
        self.V = V
        self._mesh = mesh_of(V)
        self.residual = residual
        self.bcs = _as_tuple(bcs)
        for bc in self.bcs:
            if not isinstance(bc, fd.DirichletBC):
                raise InputError(f"bcs must be DirichletBCs, got {type(bc).__name__}")
            if bc.function_space().mesh().topology is not self._mesh.topology:
                raise InputError("a boundary condition is on another mesh than V")
        self.data_spaces = _as_tuple(data_spaces)
        for Vd in self.data_spaces:
            if mesh_of(Vd).topology is not self._mesh.topology:
                raise InputError("a data space is on another mesh than V: data must live on the "
                                 "mesh of V")
        self.solver_parameters = dict(solver_parameters or {})
        self.options_prefix = "fem_moe_" if options_prefix is None else options_prefix
        # Fail now, not inside a training loop, if the residual is not a form linear in v.
        u, v = fd.Function(V), fd.TestFunction(V)
        F = residual(u, v, tuple(fd.Function(Vd) for Vd in self.data_spaces))
        if not isinstance(F, ufl.form.Form) or len(F.arguments()) != 1:
            raise InputError("residual(u, v, m) must return a UFL form linear in the test "
                             f"function v (a 1-form); got {type(F).__name__}")

    # ----------------------------------------------------------------- sizes and layout
    @property
    def mesh(self):
        return self._mesh

    @property
    def comm(self):
        return self._mesh.comm

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

    @property
    def subspaces(self):
        """The spaces whose owned dofs make up a tensor, in order: V itself, or the subspaces of
        a mixed V (e.g. velocity then pressure)."""
        return subspaces(self.V)

    @property
    def n_components(self):
        """Field components in a tensor: 1 for a scalar V, the block size for a vector V, their
        sum over the subspaces of a mixed V (e.g. 3 for a 2D velocity-pressure pair)."""
        return sum(S.block_size for S in self.subspaces)

    def dof_coordinates(self, space=None):
        """Coordinates of this rank's owned dofs of ``space`` (default V), ``[n_dofs, gdim]``, in
        the order of the tensors (for a vector space each node's coordinates repeat per
        component; for a mixed space the subspaces follow each other). Backbones that act on
        coordinates use this. Collective over the mesh comm."""
        space = self.V if space is None else space
        mesh = mesh_of(space)
        parts = []
        for S in subspaces(space):
            element = S.ufl_element()
            Vc = fd.VectorFunctionSpace(mesh,
                                        element.sub_elements[0] if S.block_size > 1 else element)
            X = fd.Function(Vc).interpolate(fd.SpatialCoordinate(mesh))
            parts.append(np.repeat(X.dat.data_ro.reshape(-1, mesh.geometric_dimension),
                                   S.block_size, axis=0))
        return np.concatenate(parts)

    def function(self, u, name=None):
        """Firedrake Function(s) in V from a layer's output ``u`` (a tensor or array of this
        rank's owned dofs, ``[n_dofs]`` or batched ``[batch, n_dofs]``: a list then). Not
        collective; on any number of ranks each passes its own dofs, as the layers do."""
        values = as_array(u)
        if values.ndim == 2:
            return [from_owned_values(self.V, row, name) for row in values]
        return from_owned_values(self.V, values, name)

    def tensor(self, f, dtype=None, device=None):
        """The tensor a layer takes or gives for Function(s) ``f`` in V: ``[n_dofs]`` (this
        rank's owned dofs), or ``[batch, n_dofs]`` for a list. float64 on the CPU unless
        ``dtype``/``device`` say otherwise."""
        import torch
        many = isinstance(f, (list, tuple))
        for g in (f if many else [f]):
            if g.function_space() != self.V:
                raise InputError(f"{g} is in {g.function_space()}, not the problem's space "
                                 f"{self.V}")
        values = np.stack([owned_values(g) for g in f]) if many else owned_values(f)
        return torch.as_tensor(values).to(dtype=dtype or torch.float64, device=device)

    def dof_components(self):
        """Component of each of this rank's owned dofs of V, ``[n_dofs]``, numbered over all
        subspaces (2D velocity-pressure: 0, 1 for the velocity, 2 for the pressure): with
        :meth:`dof_coordinates`, what a backbone needs to output a vector or mixed field."""
        parts, first = [], 0
        for S in self.subspaces:
            parts.append(np.tile(first + np.arange(S.block_size), owned_size(S) // S.block_size))
            first += S.block_size
        return np.concatenate(parts)

    def __repr__(self):
        return (f"ConstrainedProblem(V={self.V.ufl_element()}, dofs={self.V.dim()}, "
                f"bcs={len(self.bcs)}, data_spaces={len(self.data_spaces)})")
