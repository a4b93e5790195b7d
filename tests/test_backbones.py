"""Backbones: shapes, gradients, interpolation exactness, and no Firedrake inside."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from fem_moe.backbones import DeepONetBasis, FNO, FNOBasis, GridToPoints


def test_backbones_and_bridge_do_not_import_firedrake():
    """The torch side runs where Firedrake is not installed (a GPU node's backbone benchmark):
    the backbones, and the bridge serving a backbone (its errors included)."""
    code = ("import sys, torch\n"
            "from fem_moe import bridge\n"
            "from fem_moe.backbones import DeepONetBasis\n"
            "served = bridge.BackboneRanks()\n"
            "out = served.evaluate(DeepONetBasis(2, 3, 2), torch.zeros(1, 2), torch.rand(5, 2))\n"
            "assert out.shape == (1, 3, 5)\n"
            "try:\n"
            "    bridge.BackboneRanks(ranks=[1])\n"
            "except bridge.InputError as e:\n"
            "    assert 'must include rank 0' in str(e)\n"
            "sys.exit('firedrake' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("n_components", [1, 2])
def test_deeponet_shapes_and_gradients(n_components):
    torch.manual_seed(0)
    net = DeepONetBasis(n_inputs=10, n_basis=6, dim=2, n_components=n_components).double()
    inputs = torch.randn(3, 10, dtype=torch.float64)
    for n_points in (17, 40):   # any mesh: the points are an input
        points = torch.rand(n_points, 2, dtype=torch.float64)
        comps = torch.arange(n_points) % n_components if n_components > 1 else None
        out = net(inputs, points, comps)
        assert out.shape == (3, 6, n_points)
    out.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    if n_components > 1:
        with pytest.raises(ValueError, match="components"):
            net(inputs, points)


def test_deeponet_components_differ():
    torch.manual_seed(0)
    net = DeepONetBasis(4, 3, 2, n_components=2).double()
    p = torch.rand(5, 2, dtype=torch.float64)
    inputs = torch.randn(1, 4, dtype=torch.float64)
    a = net(inputs, p, torch.zeros(5, dtype=torch.long))
    b = net(inputs, p, torch.ones(5, dtype=torch.long))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("grid", [(32,), (16, 20), (8, 10, 12)])
def test_fno_shapes_and_resolution_independence(grid):
    torch.manual_seed(0)
    d = len(grid)
    modes = (4,) * d
    fno = FNO(2, 5, modes=modes, width=8, layers=2).double()
    x = torch.randn(2, 2, *grid, dtype=torch.float64, requires_grad=True)
    y = fno(x)
    assert y.shape == (2, 5, *grid)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    finer = fno(torch.randn(1, 2, *[2 * g for g in grid], dtype=torch.float64))
    assert finer.shape == (1, 5, *[2 * g for g in grid])


@pytest.mark.parametrize("d", [1, 2, 3])
def test_grid_to_points_is_exact_for_linear_fields(d):
    lower, upper = np.array([0.5, -1.0, 2.0][:d]), np.array([2.0, 1.0, 3.0][:d])
    sizes = [9, 7, 5][:d]
    axes = [torch.linspace(lo, up, s, dtype=torch.float64)
            for lo, up, s in zip(lower, upper, sizes)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    coef = torch.tensor([1.5, -2.0, 0.7][:d], dtype=torch.float64)
    field = 0.3 + sum(c * m for c, m in zip(coef, mesh))
    points = torch.tensor(lower + (upper - lower) * np.random.default_rng(0).random((50, d)))
    out = GridToPoints(lower, upper)(field[None, None], points)
    assert out.shape == (1, 1, 50)
    assert torch.allclose(out[0, 0], 0.3 + points @ coef, atol=1e-12)


def test_grid_to_points_wraps_around_a_periodic_axis():
    """Along a periodic axis the grid holds one period without its end: a field linear on the
    cells between nodes, including the seam's cell (last node to the first's copy), is
    interpolated exactly at points anywhere, x and x + P alike."""
    n, P = 8, 2.0
    nodes = torch.arange(n, dtype=torch.float64) * P / n
    values = torch.cos(2 * torch.pi * nodes / P) + 0.5 * torch.sin(4 * torch.pi * nodes / P)
    rows = 1.0 + torch.linspace(0.0, 1.0, 5, dtype=torch.float64)          # a plain axis, [0, 1]
    field = values[:, None] * rows[None, :]
    points = torch.tensor(np.random.default_rng(1).random((40, 2)), dtype=torch.float64)
    points[:, 0] = points[:, 0] * 3 * P - P                                   # three periods
    interp = GridToPoints([0.0, 0.0], [123.0, 1.0], periods=[P, 0.0])        # upper ignored along x
    out = interp(field[None, None], points)[0, 0]
    # The piecewise-linear periodic interpolant by hand.
    s = torch.remainder(points[:, 0], P) / (P / n)
    j = torch.floor(s).long()
    lam = s - j
    expected = ((1 - lam) * values[j % n] + lam * values[(j + 1) % n]) * (1.0 + points[:, 1])
    assert (out - expected).abs().max() < 1e-12, (out - expected).abs().max()
    assert torch.allclose(interp(field[None, None], points + torch.tensor([P, 0.0]))[0, 0], out,
                          atol=1e-12)


def test_fno_basis_points():
    torch.manual_seed(0)
    net = FNOBasis(1, 4, lower=[0, 0], upper=[1, 1], modes=(4, 4), width=8, layers=2).double()
    out = net(torch.randn(2, 1, 16, 16, dtype=torch.float64),
              torch.rand(33, 2, dtype=torch.float64))
    assert out.shape == (2, 4, 33)


@pytest.mark.parametrize("d", [1, 2])
def test_parametric_fno_basis_shapes_and_gradients(d):
    from fem_moe.backbones import ParametricFNOBasis
    net = ParametricFNOBasis(3, 5, [0.0] * d, [1.0] * d, grid=12, modes=4, width=8,
                             layers=2).double()
    points = torch.rand(40, d, dtype=torch.float64)
    inputs = torch.randn(2, 3, dtype=torch.float64)
    out = net(inputs, points)
    assert out.shape == (2, 5, 40)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    # Different parameters give different fields: the conditioning reaches the output.
    assert not torch.allclose(out[0], out[1])


def test_parametric_fno_components_and_input_fields():
    """A mixed space's points take their own component's channel; with input fields the FNO
    sees sum_i inputs_i fields_i on the grid (not the raw parameters), so inputs giving the same
    field give the same basis."""
    from fem_moe.backbones import ParametricFNOBasis
    torch.manual_seed(0)
    grid, C = 8, 3
    where = ParametricFNOBasis.grid_points([0.0, 0.0], [1.0, 1.0], grid, periods=[1.0, 1.0])
    assert where.shape == (grid * grid, 2) and float(where.max()) == pytest.approx(1 - 1 / grid)
    x = where.numpy()
    # Three inputs, the third field the sum of the first two: inputs (1, 1, 0) and (0, 0, 1) agree.
    f = np.stack([np.cos(2 * np.pi * x[:, 0]), np.sin(2 * np.pi * x[:, 1])])
    fields = np.concatenate([f, f.sum(0, keepdims=True)])[:, None, :].reshape(3, 1, grid, grid)
    net = ParametricFNOBasis(3, 4, [0.0, 0.0], [1.0, 1.0], grid=grid, modes=3, width=8, layers=2,
                             n_components=C, periods=[1.0, 1.0], input_fields=fields).double()
    points = torch.rand(30, 2, dtype=torch.float64)
    components = torch.arange(30) % C
    inputs = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, -1.0, 0.5]], dtype=torch.float64)
    out = net(inputs, points, components)
    assert out.shape == (3, 4, 30)
    assert torch.allclose(out[0], out[1], atol=1e-12) and not torch.allclose(out[0], out[2])
    every = net.basis.to_points(net.basis.fno(torch.cat(
        [torch.einsum("bi,ic...->bc...", inputs, net.input_fields),
         net.coords.expand(3, *net.coords.shape)], 1)), points).view(3, 4, C, 30)
    assert torch.allclose(out, every[:, :, components, torch.arange(30)], atol=1e-12)
    # Points of some components only (a rank may own none of a component's dofs), in any order.
    some = torch.tensor([2, 0, 2, 2, 0])
    assert torch.allclose(net(inputs, points[:5], some), every[:, :, some, torch.arange(5)],
                          atol=1e-12)
    none = net(inputs, points[:0], components[:0])
    assert none.shape == (3, 4, 0) and none.requires_grad
    with pytest.raises(ValueError, match="components"):
        net(inputs, points)
    with pytest.raises(ValueError, match="input_fields"):
        ParametricFNOBasis(2, 4, [0.0, 0.0], [1.0, 1.0], grid=grid, input_fields=fields)


def test_fno_products_add_a_quadratic_term():
    """``products=True`` adds (A y) * (B y) to each layer: with A, B zero the FNO is the plain one
    (same weights, same output), with them set the output changes and their gradients flow; a
    layer whose A and B pick one channel squares it before the activation."""
    from fem_moe.backbones import FNO
    torch.manual_seed(0)
    plain = FNO(2, 3, modes=(3, 3), width=4, layers=2).double()
    quad = FNO(2, 3, modes=(3, 3), width=4, layers=2, products=True).double()
    missing, unexpected = quad.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("products.") for k in missing)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for conv in quad.products:
            conv.weight.zero_()
            conv.bias.zero_()
    assert torch.allclose(quad(x), plain(x), atol=1e-14)
    # A y = B y = channel 0 of y in the first layer: its pre-activation gains y_0^2 in channel 0.
    seen = {}
    quad.pointwise[0].register_forward_hook(lambda m, i, o: seen.setdefault("p", o))
    quad.spectral[0].register_forward_hook(lambda m, i, o: seen.setdefault("s", o))
    with torch.no_grad():
        quad.products[0].weight[0, 0] = 1.0         # factor A, output channel 0, from y_0
        quad.products[0].weight[4, 0] = 1.0         # factor B (second half), from y_0
    layer = {}
    quad.spectral[1].register_forward_pre_hook(lambda m, i: layer.setdefault("x", i[0]))
    out = quad(x)
    y = seen["s"] + seen["p"]
    expected = y.clone()
    expected[:, 0] += y[:, 0] ** 2
    assert torch.allclose(layer["x"], torch.nn.functional.gelu(expected), atol=1e-13)
    assert not torch.allclose(out, plain(x))
    # As initialised (neither factor zero), every product's weights get a gradient.
    fresh = FNO(2, 3, modes=(3, 3), width=4, layers=2, products=True).double()
    fresh(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fresh.products.parameters())


def test_deeponet_periodic_trunk_sees_one_point_on_the_seam():
    """With periods, x and x + P are the same point to the trunk; without, they are not."""
    torch.manual_seed(0)
    inputs = torch.randn(2, 5, dtype=torch.float64)
    points = torch.rand(9, 2, dtype=torch.float64)
    shifted = points + torch.tensor([1.0, 0.0], dtype=torch.float64)
    periodic = DeepONetBasis(5, 4, dim=2, periods=[1.0, 0.0]).double()
    assert torch.allclose(periodic(inputs, points), periodic(inputs, shifted), atol=1e-12)
    assert "periods" not in periodic.state_dict()     # from the mesh, not a learned state
    plain = DeepONetBasis(5, 4, dim=2).double()
    assert not torch.allclose(plain(inputs, points), plain(inputs, shifted), atol=1e-6)


def test_deeponet_fourier_features_are_periodic_and_saved():
    """Fourier features along a periodic axis keep x and x + P one point; their frequencies
    are part of the saved state (a model loaded from it computes the same fields), and a trunk
    without features saves none (checkpoints from before the option load)."""
    torch.manual_seed(0)
    inputs = torch.randn(2, 5, dtype=torch.float64)
    points = torch.rand(9, 2, dtype=torch.float64)
    shifted = points + torch.tensor([2.0, 0.0], dtype=torch.float64)
    net = DeepONetBasis(5, 4, dim=2, periods=[2.0, 0.0], fourier_features=16,
                        fourier_scale=2.0).double()
    assert net.frequencies.shape == (2, 16)
    assert (net.frequencies[1] != net.frequencies[1].round()).any()
    assert torch.allclose(net(inputs, points), net(inputs, shifted), atol=1e-12)
    torch.manual_seed(1)
    other = DeepONetBasis(5, 4, dim=2, periods=[2.0, 0.0], fourier_features=16,
                          fourier_scale=2.0).double()
    assert not torch.allclose(other.frequencies, net.frequencies)
    other.load_state_dict(net.state_dict())
    assert torch.equal(other(inputs, points), net(inputs, points))
    plain = DeepONetBasis(5, 4, dim=2).double()
    assert "frequencies" not in plain.state_dict()
    with pytest.raises(ValueError, match="fourier_features"):
        DeepONetBasis(5, 4, dim=2, fourier_features=-2)


def _complex(w):
    """A spectral weight as a complex tensor (complex parameters, or real (re, im) pairs)."""
    w = w.detach()
    if w.is_complex():
        return w
    assert w.shape[-1] == 2, "a complex weight was cast to a real dtype: its imaginary part is lost"
    return torch.view_as_complex(w.contiguous())


def test_fno_weights_survive_dtype_round_trip_and_train():
    """The spectral weights are complex numbers: casting the model to float64 and back (as the
    trainer does with ``.to(dtype=...)``) keeps their imaginary parts, the output is the same,
    and a few Adam steps in float64 lower a loss."""
    torch.manual_seed(0)
    net = FNO(2, 1, modes=(4, 4), width=8, layers=2)
    x = torch.randn(3, 2, 12, 12)
    before = [_complex(w).clone() for w in net.spectral[0].weights]
    y32 = net(x)
    net.to(dtype=torch.float64)
    after = [_complex(w) for w in net.spectral[0].weights]
    assert all(b.imag.abs().max() > 0 and torch.allclose(b.to(torch.complex128), a)
               for b, a in zip(before, after))
    y64 = net(x.double())
    assert torch.allclose(y64.float(), y32, atol=1e-5)
    net.float()
    assert torch.allclose(net(x), y32, atol=1e-6)
    net.double()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    target = torch.sin(torch.linspace(0, 3, 12, dtype=torch.float64))[None, None, :,
                                                                      None].expand(3, 1, 12, 12)
    losses = []
    for _ in range(20):
        loss = (net(x.double()) - target).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_fno_loads_checkpoints_with_complex_weights():
    net = FNO(2, 1, modes=(4, 4), width=8, layers=1)
    old = {k: (_complex(v) if ".weights." in k else v)
           for k, v in net.state_dict().items()}
    fresh = FNO(2, 1, modes=(4, 4), width=8, layers=1)
    fresh.load_state_dict(old)
    x = torch.randn(1, 2, 10, 10)
    assert torch.allclose(fresh(x), net(x))
