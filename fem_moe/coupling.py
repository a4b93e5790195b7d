"""The coupled mixture of experts: one reduced problem over every expert's coefficients.

The stitched output is u(w) = g + sum_k P_k Phi^T w_k (P_k keeps the dofs expert k owns), with
w = (w_1, ..., w_K) in R^{KN}. Independent experts choose each w_k from the rows of the dofs k owns,
evaluated on k's own field; nothing ties an expert to its neighbours, and an expert far from the
boundary or initial data has a family of local solutions (the method page of the docs). The coupled
mixture solves for all of w at once, on the stitched field and every residual row:

* ``"lstsq"``: minimise 1/2 ‖P R(u(w); m)‖_W^2 + 1/2 sum_k rho_k ‖w_k‖^2 (rho_k = 0 unless block k
  is rank deficient or the paper's ridge is asked for). It *nests* the global layer: w_k = w for all
  k is the global layer's output, so the coupled residual is never larger than the global one with
  the same basis (exactly so for a linear PDE) and the same norm. ‖.‖_W is the norm's weight
  (:mod:`fem_moe.norms`): by default each expert's rows in their own dual norm (block diagonal over
  the experts), or the Euclidean norm, or the whole mesh's dual norm (W couples every row: the
  reduced matrix is then dense).
* ``"galerkin"``: the global residual tested against every expert's block basis,
  G_k = (P_k Phi) P R(u(w); m) + rho_k w_k = 0.

Everything stays row-local. Row i, owned by expert m, involves only the dofs of its stencil, which
m's submesh holds (one vertex layer of overlap). Given the coefficients of the experts owning
those dofs (its *neighbours*, N numbers each), expert m evaluates its rows on the stitched field,
and their derivatives with respect to each neighbour's coefficients. So the reduced Jacobian is
block sparse (KN x KN, block (k, l) only between experts that share a row's stencil): a PETSc
matrix with block size N whose rows live on the rank of their expert, assembled from each
expert's dense contributions (lstsq: (J Phi_nb)^T (J Phi_nb) + Phi_nb^T H Phi_nb over m's
neighbours; galerkin: block row m only). Only the rows next to another expert's dofs (the
*interface* rows) reach the other blocks' columns, so each expert forms J Phi for its own block
on all its rows and for the others on the interface rows only; W (block diagonal over the
experts) enters the others' blocks through its interface block, made once per expert
(:class:`BlockColumns`): a Gauss-Newton matrix costs an expert N Riesz columns and rows x N^2
products, as an independent expert's does, not L N and rows x (L N)^2. The coupled SNES runs
on the mesh communicator over the distributed vector of coefficients, with its own options
prefix (``moe_``): ``-moe_snes_monitor``, ``-moe_ksp_type cg -moe_pc_type bjacobi`` (each
block-Jacobi block is then a rank's experts' own matrix), or the default direct solver (LU;
MUMPS on several ranks).

The SNES works in coefficients c of each block's basis orthonormalised over the dofs the block's
expert owns (w_k = T_k c_k, T_k from the block's Gram matrix): smooth fields restricted to a small
subdomain are nearly collinear, and the trust region should not see that.

Backward (implicit function theorem): at the solution, one block-sparse solve with the transpose
of the Jacobian (exact second-order terms included), A^T lam = (dL/dw); then each expert adds its
rows' contributions to Phi_bar and m_bar, as the independent experts do, with the stitched
fields u and z = sum_l P_l Phi^T lam_l in place of its own.
"""
import contextlib
import time
import warnings

import numpy as np
import scipy.sparse
from firedrake.petsc import PETSc

from .errors import (FemMoeError, InputError, RankDeficientBasisWarning, SolverDivergedError,
                     raise_on_all_ranks)
from .expert import (DEFAULT_SOLVER_PARAMETERS, ChordSteps, PrecisionStop, SampleInfo,
                     gauss_newton_is_done, fit_coefficients, linear_failure,
                     orthonormal_coordinates, reason_name, reduced_solver_defaults,
                     ridge_factor as resolve_ridge_factor, tolerance)
from . import options
from .norms import ExpertBlocks

__all__ = ["CoupledSolver", "DEFAULT_COUPLING_PARAMETERS"]

#: Defaults of the coupled SNES (options prefix ``moe_``): the experts' own choices
#: (:data:`fem_moe.expert.DEFAULT_SOLVER_PARAMETERS`: trust-region Newton on the objective,
#: Gauss-Newton far from the solution, a direct solve, MUMPS on any number of ranks), and the type
#: of the block-sparse matrix (aij or baij, block size N).
DEFAULT_COUPLING_PARAMETERS = {**DEFAULT_SOLVER_PARAMETERS, "mat_type": "aij"}


