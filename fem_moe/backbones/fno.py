"""A Fourier neural operator on a regular grid (the paper's backbone), and its interpolation to
arbitrary points (the dofs of an unstructured mesh)."""
import itertools

import torch
from torch import nn


class SpectralConv(nn.Module):
    """Fourier layer over the last ``d`` dims (d = 1, 2 or 3): keep ``modes`` frequencies per
    dim, multiply by learned complex weights. ``[batch, c_in, *grid] -> [batch, c_out, *grid]``."""

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

    ``products=True`` adds to each layer, before its activation, the pointwise product of two
    1x1 projections of what the layer computed, ``(A y) * (B y)``: a quadratic term such as the
    advection u . grad w — one spectral layer forms u and grad w from w exactly, their product
    is one bilinear map away —, which GELU alone approximates only through differences of
    squares that the training must learn to cancel.
    """

    def __init__(self, in_channels, out_channels, modes=(12, 12), width=32, layers=4,
                 products=False):
        super().__init__()
        d = len(modes)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
        self.lift = conv(in_channels, width, 1)
        self.spectral = nn.ModuleList(SpectralConv(width, width, modes) for _ in range(layers))
        self.pointwise = nn.ModuleList(conv(width, width, 1) for _ in range(layers))
        # One 1x1 conv gives both factors (A y, B y) of a layer's product.
        self.products = nn.ModuleList(conv(width, 2 * width, 1)
                                      for _ in range(layers)) if products else None
        self.project = nn.Sequential(conv(width, 2 * width, 1), nn.GELU(),
                                     conv(2 * width, out_channels, 1))

    def forward(self, x):
        x = self.lift(x)
        for i, (s, p) in enumerate(zip(self.spectral, self.pointwise)):
            x = s(x) + p(x)
            if self.products is not None:
                a, b = self.products[i](x).chunk(2, dim=1)
                x = x + a * b
            if i < len(self.spectral) - 1:
                x = nn.functional.gelu(x)
        return self.project(x)


class GridToPoints(nn.Module):
    """(Bi/tri)linear interpolation from a regular grid over the box [lower, upper] to points.

    ``[batch, channels, *grid]`` and ``points [n_points, d]`` -> ``[batch, channels, n_points]``.
    Grid node j along an axis sits at lower + j (upper - lower) / (size - 1). Exact for fields
    linear on each grid cell; differentiable w.r.t. the grid values.

    Along an axis with a period P > 0 (``periods`` [d], 0 where not periodic) the grid holds one
    period without its end, node j at lower + j P / size (what an FFT takes as periodic), and
    points interpolate across the seam between the last node and the first.
    """

    def __init__(self, lower, upper, periods=None):
        super().__init__()
        lower = torch.as_tensor(lower, dtype=torch.get_default_dtype()).reshape(-1)
        upper = torch.as_tensor(upper, dtype=torch.get_default_dtype()).reshape(-1)
        periods = torch.zeros_like(lower) if periods is None else \
            torch.as_tensor(periods, dtype=lower.dtype).reshape(-1)
        self.register_buffer("lower", lower)
        # A periodic axis's box is one period long: its padded grid ends on the first node's copy.
        self.register_buffer("upper", torch.where(periods > 0, lower + periods, upper))
        self.register_buffer("periods", periods, persistent=False)

    def _wrap(self, values, points):
        """Append each periodic axis's first slice after its last (the seam's node) and bring
        the points into [lower, lower + P) along those axes."""
        d = points.shape[-1]
        lower, periods = self.lower.to(points.dtype), self.periods.to(points.dtype)
        for axis in torch.nonzero(periods > 0).flatten().tolist():
            dim = values.ndim - d + axis
            values = torch.cat([values, values.narrow(dim, 0, 1)], dim)
            shifted = torch.remainder(points[:, axis] - lower[axis], periods[axis]) + lower[axis]
            points = torch.cat([points[:, :axis], shifted[:, None], points[:, axis + 1:]], -1)
        return values, points

    def forward(self, values, points):
        d = points.shape[-1]
        values, points = self._wrap(values, points.to(values.dtype))
        if d == 1:   # grid_sample wants 2D: a grid one cell high
            values, points = values.unsqueeze(-2), torch.cat([torch.zeros_like(points), points], -1)
            lower = torch.cat([self.lower.new_zeros(1), self.lower.reshape(1)])
            upper = torch.cat([self.upper.new_ones(1), self.upper.reshape(1)])
            values = torch.cat([values, values], -2)
        else:
            lower, upper = self.lower, self.upper
        # grid_sample's x is the last grid axis: reverse the coordinate order.
        extent = (upper - lower).to(values.dtype)
        unit = 2 * (points.to(values.dtype) - lower.to(values.dtype)) / extent - 1
        where = unit.flip(-1).reshape(1, -1, *([1] * (len(values.shape) - 3)), unit.shape[-1])
        where = where.expand(values.shape[0], *where.shape[1:])
        out = nn.functional.grid_sample(values, where, mode="bilinear", align_corners=True)
        return out.reshape(values.shape[0], values.shape[1], -1)


class FNOBasis(nn.Module):
    """N basis fields at arbitrary points from an FNO on a regular grid (the paper's backbone,
    carried to unstructured meshes by interpolation).

    ``basis = net(inputs, points, components=None)``: ``inputs [batch, in_channels, *grid]``
    (e.g. the initial condition and the grid coordinates, sampled on the grid), ``points
    [n_points, d]`` in the box ``[lower, upper]`` -> ``[batch, n_basis, n_points]``. For a
    vector-valued or mixed space (``n_components`` > 1) the FNO outputs one channel per basis
    field and component, and each point takes its component's (``components [n_points]``, as
    :class:`DeepONetBasis`). ``periods``: see :class:`GridToPoints`.
    """

    def __init__(self, in_channels, n_basis, lower, upper, modes=(12, 12), width=32, layers=4,
                 n_components=1, periods=None, products=False):
        super().__init__()
        self.n_basis, self.n_components = n_basis, n_components
        self.fno = FNO(in_channels, n_basis * n_components, modes, width, layers, products)
        self.to_points = GridToPoints(lower, upper, periods)

    def forward(self, inputs, points, components=None):
        grid = self.fno(inputs)                                     # [batch, N * C, *grid]
        if self.n_components == 1:
            return self.to_points(grid, points)
        if components is None:
            raise ValueError("a vector-valued FNOBasis needs the components of the points")
        # Each point reads only its own component's N channels: the points grouped by component,
        # each group interpolated from its channels, then put back in order. Interpolating all
        # N * C channels at every point and keeping one in C took half the soft step on the
        # turbulence window (C = 20) and a sixth of PI-HC's (benchmarks/training_step.py).
        grid = grid.view(grid.shape[0], self.n_basis, self.n_components, *grid.shape[2:])
        components = components.long().to(grid.device)
        order = torch.argsort(components, stable=True)
        counts = torch.bincount(components, minlength=self.n_components).tolist()
        parts = [self.to_points(grid[:, :, c], points[where])
                 for c, where in enumerate(order.split(counts)) if where.numel()]
        if not parts:       # no points (a rank without dofs): still a part of the graph
            return grid.flatten(2)[..., :0]
        return torch.cat(parts, -1)[..., torch.argsort(order)]


class ParametricFNOBasis(nn.Module):
    """An FNO basis network conditioned on a parameter vector.

    ``basis = net(inputs, points, components=None)``: ``inputs [batch, n_inputs]``, ``points
    [n_points, d]`` in the box ``[lower, upper]`` -> ``[batch, n_basis, n_points]``; the grid has
    ``grid`` nodes per axis over the box (points outside it get zero: an FNO does not
    extrapolate in space), or over one period along a periodic axis (``periods``, as
    :class:`GridToPoints`; there the FNO sees the coordinate as (cos, sin) of its angle).

    What the FNO sees besides the grid coordinates: when the parameters are the coefficients of
    fields (``input_fields [n_inputs, C, *grid]``, those fields on the grid:
    :meth:`grid_points` says where), the C fields sum_i inputs_i input_fields[i] — an operator
    from the input field to the basis, as the paper's FNO; otherwise the parameters themselves,
    each a channel constant over the grid.
    """

    def __init__(self, n_inputs, n_basis, lower, upper, grid=32, modes=8, width=32, layers=4,
                 n_components=1, periods=None, input_fields=None, products=False):
        super().__init__()
        lower = torch.as_tensor(lower, dtype=torch.get_default_dtype()).reshape(-1)
        upper = torch.as_tensor(upper, dtype=torch.get_default_dtype()).reshape(-1)
        d = lower.numel()
        periods = torch.zeros(d) if periods is None else torch.as_tensor(periods).reshape(-1)
        axes, coords = self.grid_axes(grid, periods), []
        for axis, (nodes, period) in enumerate(zip(axes, periods)):
            shape = [1] * d
            shape[axis] = grid
            along = nodes.view(shape).expand(*[grid] * d)
            if period > 0:
                coords += [torch.cos(2 * torch.pi * along), torch.sin(2 * torch.pi * along)]
            else:
                coords.append(along)
        self.register_buffer("coords", torch.stack(coords))     # [channels, grid, ..]
        if input_fields is not None:
            input_fields = torch.as_tensor(input_fields, dtype=torch.get_default_dtype())
            if tuple(input_fields.shape[2:]) != (grid,) * d or input_fields.shape[0] != n_inputs:
                raise ValueError(f"input_fields of shape {tuple(input_fields.shape)} for "
                                 f"{n_inputs} inputs on a grid of {grid} nodes per axis in {d}D")
            # Not saved: it comes from the PDE, as the mesh's periods.
            self.register_buffer("input_fields", input_fields, persistent=False)
            channels = input_fields.shape[1]
        else:
            self.input_fields, channels = None, n_inputs
        self.basis = FNOBasis(channels + self.coords.shape[0], n_basis, lower, upper,
                              modes=(modes,) * d, width=width, layers=layers,
                              n_components=n_components, periods=periods, products=products)

    @staticmethod
    def grid_axes(grid, periods):
        """Each axis's grid nodes in units of the box (or of the period): [0, 1] with its end,
        [0, 1) without it along a periodic axis."""
        return [torch.arange(grid) / grid if period > 0 else torch.linspace(0.0, 1.0, grid)
                for period in periods]

    @classmethod
    def grid_points(cls, lower, upper, grid, periods=None):
        """The grid's nodes, ``[grid ** d, d]`` (numpy-convertible), in the order of
        ``input_fields``' grid axes: where to evaluate the input fields."""
        lower = torch.as_tensor(lower, dtype=torch.float64).reshape(-1)
        upper = torch.as_tensor(upper, dtype=torch.float64).reshape(-1)
        periods = (torch.zeros_like(lower) if periods is None
                   else torch.as_tensor(periods, dtype=torch.float64))
        extent = torch.where(periods > 0, periods, upper - lower)
        axes = [lo + a.double() * e
                for lo, a, e in zip(lower, cls.grid_axes(grid, periods), extent)]
        return torch.stack([x.flatten() for x in torch.meshgrid(*axes, indexing="ij")], -1)

    def forward(self, inputs, points, components=None):
        B, d = inputs.shape[0], points.shape[-1]
        grid = self.coords.shape[1:]
        if self.input_fields is not None:
            fields = torch.einsum("bi,ic...->bc...", inputs, self.input_fields.to(inputs.dtype))
        else:
            fields = inputs[(...,) + (None,) * d].expand(B, inputs.shape[1], *grid)
        coords = self.coords.to(inputs.dtype).expand(B, *self.coords.shape)
        return self.basis(torch.cat([fields, coords], dim=1), points, components)
