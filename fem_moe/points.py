"""Fields a constrained layer delivered, at which the residual and its sparse Jacobian are
assembled at most once per training step, by whichever asks first.

A physics-informed step asks for the same things twice at every output field u of a PI-HC
layer: the physics loss wants the residual R(u) (its value) and J(u)^T W R(u) (its gradient),
and the layer's implicit-function backward wants the sparse Jacobian J(u) at the same u. Each
assembled them for itself: at diffusion-sorption's paper size (1e5 dofs, 2 ranks) the loss's
residual (6.5 ms) and transposed-Jacobian action (15 ms) beside the backward's Jacobian
(30 ms) per sample. A :class:`FieldPoint` holds one delivered field with its data and
assembles each piece on demand; the loss finds the point of a field it is given by value
(:meth:`FieldPoints.find`), so that J^T W R becomes a sparse product with the Jacobian the
backward takes next, and R is the forward's own where the solve's field is the delivered one.

A point serves exactly the field the layer delivered: in float64 that is the solution, whose
residual the solve has already assembled; in float32 it is the solution rounded to float32,
where the Jacobian (then shared by the loss and the backward) is assembled -- within float32's
round-off of the solution -- and the residual is the solution's carried to the rounded field
by that Jacobian: R(u) = R(u*) + J(u) (u - u*) up to a remainder second order in the rounding
(float32's epsilon squared relative to the field, far below what the rounding itself changes),
one sparse product instead of an assembly (6.5 ms per sample at the paper's size, 2 ranks).

Points are held by the autograd graph (the layer's and the loss's contexts); the registry
keeps weak references, so a point lives as long as some graph may still ask it something.
"""
import itertools
import weakref

import numpy as np

__all__ = ["FieldPoint", "FieldPoints", "field_points"]

_ids = itertools.count()


class FieldPoint:
    """One field ``u`` (owned dofs, float64) and its data (or None) on ``expert``'s space, with
    the residual rows and the sparse Jacobian there, each assembled by ``expert`` when first
    asked (``residual``: the rows if known already). The rows are ``expert``'s residual rows,
    so points are made only by experts whose rows are all the problem's non-Dirichlet rows.
    ``near``: (u*, R(u*)), a field within round-off of ``u`` (the solution ``u`` rounds) and its
    residual rows: the rows at ``u`` are then their first-order expansion with the Jacobian at
    ``u`` (no residual assembly). :meth:`residual`, :meth:`jacobian` and :meth:`release` are
    collective over the expert's communicator."""

    def __init__(self, expert, u, data=None, residual=None, near=None):
        self.expert, self.u, self.data = expert, u, data
        self._residual, self._J, self._near = residual, None, near
        self.id = next(_ids)      # the same on every rank: points are made collectively

    def matches(self, u, data):
        """Whether this rank's dofs of ``u`` and ``data`` are this point's, bit for bit."""
        if not np.array_equal(self.u, u):
            return False
        return (data is None) == (self.data is None) and (data is None
                                                          or np.array_equal(self.data, data))

    def _set(self):
        e = self.expert
        if self.data is not None:
            e.set_data(self.data)
        e._set(e.u, self.u)

    def residual(self):
        """The residual rows at the point (zero on Dirichlet rows), as the expert's
        ``_assemble_residual``."""
        if self._residual is None and self._near is not None:
            e, (u_near, r_near) = self.expert, self._near
            step = e._matvec(self.jacobian(), self.u - u_near)
            self._residual = r_near + np.where(e.row_mask, step, 0.0)
        elif self._residual is None:
            self._set()
            self._residual = self.expert._assemble_residual()
        self._near = None
        return self._residual

    def jacobian(self):
        """The sparse Jacobian at the point, a PETSc Mat this point owns."""
        if self._J is None:
            self._set()
            self._J = self.expert._assemble_jacobian().copy()
        return self._J

    def release(self):
        """Destroy the Jacobian (assembled again if asked once more)."""
        if self._J is not None:
            self._J.destroy()
            self._J = None


class FieldPoints:
    """A problem's live points: :meth:`add` by the layers' forwards, :meth:`find` by the loss."""

    def __init__(self, comm):
        self.comm = comm
        self._points = weakref.WeakValueDictionary()

    def add(self, point):
        self._points[point.id] = point

    def find(self, U, D):
        """Per sample of fields ``U`` [batch, n] and data ``D`` [batch, n_data] (or None), the
        point holding that field and data on every rank, or None. Collective over ``comm``
        (every rank gets the same points: what they assemble is collective)."""
        points = list(self._points.values())
        mine = [{p.id for p in points if p.matches(U[b], None if D is None else D[b])}
                for b in range(U.shape[0])]
        if self.comm.size > 1:
            everyone = self.comm.allgather(mine)
            mine = [set.intersection(*sets) for sets in zip(*everyone)]
        by_id = {p.id: p for p in points}
        return [by_id[min(ids)] if ids else None for ids in mine]


def field_points(problem):
    """The problem's :class:`FieldPoints` (made on first use, on every rank alike)."""
    if "_field_points" not in problem.__dict__:
        problem._field_points = FieldPoints(problem.comm)
    return problem._field_points
