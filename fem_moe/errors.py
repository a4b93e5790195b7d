"""Exceptions of fem_moe, and the collective check that raises them on every rank.

In SPMD code an exception on one rank while the others enter a collective is a hang. Every check
on input that may differ between ranks therefore goes through :func:`raise_on_all_ranks`, which
is itself collective: all ranks of ``comm`` must call it, at the same point.
"""


class FemMoeError(RuntimeError):
    """Base class of fem_moe's errors."""


class InputError(FemMoeError, ValueError):
    """A tensor, function or option given to fem_moe is not what it must be (shape, dtype,
    device, non-finite values, mismatched spaces). The message says which and where."""


class SolverDivergedError(FemMoeError):
    """A reduced SNES solve did not converge. Attributes: ``expert`` (int or None for the
    global layer), ``sample`` (index in the batch), ``reason`` (PETSc converged-reason name)."""

    def __init__(self, message, expert=None, sample=None, reason=None):
        super().__init__(message)
        self.expert, self.sample, self.reason = expert, sample, reason


class RankDeficientBasisWarning(UserWarning):
    """The basis fields of a sample are (numerically) linearly dependent; the message says how
    the reduced problem was regularised."""


def raise_on_all_ranks(comm, error, exc_type=InputError):
    """Collective. ``error`` is this rank's message (str) or None. If any rank has one, every rank
    raises ``exc_type`` with all messages, each prefixed by the rank that found it."""
    errors = comm.allgather(error)
    found = [f"[rank {r}] {e}" for r, e in enumerate(errors) if e is not None]
    if found:
        raise exc_type("\n".join(found))
