"""The norms a least-squares reduced problem measures its residual in.

A layer in least-squares mode minimises 1/2 r^T W r over its coefficients, r = P R the assembled
residual's constraint rows (P: the rows the expert is responsible for, never Dirichlet rows) and
W a symmetric positive definite weight on those rows:

* ``"euclidean"``: W = I, the residual's dof vector as the paper's point residuals. It weighs an
  error mode e by ‖A e‖^2 (A the PDE's operator): high frequencies by the square of the stiffness,
  smooth errors barely at all, so the projection keeps the fields' rough parts right and their
  smooth parts wrong (the method page of the docs, *Residual norms*).
* ``"lumped"``: W = D^{-1}, D the diagonal of V's mass matrix: the L2 norm of the strong residual,
  independent of the mesh's grading. Same frequency weighting as the Euclidean norm.
* ``"dual"``: W = (E^T G E)^{-1}, G the H1 Gram matrix of V (grad u . grad v + u . v) and E the
  selection of the constraint rows: the residual's norm in the dual of H1 (with the other rows
  held at zero). For a linear elliptic PDE that is the error's energy norm, which Galerkin
  minimises too: least squares in this norm weighs errors as Galerkin does, and keeps least
  squares' minimiser for any basis (Galerkin's reduced equations can have no root). On the global
  layer the rows are all non-Dirichlet rows, so W is the whole mesh's dual norm. The coupled
  mixture takes the whole mesh's too (:class:`WholeMesh`), at the price of a dense reduced
  matrix (K N x K N); hence K < 16 only.
* ``"dual_blocks"`` (mixtures): each expert's rows in their own dual norm, W block diagonal over
  the experts (the one-level additive Schwarz preconditioner's blocks, :class:`ExpertBlocks`): the
  coupled problem keeps its block sparsity, for any K. It weighs smooth modes better than the
  Euclidean norm by about the ratio of subdomain to cell size, not as well as the whole mesh's dual
  norm (``benchmarks/studies/mode_norm_study.py``). On one set of rows (the global layer, an
  independent expert) it is "dual".

Applying W costs one solve with E^T G E per vector (its KSP: options prefix ``<prefix>riesz_``,
e.g. ``-fem_moe_riesz_ksp_type cg -fem_moe_riesz_pc_type gamg``; by default LU, factored once,
up to 2e5 rows, CG + GAMG to a 1e-12 relative tolerance past that: see
:data:`DEFAULT_RIESZ_PARAMETERS`).
"""
import numpy as np
import firedrake as fd
from firedrake.petsc import PETSc

from . import options
from .errors import InputError, SolverDivergedError

__all__ = ["NORMS", "check_norm", "RowNorm", "DEFAULT_RIESZ_PARAMETERS"]

NORMS = ("euclidean", "lumped", "dual", "dual_blocks")

#: The Riesz solve's defaults (options prefix ``<prefix>riesz_``): a direct solve, factored once,
#: up to :data:`DIRECT_RIESZ_ROWS` rows; past that conjugate gradients with PETSc's algebraic
#: multigrid, to a tolerance at which the objective and its gradient agree to round-off (the Gram
#: matrix is SPD and well conditioned: a handful of iterations). Which factorisation, by
#: measurement (``benchmarks/studies/riesz_solve.py``): up to
#: :data:`BLOCKED_RIESZ_ROWS` rows MUMPS, which solves the N columns of W J Phi as one block
#: (4-5 ms against 11-17 ms for 16 columns one by one with PETSc's LU, 6060 rows); past that
#: PETSc's own LU, whose solves cost 4 ms where MUMPS's cost 30 ms (103,525 rows; 16 columns:
#: 61-72 ms against 73-149 ms), on several ranks redundantly (each rank factors the whole Gram
#: matrix, as PCREDUNDANT does, and solves its share of a block's columns: :class:`SplitColumns`).
#: Measured by benchmarks/studies/riesz_solve.py.
DEFAULT_RIESZ_PARAMETERS = {"ksp_type": "preonly", "pc_type": "lu"}
#: One rank's vectors when the blocks are MUMPS's (options prefix ``<prefix>riesz_vector_``).
VECTOR_RIESZ_PARAMETERS = {"ksp_type": "preonly", "pc_type": "lu",
                           "pc_factor_mat_solver_type": "petsc"}
