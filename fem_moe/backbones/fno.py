"""A Fourier neural operator on a regular grid (the paper's backbone), and its interpolation to
arbitrary points (the dofs of an unstructured mesh)."""
import itertools

import torch
from torch import nn


class SpectralConv(nn.Module):
    """Fourier layer over the last ``d`` dims (d = 1, 2 or 3): keep ``modes`` frequencies per
    dim, multiply by learned complex weights. [batch, c_in, *grid] -> [batch, c_out, *grid]."""

    def __init__(self, c_in, c_out, modes):
        super().__init__()
        self.modes = tuple(modes)
        d = len(self.modes)
        scale = 1 / (c_in * c_out)
        # rfftn halves the last dim; the others keep both signs: 2^(d-1) corner blocks.
        self.corners = list(itertools.product((0, 1), repeat=d - 1))
        # Complex weights stored as real pairs (view_as_real): ``module.to(dtype)`` and
        # ``.double()`` cast real parameters and keep both parts, where a complex parameter
        # cast to a real dtype would lose its imaginary part.
        self.weights = nn.ParameterList(
            nn.Parameter(torch.view_as_real(scale * torch.randn(c_in, c_out, *self.modes,
                                                                dtype=torch.cfloat)).clone())
            for _ in self.corners)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written when the weights were complex parameters load as real pairs.
        for key in list(state_dict):
            if key.startswith(prefix + "weights.") and state_dict[key].is_complex():
                state_dict[key] = torch.view_as_real(state_dict[key]).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        d = len(self.modes)
        dims = tuple(range(-d, 0))
        grid = x.shape[-d:]
        xf = torch.fft.rfftn(x, dim=dims)
        out = torch.zeros(x.shape[0], self.weights[0].shape[1], *xf.shape[-d:],
                          dtype=xf.dtype, device=x.device)
        for corner, w in zip(self.corners, self.weights):
            index = [slice(None), slice(None)]
            for sign, m in zip(corner, self.modes[:-1]):
                index.append(slice(0, m) if sign == 0 else slice(-m, None))
            index.append(slice(0, self.modes[-1]))
            out[tuple(index)] = torch.einsum("bi...,io...->bo...", xf[tuple(index)],
                                             torch.view_as_complex(w.contiguous()).to(xf.dtype))
        return torch.fft.irfftn(out, s=grid, dim=dims)


class FNO(nn.Module):
    """Lift, ``layers`` x (spectral conv + 1x1 conv, GELU), project.

    ``[batch, in_channels, *grid] -> [batch, out_channels, *grid]``, grid of 1 to 3 dims; each
    grid size must be at least twice ``modes`` in the non-last dims and ``2 * modes - 1`` in
    the last.
    """

    def __init__(self, in_channels, out_channels, modes=(12, 12), width=32, layers=4):
        super().__init__()
        d = len(modes)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
        self.lift = conv(in_channels, width, 1)
        self.spectral = nn.ModuleList(SpectralConv(width, width, modes) for _ in range(layers))
        self.pointwise = nn.ModuleList(conv(width, width, 1) for _ in range(layers))
        self.project = nn.Sequential(conv(width, 2 * width, 1), nn.GELU(), conv(2 * width, out_channels, 1))

    def forward(self, x):
        x = self.lift(x)
        for i, (s, p) in enumerate(zip(self.spectral, self.pointwise)):
            x = s(x) + p(x)
            if i < len(self.spectral) - 1:
                x = nn.functional.gelu(x)
        return self.project(x)


class GridToPoints(nn.Module):
    """(Bi/tri)linear interpolation from a regular grid over the box [lower, upper] to points.

    ``[batch, channels, *grid]`` and ``points [n_points, d]`` -> ``[batch, channels, n_points]``.
    Grid node j along an axis sits at lower + j (upper - lower) / (size - 1). Exact for fields
    linear on each grid cell; differentiable w.r.t. the grid values.
    """

    def __init__(self, lower, upper):
        super().__init__()
        self.register_buffer("lower", torch.as_tensor(lower, dtype=torch.get_default_dtype()))
        self.register_buffer("upper", torch.as_tensor(upper, dtype=torch.get_default_dtype()))

    def forward(self, values, points):
        d = points.shape[-1]
        if d == 1:   # grid_sample wants 2D: a grid one cell high
            values, points = values.unsqueeze(-2), torch.cat([torch.zeros_like(points), points], -1)
            lower = torch.cat([self.lower.new_zeros(1), self.lower.reshape(1)])
            upper = torch.cat([self.upper.new_ones(1), self.upper.reshape(1)])
            values = torch.cat([values, values], -2)
        else:
            lower, upper = self.lower, self.upper
        # grid_sample's x is the last grid axis: reverse the coordinate order.
        unit = 2 * (points.to(values.dtype) - lower.to(values.dtype)) / (upper - lower).to(values.dtype) - 1
        where = unit.flip(-1).reshape(1, -1, *([1] * (len(values.shape) - 3)), unit.shape[-1])
        where = where.expand(values.shape[0], *where.shape[1:])
        out = nn.functional.grid_sample(values, where, mode="bilinear", align_corners=True)
        return out.reshape(values.shape[0], values.shape[1], -1)


class FNOBasis(nn.Module):
    """N basis fields at arbitrary points from an FNO on a regular grid (the paper's backbone,
    carried to unstructured meshes by interpolation).

    ``basis = net(inputs, points)``: ``inputs [batch, in_channels, *grid]`` (e.g. the initial
    condition and the grid coordinates, sampled on the grid), ``points [n_points, d]`` in the box
    ``[lower, upper]`` -> ``[batch, n_basis, n_points]``.
    """

    def __init__(self, in_channels, n_basis, lower, upper, modes=(12, 12), width=32, layers=4):
        super().__init__()
        self.fno = FNO(in_channels, n_basis, modes, width, layers)
        self.to_points = GridToPoints(lower, upper)

    def forward(self, inputs, points):
        return self.to_points(self.fno(inputs), points)


class ParametricFNOBasis(nn.Module):
    """An FNO basis network conditioned on a parameter vector: the FNO's input channels are the
    parameters (constant over the grid) and the grid coordinates.

    ``basis = net(inputs, points)``: ``inputs [batch, n_inputs]``, ``points [n_points, d]`` in the
    box ``[lower, upper]`` -> ``[batch, n_basis, n_points]``; the grid has ``grid`` nodes per
    axis over the box (points outside it get zero: an FNO does not extrapolate in space).
    """

    def __init__(self, n_inputs, n_basis, lower, upper, grid=32, modes=8, width=32, layers=4):
        super().__init__()
        lower = torch.as_tensor(lower, dtype=torch.get_default_dtype()).reshape(-1)
        upper = torch.as_tensor(upper, dtype=torch.get_default_dtype()).reshape(-1)
        d = lower.numel()
        axes = [torch.linspace(0.0, 1.0, grid) for _ in range(d)]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))          # [d, grid, ..]
        self.register_buffer("coords", coords)
        self.basis = FNOBasis(n_inputs + d, n_basis, lower, upper, modes=(modes,) * d,
                              width=width, layers=layers)

    def forward(self, inputs, points):
        B, d = inputs.shape[0], self.coords.shape[0]
        grid = self.coords.shape[1:]
        params = inputs[(...,) + (None,) * d].expand(B, inputs.shape[1], *grid)
        coords = self.coords.to(inputs.dtype).expand(B, d, *grid)
        return self.basis(torch.cat([params, coords], dim=1), points)
