"""One expert: the reduced (N x N) constrained solve on a function space, and its IFT backward.

Given basis fields Phi (N x n dof vectors) and data m, the expert finds w in R^N such that
u = g + Phi^T w satisfies the PDE in the chosen sense, on the residual rows it is responsible for:

* ``"lstsq"`` (the paper's choice): w = argmin 1/2 ‖r(w)‖^2, r = P R(g + Phi^T w; m), with P
  the selection of the expert's residual rows (all non-Dirichlet rows for the global layer). The
  reduced equations are G(w) = Phi J^T r + rho w = 0, J = dR/du.
* ``"galerkin"``: G(w) = Phi P R(g + Phi^T w; m) + rho w = 0.

rho is 0 unless the basis is rank deficient (see ``on_rank_deficient``).

In least squares, ‖r‖^2 is r^T W r with W the norm's weight on the constraint rows
(:mod:`fem_moe.norms`: the H1-dual norm by default; the Euclidean norm of the dof vector, as the
paper measures its residual at collocation points; the lumped-mass norm); the formulas below are
written for W = I, and W enters wherever a residual row is weighed (s = W r in place of r, W J Phi^T
in place of J Phi^T). Every derivative below is UFL's symbolic derivative of the user's residual
form, assembled by Firedrake (the same machinery pyadjoint's solve blocks use):

* Jacobian of G (SNES and IFT):  lstsq  (J Phi^T)^T P (J Phi^T) + Phi H_r Phi^T + rho I, with
  H_r = d^2/du^2 <r, R(u)> at fixed r (the second-order term: the gradient is exact, not
  Gauss-Newton); galerkin  Phi P J Phi^T + rho I.
* Backward (implicit function theorem): given u_bar = dL/du, solve A^T lam = Phi u_bar (one N x N
  solve), z = Phi^T lam, then  Phi_bar = w (x) u_bar - d<lam, G>/dPhi,  m_bar = -d<lam, G>/dm,
  where <lam, G> = <r, J z> (lstsq) or <z, P R> (galerkin) is a scalar form differentiated by UFL.

Tensors here are numpy float64 arrays of this rank's owned dofs. For a distributed space (the
global layer under mpirun) the reduced SNES is one solver on the mesh communicator: the reduced
quantities (N-vectors, N x N matrices) are summed over it, and the coefficients live on its
rank 0.
"""
import contextlib
import logging
import time
import warnings

import numpy as np
import firedrake as fd
import ufl
from firedrake.assemble import get_assembler
from firedrake.petsc import PETSc
from mpi4py import MPI
from ufl.algorithms import expand_derivatives

from .errors import InputError, RankDeficientBasisWarning, SolverDivergedError
from . import options
from .norms import NORMS, RowNorm, check_norm
from .options import shared_set
from .problem import owned_size, owned_values, set_owned_values, subspaces

__all__ = ["Expert", "DEFAULT_SOLVER_PARAMETERS", "SampleInfo", "dirichlet_dofs", "NORMS",
           "reduced_solver_defaults"]

#: Defaults of the reduced SNES: trust-region Newton on the objective 1/2 ‖r‖^2 (in lstsq mode),
#: Gauss-Newton Jacobians far from the solution and the exact Hessian near it (Levenberg-Marquardt
#: damping where the Hessian is not positive definite), dense LU. Chosen by measurement over random
#: bases, K = 1, 2, 3, P1/P2: line searches (bt, l2, cp) either stall at the objective's round-off
#: floor or accept increases on these polynomial objectives; the trust region did neither.
DEFAULT_SOLVER_PARAMETERS = {
    "snes_type": "newtontr",
    "snes_rtol": 1e-12,
    "snes_atol": 1e-13,
    "snes_stol": 0.0,
    "snes_max_it": 100,
    # fem_moe's own option: Gauss-Newton Jacobians until ‖G‖ falls below this times ‖G(w0)‖ or
    # Gauss-Newton stalls (0: the exact Hessian throughout). Measured over 216 random reduced
    # problems: 0 failures and 6.75 mean iterations, against 2 failures and 6.97 with 0.
    "gauss_newton_rtol": 1e-3,
    # fem_moe's own option: a trust region that collapses (DIVERGED_TR_DELTA) where the Newton
    # step could lower the objective 1/2 ‖r‖^2 by at most this fraction of it (the predicted
    # decrease 1/2 G^T A^-1 G, A the Hessian or, where that is not positive definite, the
    # Gauss-Newton matrix) is accepted as converged, reason "CONVERGED_STALLED": the objective's
    # round-off floor, where ‖G‖ <= rtol ‖G(w0)‖ is out of reach. Galerkin mode: ‖G‖ below this
    # times ‖G(w0)‖.
    "stall_rtol": 1e-10,
    "ksp_type": "preonly",
    "pc_type": "lu",
    # A rejected step halves the trust region (PETSc's default quarters it). The first Gauss-Newton
    # step on these quartic objectives often overshoots by a little; quartered twice, the region
    # took several doubling steps to grow back. Measured (benchmarks/studies/reduced_solves.py): 108
    # random reduced problems (global, K = 2, 3; P1/P2; two source scales) 8.12 -> 7.27 iterations,
    # no failures either way; moe_scaling at 103041 dofs 9.5 -> 7 (K = 1), 11.5 -> 8 (K = 2).
    "snes_tr_t1": 0.5,
    # fem_moe's own option (Galerkin mode): keep the reduced Jacobian of an earlier iterate (a chord
    # step) while the last step cut ‖G‖ by at least this factor; 0: a new Jacobian at every iterate
    # (Newton). There G needs the residual alone, the Jacobian a sparse matrix assembly ~3x the
    # residual's, and warm-started training solves start where chord steps contract as fast as
    # Newton's (benchmarks/training_step.py --profile). The backward always assembles its own.
    "chord_contraction": 0.01,
}


def reduced_solver_defaults(mode, base=DEFAULT_SOLVER_PARAMETERS):
    """``base`` for a reduced SNES in ``mode``. Least squares (a symmetric positive definite
    model matrix, fem_moe's descent guard) solves its steps with CG preconditioned by the
    factorisation: one iteration, the same step as ``preonly``, but PETSc's trust region learns
    from CG (KSP_CONVERGED_STEP_LENGTH) when a step was cut back to the region's boundary, and
    only then ever enlarges the region. With ``preonly`` a region that shrank once never grew
    again, and the solves crawled at its radius (benchmarks/moe_scaling.py)."""
    params = dict(base)
    if mode == "lstsq" and params.get("ksp_type") == "preonly":
        params["ksp_type"] = "cg"
    return params


# Basis Gram matrix eigenvalue ratio below which a basis counts as rank deficient.
RANK_TOL = 1e-12

#: The ridge factor of the paper's objective (``ridge_always``: its 1e-4 w term).
PAPER_RIDGE = 1e-4
#: The ridge factor where a basis turns rank deficient (and ``ridge_always`` is off): just enough
#: to fix the free directions. With the paper's 1e-4 the ridge moved the solution: training on
#: diffusion-sorption (coupled K = 4, whole-mesh dual norm) went from 1.4 % to 15 % validation
#: error in one step when an expert's block basis crossed RANK_TOL — the residual 4.6x higher
#: under the ridge, the backward holding the ridge fixed, and training never left (test error
#: 0.177); with 1e-10 the same run ends at 0.012 (benchmarks/studies/mode_norm_study.py).
RANK_DEFICIENT_RIDGE = 1e-10


def ridge_factor(ridge, ridge_always):
    """The ridge factor asked for, or by default the paper's with ``ridge_always`` and
    RANK_DEFICIENT_RIDGE without."""
    if ridge is not None:
        return float(ridge)
    return PAPER_RIDGE if ridge_always else RANK_DEFICIENT_RIDGE


