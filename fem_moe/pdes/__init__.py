"""The PDEs fem_moe ships: residual form, input distribution and classical reference solver.

``fem_moe.pdes.get(name, **options)`` returns one; ``fem_moe.pdes.REGISTRY`` lists them. A PDE
of your own is a :class:`PDE` subclass in your own module, named ``"package.module:ClassName"``
wherever a shipped PDE's name goes (a config's ``pde.name``, a dataset file): it is imported
from there.
"""
import importlib
from ..errors import InputError
from .base import PDE, CLASSICAL_SOLVER_PARAMETERS
from .diffusion_sorption import DiffusionSorption
from .navier_stokes import FlowPastObstacle
from .nonlinear_diffusion_3d import NonlinearDiffusion3D
from .reaction_diffusion import ReactionDiffusion
from .turbulence import DecayingTurbulence

__all__ = ["PDE", "CLASSICAL_SOLVER_PARAMETERS", "DecayingTurbulence", "DiffusionSorption",
           "FlowPastObstacle", "NonlinearDiffusion3D", "ReactionDiffusion", "REGISTRY", "get",
           "lookup", "reference", "config_section"]

REGISTRY = {cls.name: cls for cls in (ReactionDiffusion, DiffusionSorption, FlowPastObstacle,
                                        DecayingTurbulence, NonlinearDiffusion3D)}


def lookup(name):
    """The PDE class called ``name``: a shipped one's name (:data:`REGISTRY`), or
    ``"package.module:ClassName"`` for a :class:`PDE` subclass of your own (its module is
    imported). InputError naming what is missing otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    if not isinstance(name, str) or ":" not in name:
        raise InputError(f"unknown PDE {name!r}; fem_moe ships {sorted(REGISTRY)}, and a PDE of "
                         f"your own is named 'package.module:ClassName'")
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"PDE {name!r}: cannot import module {module_name!r} ({e})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise InputError(f"PDE {name!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, PDE)):
        raise InputError(f"PDE {name!r}: {class_name} is not a subclass of fem_moe.pdes.PDE")
    return cls


def reference(pde):
    """The name that finds ``pde``'s class again with :func:`lookup`: a shipped PDE's name, a
    PDE's own ``name`` where it has the form ``"module:ClassName"`` (a class defined in a script,
    whose module is ``__main__`` while it runs, says so where it can be imported from), else
    ``"module:ClassName"`` from the class."""
    cls = type(pde)
    if REGISTRY.get(cls.name) is cls or ":" in (cls.name or ""):
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"


def config_section(pde):
    """The config's ``pde`` section (and a dataset's record) of the PDE instance ``pde``: its
    :func:`reference` and every option. InputError if ``pde`` is not a :class:`PDE`."""
    if not isinstance(pde, PDE):
        raise InputError(f"pde must be a fem_moe.pdes.PDE instance, got {type(pde).__name__}")
    return {"name": reference(pde), "options": dict(pde.opts)}


def get(name, **options):
    """The PDE called ``name`` (see :func:`lookup`) with ``options`` (InputError for an unknown
    name or option)."""
    return lookup(name)(**options)