REDUNDANT_RIESZ_PARAMETERS = {"ksp_type": "preonly", "pc_type": "redundant",
                              "redundant_pc_type": "lu"}
ITERATIVE_RIESZ_PARAMETERS = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-12,
                              "ksp_atol": 0.0, "ksp_max_it": 500}
DIRECT_RIESZ_ROWS = 200_000
BLOCKED_RIESZ_ROWS = 20_000


def _riesz_parameters(rows, ranks):
    """The Riesz KSP's default options for a Gram matrix of ``rows`` rows on ``ranks`` ranks."""
    if rows > DIRECT_RIESZ_ROWS:
        return dict(ITERATIVE_RIESZ_PARAMETERS)
    if rows <= BLOCKED_RIESZ_ROWS and PETSc.Sys.hasExternalPackage("mumps"):
        return {**DEFAULT_RIESZ_PARAMETERS, "pc_factor_mat_solver_type": "mumps"}
    if ranks > 1:
        return dict(REDUNDANT_RIESZ_PARAMETERS)
    return dict(DEFAULT_RIESZ_PARAMETERS)


def check_norm(norm, mode="lstsq", default="dual"):
    """The norm's canonical name ("l2" is "euclidean"; None: ``default`` in least squares, where the
    layers choose the dual norm by measurement (the decisions page), "euclidean" in Galerkin mode);
    InputError for an unknown one, or for a weighted norm in Galerkin mode (whose test functions are
    the basis: no norm enters)."""
    if norm is None:
        norm = default if mode == "lstsq" else "euclidean"
    norm = "euclidean" if norm == "l2" else norm
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    if mode == "galerkin" and norm != "euclidean":
        raise InputError(f"norm={norm!r} applies to least squares; the Galerkin mode has none")
    return norm


def _lumped_mass(V):
    """The diagonal of V's mass matrix (owned dofs): positive for P1 and P2 alike."""
    mass = fd.assemble(fd.inner(fd.TrialFunction(V), fd.TestFunction(V)) * fd.dx,
                       mat_type="aij").petscmat
    diag = mass.getDiagonal().getArray(readonly=True).copy()
    mass.destroy()
    return diag


def _h1_gram(V):
    """The H1 Gram matrix of V (no boundary conditions), a PETSc aij matrix on V's comm."""
    u, v = fd.TrialFunction(V), fd.TestFunction(V)
    return fd.assemble((fd.inner(fd.grad(u), fd.grad(v)) + fd.inner(u, v)) * fd.dx,
                       mat_type="aij").petscmat