def fit_coefficients(gram, projected):
    """The coefficients w [N] of the combination of N basis fields Phi [N, n] (zero on the
    Dirichlet dofs) nearest a field f in the dof inner product, from the basis's Gram matrix
    ``gram`` = Phi Phi^T and ``projected`` = Phi f (both summed over the ranks sharing the
    dofs): the normal equations, least squares where the basis is rank deficient.

    This is how a warm start survives a change of basis: a sample's last coefficients belong
    to the basis of its last visit, and once the optimiser has moved the basis they start
    further from the solution than w = 0 does (measured on diffusion-sorption at 103,525 dofs,
    Galerkin: every stored start was refused); the last *solution* fitted by today's basis
    starts 2-3 orders of magnitude closer than w = 0 in ‖G‖ (benchmarks/training_step.py)."""
    return np.linalg.lstsq(gram, projected, rcond=None)[0]


def orthonormal_coordinates(gram):
    """(T, rank) for the Gram matrix [N, N] of N basis fields: its numerical rank (eigenvalues
    above RANK_TOL times the largest) and, at full rank, T = V diag(eig)^-1/2, so that w = T c
    maps coefficients c of the orthonormalised basis to the basis's own (the identity below
    full rank)."""
    eig, vec = np.linalg.eigh(gram)
    top = max(eig[-1], 0.0)
    rank = int(np.sum(eig > RANK_TOL * top)) if top > 0 else 0
    return (vec / np.sqrt(eig) if rank == len(eig) else np.eye(len(eig))), rank


def gauss_newton_is_done(norm, g0, last, rtol):
    """The switch from Gauss-Newton to the exact Hessian: ‖G‖ <= rtol ‖G0‖, or Gauss-Newton
    stalls (‖G‖ fell by less than half since the last Jacobian)."""
    return norm <= rtol * g0 or (last is not None and norm > 0.5 * last)


class ChordSteps:
    """Whether a Galerkin solve's SNES may keep the reduced Jacobian it has (the matrix of an
    earlier iterate of the same solve) at a new iterate: while each step cuts ‖G‖ by at least
    ``contraction`` (0: never, Newton's method), and, near the end, while the last step's rate
    reaches the solve's tolerance in at most ``CHORD_FINISH`` more steps (at most half ‖G‖ each):
    a chord step costs a residual, a new Jacobian a sparse assembly (~3-4 residuals at
    diffusion-sorption's paper size) and a step after it. :meth:`start` before each solve (a
    new basis, or sample: no matrix yet), with the ‖G‖ where SNES will stop; :meth:`keep` at
    each SNES Jacobian request, with ‖G‖ at the iterate (the same on every rank, so every rank
    decides alike)."""

    def __init__(self, contraction):
        self.contraction = float(contraction)
        self.start()

    @classmethod
    def of(cls, snes, mode):
        """From the solver's ``chord_contraction`` option in Galerkin mode (least squares needs
        the Jacobian for G itself: never)."""
        return cls(options.parameter(snes, "chord_contraction", 0.0) if mode == "galerkin" else 0.0)

    @staticmethod
    def target(snes, gnorm0):
        """The ‖G‖ at which ``snes`` stops (its tolerances, as set for the solve), from ‖G‖ at its
        first iterate."""
        rtol, atol = snes.getTolerances()[:2]
        return max(atol, rtol * gnorm0)

    def start(self, target=0.0):
        self._last, self._target = None, float(target)
        self.kept = 0

    def keep(self, gnorm):
        last, self._last = self._last, float(gnorm)
        keep = self.contraction > 0 and last is not None and (
            gnorm <= self.contraction * last or self._finishes(gnorm / last if last else 1.0,
                                                               gnorm))
        self.kept += keep
        return keep

    def _finishes(self, rate, gnorm):
        if not 0.0 < rate <= 0.5 or self._target <= 0.0 or gnorm <= self._target:
            return False
        return np.log(self._target / gnorm) / np.log(rate) <= CHORD_FINISH


#: Chord steps a Galerkin solve may still take at its last rate to reach its tolerance rather
#: than assemble a new Jacobian (:class:`ChordSteps`): about what a new Jacobian costs in
#: residuals (3-4 at diffusion-sorption's paper size, 2 ranks) and the step after it. Measured
#: there, warm starts from the stored Jacobian: ‖G‖ 3e-5 -> 1e-8 -> 6e-11 -> 9e-13 -> the
#: tolerance 7e-15, or 1e-4 -> 5e-8 -> 1.3e-9 (rate 2.4e-2, 3.2 more steps): the rates miss
#: the contraction 1e-2 by a little near the end, where a new Jacobian buys one step.
CHORD_FINISH = 4


class PrecisionStop:
    """Where a solve's field is delivered coarser than it is solved (a float32 output of a
    float64 solve: relative precision eps = 1.2e-7), SNES stops at the first iterate from which
    its next step -- the one the reduced Jacobian it holds would take -- changes the field by
    less than ``eps`` times the field (u - g, both in the dof l2 norm): the steps after it would
    not move the delivered field past its last bits. Measured at diffusion-sorption's paper size
    (benchmarks/training_step.py): the warm-started chord steps went 4e-3 -> 1e-6 -> 9e-9 ->
    1e-10 -> 1e-12 in ‖G‖ relative to the cold start's, and the last one or two of them only
    refined digits a float32 output drops. The stop passes SNES's absolute tolerance at that
    iterate (:meth:`at`, from the function callback), so SNES's own tests and bookkeeping stay;
    the solve then reports ``CONVERGED_FIELD_PRECISION``. :meth:`start` per solve (after its
    tolerances are set); ``ready`` once the SNES holds a reduced Jacobian to predict steps with."""

    def start(self, snes, precision=None):
        self.eps = float(precision) if precision else 0.0
        self.ready = self.reached = False
        self._snes, self._atol = snes, snes.getTolerances()[1]

    @property
    def active(self):
        """Whether :meth:`at` should be called (the caller's step prediction is worth making)."""
        return self.eps > 0 and self.ready

    def at(self, gnorm, step_norm, field_norm):
        """At an iterate with SNES function norm ``gnorm`` whose next step changes the field by
        ``step_norm``, the field's own norm being ``field_norm``."""
        self.reached = bool(step_norm <= self.eps * field_norm)
        # Strictly above ‖G‖, which SNES compares with "<".
        self._snes.setTolerances(atol=max(self._atol, 2.0 * gnorm) if self.reached else self._atol)


def _is_zero(form):
    return expand_derivatives(form).empty()


class SampleInfo(dict):
    """Diagnostics of one sample's reduced solve: ``residual_before``/``residual_after`` (‖r‖
    at w0 and at the solution), ``iterations``, ``reason`` (PETSc converged reason name),
    ``rank`` (numerical rank of the basis), ``ridge`` (rho), ``time`` (seconds), ``warm``
    (started from a given w0), ``chord_steps`` (iterations that kept an earlier iterate's
    reduced Jacobian: :class:`ChordSteps`), ``jacobians`` (sparse Jacobians assembled: 0
    where a stored one served, see ``jacobian`` of :meth:`Expert.solve`); a coupled solve's
    also ``coupling_time``: its time
    less its experts' own row work (assemblies, Riesz solves, dense products), the slowest
    rank's."""
    __getattr__ = dict.__getitem__


