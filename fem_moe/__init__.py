"""fem_moe: mixture-of-experts hard constraints for neural PDE solvers on Firedrake meshes.

A torch backbone predicts N basis fields on a mesh; a hard-constraint layer finds, per sample,
the coefficients that make the PDE residual assembled by Firedrake vanish (least squares or
Galerkin) with PETSc SNES, and back-propagates by the implicit function theorem.

The names below are imported on first use, so that ``fem_moe.backbones`` (plain torch) and
``fem_moe.bridge`` (torch and MPI) can be imported without Firedrake.
"""
import importlib

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "FemMoeError": "collective", "InputError": "collective", "SolverDivergedError": "errors",
    "RankDeficientBasisWarning": "errors", "TrainingStalledError": "errors",
    "ConstrainedProblem": "problem",
    "Expert": "expert", "DEFAULT_SOLVER_PARAMETERS": "expert",
    "HardConstraint": "layer", "residual_loss": "layer", "residual_rows": "layer",
    "constrained_solve": "adjoint",
    "MoEHardConstraint": "moe",
    "Partition": "partition", "DistributedPartition": "distributed",
    "NeuralSolver": "model",
    "Trainer": "train",
    "relative_l2": "losses",
    "load": "inference", "TrainedModel": "inference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fem_moe' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
