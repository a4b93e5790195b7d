"""The collective check that raises an error on every rank, and fem_moe's base errors.

In SPMD code an exception on one rank while the others enter a collective is a hang. Every check
on input that may differ between ranks therefore goes through :func:`raise_on_all_ranks`, which
is itself collective: all ranks of ``comm`` must call it, at the same point.

MPI and the standard library only (no Firedrake), so that the torch side -- :mod:`fem_moe.bridge`,
:mod:`fem_moe.backbones` -- imports where Firedrake is not installed (a GPU node's backbone
benchmark, a backbone developed on its own). The errors tied to Firedrake live in
:mod:`fem_moe.errors`, which re-exports these.
"""


class FemMoeError(RuntimeError):
    """Base class of fem_moe's errors."""


class InputError(FemMoeError, ValueError):
    """A tensor, function or option given to fem_moe is not what it must be (shape, dtype,
    device, non-finite values, mismatched spaces). The message says which and where."""


def raise_on_all_ranks(comm, error, exc_type=InputError):
    """Collective. ``error`` is this rank's problem: None, a message (str), a FemMoeError or any
    other exception (raised as a FemMoeError naming its type). If
    any rank has one, every rank raises with all messages, each prefixed by the ranks that found
    it (no prefix when every rank found the same, e.g. a bad config): the first rank's exception
    type (``exc_type`` for a message) and, for a SolverDivergedError, the first one's
    ``expert``, ``sample`` and ``reason``."""
    if isinstance(error, FemMoeError):
        error = (type(error), str(error), getattr(error, "expert", None),
                 getattr(error, "sample", None), getattr(error, "reason", None))
    elif isinstance(error, BaseException):     # numpy's LinAlgError, PETSc.Error, ...
        error = (FemMoeError, f"{type(error).__name__}: {error}", None, None, None)
    elif error is not None:
        error = (exc_type, str(error), None, None, None)
    errors = comm.allgather(error)
    found = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not found:
        return
    cls, _, expert, sample, reason = found[0][1]
    by_text = {}
    for r, e in found:
        by_text.setdefault(e[1], []).append(r)
    if len(by_text) == 1 and len(found) == comm.size:
        message = found[0][1][1]
    else:
        message = "\n".join(f"[rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}] {text}"
                            for text, rs in by_text.items())
    # Where the first error says where it happened (a SolverDivergedError's expert, sample,
    # reason), the raised one says so too.
    where = {k: v for k, v in (("expert", expert), ("sample", sample), ("reason", reason))
             if v is not None}
    raise cls(message, **where)
