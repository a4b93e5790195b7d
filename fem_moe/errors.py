"""Exceptions of fem_moe, and the collective check that raises them on every rank
(:func:`raise_on_all_ranks`, from :mod:`fem_moe.collective`: all ranks of ``comm`` must call it,
at the same point)."""
from firedrake.exceptions import ConvergenceError

from .collective import FemMoeError, InputError, raise_on_all_ranks  # noqa: F401


class SolverDivergedError(FemMoeError, ConvergenceError):
    """A reduced SNES solve did not converge (a Firedrake ``ConvergenceError``, as Firedrake's
    own solvers raise). Attributes: ``expert`` (int or None for the global layer), ``sample``
    (index in the batch), ``reason`` (PETSc converged-reason name). Where the linear solve
    failed, the message names the KSP's reason and, for a failed preconditioner, why."""

    def __init__(self, message, expert=None, sample=None, reason=None):
        super().__init__(message)
        self.expert, self.sample, self.reason = expert, sample, reason


class TrainingStalledError(SolverDivergedError):
    """Training stopped because its last steps were all skipped, each for a diverged solve
    (``train.max_skipped_in_a_row``): the weights no longer change. The attributes are those
    of the last failure."""


class RankDeficientBasisWarning(UserWarning):
    """The basis fields of a sample are (numerically) linearly dependent; the message says how
    the reduced problem was regularised. Attributes: ``rank`` (the lowest numerical rank found),
    ``n_basis`` (N), ``experts`` (the experts concerned; None for the global layer) and
    ``sample`` (index in the batch, where known)."""

    def __init__(self, message, rank=None, n_basis=None, experts=None, sample=None):
        super().__init__(message)
        self.rank, self.n_basis, self.experts, self.sample = rank, n_basis, experts, sample
