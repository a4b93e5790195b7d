"""A neural PDE solver: a backbone's basis fields, made into one field by a constraint.

The three kinds of the paper are one option apart, with the same backbone:

* ``"soft"``: u = sum_i a_i phi_i with learned weights a (no solve; the PDE only enters the
  loss, and the Dirichlet values only through the loss's boundary misfit);
* ``"pihc"``: the hard-constraint layer, one expert over the whole mesh (K = 1);
* ``"moe"``: the mixture of K hard-constraint experts.
"""
import torch
from torch import nn

from .errors import InputError
from .layer import HardConstraint
from .moe import MoEHardConstraint

__all__ = ["NeuralSolver", "KINDS"]

KINDS = ("soft", "pihc", "moe")


class NeuralSolver(nn.Module):
    """``u = solver(inputs, data)``.

    * ``inputs``: ``[batch, n_inputs]``, the same on every rank (the backbone's conditioning: a
      PDE's parameter vectors);
    * ``data``: ``[batch, problem.n_data_dofs]``, this rank's owned dofs of the problem data;
    * returns ``[batch, problem.n_dofs]``, this rank's owned dofs of the constrained unknown.

    ``backbone(inputs, points[, components])`` must return ``[batch, n_basis, n_points]`` (see
    :mod:`fem_moe.backbones`); it is evaluated at this rank's dof coordinates. Only the backbone
    (and the soft kind's weights) hold parameters, so ``state_dict()`` is the same size on every
    rank. Collective over the mesh communicator for the hard kinds.

    ``backbone_ranks``: a :class:`fem_moe.bridge.BackboneRanks`; then the backbone is evaluated
    on this rank's backbone rank (the basis comes back over MPI, and its gradient goes there),
    so only the backbone ranks need it on their devices. Default: on every rank.
    """

    def __init__(self, problem, backbone, kind="moe", n_basis=16, n_experts=None, mode="lstsq",
                 partitioner_type=None, backbone_ranks=None, **layer_kwargs):
        super().__init__()
        self.backbone_ranks = backbone_ranks
        if kind not in KINDS:
            raise InputError(f"model kind must be one of {KINDS}, got {kind!r}")
        self.problem, self.kind, self.n_basis = problem, kind, int(n_basis)
        self.backbone = backbone
        dtype = next(backbone.parameters()).dtype
        # Plain attributes, not buffers: they differ in size from rank to rank. The coordinates
        # are kept in float64 and cast from there: cast from a float32 backbone's dtype, a
        # model moved to float64 saw them rounded to float32 (2e-8 off on the unit square).
        self._coordinates = torch.tensor(problem.dof_coordinates(), dtype=torch.float64)
        self._points = self._coordinates.to(dtype)
        self._components = (torch.tensor(problem.dof_components()) if problem.n_components > 1
                            else None)
        if kind == "soft":
            self.weights = nn.Parameter(torch.full((self.n_basis,), 1.0 / self.n_basis,
                                                   dtype=dtype))
            self.constraint = None
        elif kind == "pihc":
            self.constraint = HardConstraint(problem, n_basis, mode=mode, **layer_kwargs)
        else:
            self.constraint = MoEHardConstraint(problem, n_basis, n_experts=n_experts, mode=mode,
                                                partitioner_type=partitioner_type, **layer_kwargs)

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        p = next(self.backbone.parameters())
        self._points = self._coordinates.to(device=p.device, dtype=p.dtype)
        if self._components is not None:
            self._components = self._components.to(p.device)
        return out

    def basis(self, inputs):
        """The backbone's basis fields at this rank's dofs, ``[batch, n_basis, n_dofs]``."""
        if self.backbone_ranks is not None:
            return self.backbone_ranks.evaluate(self.backbone, inputs, self._points,
                                                self._components)
        components = () if self._components is None else (self._components,)
        args = (inputs, self._points) + components
        return self.backbone(*args)

    def forward(self, inputs, data=None):
        basis = self.basis(inputs)
        if self.kind == "soft":
            return torch.einsum("bnp,n->bp", basis, self.weights)
        return self.constraint(basis, data)

    def extra_repr(self):
        return f"kind={self.kind!r}, n_basis={self.n_basis}"
