"""The PDEs fem_moe ships: residual form, input distribution and classical reference solver.

``fem_moe.pdes.get(name, **options)`` returns one; ``fem_moe.pdes.REGISTRY`` lists them.
"""
from ..errors import InputError
from .base import PDE, CLASSICAL_SOLVER_PARAMETERS
from .diffusion_sorption import DiffusionSorption
from .navier_stokes import FlowPastObstacle
from .nonlinear_diffusion_3d import NonlinearDiffusion3D
from .reaction_diffusion import ReactionDiffusion
from .turbulence import DecayingTurbulence

__all__ = ["PDE", "CLASSICAL_SOLVER_PARAMETERS", "DecayingTurbulence", "DiffusionSorption", "FlowPastObstacle",
           "NonlinearDiffusion3D", "ReactionDiffusion", "REGISTRY", "get"]

REGISTRY = {cls.name: cls for cls in (ReactionDiffusion, DiffusionSorption, FlowPastObstacle,
                                        DecayingTurbulence, NonlinearDiffusion3D)}


def get(name, **options):
    """The PDE called ``name`` with ``options`` (InputError for an unknown name or option)."""
    if name not in REGISTRY:
        raise InputError(f"unknown PDE {name!r}; fem_moe ships {sorted(REGISTRY)}")
    return REGISTRY[name](**options)
