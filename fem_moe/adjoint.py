"""The constrained solve as a pyadjoint operation, for Firedrake users who tape their own code.

``u = constrained_solve(expert, basis, data)`` takes Firedrake Functions and, when annotation is
on, records one :class:`ConstrainedSolveBlock` on the working tape. Its adjoint is the expert's
implicit-function-theorem backward, so ``ReducedFunctional``, ``compute_derivative`` and
``taylor_test`` work through it like through any Firedrake solve.
"""
import numpy as np
import firedrake as fd
from pyadjoint import Block, annotate_tape, get_working_tape, stop_annotating

__all__ = ["constrained_solve", "ConstrainedSolveBlock"]


def _vector(f):
    with f.dat.vec_ro as x:
        return x.array_r.copy()


def _function(space, values, cls=fd.Function):
    f = cls(space)
    with f.dat.vec_wo as x:
        x.array[:] = values
    return f


class ConstrainedSolveBlock(Block):
    """Dependencies: the N basis Functions (in V), then the data Functions; output: u in V."""

    def __init__(self, expert, n_basis, deps, solution):
        super().__init__()
        self.expert, self.n_basis = expert, n_basis
        self._solution = solution          # (key, w, rho) of the last solve, to skip re-solving
        for f in deps:
            self.add_dependency(f)

    def __str__(self):
        return f"fem_moe constrained solve (N = {self.n_basis}, {self.expert.mode})"

    def _unpack(self, inputs):
        Phi = np.stack([_vector(f) for f in inputs[:self.n_basis]])
        data = inputs[self.n_basis:]
        D = np.concatenate([_vector(f) for f in data]) if data else None
        return Phi, D

    def _solve(self, Phi, D):
        key = (Phi.tobytes(), None if D is None else D.tobytes())
        if self._solution[0] != key:
            w, _, info = self.expert.solve(Phi, D)
            self._solution = (key, w, info.ridge)
        return self._solution[1], self._solution[2]

    def recompute_component(self, inputs, block_variable, idx, prepared):
        Phi, D = self._unpack(inputs)
        w, _ = self._solve(Phi, D)
        e = self.expert
        return _function(e.problem.V, e.g_vec + w @ np.where(e.col_mask, Phi, 0.0))

    def prepare_evaluate_adj(self, inputs, adj_inputs, relevant_dependencies):
        Phi, D = self._unpack(inputs)
        w, rho = self._solve(Phi, D)
        return self.expert.vjp(Phi, D, w, _vector(adj_inputs[0]), rho=rho)

    def evaluate_adj_component(self, inputs, adj_inputs, block_variable, idx, prepared=None):
        Phi_bar, D_bar = prepared
        if idx < self.n_basis:
            return _function(self.expert.problem.V.dual(), Phi_bar[idx], fd.Cofunction)
        offset = 0
        for k, f in enumerate(inputs[self.n_basis:], start=self.n_basis):
            size = f.function_space().dof_dset.layout_vec.getLocalSize()
            if k == idx:
                return _function(f.function_space().dual(), D_bar[offset:offset + size], fd.Cofunction)
            offset += size


def constrained_solve(expert, basis, data=()):
    """u = g + sum_i w_i basis_i with w solved by ``expert`` (an :class:`fem_moe.Expert`).

    basis: sequence of N Functions in ``expert.problem.V``; data: sequence of Functions, one per
    data space. Returns a new Function u in V. Taped when annotation is on. Collective over the
    mesh communicator."""
    basis, data = list(basis), list(data)
    with stop_annotating():
        Phi = np.stack([_vector(f) for f in basis])
        D = np.concatenate([_vector(f) for f in data]) if data else None
        w, u_vec, info = expert.solve(Phi, D)
        u = _function(expert.problem.V, u_vec)
    if annotate_tape():
        key = (Phi.tobytes(), None if D is None else D.tobytes())
        block = ConstrainedSolveBlock(expert, len(basis), basis + data, (key, w, info.ridge))
        get_working_tape().add_block(block)
        block.add_output(u.create_block_variable())
    return u