class RowNorm:
    """The weight W of a residual norm on a space's constraint rows: ``weigh(x)`` = W x for x
    [n] or [n, M] (owned dofs; zero off the rows, and ignoring x there).

    ``space``: the function space; ``rows`` [n owned] bool: the constraint rows; ``norm``: one of
    :data:`NORMS`; ``options_prefix``: the dual norm's Riesz KSP takes its options under
    ``<options_prefix>`` (a petsctools options manager; ``shared``: the shared option set
    ``options_prefix`` belongs to, see :mod:`fem_moe.options`).
    Collective over the space's communicator (construction and ``weigh``)."""

    def __init__(self, space, rows, norm, options_prefix="fem_moe_riesz_", shared=None):
        self.norm = check_norm(norm)
        self.rows = np.asarray(rows, dtype=bool)
        self._diag, self._ksp, self._split, self._vector_ksp = None, None, None, None
        # Work vectors, dense blocks and whether a block of columns goes to one KSPMatSolve:
        # for the non-split Riesz solvers only (SplitColumns has its own).
        self._x = self._y = None
        self._dense, self._blocked = {}, False
        if self.norm == "euclidean":
            self._diag = self.rows.astype(np.float64)
        elif self.norm == "lumped":
            self._diag = np.where(self.rows, 1.0 / _lumped_mass(space), 0.0)
        else:     # "dual", or "dual_blocks": the same on one set of rows
            G = _h1_gram(space)
            start = G.getOwnershipRange()[0]
            comm = G.getComm()
            selected = (start + np.flatnonzero(self.rows)).astype(PETSc.IntType)
            idx = PETSc.IS().createGeneral(selected, comm=comm)
            self._G = G.createSubMatrix(idx, idx)
            G.destroy(), idx.destroy()
            prefix = options_prefix
            ksp = PETSc.KSP().create(comm=comm)
            ksp.setOperators(self._G)
            options.set_up(ksp, prefix, _riesz_parameters(self._G.getSize()[0], comm.size),
                           shared=shared)
            self._ksp, self.options_prefix = ksp, prefix
            if ksp.getPC().getType() == "redundant":
                # PCREDUNDANT's layout, but a block's columns shared out among the ranks (and
                # the inner solver's failures seen: an outer preonly KSP does not report them).
                self._split = SplitColumns(self._G, prefix, options.parameters(ksp))
            else:
                with options.used(ksp):
                    ksp.setUp()
                if comm.size == 1 and _factor_package(ksp.getPC()) == "mumps":
                    # MUMPS solves a block of columns fast, one vector slowly (3.6 ms at 16641
                    # rows where PETSc's LU takes 0.5 ms): vectors get PETSc's own LU.
                    self._vector_ksp = PETSc.KSP().create(comm=comm)
                    self._vector_ksp.setOperators(self._G)
                    options.set_up(self._vector_ksp, prefix + "vector_", VECTOR_RIESZ_PARAMETERS)
                    with options.used(self._vector_ksp):
                        self._vector_ksp.setUp()
                # PETSc's own LU solves a KSPMatSolve's columns one by one, slower than
                # separate solves (19 ms against 11 ms, 16 columns of 6060 rows): then weigh
                # loops over the columns itself.
                self._blocked = _factor_package(ksp.getPC()) != "petsc"
                self._x, self._y = self._G.createVecs()

    @property
    def diagonal(self):
        """W's diagonal if W is diagonal (Euclidean, lumped), else None."""
        return self._diag

    def weigh(self, x):
        """W x: x [n] or [n, M] float64 (owned dofs) -> the same shape. Collective."""
        x = np.asarray(x, dtype=np.float64)
        if self._diag is not None:
            return self._diag[:, None] * x if x.ndim == 2 else self._diag * x
        out = np.zeros_like(x)
        if self._split is not None:
            out[self.rows] = self._split.solve(x[self.rows])
            return out
        if x.ndim == 1:
            ksp = self._vector_ksp or self._ksp
            self._x.setArray(x[self.rows])
            with options.used(ksp):
                ksp.solve(self._x, self._y)
            _raise_if_failed(ksp.getConvergedReason(), ksp.getOptionsPrefix())
            out[self.rows] = self._y.getArray(readonly=True)
            return out
        if not self._blocked:
            for j in range(x.shape[1]):
                out[:, j] = self.weigh(x[:, j])
            return out
        # All columns in one KSPMatSolve: one forward/back substitution sweep for a direct
        # solver (MUMPS takes the columns as a block), block Krylov otherwise.
        B, X = self._blocks(x.shape[1])
        B.getDenseArray()[:] = x[self.rows]
        B.assemble()
        with options.used(self._ksp):
            self._ksp.matSolve(B, X)
        _raise_if_failed(self._ksp.getConvergedReason(), self.options_prefix)
        out[self.rows] = X.getDenseArray()
        return out

    def _blocks(self, m):
        """Dense right-hand side and solution matrices with m columns, made once per m."""
        if m not in self._dense:
            rows = self._G.getLocalSize()[0]
            B = PETSc.Mat().createDense(((rows, None), (None, m)), comm=self._G.getComm())
            B.setUp()
            B.assemble()
            self._dense[m] = (B, B.duplicate())
        return self._dense[m]

    def destroy(self):
        if self._ksp is not None:
            for obj in (self._ksp, self._G, self._x, self._y,
                        *(m for pair in self._dense.values() for m in pair)):
                if obj is not None:
                    obj.destroy()
            for solver in (self._split, self._vector_ksp):
                if solver is not None:
                    solver.destroy()
            self._ksp = None