class CoupledRows:
    """Expert k's rows of the coupled problem: the residual rows of the dofs k owns, on the
    stitched field over k's submesh, and their derivatives with respect to the coefficients of
    each neighbour (each expert owning a dof of the submesh, k among them). Local (COMM_SELF).

    ``neighbours``: the neighbours' expert ids, sorted; ``block`` [n_sub]: for each dof of the
    submesh, the position of its owner in ``neighbours``; ``own`` [n_sub]: the dofs k owns that
    are not Dirichlet dofs (block k's columns)."""

    def __init__(self, space):
        self.k, self.expert = space.k, space.expert
        owners = space.dof_owner
        self.neighbours = np.unique(owners)
        self.block = np.searchsorted(self.neighbours, owners)
        self.me = int(np.searchsorted(self.neighbours, self.k))
        self.own = space.rows & self.expert.col_mask
        self.N = N = self.expert.N
        # Fixed by the partition: each neighbour's dofs, and where the columns of block k and
        # of the other blocks sit among the L N columns of the block basis.
        L = len(self.neighbours)
        self.dofs_of = [np.flatnonzero(self.block == l) for l in range(L)]
        self.n_cols = L * N
        self.cols_me = np.arange(self.me * N, (self.me + 1) * N)
        self.cols_nb = np.setdiff1d(np.arange(L * N), self.cols_me)
        self.others = [l for l in range(L) if l != self.me]
        # The other blocks' columns are nonzero only on the overlap's dofs (owned by neighbours).
        self.nb_dofs = np.flatnonzero(self.block != self.me)
        # The block basis's columns, written in place by each sample (set_transforms): block
        # k's as a dense PETSc matrix (for its sparse-dense products), the others' as a C-order
        # array (scipy's sparse-dense products copy a Fortran-ordered operand every time). Their
        # zeros -- a block's columns off its expert's dofs -- are the same for every sample.
        n_sub = len(self.block)
        self.blk_nb = np.zeros((n_sub, (L - 1) * N))
        self._self_mat = PETSc.Mat().createDense((n_sub, N), comm=PETSc.COMM_SELF)
        self._self_mat.setUp()
        self.blk_me = self._self_mat.getDenseArray()     # a view of the matrix's values
        self.blk_me[:] = 0.0
        self._self_mat.assemble()

    # ------------------------------------------------------------------ per sample
    def set_sample(self, Phi, data):
        """Phi [N, n_sub] (raw basis on the submesh) and data [n_data_sub] or None."""
        e = self.expert
        self.Phi = np.where(e.col_mask, Phi, 0.0)
        if data is not None:
            e.set_data(data)

    def block_transform(self, ridge_always, ridge_factor):
        """T_k and rho_k of block k (w_k = T_k c_k): the basis orthonormalised over the dofs k
        owns; the identity and a ridge if it is rank deficient there. Returns (T, rho, rank)."""
        P = self.Phi[:, self.own]
        T, rank = orthonormal_coordinates(P @ P.T)
        rho = self._ridge(ridge_factor) if (ridge_always or rank < self.N) else 0.0
        return T, rho, rank

    def fit(self, u):
        """Block k's coefficients w_k [N] whose combination of its basis is nearest the field u
        [n_sub] on the dofs k owns (:func:`fem_moe.expert.fit_coefficients`), or None for a
        field of another size. Local."""
        if np.shape(u) != self.Phi.shape[1:]:
            return None
        P = self.Phi[:, self.own]
        return fit_coefficients(P @ P.T, P @ (u - self.expert.g_vec)[self.own])

    def _ridge(self, factor):
        """factor x the mean diagonal of block k's own Gauss-Newton matrix at w = 0 (the
        independent expert's ridge)."""
        e = self.expert
        e.rho = 0.0
        e._g0 = None
        state = e._evaluate(np.zeros(self.N), self.Phi, e._phi_mat(self.Phi), True)
        diag = np.trace(state.get("GN", state["A"])) / self.N
        return factor * max(abs(diag), 1e-300)

    def set_transforms(self, T_nb):
        """The neighbours' T [L, N, N]: the basis in c coordinates, Phi_c[:, i] = T_l^T Phi[:, i]
        for dof i owned by neighbour l, and the block basis [n_sub, L N] (column block l: Phi_c
        on l's dofs, zero elsewhere), kept as block k's columns (``blk_me``, a view of the
        PETSc matrix) and the others' (``blk_nb``)."""
        N = self.N
        self.T_nb = T_nb
        # Most of the submesh's dofs are k's own: one product over all of them, then the
        # neighbours' few (scattering every block's columns cost 5x more at 1e5 dofs).
        self.Phi_c = T_nb[self.me].T @ self.Phi
        for j, l in enumerate(self.others):
            idx = self.dofs_of[l]
            self.Phi_c[:, idx] = T_nb[l].T @ self.Phi[:, idx]
            self.blk_nb[idx, j * N:(j + 1) * N] = self.Phi_c[:, idx].T
        self.blk_me[:] = self.Phi_c.T
        self.blk_me[self.nb_dofs] = 0.0
        self._self_mat.assemble()

    def field(self, C_nb):
        """The stitched field on the submesh from the neighbours' coefficients C_nb [L, N] (in
        c coordinates, with Phi_c): sum_i Phi_c[:, i] . C_nb[block[i]], k's own block over
        every dof first, then the neighbours' dofs."""
        out = C_nb[self.me] @ self.Phi_c
        for l in self.others:
            idx = self.dofs_of[l]
            out[idx] = C_nb[l] @ self.Phi_c[:, idx]
        return out

    # ------------------------------------------------------------------ evaluation
    def set_field(self, C_nb):
        """Set the expert's u to the stitched field."""
        e = self.expert
        e._set(e.u, e.g_vec + self.field(C_nb))

    def residual(self, C_nb):
        """Sets the expert's u to the stitched field; its owned rows r (zero elsewhere)."""
        self.set_field(C_nb)
        return self.expert._assemble_residual()

    def jacobian_blocks(self, J=None):
        """P J Phi_blk at the expert's current u (or with a given sparse Jacobian ``J`` of the
        expert's, e.g. one stored at a nearby point), as :class:`BlockColumns`: block k's
        columns on every row, the other blocks' on the interface rows (the only rows they
        reach)."""
        e = self.expert
        J = e._assemble_jacobian() if J is None else J
        own = e._times_phi(J, self._self_mat)
        own[~e.row_mask] = 0.0
        if self.interface is None:
            self.interface = self._interface_rows(_csr(J))
            self._interface_is = PETSc.IS().createGeneral(self.interface.astype(PETSc.IntType),
                                                          comm=PETSc.COMM_SELF)
            self._all_cols = PETSc.IS().createStride(J.getSize()[1], 0, 1, comm=PETSc.COMM_SELF)
        # The interface rows alone (a few hundred): all of J as scipy's copied every value.
        sub = J.createSubMatrix(self._interface_is, self._all_cols)
        rows = _csr(sub)
        sub.destroy()
        return BlockColumns(self, own, rows @ self.blk_nb)

    interface = _interface_is = _all_cols = None

    def _interface_rows(self, J):
        """The rows of k (not Dirichlet) whose stencil holds a dof another expert owns: where
        the other blocks' columns of P J Phi_blk can be nonzero. From J's sparsity pattern,
        which no sample changes."""
        pattern = J.copy()
        pattern.data[:] = 1.0
        reaches = pattern @ (self.block != self.me).astype(np.float64)
        return np.flatnonzero((reaches > 0) & self.expert.row_mask)

    def interface_weight(self, cap):
        """S = W restricted to the interface rows [m, m] (W the expert's row norm, fixed), made
        once: the other blocks' Gauss-Newton blocks are then m-sized products, with no Riesz
        solve per iteration. None where m > ``cap`` (memory m^2; the caller weighs those columns
        each time instead)."""
        if getattr(self, "_S", None) is None and len(self.interface) <= cap:
            e, I = self.expert, self.interface
            diag = e.row_norm.diagonal
            if diag is not None:
                self._S = np.diag(diag[I])
            else:
                self._S = np.empty((len(I), len(I)))
                for start in range(0, len(I), _WEIGHT_CHUNK):
                    cols = I[start:start + _WEIGHT_CHUNK]
                    unit = np.zeros((e.n, len(cols)))
                    unit[cols, np.arange(len(cols))] = 1.0
                    self._S[:, start:start + len(cols)] = e.weigh(unit)[I]
        return getattr(self, "_S", None)

    def hessian_term(self, s):
        """Phi_blk^T H(s) Phi_blk [L N, L N], H(s) = d^2 <s, R(u)>/du^2 (s = W r, the weighed
        rows); None if R is linear. Block k's columns by one sparse-dense product; the others'
        live on the overlap's dofs, where only the rows of H there enter."""
        e = self.expert
        if e.H is None:
            return None
        e._set(e.r_fn, s)
        H = e._assemble_hessian()
        H_own = e._times_phi(H, self._self_mat, "H")          # H Phi_k [n_sub, N]
        D, me, nb = self.nb_dofs, self.cols_me, self.cols_nb
        out = np.empty((self.n_cols,) * 2)
        out[np.ix_(me, me)] = self.blk_me.T @ H_own
        cross = self.blk_nb[D].T @ H_own[D]
        out[np.ix_(nb, me)], out[np.ix_(me, nb)] = cross, cross.T     # H is symmetric
        out[np.ix_(nb, nb)] = self.blk_nb[D].T @ (_csr(H)[D] @ self.blk_nb)
        return out

    def destroy(self):
        for name in ("_self_mat", "_interface_is", "_all_cols"):
            if getattr(self, name) is not None:
                getattr(self, name).destroy()
                setattr(self, name, None)


