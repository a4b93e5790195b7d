"""fem_moe: mixture-of-experts hard constraints for neural PDE solvers on Firedrake meshes.

A torch backbone predicts N basis fields on a mesh; a hard-constraint layer finds, per sample,
the coefficients that make the PDE residual assembled by Firedrake vanish (least squares or
Galerkin) with PETSc SNES, and back-propagates by the implicit function theorem.
"""
from .errors import (FemMoeError, InputError, SolverDivergedError,  # noqa: F401
                     RankDeficientBasisWarning)
from .problem import ConstrainedProblem  # noqa: F401
from .expert import Expert, DEFAULT_SOLVER_PARAMETERS  # noqa: F401
from .layer import HardConstraint, residual_loss  # noqa: F401
from .adjoint import constrained_solve  # noqa: F401
from .moe import MoEHardConstraint  # noqa: F401
from .partition import Partition  # noqa: F401

__version__ = "0.1.0.dev0"
