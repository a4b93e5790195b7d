"""The constrained solve as a pyadjoint operation, for Firedrake users who tape their own code.

``u = constrained_solve(expert, basis, data)`` takes Firedrake Functions and, when annotation is
on, records one :class:`ConstrainedSolveBlock` on the working tape. Its adjoint is the expert's
implicit-function-theorem backward and its tangent linear model the expert's forward-mode
derivative (:meth:`fem_moe.Expert.jvp`), so ``ReducedFunctional``, ``compute_derivative``,
``compute_tlm`` and ``taylor_test`` work through it like through any Firedrake solve. Its
second-order adjoint (``ReducedFunctional.hessian``, ``taylor_to_dict``) is the adjoint applied
to the output's second-order adjoint, exactly, plus the adjoint's derivative along the inputs'
tangent by a central difference of two exact adjoints (two extra solves per Hessian action,
error O(step^2), ``block.hessian_step`` = 1e-5 relative): not the analytic second-order adjoint,
which needs the residual's third derivative in least squares.
"""
import numpy as np
import firedrake as fd
from mpi4py import MPI
from pyadjoint import Block, annotate_tape, get_working_tape, stop_annotating

from .expert import Expert
from .problem import from_owned_values

__all__ = ["constrained_solve", "ConstrainedSolveBlock"]


def _unpack(basis, data):
    """Functions -> (Phi [N, n], D [n_data] or None, key): the arrays the expert takes, and a key
    that identifies them (to reuse a solve for the same inputs)."""
    Phi = np.stack([Expert._get(f) for f in basis])
    D = np.concatenate([Expert._get(f) for f in data]) if data else None
    return Phi, D, (Phi.tobytes(), None if D is None else D.tobytes())


class ConstrainedSolveBlock(Block):
    """Dependencies: the N basis Functions (in V), then the data Functions; output: u in V."""

    def __init__(self, expert, n_basis, deps, solution):
        super().__init__()
        self.expert, self.n_basis = expert, n_basis
        self._solution = solution          # (key, w, rho) of the last solve, to skip re-solving
        self.hessian_step = 1e-5
        for f in deps:
            self.add_dependency(f)

    def __str__(self):
        return f"fem_moe constrained solve (N = {self.n_basis}, {self.expert.mode})"

    def _solve(self, inputs):
        Phi, D, key = _unpack(inputs[:self.n_basis], inputs[self.n_basis:])
        if self._solution[0] != key:
            w, _, info = self.expert.solve(Phi, D)
            self._solution = (key, w, info.ridge)
        return Phi, D, self._solution[1], self._solution[2]

    def recompute_component(self, inputs, block_variable, idx, prepared):
        Phi, _, w, _ = self._solve(inputs)
        e = self.expert
        return from_owned_values(e.problem.V, e.g_vec + w @ np.where(e.col_mask, Phi, 0.0))

    def prepare_evaluate_adj(self, inputs, adj_inputs, relevant_dependencies):
        Phi, D, w, rho = self._solve(inputs)
        Phi_bar, D_bar = self.expert.vjp(Phi, D, w, Expert._get(adj_inputs[0]), rho=rho)
        return list(Phi_bar) + self.expert.problem.split_data(D_bar)

    def evaluate_adj_component(self, inputs, adj_inputs, block_variable, idx, prepared=None):
        return from_owned_values(inputs[idx].function_space().dual(), prepared[idx],
                                 cls=fd.Cofunction)

    def evaluate_tlm_component(self, inputs, tlm_inputs, block_variable, idx, prepared=None):
        Phi, D, w, rho = self._solve(inputs)
        N = self.n_basis
        get = lambda f, like: np.zeros_like(like) if f is None else Expert._get(f)
        dPhi = np.stack([get(t, Phi[i]) for i, t in enumerate(tlm_inputs[:N])])
        ddata = None
        if D is not None and any(t is not None for t in tlm_inputs[N:]):
            ddata = np.concatenate([get(t, Expert._get(f))
                                    for t, f in zip(tlm_inputs[N:], inputs[N:])])
        du = self.expert.jvp(Phi, D, w, dPhi, ddata, rho=rho)
        return from_owned_values(self.expert.problem.V, du)

    def prepare_evaluate_hessian(self, inputs, hessian_inputs, adj_inputs, relevant_dependencies):
        """The second-order adjoint of each dependency: the adjoint map applied to the output's
        second-order adjoint (exact), plus the derivative of the adjoint map, at the output's
        first-order adjoint, along the dependencies' tangent (``tlm_value``), by a central
        difference of two exact adjoints at solves of the perturbed inputs (relative step
        ``hessian_step``, error O(step^2))."""
        Phi, D, w, rho = self._solve(inputs)
        e, N = self.expert, self.n_basis
        zero_data = None if D is None else np.zeros_like(D)
        total_Phi, total_D = np.zeros_like(Phi), zero_data
        if hessian_inputs[0] is not None:
            total_Phi, total_D = e.vjp(Phi, D, w, Expert._get(hessian_inputs[0]), rho=rho)
        tlm = [bv.tlm_value for bv in self.get_dependencies()]
        if adj_inputs[0] is not None and any(t is not None for t in tlm):
            get = lambda f, like: np.zeros_like(like) if f is None else Expert._get(f)   # noqa: E731
            dPhi = np.stack([get(t, Phi[i]) for i, t in enumerate(tlm[:N])])
            dD = None if D is None else np.concatenate(
                [get(t, Expert._get(f)) for t, f in zip(tlm[N:], inputs[N:])])
            size = e.comm.allreduce(max(np.abs(dPhi).max(initial=0.0),
                                        0.0 if dD is None else np.abs(dD).max(initial=0.0)),
                                    op=MPI.MAX)
            scale = e.comm.allreduce(np.abs(Phi).max(initial=0.0), op=MPI.MAX)
            eps = self.hessian_step * max(scale, 1.0) / max(size, 1e-300)
            lam = Expert._get(adj_inputs[0])

            def adjoint_at(t):
                P, M = Phi + t * dPhi, None if D is None else D + t * dD
                wt, _, info = e.solve(P, M, w0=w)
                return e.vjp(P, M, wt, lam, rho=info.ridge)

            (pP, pD), (mP, mD) = adjoint_at(eps), adjoint_at(-eps)
            total_Phi = total_Phi + (pP - mP) / (2 * eps)
            if D is not None:
                total_D = (total_D if total_D is not None else 0.0) + (pD - mD) / (2 * eps)
        return list(total_Phi) + (self.expert.problem.split_data(total_D) if D is not None else [])

    def evaluate_hessian_component(self, inputs, hessian_inputs, adj_inputs, block_variable, idx,
                                   relevant_dependencies, prepared=None):
        return from_owned_values(inputs[idx].function_space().dual(), prepared[idx],
                                 cls=fd.Cofunction)


def constrained_solve(expert, basis, data=()):
    """u = g + sum_i w_i basis_i with w solved by ``expert`` (an :class:`fem_moe.Expert`).

    basis: sequence of N Functions in ``expert.problem.V``; data: sequence of Functions, one per
    data space. Returns a new Function u in V. Taped when annotation is on. Collective over the
    mesh communicator."""
    basis, data = list(basis), list(data)
    with stop_annotating():
        Phi, D, key = _unpack(basis, data)
        w, u_vec, info = expert.solve(Phi, D)
        u = from_owned_values(expert.problem.V, u_vec)
    if annotate_tape():
        block = ConstrainedSolveBlock(expert, len(basis), basis + data, (key, w, info.ridge))
        get_working_tape().add_block(block)
        block.add_output(u.create_block_variable())
    return u
