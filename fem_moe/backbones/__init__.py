"""Backbones: plain torch modules that output N basis fields at given points.

No Firedrake here: a backbone sees tensors only. The points are the dof coordinates of whatever
space the hard-constraint layer works on (``problem.dof_coordinates()``), so one backbone serves
any mesh, degree or partition.
"""
from .deeponet import DeepONetBasis, MLP  # noqa: F401
from .fno import FNO, FNOBasis, GridToPoints, ParametricFNOBasis  # noqa: F401

__all__ = ["MLP", "DeepONetBasis", "FNO", "FNOBasis", "GridToPoints", "ParametricFNOBasis"]