class SplitColumns:
    """The Riesz solve laid out as PCREDUNDANT lays it out — every rank holds the whole Gram
    matrix and factors it itself (options under ``<prefix>redundant_``, as PCREDUNDANT's inner
    solver takes them) — except that the columns of a block are shared out among the ranks
    instead of every rank solving every column: P ranks solve a Gauss-Newton matrix's N columns
    in the time of N / P solves, at the price of sending each rank its columns of every row and the
    solved rows back. A vector is solved by every rank, as PCREDUNDANT does.

    ``G``: the Gram matrix on the rows (distributed); ``parameters``: the outer Riesz KSP's
    options (its ``redundant_*`` ones are this solver's). Collective over G's communicator."""

    def __init__(self, G, prefix, parameters):
        self.comm = G.getComm().tompi4py()
        self.rows = np.array(self.comm.allgather(G.getLocalSize()[0]))
        self.start = int(self.rows[:self.comm.rank].sum())
        self._G = G.getRedundantMatrix(self.comm.size)         # the whole matrix, COMM_SELF
        ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
        ksp.setOperators(self._G)
        inner = {key[len("redundant_"):]: value for key, value in parameters.items()
                 if key.startswith("redundant_")}
        options.set_up(ksp, prefix + "redundant_", {"ksp_type": "preonly", "pc_type": "lu"}, inner)
        with options.used(ksp):
            ksp.setUp()
        self._ksp, self.prefix = ksp, prefix
        self._x, self._y = self._G.createVecs()

    def solve(self, b):
        """G^-1 b for this rank's rows b [n_local] or [n_local, M] -> the same shape. Collective."""
        if b.ndim == 1:
            B = self._allgather(np.ascontiguousarray(b), self.rows).reshape(-1, 1)
            return self._columns(B)[self.start:self.start + len(b), 0]
        # Rank r solves columns bounds[r]:bounds[r+1] of every row: each rank sends each other
        # rank those columns of its rows, and gets its rows of every column back.
        M, P = b.shape[1], self.comm.size
        bounds = np.linspace(0, M, P + 1).astype(int)
        width = np.diff(bounds)
        send = np.concatenate([b[:, bounds[r]:bounds[r + 1]].ravel() for r in range(P)])
        mine = self._alltoall(send, len(b) * width, self.rows * width[self.comm.rank])
        Y = self._columns(mine.reshape(-1, width[self.comm.rank]))        # [n_total, my columns]
        ends = np.cumsum(self.rows)
        send = np.concatenate([Y[e - n:e].ravel() for e, n in zip(ends, self.rows)])
        back = self._alltoall(send, self.rows * width[self.comm.rank], len(b) * width)
        parts = np.split(back, np.cumsum(len(b) * width)[:-1])
        return np.hstack([part.reshape(len(b), w) for part, w in zip(parts, width)])

    def _columns(self, B):
        """Solve each column of B [n_total, m] with this rank's factorisation; a failure on any
        rank raises SolverDivergedError on every rank."""
        Y = np.empty_like(B)
        worst = 0
        with options.used(self._ksp):
            for j in range(B.shape[1]):
                self._x.setArray(B[:, j])
                self._ksp.solve(self._x, self._y)
                worst = min(worst, self._ksp.getConvergedReason())
                Y[:, j] = self._y.getArray(readonly=True)
        _raise_if_failed(self.comm.allreduce(worst, op=MPI.MIN), self.prefix + "redundant_")
        return Y

    def _alltoall(self, send, send_counts, recv_counts):
        recv = np.empty(int(np.sum(recv_counts)))
        self.comm.Alltoallv([send, send_counts, _offsets(send_counts), MPI.DOUBLE],
                            [recv, recv_counts, _offsets(recv_counts), MPI.DOUBLE])
        return recv

    def _allgather(self, local, counts):
        out = np.empty(int(np.sum(counts)))
        self.comm.Allgatherv(local.ravel(), [out, counts, _offsets(counts), MPI.DOUBLE])
        return out

    def destroy(self):
        for obj in (self._ksp, self._G, self._x, self._y):
            obj.destroy()