class Expert:
    """The reduced solve on one function space, for one set of residual rows.

    Parameters
    ----------
    problem : ConstrainedProblem
        Its ``V`` is the space the expert works on (the whole mesh, or a subdomain submesh).
    n_basis : int
        N, the number of basis fields.
    mode : "lstsq" or "galerkin"
        The reduced problem: least squares or Galerkin (the module's docstring).
    row_mask : bool array [n_dofs], optional
        The residual rows this expert is responsible for (owned dofs of its subdomain). Dirichlet
        rows are always excluded. Default: every owned row.
    on_rank_deficient : "ridge" or "raise"
        A rank-deficient basis either gets the ridge rho = ``ridge`` times the mean diagonal of
        the Gauss-Newton matrix at w = 0 (warned, recorded in the diagnostics) or raises.
        ``ridge`` defaults to RANK_DEFICIENT_RIDGE (1e-10), or the paper's 1e-4 with
        ``ridge_always`` (:func:`ridge_factor`).
    ridge_always : bool
        Add that ridge to every solve, as the paper's objective does (its 1e-4 w term): w is then
        unique even where the constraint rows leave directions free (an expert whose subdomain
        holds no boundary or initial values), so SNES converges and the backbone, through the
        training loss, decides those directions. The backward holds rho fixed.
    expert_id : int or None
        Named in error messages.
    dirichlet : (bool array [n_dofs], float array [n_dofs]), optional
        Dirichlet dofs and the lifting g, given instead of being derived from ``problem.bcs``
        (experts on a subdomain mesh take them from the global problem).
    norm : str, optional
        Least squares' residual norm (:mod:`fem_moe.norms`; default "dual"; Galerkin mode has
        none).
    options_prefix : str, optional
        The SNES's options prefix (default ``problem.options_prefix``); the dual norm's Riesz
        KSP takes ``<options_prefix>riesz_``.
    option_set : (str, list), optional
        (base, endings): the expert is one of the solvers with prefixes ``<base><ending>_``
        (``options_prefix`` among them), which share the options given under ``<base>``
        (``-expert_snes_monitor`` for every ``expert_<k>_``; see :mod:`fem_moe.options`); their
        Riesz KSPs are ``<base>riesz_<ending>_``, sharing ``<base>riesz_``.

    Collective over ``problem.comm`` (construction, ``solve``, ``vjp``).
    """

    def __init__(self, problem, n_basis, mode="lstsq", row_mask=None, on_rank_deficient="ridge",
                 ridge=None, expert_id=None, dirichlet=None, options_prefix=None,
                 ridge_always=False, norm=None, option_set=None):
        if mode not in ("lstsq", "galerkin"):
            raise InputError(f"mode must be 'lstsq' or 'galerkin', got {mode!r}")
        norm = check_norm(norm, mode)
        if on_rank_deficient not in ("ridge", "raise"):
            raise InputError("on_rank_deficient must be 'ridge' or 'raise', got "
                             f"{on_rank_deficient!r}")
        if int(n_basis) < 1:
            raise InputError(f"n_basis must be a positive integer, got {n_basis}")
        self.problem, self.mode, self.N = problem, mode, int(n_basis)
        self.ridge_always = bool(ridge_always)
        self.on_rank_deficient, self.expert_id = on_rank_deficient, expert_id
        self.ridge_factor = ridge_factor(ridge, self.ridge_always)
        V = problem.V
        self.comm = problem.comm
        self.n = problem.n_dofs

        # Coefficients, built once: forms (and their compiled kernels) are reused by every sample.
        self.u = fd.Function(V, name="u")
        self.r_fn = fd.Function(V, name="r")      # the masked residual, as coefficients
        self.z_fn = fd.Function(V, name="z")      # Phi^T lam
        self.y_fn = fd.Function(V, name="y")      # P J z
        self.m = tuple(fd.Function(Vd, name=f"m{k}") for k, Vd in enumerate(problem.data_spaces))
        v = fd.TestFunction(V)
        self.F = problem.residual(self.u, v, self.m)
        self._quadrature = residual_quadrature_degree(self.F)
        self.dF = fd.derivative(self.F, self.u)
        F_r = ufl.replace(self.F, {v: self.r_fn})                       # <r, R(u)>
        self.JT_r = fd.derivative(F_r, self.u)                           # J^T r, a 1-form
        H = fd.derivative(fd.derivative(F_r, self.u), self.u)
        self.H = None if _is_zero(H) else H
        if mode == "lstsq":
            lam_G = fd.derivative(F_r, self.u, self.z_fn) + ufl.replace(self.F, {v: self.y_fn})
        else:
            lam_G = ufl.replace(self.F, {v: self.z_fn})
        self.dm_forms = []
        for mk in self.m:
            form = fd.derivative(lam_G, mk)
            self.dm_forms.append(None if _is_zero(form) else form)

        # Lifting g and the masks of Dirichlet dofs (columns of Phi) and residual rows.
        if dirichlet is None:
            self.bc_mask, self.g_vec = dirichlet_dofs(problem)
        else:
            self.bc_mask = np.asarray(dirichlet[0], dtype=bool)
            self.g_vec = np.where(self.bc_mask, dirichlet[1], 0.0)
        self.col_mask = ~self.bc_mask
        rows = np.ones(self.n, dtype=bool) if row_mask is None else np.asarray(row_mask, dtype=bool)
        if rows.shape != (self.n,):
            raise InputError(f"row_mask has shape {rows.shape}, expected ({self.n},)")
        self.row_mask = rows & ~self.bc_mask
        self.options_prefix = problem.options_prefix if options_prefix is None else options_prefix
        self._shared, riesz, riesz_shared = None, self.options_prefix + "riesz_", None
        if option_set is not None:
            base, endings = option_set
            ending = self.options_prefix[len(base):]
            self._shared = shared_set(base, endings)
            riesz, riesz_shared = f"{base}riesz_{ending}", shared_set(base + "riesz_", endings)
        # The objective weighs the constraint rows r = P R as 1/2 r^T W r (least squares).
        self.norm = norm
        self.row_norm = RowNorm(V, self.row_mask, norm if mode == "lstsq" else "euclidean",
                                options_prefix=riesz, shared=riesz_shared)
        self.weigh = self.row_norm.weigh

        self._R = fd.Cofunction(V.dual())
        self._assemblers = {}
        self._J = None
        self._H = None
        # A stored Jacobian serving as a solve's first chord matrix (see solve) and its reduced
        # matrix; the residual rows at the lifting and at the solution of the last solve.
        self._stored = self._stored_A = None
        self.lifting_residual = self.solution_residual = None
        self._Phi_mat = None
        self._products = {}
        self._build_snes()

    # ---------------------------------------------------------------- dof-vector helpers
    @staticmethod
    def _get(f):
        return owned_values(f)

    _set = staticmethod(set_owned_values)

    def _sum(self, a):
        """Sum an array over the mesh communicator; identical bits on every rank."""
        a = np.ascontiguousarray(a, dtype=np.float64)
        if self.comm.size == 1:
            return a
        out = np.empty_like(a)
        self.comm.Allreduce(a, out)
        self.comm.Bcast(out, root=0)
        return out

    def set_data(self, data):
        """Write a data vector (owned dofs of all data spaces, concatenated) into ``self.m``."""
        for mk, values in zip(self.m, self.problem.split_data(data)):
            self._set(mk, values)

    # ---------------------------------------------------------------- assembly
    def _phi_mat(self, Phi):
        """Phi^T as a dense PETSc matrix (n x N, rows distributed as V's dofs)."""
        arr = np.asfortranarray(Phi.T)
        if self._Phi_mat is None:
            self._Phi_mat = PETSc.Mat().createDense(((self.n, None), (None, self.N)),
                                                    comm=self.comm)
            self._Phi_mat.setUp()
        self._Phi_mat.getDenseArray()[:] = arr
        self._Phi_mat.assemble()
        return self._Phi_mat

    def _assemble(self, form, tensor=None, **kwargs):
        """Assemble ``form`` with an assembler built once per form: UFL preprocessing costs more
        than the assembly itself on small meshes (the design page of the docs)."""
        key = id(form)
        with _expert_subdomains_may_be_empty(self.expert_id is not None):
            if key not in self._assemblers:
                kwargs.setdefault("form_compiler_parameters",
                                  {"quadrature_degree": self._quadrature})
                self._assemblers[key] = get_assembler(form, **kwargs)
            return self._assemblers[key].assemble(tensor=tensor)

    def _assemble_residual(self):
        """r = P R: the residual's constraint rows (zero elsewhere), at the current u and m."""
        self._assemble(self.F, tensor=self._R)
        return np.where(self.row_mask, self._get(self._R), 0.0)

    def _assemble_jacobian(self):
        self.jacobians_assembled += 1
        self._J = self._assemble(self.dF, tensor=self._J, mat_type="aij")
        return self._J.petscmat

    #: Sparse Jacobians this expert has assembled (diagnostics: SampleInfo.jacobians).
    jacobians_assembled = 0

    def jacobian(self):
        """The sparse Jacobian last assembled (a PETSc Mat on the mesh communicator, owned by the
        expert: the next assembly overwrites it), e.g. by :meth:`vjp` at a solution."""
        return self._J.petscmat

    def _assemble_hessian(self):
        if self.H is None:
            return None
        self._H = self._assemble(self.H, tensor=self._H, mat_type="aij")
        return self._H.petscmat

    def _times_phi(self, mat, Phi_mat, pattern="J"):
        """(mat @ Phi^T) as a local numpy array [n, N]. ``pattern`` names mat's nonzero pattern:
        "J" for the Jacobian's (any copy of one, e.g. a stored one), "H" for the Hessian's. The
        product matrix of the last call with that pattern and the same ``Phi_mat`` is reused
        (PETSc's MAT_REUSE_MATRIX: the numeric phase only, whose off-process rows of Phi^T come
        by the scatter of the symbolic one, which is why the pattern must be the same): a fresh
        product allocates and first touches an n x N array and sets up that scatter, half of
        its time at diffusion-sorption's paper size (2 ranks: 5.9 ms fresh, 3.1 ms reused)."""
        C, B = self._products.get(pattern, (None, None))
        if B is Phi_mat:
            mat.matMult(Phi_mat, result=C)
        else:
            if C is not None:
                C.destroy()
            C = mat.matMult(Phi_mat)
            self._products[pattern] = (C, Phi_mat)
        return C.getDenseArray().copy()     # the next product overwrites C

    def _evaluate(self, w, Phi, Phi_mat, jacobian=False, r=None, J=None):
        """The reduced problem at w: a dict with r (masked residual), objective (1/2 ‖r‖^2), G and,
        if ``jacobian``, A = dG/dw (and GN, its Gauss-Newton part, in lstsq mode). Sets self.u.
        ``r``: the residual rows at w if known (not assembled again); ``J``: the sparse
        Jacobian at w if known (a PETSc Mat; else assembled)."""
        state = self._evaluate_residual(w, Phi, r)
        self._complete(state, Phi, Phi_mat, jacobian, J)
        return state

    def _evaluate_residual(self, w, Phi, r=None):
        self._set(self.u, self.g_vec + w @ Phi)
        r = self._assemble_residual() if r is None else r
        s = self.weigh(r)                                  # W r
        rr = self._sum(np.array([r @ s]))[0]
        # The ridge enters the objective too, so that G stays its gradient.
        return {"w": w, "r": r, "s": s, "rnorm": np.sqrt(rr),
                "objective": 0.5 * (rr + self.rho * w @ w)}

    def _complete(self, state, Phi, Phi_mat, jacobian, J=None):
        """Add G (and A if ``jacobian``) to a state from _evaluate_residual; u must still be the
        state's (the SNES callbacks guarantee it: they evaluate in order at one w). ``J``: the
        sparse Jacobian there, if known."""
        w, r, I = state["w"], state["r"], np.eye(self.N)
        # Least squares needs J for G (J Phi^T, kept), Galerkin only for A.
        needs_J = "JPhi" not in state if self.mode == "lstsq" else jacobian and "A" not in state
        if J is None and needs_J:
            J = self._assemble_jacobian()
        if self.mode == "lstsq":
            if "JPhi" not in state:
                JPhi = self._times_phi(J, Phi_mat)
                JPhi[~self.row_mask] = 0.0                      # P J Phi^T
                state["JPhi"] = JPhi
                state["G"] = self._sum(JPhi.T @ state["s"]) + self.rho * w
            if jacobian and "A" not in state:
                JPhi = state["JPhi"]
                GN = JPhi.T @ self.weigh(JPhi)
                S = np.zeros_like(GN)
                if self.H is not None and self._exact_hessian(state["G"]):
                    self._set(self.r_fn, state["s"])
                    S = Phi @ self._times_phi(self._assemble_hessian(), Phi_mat, "H")
                GN, S = np.split(self._sum(np.concatenate([GN, S])), 2)
                state["GN"], state["A"] = GN, GN + S + self.rho * I
        else:
            if "G" not in state:
                state["G"] = self._sum(Phi @ r) + self.rho * w
            if jacobian and "A" not in state:
                state["A"] = self._tested(J, Phi, Phi_mat)

    def _tested(self, J, Phi, Phi_mat):
        """Phi P J Phi^T + rho I: Galerkin's reduced Jacobian with the sparse Jacobian J (at the
        state's point, or a stored one at a nearby point: a chord matrix)."""
        JPhi = self._times_phi(J, Phi_mat)
        JPhi[~self.row_mask] = 0.0
        return self._sum(Phi @ JPhi) + self.rho * np.eye(self.N)

    def _exact_hessian(self, G):
        """Whether the SNES Jacobian gets the second-order term: always in the backward; in the
        solve from the first iterate where ‖G‖ <= gauss_newton_rtol ‖G(w0)‖ or where Gauss-Newton
        stalls (‖G‖ fell by less than half since the last Jacobian: a large residual at the
        solution makes Gauss-Newton linear). Gauss-Newton steps cost one assembly less and are as
        good far from the solution; the exact Hessian gives the fast final convergence."""
        if self._g0 is None:
            return True
        norm, last = np.linalg.norm(G), self._last_norm
        self._last_norm = norm
        if gauss_newton_is_done(norm, self._g0, last, self.gauss_newton_rtol):
            self._g0 = None    # exact from here on
        return self._g0 is None

    # ---------------------------------------------------------------- SNES
    def _build_snes(self):
        N = self.N
        # One solver on the mesh communicator: the N coefficients (and the N x N Jacobian's
        # rows) live on its rank 0, every rank evaluates the distributed residual in the
        # callbacks. (Identical solvers on each rank would stay in step only as long as every
        # rank computed bitwise-identical numbers.)
        comm = self.comm
        n_local = N if comm.rank == 0 else 0
        snes = PETSc.SNES().create(comm=comm)
        prefix = self.options_prefix
        self._wvec = PETSc.Vec().createMPI((n_local, N), comm=comm)
        self._Gvec = self._wvec.duplicate()
        if comm.size == 1:
            self._Amat = PETSc.Mat().createDense((N, N), comm=comm)
        else:
            self._Amat = PETSc.Mat().createAIJ(((n_local, N), (n_local, N)), nnz=(N, 0),
                                               comm=comm)
        self._Amat.setUp()
        snes.setFunction(self._snes_function, self._Gvec)
        snes.setJacobian(self._snes_jacobian, self._Amat)
        if self.mode == "lstsq":
            snes.setObjective(self._snes_objective)
        defaults = reduced_solver_defaults(self.mode)
        if comm.size > 1:      # read only by a factorising preconditioner
            defaults["pc_factor_mat_solver_type"] = "mumps"
        options.set_up(snes, prefix, defaults, self.problem.solver_parameters, self._shared)
        self.gauss_newton_rtol = options.parameter(snes, "gauss_newton_rtol", 0.0)
        self.stall_rtol = options.parameter(snes, "stall_rtol", 0.0)
        self.chord = ChordSteps.of(snes, self.mode)
        self.precision = PrecisionStop()
        params = options.parameters(snes)
        self.snes = snes
        self._g0 = None
        # PETSc's fixed initial trust region (0.2) knows nothing of the size of w: unless it was
        # set, start each solve with the Gauss-Newton step's length (the region shrinks if that
        # step is poor), which saves the iterations spent growing the region.
        self._auto_delta0 = snes.getType() == "newtontr" and "snes_tr_delta0" not in params

    def _state_at(self, X, what):
        """The cached state at the SNES iterate X, completed with ``what`` ("objective", "G" or
        "A"): the line search asks for objectives at trial points, which need no Jacobian."""
        w = self._T @ self._coefficients(X)
        state = self._cache
        if state is None or not np.array_equal(state["w"], w):
            state = self._cache = self._evaluate_residual(w, self._Phi)
        if what != "objective":
            self._complete(state, self._Phi, self._Phi_petsc, what == "A")
        return state

    def _coefficients(self, X):
        """All N entries of an SNES vector on every rank (they live on rank 0)."""
        x = X.getArray(readonly=True)
        return x.copy() if self.comm.size == 1 else self.comm.bcast(x.copy(), root=0)

    def _local(self, values):
        """This rank's part of an N-vector for the SNES: all on rank 0, none elsewhere."""
        return values if self.comm.rank == 0 else values[:0]

    def _snes_objective(self, snes, X):
        return self._state_at(X, "objective")["objective"]

    def _snes_function(self, snes, X, G):
        state = self._state_at(X, "G")
        g = self._T.T @ state["G"]
        G.setArray(self._local(g))
        if self.precision.active:
            try:
                step = self._T @ np.linalg.solve(self._M, g)
            except np.linalg.LinAlgError:
                return
            self.precision.at(np.linalg.norm(g), self._field_norm(step),
                              self._field_norm(state["w"]))

    def _field_norm(self, w):
        """‖w Phi‖ in the dof l2 norm over every rank (the Gram matrix of the solve's basis)."""
        return float(np.sqrt(max(w @ self._gram @ w, 0.0)))

    def _snes_jacobian(self, snes, X, A, P):
        if self.chord.keep(np.linalg.norm(self._T.T @ self._state_at(X, "G")["G"])):
            return          # P still holds the matrix of an earlier iterate: a chord step
        T = self._T
        if self._stored is not None:
            # The solve's first matrix, from the sample's stored Jacobian; later iterates that
            # need a new one assemble it.
            M = T.T @ self._stored_matrix() @ T
            self._stored = None
        else:
            M = self._newton_matrix(self._state_at(X, "A"))
        self._M, self.precision.ready = M, True     # what the next steps are taken with
        if self.comm.size == 1:
            P.getDenseArray()[:] = M
        elif self.comm.rank == 0:
            P.setValues(range(self.N), range(self.N), M)
        P.assemble()
        if A != P:
            A.assemble()

    def _stored_matrix(self):
        """Galerkin's reduced Jacobian with the stored sparse Jacobian, made once per solve."""
        if self._stored_A is None:
            self._stored_A = self._tested(self._stored, self._Phi, self._Phi_petsc)
        return self._stored_A

    def _newton_matrix(self, state):
        """T^T A T of a state with its Jacobian, for the SNES (least squares: a descent one)."""
        T = self._T
        M = T.T @ state["A"] @ T
        if self.mode == "lstsq":
            # Newton's step must be a descent direction of the objective: where the exact
            # Hessian is not positive definite, use Gauss-Newton with Levenberg-Marquardt damping.
            try:
                np.linalg.cholesky(M)
            except np.linalg.LinAlgError:
                GN = T.T @ state["GN"] @ T
                M = GN + (1e-8 * np.trace(GN) / self.N) * np.eye(self.N) + self.rho * T.T @ T
        return M

    # ---------------------------------------------------------------- public
    @PETSc.Log.EventDecorator("FemMoeReducedSolve")
    def solve(self, Phi, data=None, w0=None, sample=None, rtol=None, u0=None, jacobian=None,
              lifting_residual=None, precision=None):
        """Solve one sample. Collective over ``problem.comm``.

        Phi: [N, n] float64 (this rank's owned dofs); data: [n_data] float64 or None;
        w0: initial coefficients [N] (default 0); u0: instead of w0, a field [n] to start
        from (e.g. the sample's solution for an earlier basis): w0 is then its best fit by
        this basis (:func:`fit_coefficients`; a u0 of another size is ignored, on every rank);
        rtol: the SNES relative tolerance of this solve (default: the options').

        What a warm start's sample may bring from its last visit, in Galerkin mode (both depend
        on the sample's data and a field, not on the basis): ``jacobian``, the sparse Jacobian
        (a PETSc Mat like :meth:`jacobian`'s) at its last solution, taken as the first chord
        matrix (``chord_contraction`` > 0) instead of one assembled at the start, which lies as
        near the solution; and ``lifting_residual`` [n], the residual rows at the lifting
        (w = 0), from which the cold ‖G‖ the start is compared with is a product with the basis
        instead of an assembly. Both are ignored for a cold start (a refused warm one too).
        After the solve, ``self.lifting_residual`` holds the residual rows at the lifting where
        the solve knew them (else None) and ``self.solution_residual`` those at the solution (for
        :meth:`vjp`'s ``residual``).

        ``precision``: the relative precision at which the caller delivers the field (e.g.
        float32's epsilon): SNES also stops where its next step would change the field by less
        (:class:`PrecisionStop`); None: its tolerances alone.

        Returns (w [N], u [n], SampleInfo). Raises SolverDivergedError (every rank) if SNES does
        not converge.
        """
        t0, assembled = time.perf_counter(), self.jacobians_assembled
        self._stored = self._stored_A = None
        self.lifting_residual = self.solution_residual = None
        galerkin = self.mode == "galerkin"
        Phi = np.where(self.col_mask, Phi, 0.0)
        if data is not None:
            self.set_data(data)
        self._Phi, self._Phi_petsc = Phi, self._phi_mat(Phi)
        self._cache = None
        self.rho = 0.0
        rank, ridge, self._T = self._check_rank(Phi, sample)
        self.rho = ridge
        if u0 is not None and self.comm.allreduce(np.shape(u0) == (self.n,), op=MPI.LAND):
            w0 = fit_coefficients(self._gram, self._sum(Phi @ (u0 - self.g_vec)))
        w = np.zeros(self.N) if w0 is None else np.array(w0, dtype=np.float64)
        self._wvec.setArray(self._local(np.linalg.solve(self._T, w)))
        g_cold = None
        if w0 is not None:
            g_cold = self._cold_gradient_if_warm_is_better(lifting_residual if galerkin else None)
            if g_cold is None:
                w0 = None
                self._wvec.zeroEntries()
            elif galerkin and self.chord.contraction > 0:
                self._stored = jacobian
        start = self._state_at(self._wvec, "objective")
        before = start["rnorm"]
        if w0 is None:
            self.lifting_residual = start["r"]
        G0 = self._state_at(self._wvec, "G")["G"]
        g_start = np.linalg.norm(self._T.T @ G0)
        if g_cold is not None:
            g_start = max(g_start, g_cold)   # the stall test's scale: the cold solve's
        if self.mode == "lstsq" and self.gauss_newton_rtol > 0:
            self._g0, self._last_norm = np.linalg.norm(G0), None
        if self._auto_delta0:
            T = self._T
            if self._stored is not None:
                M = T.T @ self._stored_matrix() @ T
            else:
                state = self._state_at(self._wvec, "A")
                M = T.T @ state.get("GN", state["A"]) @ T
            step = np.linalg.lstsq(M, T.T @ G0, rcond=None)[0]
            self.snes.setTRTolerances(delta_0=max(float(np.linalg.norm(step)), 1e-8))
        try:
            with tolerance(self.snes, rtol, g_cold), options.used(self.snes):
                self.chord.start(ChordSteps.target(self.snes, np.linalg.norm(self._T.T @ G0)))
                self.precision.start(self.snes, precision)
                self.snes.solve(None, self._wvec)
        finally:
            self._g0 = None
            self._stored = self._stored_A = None
        reason = self.snes.getConvergedReason()
        w = self._T @ self._coefficients(self._wvec)
        end = self._state_at(self._wvec, "objective")
        after, self.solution_residual = end["rnorm"], end["r"]
        name = reason_name(reason)
        if reason == PETSc.SNES.ConvergedReason.CONVERGED_FNORM_ABS and self.precision.reached:
            name = "CONVERGED_FIELD_PRECISION"
        if reason == PETSc.SNES.ConvergedReason.DIVERGED_TR_DELTA:
            if self._stalled(g_start):
                reason, name = 1, "CONVERGED_STALLED"
            elif after <= self.stall_rtol * before:
                # The residual itself fell to round-off relative to where it started (a basis
                # that spans the solution): the objective's floor, where the predicted
                # decrease is round-off too.
                reason, name = 1, "CONVERGED_AT_FLOOR"
        info = SampleInfo(residual_before=before, residual_after=after,
                          iterations=self.snes.getIterationNumber(), reason=name,
                          rank=rank, ridge=self.rho, time=time.perf_counter() - t0,
                          warm=w0 is not None, chord_steps=self.chord.kept,
                          jacobians=self.jacobians_assembled - assembled)
        if reason < 0 or not np.all(np.isfinite(w)):
            who = "global layer" if self.expert_id is None else f"expert {self.expert_id}"
            raise SolverDivergedError(
                f"{who}: the reduced SNES diverged on sample {sample} ({info.reason}) after "
                f"{info.iterations} iterations{linear_failure(self.snes)}; ||r|| "
                f"{info.residual_before:.3e} -> {info.residual_after:.3e}. Options prefix "
                f"{self.options_prefix!r}.",
                expert=self.expert_id, sample=sample, reason=info.reason)
        return w, self.g_vec + w @ Phi, info

    def _cold_gradient_if_warm_is_better(self, lifting_residual=None):
        """‖G‖ at the cold start w = 0 (in the SNES's coordinates) if the warm start in the SNES
        vector starts lower than it, else None: lower in the objective (least squares), or in
        ‖G‖ (Galerkin mode, where SNES drives G, not the residual, to zero: a Galerkin solution's
        residual can be larger than the lifting's, and comparing residual norms refused every
        warm start on diffusion-sorption). The warm start is evaluated last and through the
        state cache, so that the solve starts from that evaluation. On a nonlinear PDE the stale
        coefficients of a sample can lie in a worse basin than 0 once the basis has moved; the
        trust region never climbs out of one (measured on the plate's cubic reaction-diffusion:
        training with unguarded warm starts ended 0.55 against 0.42 cold, with loss spikes of
        3e3). The cold ‖G‖ is where a cold solve's tolerance is measured from
        (:func:`tolerance`); in Galerkin mode it costs a product with the basis (and the
        residual at the lifting, unless ``lifting_residual`` gives it), in least squares the
        Jacobian at the lifting."""
        T = self._T
        if lifting_residual is not None:        # Galerkin: G(0) = Phi r(g) (w = 0: no ridge)
            self.lifting_residual = lifting_residual
            g_cold = float(np.linalg.norm(T.T @ self._sum(self._Phi @ lifting_residual)))
            g_warm = np.linalg.norm(T.T @ self._state_at(self._wvec, "G")["G"])
            return g_cold if g_warm <= g_cold else None
        cold = self._evaluate_residual(np.zeros(self.N), self._Phi)
        self._complete(cold, self._Phi, self._Phi_petsc, False)
        self.lifting_residual = cold["r"]
        g_cold = float(np.linalg.norm(T.T @ cold["G"]))
        self._cache = None          # u is now the cold start's
        if self.mode == "lstsq":
            better = self._state_at(self._wvec, "objective")["objective"] <= cold["objective"]
        else:
            better = np.linalg.norm(T.T @ self._state_at(self._wvec, "G")["G"]) <= g_cold
        return g_cold if better else None

    def _stalled(self, g_start):
        """At the current iterate, is the objective at its round-off floor (see stall_rtol)?"""
        state = self._state_at(self._wvec, "A")
        T = self._T
        g = T.T @ state["G"]
        if self.mode != "lstsq":
            return np.linalg.norm(g) <= self.stall_rtol * g_start
        M = T.T @ state["A"] @ T
        try:
            np.linalg.cholesky(M)
        except np.linalg.LinAlgError:
            M = T.T @ state["GN"] @ T + self.rho * T.T @ T
        decrease = 0.5 * g @ np.linalg.lstsq(M, g, rcond=None)[0]
        return decrease <= self.stall_rtol * state["objective"]

    def _check_rank(self, Phi, sample):
        """Numerical rank of the reduced problem: of the basis (without Dirichlet dofs), and at
        most the number of residual rows. Below N, w is not unique and dG/dw is singular: raise,
        or regularise with a ridge (see on_rank_deficient)."""
        gram = self._sum(np.concatenate([Phi @ Phi.T, [np.full(self.N, self.row_mask.sum())]]))
        self._gram = gram[:-1]
        T, rank = orthonormal_coordinates(gram[:-1])
        rows = int(gram[-1, 0])
        if rank == self.N and rows >= self.N:
            # SNES works in the coefficients c of the basis orthonormalised in the dof inner
            # product, w = T c: nearly collinear fields (smooth fields on a small subdomain) then
            # cost no extra Newton iterations. The solution u, hence w, is the same.
            return rank, self._ridge(Phi) if self.ridge_always else 0.0, T
        who = "global layer" if self.expert_id is None else f"expert {self.expert_id}"
        if rank < self.N:
            msg = (f"{who}, sample {sample}: the {self.N} basis fields (restricted to the "
                   f"non-Dirichlet dofs) have numerical rank {rank}")
        else:
            rank = rows
            msg = (f"{who}, sample {sample}: only {rows} residual rows for {self.N} coefficients "
                   f"(numerical rank {rows})")
        if self.on_rank_deficient == "raise" or rank == 0:
            raise InputError(msg + " (on_rank_deficient='raise')" if rank else msg + ": all zero")
        rho = self._ridge(Phi)
        experts = None if self.expert_id is None else [self.expert_id]
        warnings.warn(RankDeficientBasisWarning(
            msg + f"; regularised with the ridge term rho*w, rho = {rho:.3e} "
            f"({self.ridge_factor:g} x mean diagonal of the reduced Jacobian); the backward holds "
            "rho fixed: it is the exact gradient of the problem regularised with this rho",
            rank=rank, n_basis=self.N, experts=experts, sample=sample), stacklevel=4)
        return rank, rho, np.eye(self.N)

    def _ridge(self, Phi):
        """rho = ridge factor x the mean diagonal of the Gauss-Newton matrix at w = 0."""
        state = self._evaluate(np.zeros(self.N), Phi, self._Phi_petsc, True)
        diag = np.trace(state.get("GN", state["A"])) / self.N
        return self.ridge_factor * max(abs(diag), 1e-300)

    @PETSc.Log.EventDecorator("FemMoeReducedVJP")
    def vjp(self, Phi, data, w, u_bar, rho=0.0, sample=None, data_gradient=True, residual=None,
            jacobian=None):
        """The IFT backward of one sample. Collective over ``problem.comm``.

        Phi [N, n], data [n_data] or None, w [N] (the forward's solution), u_bar [n] (dL/du on owned
        dofs); ``residual``: the residual rows at w, if known (the forward's ``solution_residual``:
        not assembled again); ``jacobian``: the sparse Jacobian at w, if known (a PETSc Mat, e.g. a
        :class:`fem_moe.points.FieldPoint`'s), else assembled -- and then :meth:`jacobian` until the
        next assembly. Returns (Phi_bar [N, n], data_bar [n_data]); with ``data_gradient`` False,
        data_bar is None (its assembly skipped: nothing upstream asks for it). Raises
        SolverDivergedError if the reduced Jacobian is singular or too ill-conditioned for a
        meaningful gradient.
        """
        Phi = np.where(self.col_mask, Phi, 0.0)
        if data is not None:
            self.set_data(data)
        self.rho = rho
        Phi_mat = self._phi_mat(Phi)
        state = self._evaluate(w, Phi, Phi_mat, True, r=residual, J=jacobian)
        r, s = state["r"], state["s"]
        lam = self._backward_solve(state["A"], Phi, self._sum(Phi @ u_bar), sample)
        z = lam @ Phi
        J = self.jacobian() if jacobian is None else jacobian
        Jt = lambda x: self._matvec(J, x, transpose=True)
        if self.mode == "lstsq":
            y = self.weigh(self._matvec(J, z))           # W P J z
            q = Jt(y)
            if self.H is not None:
                q = q + self._matvec(self._H.petscmat, z)
            Phi_bar = np.outer(w, u_bar - q) - np.outer(lam, Jt(s))
            self._set(self.y_fn, y)
        else:
            z = np.where(self.row_mask, z, 0.0)    # the test function of <lam, G> is P z
            Phi_bar = np.outer(w, u_bar - Jt(z)) - np.outer(lam, r)
        Phi_bar[:, ~self.col_mask] = 0.0
        if not data_gradient:
            return Phi_bar, None
        self._set(self.z_fn, z)
        self._set(self.r_fn, s)
        return Phi_bar, -self._data_derivative()

    def jvp(self, Phi, data, w, dPhi, ddata=None, rho=0.0, sample=None):
        """The tangent of one sample's solution (forward mode, implicit function theorem): the
        change du [n] of u = g + Phi^T w for a change dPhi [N, n] of the basis and ddata
        [n_data] (or None) of the data, at the forward's solution w [N]. With G(w; Phi, m) = 0,
        dw = -A^-1 (dG/dPhi dPhi + dG/dm dm), A = dG/dw (exact second-order terms), and
        du = dPhi^T w + Phi^T dw. The dual of :meth:`vjp`. Collective over ``problem.comm``."""
        Phi = np.where(self.col_mask, Phi, 0.0)
        dPhi = np.where(self.col_mask, dPhi, 0.0)
        if data is not None:
            self.set_data(data)
        self.rho = rho
        state = self._evaluate(w, Phi, self._phi_mat(Phi), True)
        r, s = state["r"], state["s"]
        J = self.jacobian()
        Jt = lambda x: self._matvec(J, x, transpose=True)
        du_w = w @ dPhi                               # the field's change at fixed w
        dR_m = self._data_direction(ddata)            # dR/dm dm (full rows), or 0
        Jdu = np.where(self.row_mask, self._matvec(J, du_w) + dR_m, 0.0)      # P dR
        if self.mode == "lstsq":
            # d(J^T W r) = H(s) du + J^T W P dR + (dJ/dm dm)^T s
            inner = Jt(self.weigh(Jdu))
            if self.H is not None:
                inner = inner + self._matvec(self._H.petscmat, du_w)
            inner = inner + self._data_direction(ddata, transposed_jacobian_at=s)
            dG = self._sum(dPhi @ Jt(s) + Phi @ inner)
        else:
            dG = self._sum(dPhi @ r + Phi @ Jdu)
        dw = -self._backward_solve(state["A"].T, Phi, dG, sample)
        return du_w + dw @ Phi

    def _data_direction(self, ddata, transposed_jacobian_at=None):
        """For a data change ddata (owned dofs, concatenated; None: none): dR/dm ddata, or with
        ``transposed_jacobian_at`` s, (d/dm J(u; m) ddata)^T s = d/dm <s, dR/du> ddata -- both
        1-forms assembled at the current u and m (owned dofs). Zero without data spaces."""
        if ddata is None or not self.m:
            return np.zeros(self.n)
        if not hasattr(self, "_dm_dirs"):
            self._dm_dirs = tuple(fd.Function(mk.function_space()) for mk in self.m)
            v = fd.TestFunction(self.problem.V)
            F_r = ufl.replace(self.F, {v: self.r_fn})
            JT_s = fd.derivative(F_r, self.u, v)
            forms = [(fd.derivative(self.F, mk, d), fd.derivative(JT_s, mk, d))
                     for mk, d in zip(self.m, self._dm_dirs)]
            self._dm_tangent = [sum(f[i] for f in forms if not _is_zero(f[i])) for i in (0, 1)]
        for d, values in zip(self._dm_dirs, self.problem.split_data(ddata)):
            self._set(d, values)
        which = 0
        if transposed_jacobian_at is not None:
            self._set(self.r_fn, transposed_jacobian_at)
            which = 1
        form = self._dm_tangent[which]
        if isinstance(form, int):       # sum() of nothing: R does not depend on this data
            return np.zeros(self.n)
        return self._get(self._assemble(form))

    def _backward_solve(self, A, Phi, b, sample):
        """lam = A^-T b, refusing a singular or ill-conditioned A: its condition number in the
        coordinates of the orthonormalised basis (those of the forward's SNES, where nearly
        collinear fields cost nothing) above 1e12 leaves the gradient few correct digits."""
        T, _ = orthonormal_coordinates(self._sum(Phi @ Phi.T))
        cond = np.linalg.cond(T.T @ A @ T)
        if not np.isfinite(cond) or cond > 1e12:
            who = "global layer" if self.expert_id is None else f"expert {self.expert_id}"
            raise SolverDivergedError(
                f"{who}, sample {sample}: the reduced Jacobian of the backward is singular or "
                f"ill-conditioned (condition number {cond:.2e} in orthonormalised coordinates); "
                "the gradient would be meaningless", expert=self.expert_id, sample=sample,
                reason="BACKWARD_ILL_CONDITIONED")
        return np.linalg.solve(A.T, b)

    def _data_derivative(self):
        """d<lam, G>/dm (with z_fn, r_fn, y_fn, u and m set): the data spaces' dofs concatenated,
        zero where the residual does not depend on a data field."""
        parts = [np.zeros(owned_size(mk.function_space())) if form is None
                 else self._get(self._assemble(form)) for mk, form in zip(self.m, self.dm_forms)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def _matvec(self, mat, x, transpose=False):
        X, Y = mat.createVecs()
        X.setArray(x)
        (mat.multTranspose if transpose else mat.mult)(X, Y)
        return Y.getArray(readonly=True).copy()

    def destroy(self):
        self.snes.destroy()
        self.row_norm.destroy()
        for C, _ in self._products.values():
            C.destroy()
        self._products.clear()


@contextlib.contextmanager
def tolerance(snes, rtol=None, cold_gradient=None):
    """For the duration of one solve: SNES's relative tolerance ``rtol`` (None: its own) and,
    for a solve from a warm start, the stopping point of a cold one. SNES measures rtol from
    the start's ‖G‖, so a warm start near the solution would be driven rtol below *its* ‖G‖,
    orders below where a cold solve stops, and converge no sooner than a cold solve.
    ``cold_gradient`` = ‖G‖ at the cold start (in the SNES's coordinates) makes the absolute
    tolerance rtol x that (or the options' atol, if larger): a warm solve then stops as soon as
    it is as converged as a cold solve would be, and no later than rtol below its own start."""
    old_rtol, old_atol = snes.getTolerances()[:2]
    new_rtol = old_rtol if rtol is None else float(rtol)
    new_atol = old_atol if cold_gradient is None else max(old_atol, new_rtol * float(cold_gradient))
    snes.setTolerances(rtol=new_rtol, atol=new_atol)
    try:
        yield
    finally:
        snes.setTolerances(rtol=old_rtol, atol=old_atol)


def dirichlet_dofs(problem):
    """(mask, g): the owned dofs of ``problem.V`` under its DirichletBCs (bool [n_dofs]) and the
    lifting g (float [n_dofs]: the boundary values there, 0 elsewhere). Collective."""
    V = problem.V
    g = fd.Function(V)
    for bc in problem.bcs:
        bc.apply(g)
    mask = np.zeros(problem.n_dofs, dtype=bool)
    subs = subspaces(V)
    offsets = np.cumsum([0] + [owned_size(S) for S in subs])
    for bc in problem.bcs:
        fs = bc.function_space()
        comp = getattr(fs, "component", None)
        holder = fs.parent if comp is not None else fs       # the space whose nodes bc.nodes number
        i = holder.index if len(subs) > 1 else 0
        bs, n_nodes = subs[i].block_size, subs[i].dof_dset.size
        nodes = bc.nodes[bc.nodes < n_nodes]
        for c in (range(bs) if comp is None else [comp]):
            mask[offsets[i] + nodes * bs + c] = True
    return mask, Expert._get(g)


class _EmptySubdomainFilter(logging.Filter):
    def filter(self, record):
        return "is empty. This is likely an error" not in record.getMessage()


@contextlib.contextmanager
def _expert_subdomains_may_be_empty(active):
    """An expert's submesh carries every marker of the whole mesh, most of them empty there
    (ds(2) on an expert far from boundary 2): Firedrake's warning about empty subdomains is
    expected for it, and silenced while it assembles. Other meshes keep the warning."""
    if not active:
        yield
        return
    log, quiet = logging.getLogger("firedrake"), _EmptySubdomainFilter()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def residual_quadrature_degree(F):
    """The quadrature degree UFL estimates for the residual form F (the largest over its
    integrals; measures with an explicit degree keep theirs). Every form derived from F is
    assembled with it: left to itself, UFL estimates higher degrees for the derivatives of a
    non-polynomial residual (e.g. a coefficient (u^2 + eps^2)^p), and a Jacobian that is not the
    exact derivative of the assembled residual stalls the reduced solves and biases the IFT
    gradient (measured: 6e-9 relative gradient error, trust regions collapsing at ‖G‖ ~ 5e-5
    ‖G0‖)."""
    from ufl.algorithms import estimate_total_polynomial_degree
    degrees = [estimate_total_polynomial_degree(itg.integrand()) for itg in F.integrals()]
    return max(degrees) if degrees else 2


def reason_name(reason, kind=None):
    """The name of a PETSc reason code (``kind``: PETSc.SNES.ConvergedReason by default)."""
    kind = PETSc.SNES.ConvergedReason if kind is None else kind
    names = {v: k for k, v in vars(kind).items() if isinstance(v, int)}
    return names.get(reason, str(reason))


def linear_failure(snes):
    """For an SNES that stopped with DIVERGED_LINEAR_SOLVE: "; linear solve: <KSP reason>"
    (and the preconditioner's failure, e.g. a zero pivot), else ""."""
    if snes.getConvergedReason() != PETSc.SNES.ConvergedReason.DIVERGED_LINEAR_SOLVE:
        return ""
    ksp = snes.getKSP()
    text = f"; linear solve: {reason_name(ksp.getConvergedReason(), PETSc.KSP.ConvergedReason)}"
    failed = ksp.getPC().getFailedReason()
    if failed:
        text += f" ({reason_name(failed, PETSc.PC.FailedReason)})"
    return text


class ResidualNorm:
    """The squared residual norm of a given field and its gradient: the soft-constraint loss and
    the physics-informed training loss.

    ``norm="l2"``: ‖P R(u; m)‖^2 + ‖B (u - g)‖^2, with P the non-Dirichlet rows and B the
    Dirichlet dofs (the boundary misfit, zero for an output of a hard-constraint layer): the
    Euclidean norm of the assembled residual, as the paper's point residuals.

    ``norm="lumped"``: (P R)^T D^{-1} (P R) + ‖B (u - g)‖^2, D the diagonal of the mass
    matrix: the L2 norm of the strong residual (see :mod:`fem_moe.norms`).

    ``norm="dual"``: (P R)^T A^{-1} (P R) + ‖B (u - g)‖^2, A the H1 Gram matrix (grad u . grad v
    + u . v, Dirichlet rows and columns replaced by the identity): the residual's norm in the dual
    of H1, which for a linear elliptic PDE is equivalent to the error in the energy norm, on any
    mesh. The Euclidean norm weighs high frequencies by the square of the stiffness and barely
    sees smooth errors; the dual norm weighs them alike. It costs one solve with A per sample and
    evaluation (:class:`fem_moe.norms.RowNorm`; options prefix ``<problem prefix>loss_riesz_``,
    default LU factored once).

    Collective over ``problem.comm``.
    """

    def __init__(self, problem, norm="l2"):
        norm = "l2" if norm == "euclidean" else norm
        if norm not in ("l2", "lumped", "dual"):
            raise InputError("norm must be 'l2' (or 'euclidean'), 'lumped' or 'dual', got "
                             f"{norm!r}")
        # A Galerkin expert holds exactly the forms needed: R, J and d/dm <z, R> with z := r.
        self._e = Expert(problem, 1, mode="galerkin")
        self.problem, self.norm = problem, norm
        self._JTz = fd.Cofunction(problem.V.dual())
        self._rows = RowNorm(problem.V, self._e.row_mask, "euclidean" if norm == "l2" else norm,
                             options_prefix=problem.options_prefix + "loss_riesz_")

    def _weighted(self, r):
        """W r: A^{-1} r for the dual norm, r / M_ii for the lumped one, r itself for l2 (owned
        dofs, zero on Dirichlet rows)."""
        return self._rows.weigh(r)

    def _set_point(self, u, data):
        """Set the expert's u and m."""
        e = self._e
        if data is not None:
            e.set_data(data)
        e._set(e.u, u)

    def _residual_at(self, u, data):
        """The masked residual r and the Dirichlet misfit b at u (sets the expert's u and m)."""
        self._set_point(u, data)
        return self._e._assemble_residual(), self._misfit(u)

    def _misfit(self, u):
        """The Dirichlet misfit B (u - g) (zero off the Dirichlet dofs)."""
        e = self._e
        return np.where(e.bc_mask, u - e.g_vec, 0.0)

    def _rows_at(self, u, data, residual=None):
        """(r, W r, b) at u (sets the expert's u and m, unless ``residual``, r at u, is given)."""
        r, b = self._residual_at(u, data) if residual is None else (residual, self._misfit(u))
        return r, self._weighted(r), b

    def evaluate(self, u, data=None, residual=None):
        """u [n], data [n_data] or None -> (value, rows): rows = (r, W r, b) at u, what
        :meth:`gradient` needs at the same u and data. ``residual``: the residual rows r at u,
        if known (e.g. a :class:`fem_moe.points.FieldPoint`'s; not assembled again)."""
        r, z, b = rows = self._rows_at(u, data, residual)
        return float(self._e._sum(np.array([r @ z + b @ b]))[0]), rows

    def value(self, u, data=None):
        """u [n], data [n_data] or None -> float."""
        return self.evaluate(u, data)[0]

    def gradient(self, u, data=None, rows=None, data_gradient=True, jacobian=None):
        """u [n], data [n_data] or None -> (dvalue/du [n], dvalue/ddata [n_data], or None
        without ``data_gradient``). ``rows``: :meth:`evaluate`'s at the same u and data (else
        assembled again); ``jacobian``: the sparse Jacobian at u if known (a PETSc Mat, e.g.
        a :class:`fem_moe.points.FieldPoint`'s, which the layer's backward takes too)."""
        e = self._e
        if rows is None:
            rows = self._rows_at(u, data)
        elif jacobian is None or data_gradient:
            self._set_point(u, data)
        _, z, b = rows
        if jacobian is not None:
            du = 2 * e._matvec(jacobian, z, transpose=True) + 2 * b
        else:
            # J^T z assembled as the 1-form d<z, R(u)>/du: one vector assembly instead of the
            # Jacobian matrix and a product with it.
            e._set(e.r_fn, z)
            du = 2 * e._get(e._assemble(e.JT_r, tensor=self._JTz)) + 2 * b
        if not data_gradient:
            return du, None
        e._set(e.z_fn, z)
        return du, 2 * e._data_derivative()
