"""A DeepONet-style basis network: branch on the input field, trunk on coordinates."""
import torch
from torch import nn


class MLP(nn.Sequential):
    """in_features -> width (x depth, with ``activation``) -> out_features."""

    def __init__(self, in_features, out_features, width=64, depth=3, activation=nn.GELU):
        layers, d = [], in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), activation()]
            d = width
        layers.append(nn.Linear(d, out_features))
        super().__init__(*layers)


class DeepONetBasis(nn.Module):
    """N basis fields at arbitrary points, conditioned on an input vector.

    ``basis = net(inputs, points, components=None)``

    * ``inputs``: ``[batch, n_inputs]`` — the input function at fixed sensor points (e.g. an
      initial condition sampled on a grid), or parameters.
    * ``points``: ``[n_points, dim]`` — where to evaluate (for a hard-constraint layer, the dof
      coordinates of this rank, ``problem.dof_coordinates()``).
    * ``components``: ``[n_points]`` integers in ``[0, n_components)`` for vector-valued spaces
      (the dof's component; ``problem.dof_components()``), else None.
    * returns ``[batch, n_basis, n_points]``: basis_i(x) = sum_k b_ik(inputs) t_k(x, component).

    The trunk sees coordinates scaled by ``scale`` (and shifted by ``shift``) so that a mesh of any
    size maps to about [-1, 1]. Along a coordinate with a period P > 0 (``periods`` [dim], 0 where
    not periodic) it sees (cos 2 pi x / P, sin 2 pi x / P) instead, so that every basis field is
    periodic and the two copies of a seam point are one point to it.

    ``fourier_features`` = m > 0 adds random Fourier features (Tancik et al., 2020): the trunk also
    sees cos(2 pi x.b_j) and sin(2 pi x.b_j) for m frequency vectors b_j drawn once from N(0, s^2),
    s = ``fourier_scale``, per scaled coordinate (whole numbers of cycles per period along a
    periodic one, so periodicity is kept). A plain MLP on coordinates learns the smooth part of a
    field first and its boundary layers and wakes last (spectral bias); with the features its fields
    resolve them: the span of the trunk fitted to the channel's solutions leaves 11 % of them with a
    plain trunk, 2 % with 32 features at scale 3 (``benchmarks/studies/trunk_span.py``). The
    frequencies are a buffer (saved with the weights; drawn from torch's generator, so the trainer's
    seed fixes them).
    """

    def __init__(self, n_inputs, n_basis, dim, n_components=1, latent=64, width=64, depth=3,
                 shift=0.0, scale=1.0, periods=None, fourier_features=0, fourier_scale=1.0):
        super().__init__()
        self.n_basis, self.latent, self.n_components = n_basis, latent, n_components
        periods = torch.zeros(dim) if periods is None else torch.as_tensor(periods)
        n_periodic = int((periods > 0).sum())
        if fourier_features < 0 or not fourier_scale > 0:
            raise ValueError(f"fourier_features must be >= 0 and fourier_scale > 0, got "
                             f"{fourier_features} and {fourier_scale}")
        self.branch = MLP(n_inputs, n_basis * latent, width, depth)
        component_inputs = n_components if n_components > 1 else 0
        n_trunk = dim + n_periodic + component_inputs + 2 * fourier_features
        self.trunk = MLP(n_trunk, latent, width, depth)
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.get_default_dtype()))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.get_default_dtype()))
        # Not saved: it comes from the mesh, and checkpoints stay loadable across versions.
        self.register_buffer("periods", periods.to(torch.get_default_dtype()), persistent=False)
        b = None
        if fourier_features:
            b = torch.randn(dim, fourier_features) * fourier_scale
            b[periods > 0] = b[periods > 0].round()
            b = b.to(torch.get_default_dtype())
        self.register_buffer("frequencies", b)     # None: no features, nothing in the checkpoint

    def forward(self, inputs, points, components=None):
        b = self.branch(inputs).view(inputs.shape[0], self.n_basis, self.latent)
        t = self.trunk_fields(points, components)
        return torch.einsum("bnk,pk->bnp", b, t) / self.latent ** 0.5

    def trunk_fields(self, points, components=None):
        """The trunk's ``latent`` fields at ``points``, ``[n_points, latent]``: every basis
        field is a combination of them, whatever the input."""
        x = (points.to(self.scale.dtype) - self.shift) / self.scale
        periodic = self.periods > 0
        features = []
        if self.frequencies is not None:
            # Along a periodic axis the coordinate in periods, so whole frequencies stay periodic.
            in_periods = points.to(x.dtype) / torch.where(periodic, self.periods, 1)
            u = torch.where(periodic, in_periods, x)
            phase = 2 * torch.pi * u @ self.frequencies
            features = [torch.cos(phase), torch.sin(phase)]
        if periodic.any():
            angle = 2 * torch.pi * points[:, periodic].to(x.dtype) / self.periods[periodic]
            x = torch.cat([x[:, ~periodic], torch.cos(angle), torch.sin(angle)], -1)
        if self.n_components > 1:
            if components is None:
                raise ValueError("a vector-valued DeepONetBasis needs the components of the points")
            which = nn.functional.one_hot(components.long(), self.n_components).to(x.dtype)
            x = torch.cat([x, which], -1)
        if features:
            x = torch.cat([x] + features, -1)
        return self.trunk(x)