class BlockColumns:
    """P J Phi_blk [n_sub, L N] of one expert's rows, stored as its two parts: ``own`` [n_sub, N],
    block k's columns, and ``nb`` [m, (L - 1) N], the other blocks' columns on the interface
    rows (zero on every other row). The products the coupled matrix needs cost rows x N^2 and
    m x (L N)^2, not rows x (L N)^2, and the Riesz solves N columns, not L N."""

    def __init__(self, rows, own, nb):
        self.rows, self.own, self.nb = rows, own, nb

    def full(self):
        """The dense [n_sub, L N] array (for a norm that couples every row)."""
        r = self.rows
        out = np.zeros((self.own.shape[0], r.n_cols))
        out[:, r.cols_me] = self.own
        out[np.ix_(r.interface, r.cols_nb)] = self.nb
        return out

    def transpose_times(self, x):
        """(P J Phi_blk)^T x [L N] for a row vector x [n_sub]."""
        r = self.rows
        out = np.empty(r.n_cols)
        out[r.cols_me] = self.own.T @ x
        out[r.cols_nb] = self.nb.T @ x[r.interface]
        return out

    def gauss_newton(self, Z, Z_nb, S):
        """(P J Phi_blk)^T W (P J Phi_blk) [L N, L N] from Z = W own and either S, W on the
        interface rows, or Z_nb = W nb (placed on the interface rows: [n_sub, (L - 1) N])."""
        r = self.rows
        me, nbc, I = r.cols_me, r.cols_nb, r.interface
        out = np.empty((r.n_cols,) * 2)
        out[np.ix_(me, me)] = self.own.T @ Z
        cross = self.nb.T @ Z[I]
        out[np.ix_(nbc, me)], out[np.ix_(me, nbc)] = cross, cross.T     # W is symmetric
        out[np.ix_(nbc, nbc)] = self.nb.T @ (S @ self.nb if S is not None else Z_nb[I])
        return out

    def tested(self, Phi_c):
        """Phi_c (P J Phi_blk) [N, L N]: the Galerkin rows (Phi_c [N, n_sub], the test basis)."""
        r = self.rows
        out = np.empty((Phi_c.shape[0], r.n_cols))
        out[:, r.cols_me] = Phi_c @ self.own
        out[:, r.cols_nb] = Phi_c[:, r.interface] @ self.nb
        return out

    def interface_columns(self):
        """The other blocks' columns as [n_sub, (L - 1) N] (zero off the interface rows)."""
        r = self.rows
        out = np.zeros((self.own.shape[0], len(r.cols_nb)))
        out[r.interface] = self.nb
        return out


def _csr(mat):
    """A sequential PETSc aij matrix as a scipy CSR matrix (a copy of its values)."""
    indptr, indices, values = mat.getValuesCSR()
    return scipy.sparse.csr_matrix((values, indices, indptr), shape=mat.getSize())


#: Below this many experts (the mixture's dense limit) on several ranks, every rank factors a copy
#: of the coupled matrix (K N x K N, at most a few hundred unknowns) with sequential MUMPS instead
#: of one parallel MUMPS factorisation: parallel MUMPS's fixed cost per factorisation (0.7 ms for
#: 32 unknowns on 2 ranks, 6 % of a coupled K = 2 solve at 16641 dofs) does not shrink with the
#: matrix. The inertia checks likewise. Options under the prefix still choose (``pc_type``).
REDUNDANT_EXPERTS = 16
REDUNDANT_COUPLING_PARAMETERS = {"pc_type": "redundant", "redundant_pc_type": "lu",
                                 "redundant_pc_factor_mat_solver_type": "mumps"}

# Columns weighed at a time when W's interface block is formed (memory n_sub x this).
_WEIGHT_CHUNK = 64
#: The largest interface (rows of one expert) whose block of W is kept dense (m^2 doubles):
#: past it the other blocks' columns are weighed at every Gauss-Newton matrix instead.
INTERFACE_WEIGHT_ROWS = 2048


