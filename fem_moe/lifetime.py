"""How the PETSc objects of a parallel job are destroyed on every rank alike, during the run and
at exit.

petsc4py does not destroy an object on a communicator of more than one rank when Python releases
it: it parks it in a garbage map on that communicator, and ``PETSc.garbage_cleanup(comm)``
(collective) destroys the objects parked on *every* rank. That is safe only while the ranks
agree on which objects exist. They stop agreeing when a cleanup destroys an object whose child
(another PETSc object it holds) is still referenced from Python on some ranks and already
released on others: the child dies with its parent on the ranks that had released it, and lives
on, unmatched, where it had not. Python's cycle collector is what releases objects at
different moments on different ranks: it runs when each rank's own allocations say so, and a
Firedrake solve, a layer or a training step leaves reference cycles holding PETSc objects. Once
the ranks disagree, a later cleanup waits for ever in a collective that some ranks never enter:
``PetscFinalize`` cleans ``PETSC_COMM_WORLD``'s garbage only on the ranks where PETSc's
communicator for it still holds an object, and those ranks wait in its ``MPI_Allreduce`` for the
ranks that have gone on to ``MPI_Finalize`` (the job prints all its results and never exits).

So every cleanup fem_moe makes happens where every rank has released the same objects
(:func:`collect_garbage`): the cycle collector is paused while it runs, and if it freed anything
on any rank since the communicator's last cleanup, every rank first runs a full collection.
Between cleanups the collector rarely frees anything in a training loop (it does in the first
steps), so the full collection (~0.16 s with Firedrake and torch loaded) is rarely paid. Other
code's objects can still end up differing between ranks (measured: a dataset's generation and
loading leave some ranks holding a few more objects on ``COMM_WORLD`` than others), so fem_moe
also keeps one object on ``COMM_WORLD`` from its start to the end on every rank: PETSc's
communicator for ``COMM_WORLD`` then exists on every rank until ``PetscFinalize``, which
therefore cleans it on every rank, and no cleanup has to create it on some ranks only. At exit,
before petsc4py's own cleanup, every rank collects and cleans ``COMM_WORLD`` in one order
(:func:`clean_up`) and frees the communicators fem_moe split (:func:`free_at_exit`) in the
order they were made.

MPI only at import; petsc4py when first needed: the bridge registers its communicators here
where neither Firedrake nor PETSc is installed (a GPU node's backbone).
"""
import atexit
import gc

from mpi4py import MPI

__all__ = ["collect_garbage", "clean_up", "free_at_exit", "run_first_at_exit"]

_freed = [1]        # collections that freed objects in this process (1: before fem_moe came)
_cleaned_at = {}    # per communicator: _freed at its last cleanup
_to_free = []       # communicators to free at exit, in the order they were registered
_anchor = []        # the object kept on COMM_WORLD to the end


def _count_frees(phase, info):
    if phase == "stop" and info["collected"]:
        _freed[0] += 1


gc.callbacks.append(_count_frees)


def run_first_at_exit():
    """Make fem_moe's exit cleanup the next to run at exit, before petsc4py's own cleanup (which
    atexit runs after anything registered later), and keep an object on ``COMM_WORLD`` to the
    end. Collective over ``COMM_WORLD`` (every rank imports this module, which calls it; the
    layers' first cleanup on ``COMM_WORLD`` and the command line call it again once PETSc is
    imported)."""
    atexit.unregister(_at_exit)
    atexit.register(_at_exit)
    _anchor_world()


def _anchor_world():
    """An object on ``COMM_WORLD`` kept to the end on every rank, made once PETSc is running:
    PETSc's communicator for ``COMM_WORLD`` then lives on every rank until ``PetscFinalize``,
    so that a cleanup of ``COMM_WORLD`` never has to create it on some ranks only (a
    collective ``MPI_Comm_dup`` that the others never enter), and every rank takes part in
    ``PetscFinalize``'s cleanup of it, even where other code has left the ranks holding
    different objects. Collective over ``COMM_WORLD`` the first time."""
    PETSc = _petsc()
    if _anchor or PETSc is None or not PETSc.Sys.isInitialized() or PETSc.Sys.isFinalized():
        return
    _anchor.append(PETSc.Vec().createMPI((0, PETSc.DECIDE), comm=PETSc.COMM_WORLD))


def _petsc():
    """petsc4py's PETSc module, or None where it is not installed."""
    try:
        from petsc4py import PETSc
    except ImportError:
        return None
    return PETSc


def collect_garbage(comm):
    """Destroy the PETSc objects on ``comm`` that Python has released, on every rank alike.
    Collective over ``comm``: every rank calls it at the same point (the layers: at the end of
    each forward and backward; without it every matrix and solver of a training step stayed
    alive on several ranks: ~15 MiB more per step at diffusion-sorption's paper size).

    The cycle collector is paused meanwhile; where it has freed objects on any rank of ``comm``
    since the last cleanup of ``comm``, every rank first collects in full, so that every rank
    has released the same objects when PETSc destroys them."""
    if comm.size == 1:
        return
    if comm.py2f() not in _cleaned_at and comm.Compare(MPI.COMM_WORLD) != MPI.UNEQUAL:
        run_first_at_exit()
    _destroy_released(comm, _freed[0] != _cleaned_at.get(comm.py2f()))


def clean_up():
    """Collective over ``COMM_WORLD``: a full collection on every rank, then the released PETSc
    objects on ``COMM_WORLD`` destroyed. For exit, and between test modules."""
    _destroy_released(MPI.COMM_WORLD, True)


def _destroy_released(comm, collect):
    """Collective over ``comm``: with the cycle collector paused, a full collection on every
    rank if ``collect`` holds on any rank, then PETSc's garbage on ``comm`` destroyed (where
    PETSc is running)."""
    PETSc = _petsc()
    paused = gc.isenabled()
    gc.disable()
    try:
        if comm.allreduce(collect, op=MPI.LOR):
            gc.collect()
        _cleaned_at[comm.py2f()] = _freed[0]
        if PETSc is not None and PETSc.Sys.isInitialized() and not PETSc.Sys.isFinalized():
            PETSc.garbage_cleanup(comm)
    finally:
        if paused:
            gc.enable()


def free_at_exit(comm):
    """Free the communicator ``comm`` (one fem_moe made, e.g. by a split) at exit, after the
    PETSc cleanup, in the order such communicators were registered. Collective at exit."""
    _to_free.append(comm)


def _at_exit():
    """Collective over COMM_WORLD at exit (every rank imported this module: the layers, the
    bridge and the command line import it): :func:`clean_up`, then the communicators fem_moe
    made freed, in the order they were made."""
    clean_up()
    for comm in _to_free:
        if comm != MPI.COMM_NULL:
            comm.Free()
    _to_free.clear()


run_first_at_exit()
