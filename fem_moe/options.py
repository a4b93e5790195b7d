"""PETSc options of fem_moe's solvers, through petsctools' options manager (as Firedrake's
variational solvers take theirs).

Each solver object gets an :class:`petsctools.OptionsManager` under its options prefix. From the
highest precedence down: options given under that prefix (the command line), the caller's
``parameters`` (e.g. ``ConstrainedProblem.solver_parameters``), options given under a shared
prefix (``-expert_snes_monitor`` for every ``expert_<k>_``; petsctools' ``DefaultOptionSet``),
and fem_moe's defaults. The options are in PETSc's database only while the object is set up or
used (:func:`used`), so that options PETSc reads during a solve (``-..._snes_converged_reason``,
``-..._ksp_view``) work, and the database does not grow with the number of solvers.
"""
import contextlib

import petsctools

__all__ = ["set_up", "used", "parameter", "parameters", "shared_set"]


def shared_set(base, endings):
    """The set of prefixes ``<base><ending>_`` sharing the defaults given under ``<base>``
    (petsctools' DefaultOptionSet), e.g. ``shared_set("expert_", range(K))``."""
    return petsctools.DefaultOptionSet(base, [str(e) for e in endings])


def set_up(obj, prefix, defaults, parameters=None, shared=None):
    """Attach an options manager to PETSc object ``obj`` under ``prefix`` (precedence as in the
    module's docstring; ``shared``: a :func:`shared_set` holding ``prefix``) and call its
    ``setFromOptions``. Returns the manager."""
    petsctools.attach_options(obj, parameters=dict(parameters or {}), options_prefix=prefix,
                              default_options_set=shared)
    for key, value in defaults.items():
        petsctools.set_default_parameter(obj, key, value)
    petsctools.set_from_options(obj)
    return petsctools.get_options(obj)


def used(obj):
    """Context manager: ``obj``'s options in PETSc's database for the duration of the block."""
    if not petsctools.has_options(obj):
        return contextlib.nullcontext()
    return petsctools.inserted_options(obj)


def parameter(obj, key, default=None):
    """The value of option ``key`` (without prefix) of ``obj``'s manager, as a float where it
    reads as one (the database stores command-line values as strings)."""
    value = petsctools.get_options(obj).parameters.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def parameters(obj):
    """All options of ``obj``'s manager (without prefix): defaults, shared, given, command line."""
    return petsctools.get_options(obj).parameters