class CoupledSolver:
    """The coupled reduced problem of a mixture, its SNES on the mesh communicator and its IFT
    backward. ``rows``: {k: CoupledRows} of this rank's experts; ``expert_rank`` [K].

    The distributed vector of coefficients holds the blocks in the order of (rank, expert), so
    each rank owns its experts' blocks contiguously. Each rank scatters in the blocks of its
    experts' neighbours (a PETSc Scatter: N numbers per neighbour). Collective over ``comm``
    (construction, ``solve``, ``vjp``)."""

    def __init__(self, comm, rows, expert_rank, n_basis, mode, solver_parameters=None,
                 ridge_always=False, ridge_factor=None, options_prefix="moe_", norm=None,
                 on_rank_deficient="ridge"):
        self.comm, self.rows, self.mode, self.N = comm, rows, mode, int(n_basis)
        self.on_rank_deficient = on_rank_deficient
        # The least-squares weight W of the rows (fem_moe.norms): block diagonal over the experts
        # unless it couples every row (the whole mesh's dual norm: a dense reduced matrix).
        self.norm = ExpertBlocks(rows) if norm is None else norm
        self.dense = mode == "lstsq" and self.norm.couples_all
        self.ridge_always = ridge_always
        self.ridge_factor = resolve_ridge_factor(ridge_factor, ridge_always)
        K, N = len(expert_rank), self.N
        order = sorted(range(K), key=lambda k: (expert_rank[k], k))
        self.position = np.empty(K, dtype=np.int64)
        self.position[order] = np.arange(K)
        self.mine = [k for k in order if expert_rank[k] == comm.rank]
        neighbours = {}
        for part in comm.allgather({k: r.neighbours for k, r in rows.items()}):
            neighbours.update(part)
        needed = sorted({int(self.position[l]) for k in self.mine for l in rows[k].neighbours})
        self.needed = np.array(needed, dtype=np.int64)
        # Where each of my experts finds its neighbours' blocks in the scattered local vector.
        self.slots = {k: np.searchsorted(self.needed, self.position[rows[k].neighbours])
                      for k in self.mine}
        n_local = len(self.mine) * N
        self.x = PETSc.Vec().createMPI((n_local, PETSc.DECIDE), bsize=N, comm=comm)
        self.first_block = self.x.getOwnershipRange()[0] // N
        self.local = PETSc.Vec().createSeq(len(needed) * N, bsize=N, comm=PETSc.COMM_SELF)
        is_from = PETSc.IS().createBlock(N, self.needed.astype(PETSc.IntType), comm=PETSc.COMM_SELF)
        self.scatter = PETSc.Scatter().create(self.x, is_from, self.local, None)
        is_from.destroy()
        # The transforms T_k travel the same way, N^2 numbers per block.
        self.tx = PETSc.Vec().createMPI((len(self.mine) * N * N, PETSc.DECIDE), bsize=N * N,
                                        comm=comm)
        self.tlocal = PETSc.Vec().createSeq(len(needed) * N * N, bsize=N * N, comm=PETSc.COMM_SELF)
        is_t = PETSc.IS().createBlock(N * N, self.needed.astype(PETSc.IntType),
                                      comm=PETSc.COMM_SELF)
        self.tscatter = PETSc.Scatter().create(self.tx, is_t, self.tlocal, None)
        is_t.destroy()
        self.G = self.x.duplicate()      # the SNES's residual vector
        self._acc = self.x.duplicate()   # where the experts' contributions are summed
        self._redundant = comm.size > 1 and K < REDUNDANT_EXPERTS
        self._build_matrix(neighbours, K, options_prefix, solver_parameters)
        self._build_snes(options_prefix, solver_parameters)

    # ------------------------------------------------------------------ setup
    def _pattern(self, neighbours, K):
        """Column blocks of each block row: lstsq, pairs of neighbours of any expert (its rows
        couple them; every pair where W couples every row); galerkin, block row k holds the
        neighbours of k."""
        if self.dense:
            return [set(range(K)) for _ in range(K)]
        cols = [set() for _ in range(K)]
        for m, nb in neighbours.items():
            for k in (nb if self.mode == "lstsq" else [m]):
                cols[k].update(int(l) for l in nb)
        return cols

    def _build_matrix(self, neighbours, K, prefix, params):
        N, n_local = self.N, len(self.mine) * self.N
        A = PETSc.Mat().create(comm=self.comm)
        A.setSizes(((n_local, PETSc.DECIDE), (n_local, PETSc.DECIDE)), bsize=N)
        options.set_up(A, prefix, DEFAULT_COUPLING_PARAMETERS, params)
        cols = self._pattern(neighbours, K)
        lo, hi = self.first_block, self.first_block + len(self.mine)
        d_nnz, o_nnz = [], []
        for k in self.mine:
            pos = self.position[sorted(cols[k])]
            d_nnz.append(int(((pos >= lo) & (pos < hi)).sum()))
            o_nnz.append(len(pos) - d_nnz[-1])
        if "baij" not in A.getType():       # AIJ counts scalar rows
            d_nnz, o_nnz = np.repeat(d_nnz, N) * N, np.repeat(o_nnz, N) * N
        A.setPreallocationNNZ((np.asarray(d_nnz, dtype=PETSc.IntType),
                               np.asarray(o_nnz, dtype=PETSc.IntType)))
        A.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, True)
        A.setUp()
        self.A = A

    def _build_snes(self, prefix, params):
        snes = PETSc.SNES().create(comm=self.comm)
        snes.setFunction(self._snes_function, self.G)
        snes.setJacobian(self._snes_jacobian, self.A)
        if self.mode == "lstsq":
            snes.setObjective(self._snes_objective)
        # MUMPS on one rank too (read only by a factorising preconditioner): PETSc's own LU
        # calls a pivot below 2.2e-14 (absolute) zero, and the coupled matrix's scale is the
        # residual's squared (~1e-12 on diffusion-sorption): it failed on most training steps.
        defaults = {**reduced_solver_defaults(self.mode, DEFAULT_COUPLING_PARAMETERS),
                    "pc_factor_mat_solver_type": "mumps"}
        if self._redundant:
            defaults.update(REDUNDANT_COUPLING_PARAMETERS)
        options.set_up(snes, prefix, defaults, params)
        # fem_moe's own solves with the coupled matrix (the first step's length, the stall
        # test, the backward) go through the SNES's preconditioner, shared, and no Krylov
        # method: the SNES's CG keeps the last trust-region radius and would cut them short.
        self._direct = PETSc.KSP().create(comm=self.comm)
        self._direct.setType("preonly")
        self._direct.setPC(snes.getKSP().getPC())
        self.gauss_newton_rtol = options.parameter(snes, "gauss_newton_rtol", 0.0)
        self.stall_rtol = options.parameter(snes, "stall_rtol", 0.0)
        self.chord = ChordSteps.of(snes, self.mode)
        self.precision = PrecisionStop()
        self._auto_delta0 = (snes.getType() == "newtontr"
                             and "snes_tr_delta0" not in options.parameters(snes))
        self.snes, self.prefix = snes, prefix
        if self.mode == "lstsq":
            self.A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
            # A small coupled matrix is factored whole on every rank (REDUNDANT_EXPERTS).
            ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF if self._redundant else self.comm)
            # MUMPS reports the inertia in parallel only without its ScaLAPACK root and with
            # null-pivot detection; it reads these when it factors (options.used below).
            inertia = {"ksp_type": "preonly", "pc_type": "cholesky",
                       "pc_factor_mat_solver_type": "mumps", "mat_mumps_icntl_13": 1,
                       "mat_mumps_icntl_24": 1}
            options.set_up(ksp, prefix + "inertia_", inertia)
            self._inertia_ksp = ksp

    @contextlib.contextmanager
    def _local(self):
        """Time spent on work an expert does on its own rows whether coupled or not (its
        residual, Jacobian and second-derivative forms, the norm's Riesz solves, the dense
        products with its basis): the rest of a coupled solve is the coupling's own cost."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._local_seconds += time.perf_counter() - t0

    _local_seconds = 0.0

    # ------------------------------------------------------------------ collective helpers
    def _agree(self, error):
        """Every rank raises if any rank has an error (an exception, a message or None). Inside
        an SNES callback PETSc turns the exception into its own error code: it is kept, to be
        raised again once the solve has returned."""
        try:
            raise_on_all_ranks(self.comm, error, exc_type=FemMoeError)
        except FemMoeError as exc:
            self._callback_error = exc
            raise

    def _weigh(self, arrays):
        """W x for each of my experts' rows, {k: x_k} -> {k: (W x)_k}. Collective (the whole
        mesh's norm exchanges and solves on the mesh communicator); raises on every rank."""
        out, err = None, None
        try:
            with self._local():
                out = self.norm.weigh(arrays)
        except Exception as exc:     # noqa: BLE001 -- reaches every rank below
            err = exc
        self._agree(err)
        return out

    def _neighbour_blocks(self, vec, local, scatter, shape):
        """The blocks of each of my experts' neighbours from distributed ``vec``:
        {k: [L, *shape]}."""
        scatter.scatter(vec, local, PETSc.InsertMode.INSERT_VALUES, PETSc.ScatterMode.FORWARD)
        arr = local.getArray(readonly=True).reshape((-1,) + shape)
        return {k: arr[self.slots[k]].copy() for k in self.mine}

    def _set_own_blocks(self, vec, blocks):
        arr = vec.getArray()
        size = arr.size // max(len(self.mine), 1)
        for i, k in enumerate(self.mine):
            arr[i * size:(i + 1) * size] = np.ravel(blocks[k])

    # ------------------------------------------------------------------ the reduced problem
    def _state_at(self, X, what):
        """The state at the SNES iterate X (c, distributed), completed with ``what``
        ("objective", "G" or "A"). Collective: every rank takes the same branches."""
        c = X.getArray(readonly=True)
        state = self._cache
        changed = state is None or not np.array_equal(state["c"], c)
        if self.comm.allreduce(bool(changed), op=_LOR):
            state = self._cache = self._evaluate_residual(X)
        if what == "objective":
            return state
        if "G" not in state:
            self._gradient(state)
        if what == "A" and "A" not in state:
            self._jacobian(state)
        return state

    def _evaluate_residual(self, X, residuals=None):
        """The residual rows of my experts at X, the objective and ‖r‖ (summed over ranks).
        ``residuals``: {k: rows} at X if known (the experts' u is set, nothing assembled)."""
        err, rr, ridge = None, 0.0, 0.0
        state = {"c": X.getArray(readonly=True).copy(), "r": {}, "s": {}, "C": {}}
        try:
            C = self._neighbour_blocks(X, self.local, self.scatter, (self.N,))
            for k in self.mine:
                state["C"][k] = C[k]
                with self._local():
                    if residuals is None:
                        state["r"][k] = self.rows[k].residual(C[k])
                    else:
                        self.rows[k].set_field(C[k])
                        state["r"][k] = residuals[k]
                w = self.T[k] @ C[k][self.rows[k].me]
                ridge += self.rho[k] * (w @ w)
        except Exception as exc:     # noqa: BLE001 -- reaches every rank below
            err = exc
        self._agree(err)
        # The rows as the norm weighs them, s = W r (fem_moe.norms).
        state["s"] = self._weigh(state["r"]) if self.mode == "lstsq" else state["r"]
        rr = sum(state["r"][k] @ state["s"][k] for k in self.mine)
        total_rr, total_ridge = self.comm.allreduce(np.array([rr, ridge]))
        state["objective"], state["rnorm"] = 0.5 * (total_rr + total_ridge), np.sqrt(total_rr)
        return state

    def _ridge_terms(self, k, C):
        """Block k's ridge in c coordinates: gradient T^T rho T c and matrix rho T^T T."""
        T, rho = self.T[k], self.rho[k]
        M = rho * T.T @ T
        return M @ C[self.rows[k].me], M

    def _jacobian_columns(self, state):
        """{k: P J Phi_blk} of my experts at the state's point (:class:`BlockColumns`), assembled
        once per state. The experts' u must be the state's (the cache holds the last point
        evaluated). Collective."""
        if "JPhi" in state:
            return state["JPhi"]
        JPhi, err = {}, None
        try:
            for k in self.mine:
                with self._local():
                    JPhi[k] = self.rows[k].jacobian_blocks()
        except Exception as exc:     # noqa: BLE001
            err = exc
        self._agree(err)
        state["JPhi"] = JPhi
        return JPhi

    def _gradient(self, state):
        """G (distributed Vec) into state["G"]. Least squares needs P J Phi_blk for it (kept in
        the state); Galerkin's G is the rows tested with the basis, and its Jacobian is
        assembled only where SNES asks for the matrix (not at rejected trial points, nor at
        the converged iterate)."""
        N = self.N
        JPhi = self._jacobian_columns(state) if self.mode == "lstsq" else None
        err = None
        self._acc.zeroEntries()
        try:
            for k in self.mine:
                rows = self.rows[k]
                if self.mode == "lstsq":
                    with self._local():
                        g = JPhi[k].transpose_times(state["s"][k])
                        idx = self.position[rows.neighbours]
                else:
                    g, idx = rows.Phi_c @ state["r"][k], self.position[[k]]
                g = g.reshape(-1, N)
                g[list(idx).index(self.position[k])] += self._ridge_terms(k, state["C"][k])[0]
                self._acc.setValuesBlocked(idx.astype(PETSc.IntType), g.ravel(),
                                        addv=PETSc.InsertMode.ADD_VALUES)
        except Exception as exc:     # noqa: BLE001
            err = exc
        self._agree(err)
        self._acc.assemble()
        state["G"] = self._acc.copy()
        state["gnorm"] = state["G"].norm()

    def _gauss_newton_blocks(self, state):
        """{k: (P J Phi_blk)^T W (P J Phi_blk)} of my experts, with the Riesz solves it needs
        (collective for a norm that couples every row): block k's columns are weighed, the
        others' go through W's interface block (made once per expert), or are weighed too where
        that block is too large to keep."""
        if "GN" in state:
            return state["GN"]
        JPhi = state["JPhi"]
        if self.dense:
            full = {k: JPhi[k].full() for k in self.mine}
            WJ = self._weigh({k: self._columns(k, full[k]) for k in self.mine})
            state["GN"] = {k: full[k].T @ WJ[k] for k in self.mine}
            return state["GN"]
        N, S, columns, err = self.N, {}, {}, None
        try:
            for k in self.mine:
                with self._local():
                    S[k] = self.rows[k].interface_weight(INTERFACE_WEIGHT_ROWS)
                columns[k] = JPhi[k].own if S[k] is not None else np.hstack(
                    [JPhi[k].own, JPhi[k].interface_columns()])
        except Exception as exc:     # noqa: BLE001 -- reaches every rank below
            err = exc
        self._agree(err)
        WJ = self._weigh(columns)
        with self._local():
            state["GN"] = {k: JPhi[k].gauss_newton(WJ[k][:, :N], WJ[k][:, N:], S[k])
                           for k in self.mine}
        return state["GN"]

    def _jacobian(self, state, exact=None, descent=True, columns=None):
        """The block-sparse Jacobian into self.A: lstsq GN (+ the second-order term where
        ``exact``, default by the Gauss-Newton switch; with ``descent``, only where that is
        positive definite), galerkin Phi_c P J Phi_blk. ``columns``: {k: BlockColumns} to make
        it from (Galerkin: stored Jacobians') instead of the state's own; A is then not the
        state's."""
        if exact is None:
            exact = self._exact_hessian(state["gnorm"])
        err = None
        A = self.A
        JPhi = self._jacobian_columns(state) if columns is None else columns
        A.zeroEntries()
        GN = self._gauss_newton_blocks(state) if self.mode == "lstsq" else None
        try:
            for k in self.mine:
                rows = self.rows[k]
                if self.mode == "lstsq":
                    M = GN[k].copy()
                    idx_r = idx_c = self.position[rows.neighbours]
                    if self.dense:
                        idx_c = np.arange(len(self.position))
                    if exact:
                        with self._local():
                            S = rows.hessian_term(state["s"][k])
                        if S is not None:
                            M[:, self._column_index(k)] += S
                else:
                    with self._local():
                        M = JPhi[k].tested(rows.Phi_c)
                    idx_r, idx_c = self.position[[k]], self.position[rows.neighbours]
                # M is a fresh array: block k's ridge goes into its (k, k) block.
                mi, me = (list(idx).index(self.position[k]) for idx in (idx_r, idx_c))
                N = self.N
                ridge = self._ridge_terms(k, state["C"][k])[1]
                M[mi * N:(mi + 1) * N, me * N:(me + 1) * N] += ridge
                A.setValuesBlocked(idx_r.astype(PETSc.IntType), idx_c.astype(PETSc.IntType),
                                   M.ravel(), addv=PETSc.InsertMode.ADD_VALUES)
        except Exception as exc:     # noqa: BLE001
            err = exc
        self._agree(err)
        A.assemble()
        if columns is not None:
            return
        state["A"] = exact
        if exact and descent and self.mode == "lstsq" and not self._positive_definite():
            # Newton's step must be a descent direction of the objective: where the exact
            # Hessian is not positive definite, Gauss-Newton with Levenberg-Marquardt damping
            # (the experts' rule).
            self._jacobian(state, exact=False)
            A.shift(1e-8 * A.getDiagonal().sum() / A.getSize()[0])

    def _direct_solve(self, b, x, transpose=False):
        """x = A^-1 b (or A^-T b) by the SNES's preconditioner alone, with the SNES's options in
        PETSc's database: a preconditioner set up here (a redundant one's inner solver reads
        them then) is set up as the SNES would. Collective."""
        self._direct.setOperators(self.A)
        with options.used(self.snes):
            (self._direct.solveTranspose if transpose else self._direct.solve)(b, x)

    def _column_index(self, k):
        """Where expert k's neighbours' columns sit in the columns of its block row: all of
        them (a slice) unless the matrix is dense, where the columns are every expert's, by
        position."""
        if not self.dense:
            return slice(None)
        N = self.N
        return np.concatenate([np.arange(p * N, (p + 1) * N)
                               for p in self.position[self.rows[k].neighbours]])

    def _columns(self, k, JPhi):
        """Expert k's columns (its neighbours' blocks) as the matrix's column blocks: JPhi
        itself, or where the matrix is dense, placed among every expert's columns."""
        if not self.dense:
            return JPhi
        out = np.zeros((JPhi.shape[0], len(self.position) * self.N))
        out[:, self._column_index(k)] = JPhi
        return out

    def _positive_definite(self):
        """Whether the assembled matrix is positive definite: its inertia from a Cholesky
        factorisation (MUMPS; options prefix ``<prefix>inertia_``), of the distributed matrix or,
        where it is small, of every rank's copy of it. Collective."""
        ksp = self._inertia_ksp
        A = self.A
        if "baij" in A.getType():     # MUMPS's Cholesky takes AIJ (or SBAIJ), not BAIJ
            A = self._inertia_mat = A.convert("aij", out=getattr(self, "_inertia_mat", None))
        if self._redundant:
            A = self._inertia_copy = A.getRedundantMatrix(
                self.comm.size, subcomm=PETSc.COMM_SELF, out=getattr(self, "_inertia_copy", None))
        ksp.setOperators(A)
        with options.used(ksp):
            ksp.setUp()
        negative, zero, _ = ksp.getPC().getFactorMatrix().getInertia()
        definite = negative == 0 and zero == 0
        # The copies are equal, their factorisations too: agreeing costs nothing and makes sure.
        return self.comm.allreduce(definite, op=_LAND) if self._redundant else definite

    def _exact_hessian(self, gnorm):
        """As the experts' switch: Gauss-Newton until ‖G‖ <= gauss_newton_rtol ‖G0‖ or
        Gauss-Newton stalls, then the exact Hessian (always in the backward)."""
        if self.mode != "lstsq":
            return False
        if self._g0 is None:
            return True
        last, self._last_norm = self._last_norm, gnorm
        if gauss_newton_is_done(gnorm, self._g0, last, self.gauss_newton_rtol):
            self._g0 = None
        return self._g0 is None

    # ------------------------------------------------------------------ SNES callbacks
    def _snes_objective(self, snes, X):
        return self._state_at(X, "objective")["objective"]

    def _snes_function(self, snes, X, G):
        self._state_at(X, "G")["G"].copy(G)
        if self.precision.active:
            # The next step from X, with the matrix the SNES holds (factored already). The
            # coordinates are orthonormal per block over the dofs its expert owns, and the
            # experts own disjoint dofs: ‖step‖ and ‖X‖ are the field's change and norm.
            step = G.duplicate()
            self._direct_solve(G, step)
            self.precision.at(G.norm(), step.norm(), X.norm())
            step.destroy()

    def _snes_jacobian(self, snes, X, A, P):
        self.precision.ready = True
        if self.chord.keep(self._state_at(X, "G")["gnorm"]):
            pass                       # A still holds an earlier iterate's: a chord step
        elif self._stored is not None:
            # The solve's first matrix, from the stored Jacobians; later iterates that need a
            # new one assemble it.
            self._stored_matrix(self._state_at(X, "G"))
            self._stored = None
        else:
            self._state_at(X, "A")
        if A != P:
            A.assemble()

    def _stored_matrix(self, state):
        """Galerkin's block-sparse matrix into self.A from the stored Jacobians of my experts,
        once per solve. Collective."""
        if self._stored_filled:
            return
        columns, err = {}, None
        try:
            for k in self.mine:
                with self._local():
                    columns[k] = self.rows[k].jacobian_blocks(J=self._stored[k])
        except Exception as exc:     # noqa: BLE001
            err = exc
        self._agree(err)
        self._jacobian(state, columns=columns)
        self._stored_filled = True

    _stored, _stored_filled = None, False
    #: The residual rows {k: [n_sub]} of my experts at the lifting and at the solution of the
    #: last solve (None where it did not evaluate them), as Expert.solve's.
    lifting_residuals = solution_residuals = None

    def jacobians(self):
        """{k: Mat} the sparse Jacobians my experts assembled last (the backward's at the
        solution, after :meth:`vjp`); each is overwritten by the expert's next assembly."""
        return {k: self.rows[k].expert.jacobian() for k in self.mine}

    # ------------------------------------------------------------------ one sample
    def prepare(self, Phi, data, sample=None, report=True, blocks=None):
        """Set one sample's basis {k: [N, n_sub]} and data {k: [n_data_sub] or None} on my
        experts, compute and exchange the block transforms. A block whose basis is rank
        deficient over its expert's dofs is warned about (RankDeficientBasisWarning, every
        rank) and gets the ridge, or raises InputError with on_rank_deficient = "raise" (the
        forward's ``report``; the backward sets the same sample again). ``blocks``: the
        :meth:`blocks` this basis was prepared with before (the backward's, from its forward):
        they are taken instead of computed again (a rank-deficient block's ridge costs a
        Jacobian assembly). Collective."""
        err, N = None, self.N
        self.T, self.rho, self.block_rank = {}, {}, {}
        try:
            for k in self.mine:
                self.rows[k].set_sample(Phi[k], data[k])
                self.T[k], self.rho[k], self.block_rank[k] = (
                    blocks[k] if blocks is not None else
                    self.rows[k].block_transform(self.ridge_always, self.ridge_factor))
        except Exception as exc:     # noqa: BLE001
            err = exc
        self._agree(err)
        if report:
            self._report_rank(sample)
        self._set_own_blocks(self.tx, self.T)
        T_nb = self._neighbour_blocks(self.tx, self.tlocal, self.tscatter, (N, N))
        for k in self.mine:
            self.rows[k].set_transforms(T_nb[k])
        self._cache = None
        self._g0 = None

    def blocks(self):
        """{k: (T_k, rho_k, rank_k)} of my experts for the prepared sample (see :meth:`prepare`)."""
        return {k: (self.T[k], self.rho[k], self.block_rank[k]) for k in self.mine}

    def _report_rank(self, sample):
        """Warn (or raise, as asked) on every rank about rank-deficient blocks. Collective."""
        mine = [(k, r) for k, r in self.block_rank.items() if r < self.N]
        deficient = sorted(x for part in self.comm.allgather(mine) for x in part)
        if not deficient:
            return
        rho = self.comm.allreduce(max(self.rho.values(), default=0.0), op=_MAX)
        where = "" if sample is None else f" (sample {sample})"
        msg = (f"coupled mixture{where}: the basis restricted to the own dofs of expert(s) "
               f"{[k for k, _ in deficient]} has numerical rank {[r for _, r in deficient]} "
               f"< N = {self.N}")
        if self.on_rank_deficient == "raise":
            raise InputError(msg + " (on_rank_deficient='raise')")
        warnings.warn(RankDeficientBasisWarning(
            msg + f"; regularised with the ridge term rho*w_k, rho up to {rho:.3e} "
            f"({self.ridge_factor:g} x the mean diagonal of the block's Gauss-Newton matrix)",
            rank=min(r for _, r in deficient), n_basis=self.N,
            experts=[k for k, _ in deficient], sample=sample), stacklevel=3)

    def fit(self, fields):
        """Coefficients {k: w_k} to start a solve from: each of my experts' best fit of the
        field u_k {k: [n_sub]} on its own dofs (e.g. the sample's solution for an earlier
        basis: its stored coefficients would belong to that basis), after ``prepare``; 0 for
        an expert whose field is missing or of another size. Local."""
        out = {}
        for k in self.mine:
            w = self.rows[k].fit(fields[k]) if k in fields else None
            out[k] = np.zeros(self.N) if w is None else w
        return out

    @PETSc.Log.EventDecorator("FemMoeCoupledSolve")
    def solve(self, w0, sample=None, rtol=None, warm=False, jacobians=None,
              lifting_residuals=None, precision=None):
        """The coupled solve from w0 {k: [N]} (after ``prepare``): returns ({k: w_k},
        {k: u on k's submesh}, info). ``rtol``: this solve's SNES relative tolerance (default
        the options'); ``warm``: w0 is a warm start (recorded in info). A warm start may bring
        each of my experts' ``jacobians`` {k: Mat} at the sample's last solution and
        ``lifting_residuals`` {k: rows} (Galerkin mode; see :meth:`fem_moe.expert.Expert.solve`:
        the first chord matrix, and the cold ‖G‖ without an assembly); used only where every
        rank has all of its experts'. Afterwards ``lifting_residuals`` and
        ``solution_residuals`` hold my experts' rows at the lifting (where known) and at the
        solution (:meth:`vjp`'s ``residuals``). ``precision``: the relative precision the field
        is delivered at (:class:`fem_moe.expert.PrecisionStop`; not where a block is rank
        deficient: its coordinates are not orthonormal). Raises SolverDivergedError on every
        rank."""
        t0, self._local_seconds = time.perf_counter(), 0.0
        assembled = self._assembled()
        galerkin = self.mode == "galerkin"
        self._stored, self._stored_filled = None, False
        self.lifting_residuals = self.solution_residuals = None
        self._set_own_blocks(self.x, {k: np.linalg.solve(self.T[k], w0[k]) for k in self.mine})
        lifting = self._all_mine(lifting_residuals) if warm and galerkin else None
        g_cold = self._cold_gradient_if_warm_is_better(lifting) if warm else None
        if warm and g_cold is None:
            self.x.zeroEntries()
            warm = False
        elif warm and galerkin and self.chord.contraction > 0:
            self._stored = self._all_mine(jacobians)
        start = self._state_at(self.x, "G")
        if self.lifting_residuals is None and self.x.norm() == 0.0:     # the lifting's rows
            self.lifting_residuals = start["r"]
        before, g_start = start["rnorm"], start["gnorm"]
        if g_cold is not None:
            g_start = max(g_start, g_cold)   # the stall test's scale: the cold solve's
        if self.mode == "lstsq" and self.gauss_newton_rtol > 0:
            self._g0, self._last_norm = g_start, None
        if self._auto_delta0:
            # The first Gauss-Newton step's length starts the trust region (the experts' rule).
            if self._stored is not None:
                self._stored_matrix(start)
            else:
                self._state_at(self.x, "A")
            step = self.x.duplicate()
            self._direct_solve(start["G"], step)
            self.snes.setTRTolerances(delta_0=max(step.norm(), 1e-8))
            step.destroy()
        self._callback_error = None
        rank = min(self.comm.allgather(min(self.block_rank.values(), default=self.N)))
        try:
            with tolerance(self.snes, rtol, g_cold), options.used(self.snes):
                self.chord.start(ChordSteps.target(self.snes, start["gnorm"]))
                self.precision.start(self.snes, precision if rank == self.N else None)
                self.precision.ready = self._auto_delta0     # the start's matrix is factored
                self.snes.solve(None, self.x)
        except PETSc.Error as exc:
            if self._callback_error is not None:    # already agreed on by every rank
                raise self._callback_error from exc
            self._agree(exc)
        finally:
            self._g0 = None
            self._stored, self._stored_filled = None, False
        reason = self.snes.getConvergedReason()
        name = reason_name(reason)
        if reason == PETSc.SNES.ConvergedReason.CONVERGED_FNORM_ABS and self.precision.reached:
            name = "CONVERGED_FIELD_PRECISION"
        end = self._state_at(self.x, "G")
        rnorm_end, self.solution_residuals = end["rnorm"], end["r"]
        if reason in _STALLS and self._stalled(g_start):
            reason, name = 1, "CONVERGED_STALLED"
        elif reason in _STALLS and rnorm_end <= self.stall_rtol * self._at_zero():
            # The first stage left the field at the residual's round-off floor (a basis that
            # spans the solution): ‖G‖ cannot fall relative to where it started.
            reason, name = 1, "CONVERGED_AT_FLOOR"
        info = SampleInfo(residual_before=before, residual_after=rnorm_end,
                          iterations=self.snes.getIterationNumber(), reason=name,
                          rank=rank,
                          ridge=self.comm.allreduce(max(self.rho.values(), default=0.0), op=_MAX),
                          time=time.perf_counter() - t0, warm=warm, chord_steps=self.chord.kept,
                          jacobians=self.comm.allreduce(self._assembled() - assembled))
        # The coupling's own cost, the slowest rank's: the solve less its experts' row work.
        info["coupling_time"] = self.comm.allreduce(info.time - self._local_seconds, op=_MAX)
        finite = self.comm.allreduce(bool(np.all(np.isfinite(self.x.getArray(readonly=True)))),
                                     op=_LAND)
        if reason < 0 or not finite:
            raise SolverDivergedError(
                f"coupled mixture: the coupled SNES diverged on sample {sample} ({name}) after "
                f"{info.iterations} iterations{linear_failure(self.snes)}; ||r|| {before:.3e} -> "
                f"{info.residual_after:.3e}. Options prefix {self.prefix!r}.", sample=sample,
                reason=name)
        return self._coefficients(), info

    def _coefficients(self):
        """{k: (w_k, u_k)} for my experts at the current iterate: w_k = T_k c_k, and the
        stitched field on k's submesh."""
        C = self._neighbour_blocks(self.x, self.local, self.scatter, (self.N,))
        out = {}
        for k in self.mine:
            rows = self.rows[k]
            out[k] = (self.T[k] @ C[k][rows.me], rows.expert.g_vec + rows.field(C[k]))
        return out

    def _assembled(self):
        """Sparse Jacobians my experts have assembled so far."""
        return sum(self.rows[k].expert.jacobians_assembled for k in self.mine)

    def _all_mine(self, parts):
        """{k: x} of my experts from ``parts`` if every rank has all of its experts' there, else
        None (the same on every rank). Collective."""
        have = parts is not None and all(parts.get(k) is not None for k in self.mine)
        return {k: parts[k] for k in self.mine} if self.comm.allreduce(have, op=_LAND) else None

    def _cold_gradient_if_warm_is_better(self, lifting_residuals=None):
        """‖G‖ at all coefficients 0 if the start in self.x is lower there (the objective; ‖G‖ in
        Galerkin mode, where SNES drives G to zero), else None: a stale warm start can lie in a
        worse basin of a nonlinear PDE's objective, and the cold ‖G‖ is where a cold solve's
        tolerance is measured from (see :meth:`fem_moe.expert.Expert.
        _cold_gradient_if_warm_is_better`). ``lifting_residuals``: my experts' rows at all
        coefficients 0, if known (Galerkin: ‖G‖ there is then a product with the basis). Collective.
        The start is evaluated last, so that the solve reuses that evaluation."""
        at_zero, g_zero = self._at_zero(gradient=True, residuals=lifting_residuals)
        if self.mode == "lstsq":
            better = self._state_at(self.x, "objective")["objective"] <= 0.5 * at_zero ** 2
        else:
            better = self._state_at(self.x, "G")["gnorm"] <= g_zero
        return g_zero if better else None

    def _at_zero(self, gradient=False, residuals=None):
        """‖r‖ of the lifting alone (all coefficients 0): the residual's scale; with
        ``gradient``, (‖r‖, ‖G‖) there; ``residuals``: the rows there, if known (kept in
        ``lifting_residuals`` either way). Collective."""
        zero = self.x.duplicate()
        zero.zeroEntries()
        state = self._evaluate_residual(zero, residuals)
        self.lifting_residuals = state["r"]
        if gradient:
            self._gradient(state)
            state["G"].destroy()
        self._cache = None
        zero.destroy()
        return (state["rnorm"], state["gnorm"]) if gradient else state["rnorm"]

    def _stalled(self, g_start):
        """The objective at its round-off floor (the experts' rule, see stall_rtol)?"""
        state = self._state_at(self.x, "G")
        g = state["G"]
        if self.mode != "lstsq":
            return g.norm() <= self.stall_rtol * g_start
        self._jacobian(state, exact=False)   # Gauss-Newton: positive definite
        step = g.duplicate()
        self._direct_solve(g, step)
        decrease = 0.5 * g.dot(step)
        step.destroy()
        return decrease <= self.stall_rtol * state["objective"]

    @PETSc.Log.EventDecorator("FemMoeCoupledVJP")
    def vjp(self, w, u_bar, sample=None, data_gradient=True, residuals=None):
        """The IFT backward of one sample (after ``prepare`` with the forward's basis and data).
        w {k: [N]} the forward's coefficients; u_bar {k: [n_sub]} dL/du on k's owned dofs (zero
        elsewhere); ``residuals``: my experts' rows at w if known (the forward's
        ``solution_residuals``; used where every rank has them). The experts' Jacobians at the
        solution stay :meth:`jacobians` until their next assembly. Returns ({k: Phi_bar
        [N, n_sub]}, {k: data_bar [n_data_sub]}), to be summed
        over the experts sharing a dof; with ``data_gradient`` False, each data_bar is None.
        Collective."""
        N = self.N
        self._set_own_blocks(self.x, {k: np.linalg.solve(self.T[k], w[k]) for k in self.mine})
        residuals = self._all_mine(residuals)
        if residuals is not None:
            self._cache = self._evaluate_residual(self.x, residuals)
        state = self._state_at(self.x, "G")
        self._jacobian(state, exact=True, descent=False)     # the exact gradient's matrix
        b = self.x.duplicate()
        own = {k: self.rows[k].own for k in self.mine}
        self._set_own_blocks(b, {k: self.rows[k].Phi_c[:, own[k]] @ u_bar[k][own[k]]
                                 for k in self.mine})
        lam = self.x.duplicate()
        err = None
        try:
            self._direct_solve(b, lam, transpose=True)
        except PETSc.Error as exc:
            err = exc
        if err is None and self._direct.getConvergedReason() < 0:
            err = (f"coupled mixture, sample {sample}: the backward's block-sparse solve failed "
                   f"({self._direct.getConvergedReason()}); options prefix {self.prefix!r}")
        finite = bool(np.all(np.isfinite(lam.getArray(readonly=True))))
        if err is None and not self.comm.allreduce(finite, op=_LAND):
            err = (f"coupled mixture, sample {sample}: the backward's solve gave non-finite values "
                   "(singular reduced Jacobian)")
        self._agree(err)
        Lam = self._neighbour_blocks(lam, self.local, self.scatter, (N,))
        W = self._neighbour_blocks(self.x, self.local, self.scatter, (N,))
        b.destroy(), lam.destroy()
        parts, err = {}, None
        try:
            for k in self.mine:
                parts[k] = self._expert_rows_at(k, state["r"][k], W[k], Lam[k])
        except Exception as exc:     # noqa: BLE001
            err = exc
        self._agree(err)
        if self.mode == "lstsq":
            # s = W r (the state's) and y = W P J z, the rows as the norm weighs them
            # (collective for a norm that couples every row).
            s = state["s"]
            y = self._weigh({k: p["Jz"] for k, p in parts.items()})
        grads, err = {}, None
        try:
            for k in self.mine:
                weighed = (s[k], y[k]) if self.mode == "lstsq" else (None, None)
                grads[k] = self._expert_vjp(k, parts[k], *weighed, u_bar[k], data_gradient)
        except Exception as exc:     # noqa: BLE001
            err = exc
        self._agree(err)
        return {k: g[0] for k, g in grads.items()}, {k: g[1] for k, g in grads.items()}

    def _expert_rows_at(self, k, r, C_nb, Lam_c):
        """Expert k's rows at the solution, with its residual r there and the neighbours' c and
        lam: the Jacobian (the one the solution's state assembled, with the expert's u still
        the solution), the stitched multiplier field z, P J z, and the coefficients and
        multipliers per dof."""
        rows = self.rows[k]
        e = rows.expert
        J = e.jacobian()
        z = rows.field(Lam_c)
        Jz = np.where(e.row_mask, e._matvec(J, z), 0.0) if self.mode == "lstsq" else None
        # w-space coefficients and multipliers per dof (the dof's owner's).
        W = np.einsum("lnm,lm->ln", rows.T_nb, C_nb)[rows.block]          # [n_sub, N]
        Lam = np.einsum("lnm,lm->ln", rows.T_nb, Lam_c)[rows.block]
        return {"r": r, "J": J, "z": z, "Jz": Jz, "W": W, "Lam": Lam}

    def _expert_vjp(self, k, part, s, y, u_bar, data_gradient=True):
        """Expert k's rows' share of (Phi_bar, data_bar), from :meth:`_expert_rows_at` and (lstsq)
        s = W r, y = W P J z. The expert's u must still be the solution's."""
        rows = self.rows[k]
        e = rows.expert
        J, z, W, Lam, r = part["J"], part["z"], part["W"], part["Lam"], part["r"]
        Jt = lambda x: e._matvec(J, x, transpose=True)
        ub = np.where(rows.own, u_bar, 0.0)
        if self.mode == "lstsq":
            q = Jt(y)
            if e.H is not None:
                e._set(e.r_fn, s)
                q = q + e._matvec(e._assemble_hessian(), z)
            Phi_bar = (W * (ub - q)[:, None]).T - (Lam * Jt(s)[:, None]).T
            e._set(e.y_fn, y)
        else:
            z = np.where(e.row_mask, z, 0.0)
            s = r
            Phi_bar = (W * (ub - Jt(z))[:, None]).T - (Lam * r[:, None]).T
        Phi_bar[:, ~e.col_mask] = 0.0
        if not data_gradient:
            return Phi_bar, None
        e._set(e.z_fn, z)
        e._set(e.r_fn, s)
        return Phi_bar, -e._data_derivative()

    def destroy(self):
        if self.mode == "lstsq":
            self._inertia_ksp.destroy()
        for name in ("_inertia_mat", "_inertia_copy"):
            if getattr(self, name, None) is not None:
                getattr(self, name).destroy()
        for obj in (self._direct, self.snes, self.A, self.x, self.G, self._acc, self.local,
                    self.scatter, self.tx, self.tlocal, self.tscatter):
            obj.destroy()
        for rows in self.rows.values():
            rows.destroy()
        if hasattr(self.norm, "destroy"):
            self.norm.destroy()


from mpi4py import MPI  # noqa: E402
_LOR, _LAND, _MAX = MPI.LOR, MPI.LAND, MPI.MAX
_STALLS = (PETSc.SNES.ConvergedReason.DIVERGED_TR_DELTA,
           PETSc.SNES.ConvergedReason.DIVERGED_LINE_SEARCH)
