"""A PI-HC layer's training output shares its residual and Jacobian with the physics loss."""
import collections

import numpy as np
import pytest
import torch

import fem_moe
from fem_moe.expert import Expert
from problems import classical_solution, nonlinear_diffusion, random_basis, source

N = 4


@pytest.fixture
def assemblies(monkeypatch):
    """Counts, by what was assembled, of the experts' sparse Jacobians ("jacobian"), residuals
    ("residual") and the loss's transposed-Jacobian actions ("action"), from the moment the
    test resets them."""
    counts = collections.Counter()
    assemble, jacobian = Expert._assemble, Expert._assemble_jacobian

    def counted_assemble(self, form, *args, **kwargs):
        if form is self.JT_r:
            counts["action"] += 1
        if form is self.F:
            counts["residual"] += 1
        return assemble(self, form, *args, **kwargs)

    def counted_jacobian(self):
        counts["jacobian"] += 1
        return jacobian(self)

    monkeypatch.setattr(Expert, "_assemble", counted_assemble)
    monkeypatch.setattr(Expert, "_assemble_jacobian", counted_jacobian)
    return counts


def step(layer, problem, basis, data, counts):
    """The physics loss of the layer's output, its value and the gradients w.r.t. the basis and
    the data, and what the loss and the backward assembled."""
    b, d = basis.clone().requires_grad_(), data.clone().requires_grad_()
    u = layer(b, d)
    counts.clear()
    loss = fem_moe.residual_loss(problem, u, d)
    loss.backward()
    return loss.detach(), b.grad, d.grad, dict(counts)


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("mode", ["galerkin", "lstsq"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_physics_loss_of_a_training_output_takes_the_layers_jacobian(mode, dtype, assemblies):
    """In a training forward (the module in training mode, autograd recording) each output
    field brings its residual and sparse Jacobian to the physics loss: the loss and the backward
    assemble one Jacobian per sample, which the loss's gradient and the layer's
    implicit-function backward share, and no residual (float32: the solution's carried to the
    rounded field by that Jacobian) and no transposed-Jacobian action -- with the value and
    gradients of the evaluation-mode path, which assembles each for itself (in float32 the
    shared Jacobian is the delivered field's, the solution rounded: gradients within float32's
    round-off)."""
    problem = nonlinear_diffusion(n=8)
    layer = fem_moe.HardConstraint(problem, N, mode=mode)
    basis = random_basis(problem, N, batch=2).to(dtype)
    data = torch.cat([source(problem, 4.0), source(problem, 7.0)]).to(dtype)
    shared = step(layer.train(), problem, basis, data, assemblies)
    own = step(layer.eval(), problem, basis, data, assemblies)
    assert shared[3] == {"jacobian": 2}, shared[3]
    assert own[3] == {"jacobian": 2, "action": 2, "residual": 2}, own[3]
    ulp = torch.finfo(dtype).eps
    assert torch.allclose(shared[0].double(), own[0].double(), rtol=2 * ulp, atol=0), (shared[0],
                                                                                       own[0])
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for got, want in zip(shared[1:3], own[1:3]):
        assert torch.allclose(got, want, rtol=0, atol=tol * want.abs().max()), \
            (got - want).abs().max() / want.abs().max()


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("mode", ["galerkin", "lstsq"])
def test_a_float32_fields_residual_is_the_rounded_fields_own(mode, assemblies):
    """Where the basis spans the solution (to float32's precision), the float32 rounding of the
    delivered field changes the residual the loss sees by as much as the solve left: the point
    carries the solution's residual to the rounded field with its Jacobian (assembling none),
    and the loss's value and gradients are the evaluation-mode path's, which assembles the
    residual at the rounded field itself."""
    problem = nonlinear_diffusion(n=8)
    data = source(problem, 4.0)
    basis = random_basis(problem, N)
    basis[0, 1] = 0.7 * torch.tensor(classical_solution(problem, data[0].numpy()))
    basis, data = basis.float(), data.float()
    layer = fem_moe.HardConstraint(problem, N, mode=mode)
    shared = step(layer.train(), problem, basis, data, assemblies)
    own = step(layer.eval(), problem, basis, data, assemblies)
    assert "residual" not in shared[3], shared[3]
    rounded = fem_moe.residual_loss(problem, layer.train()(basis, data).double().float().double(),
                                    data.double()).item()
    unrounded = fem_moe.residual_loss(problem, layer(basis.double(), data.double()),
                                      data.double()).item()
    assert abs(rounded - unrounded) > 0.3 * unrounded, (rounded, unrounded)   # it matters
    assert torch.allclose(shared[0], own[0], rtol=2 * torch.finfo(torch.float32).eps,
                          atol=0), (shared[0], own[0])
    for got, want in zip(shared[1:3], own[1:3]):
        assert torch.allclose(got, want, rtol=0, atol=1e-4 * want.abs().max()), \
            (got - want).abs().max() / want.abs().max()


@pytest.mark.parallel([1, 2])
def test_a_field_the_layer_did_not_deliver_is_not_taken_for_one(assemblies):
    """The loss takes a point only for its field and data bit for bit: a field one ulp away,
    or the same field with other data, is assembled for itself; so is a copy of the delivered
    field (by value: the same residual, whoever made the tensor)."""
    problem = nonlinear_diffusion(n=6)
    layer = fem_moe.HardConstraint(problem, N, mode="galerkin").train()
    basis = random_basis(problem, N).requires_grad_()
    data = source(problem, 3.0)
    u = layer(basis, data)
    nudged = u.detach().clone()
    nudged[0, np.flatnonzero(~layer.expert.bc_mask)[:1]] *= 1 + 1e-15
    for field, d, actions in ((nudged, data, 1), (u, 1.01 * data, 1),
                              (u.detach().clone(), data, 0)):
        x = field.detach().clone().requires_grad_()
        assemblies.clear()
        fem_moe.residual_loss(problem, x, d).backward()
        assert assemblies["action"] == actions, (assemblies, actions)