def _factor_package(pc):
    """The factorisation package of a factorising PC (None for any other)."""
    return pc.getFactorSolverType() if pc.getType() in ("lu", "cholesky") else None


def _offsets(counts):
    """Displacements of consecutive blocks of ``counts`` entries (MPI's v-collectives)."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]])


def _raise_if_failed(reason, prefix):
    """SolverDivergedError naming the Riesz solve's options prefix if KSP ``reason`` < 0."""
    if reason < 0:
        from .expert import reason_name
        name = reason_name(reason, PETSc.KSP.ConvergedReason)
        raise SolverDivergedError(f"the dual norm's Riesz solve (options prefix {prefix!r}) "
                                  f"failed: {name}", reason=name)


class ExpertBlocks:
    """The coupled mixture's W, block diagonal over the experts: each expert weighs the rows
    it owns with its own :class:`RowNorm` (Euclidean, lumped, or the dual norm of its rows,
    "dual_blocks"). The coupled problem keeps the block sparsity of its rows. Local."""
    couples_all = False

    def __init__(self, rows):
        self.rows = rows

    def weigh(self, arrays):
        """{k: x_k [n_sub] or [n_sub, M]} -> {k: W_k x_k} for this rank's experts."""
        return {k: self.rows[k].expert.weigh(x) for k, x in arrays.items()}


class WholeMesh:
    """The coupled mixture's W for ``norm="dual"``: the whole mesh's H1-dual norm over every
    expert's rows at once, so that the coupled least squares weighs errors as the global layer's
    dual norm (and Galerkin) do. W couples every row with every other: the coupled reduced
    matrix is dense (K N x K N, each rank holding its experts' block rows), and each
    Gauss-Newton matrix costs one Riesz solve with K N right-hand sides on the whole mesh.

    ``plan``: the mixture's exchange plan (the whole mesh's owned dofs <-> the experts' submesh
    dofs); ``space``: the whole mesh's space; ``rows``: its constraint rows (owned dofs, bool);
    ``own``: {k: bool [n_sub]}, the rows expert k owns (each row owned once). Collective over
    the mesh communicator (``weigh``)."""
    couples_all = True

    def __init__(self, plan, space, rows, own, options_prefix):
        self.plan, self.own = plan, own
        self.norm = RowNorm(space, rows, "dual", options_prefix=options_prefix + "riesz_")

    def weigh(self, arrays):
        """{k: x_k [n_sub] or [n_sub, M]} (every expert of this rank) -> {k: (W x)_k}, on the
        rows k owns. Collective."""
        vector = next(iter(arrays.values())).ndim == 1 if arrays else False
        vector = self.plan.comm.allreduce(vector, op=_LOR)
        cols = {k: np.where(self.own[k][:, None], x.reshape(len(x), -1), 0.0)
                for k, x in arrays.items()}
        M = self.plan.comm.allreduce(max((c.shape[1] for c in cols.values()), default=0), op=_MAX)
        whole = self.plan.gather_sum(cols, M)
        back = self.plan.scatter(self.norm.weigh(whole))
        out = {k: np.where(self.own[k][:, None], back[k], 0.0) for k in arrays}
        return {k: y[:, 0] for k, y in out.items()} if vector else out

    def destroy(self):
        self.norm.destroy()


from mpi4py import MPI  # noqa: E402
_LOR, _MAX = MPI.LOR, MPI.MAX
