"""Warm starts (each sample's solve from its last solution) and the training tolerance."""
import numpy as np
import pytest
import torch

import fem_moe
from fem_moe.errors import InputError
from problems import nonlinear_diffusion, random_basis, source

N = 4


def layers(problem, **kwargs):
    return {"pihc": lambda: fem_moe.HardConstraint(problem, N, **kwargs),
            "coupled": lambda: fem_moe.MoEHardConstraint(problem, N, n_experts=3, **kwargs),
            "independent": lambda: fem_moe.MoEHardConstraint(problem, N, n_experts=3, coupled=False,
                                                             ridge_always=True, **kwargs)}


def infos(layer):
    """Per sample of the last forward: the solves' SampleInfos (the coupled one, or each
    expert's in turn)."""
    if isinstance(layer, fem_moe.HardConstraint):
        return [[i] for i in layer.diagnostics]
    diags = layer.all_diagnostics()
    if diags.coupling:
        return [[i] for i in diags.coupling]
    return [list(s) for s in zip(*[d["samples"] for d in diags])]


def batch(problem, scales):
    return torch.cat([source(problem, s) for s in scales])


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("kind", ["pihc", "coupled", "independent"])
def test_warm_start_starts_near_and_gives_the_cold_solution(kind):
    problem = nonlinear_diffusion(n=8)
    warm, cold = layers(problem, warm_start=True)[kind](), layers(problem)[kind]()
    data = batch(problem, [1.0, 2.0, 3.0])
    basis = random_basis(problem, N, batch=3)
    warm(basis, data)
    assert all(not i.warm for s in infos(warm) for i in s)
    # The next step's basis: a small change, as one optimiser step makes; and a new sample.
    basis2 = basis + 1e-3 * random_basis(problem, N, batch=3, seed=7)
    data2 = batch(problem, [1.0, 2.0, 4.0])
    u_warm, u_cold = warm(basis2, data2), cold(basis2, data2)
    used = infos(warm)
    assert [all(i.warm for i in s) for s in used] == [True, True, False]
    assert torch.allclose(u_warm, u_cold, rtol=0, atol=1e-8 * u_cold.abs().max())
    # The warm solves started from the stored coefficients: their starting residual is within a
    # tenth of the cold start's excess over the minimum.
    total = lambda layer, key: np.array([sum(i[key] for i in s) for s in infos(layer)])
    best = total(cold, "residual_after")
    excess_warm = total(warm, "residual_before") - best
    excess_cold = total(cold, "residual_before") - best
    assert np.all(excess_warm[:2] < 0.1 * excess_cold[:2]), (excess_warm, excess_cold)
    assert warm.warm_starts.hits == 2 and warm.warm_starts.misses == 4
    # The gradient is the cold one's (the implicit-function gradient at the same solution).
    b1, b2 = basis2.clone().requires_grad_(), basis2.clone().requires_grad_()
    warm(b1, data2).square().sum().backward()
    cold(b2, data2).square().sum().backward()
    assert torch.allclose(b1.grad, b2.grad, rtol=0, atol=1e-6 * b2.grad.abs().max())


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("mode", ["lstsq", "galerkin"])
@pytest.mark.parametrize("kind", ["pihc", "coupled", "independent"])
def test_warm_start_survives_a_moved_basis(kind, mode):
    """What an optimiser step does to a basis: the same span in other coefficients (mixed by
    an invertible matrix), a little moved. The sample's stored solution, fitted by the new
    basis, starts the solve at its solution -- stored coefficients would start it far away
    (worse than cold: refused) -- and the warm solve stops where a cold one does, so it takes
    fewer iterations than the cold solve, and gives the same solution."""
    problem = nonlinear_diffusion(n=8)
    kw = {"mode": mode}
    warm, cold = layers(problem, warm_start=True, **kw)[kind](), layers(problem, **kw)[kind]()
    data = batch(problem, [1.0, 3.0])
    basis = random_basis(problem, N, batch=2)
    warm(basis, data)
    mix = torch.tensor(np.random.default_rng(3).normal(size=(N, N)) + 2 * np.eye(N))
    moved = torch.einsum("ij,bjn->bin", mix, basis) + 1e-7 * random_basis(problem, N, batch=2,
                                                                          seed=5)
    u_warm, u_cold = warm(moved, data), cold(moved, data)
    used, fresh = infos(warm), infos(cold)
    assert all(i.warm for s in used for i in s)
    its = lambda runs: sum(i.iterations for s in runs for i in s)
    if kind != "independent":
        # (The independent experts' ridge rho |w|^2, the paper's, changes with the basis's
        # coefficients: the stored field is not the new solution, only near it.)
        assert its(used) < its(fresh), (its(used), its(fresh))
    # Least squares on a basis that cannot zero the residual stops at its objective's round-off
    # floor (stall_rtol), a few 1e-8 from the cold solve's stopping point; Galerkin at |G| ~ 0.
    tol = 1e-7 if mode == "lstsq" else 1e-10
    assert torch.allclose(u_warm, u_cold, rtol=0, atol=tol * u_cold.abs().max())


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("kind", ["pihc", "coupled", "independent"])
def test_a_warm_start_stops_where_a_cold_solve_would(kind):
    """SNES measures its relative tolerance from the start's |G|; a warm start already within
    the cold solve's tolerance (training_rtol times |G| at the cold start) is done at once,
    instead of being driven training_rtol below its own, already small, |G|."""
    problem = nonlinear_diffusion(n=8)
    layer = layers(problem, warm_start=True, mode="galerkin", training_rtol=1e-3)[kind]()
    data, basis = batch(problem, [1.0, 3.0]), random_basis(problem, N, batch=2)
    layer(basis.clone().requires_grad_(), data)
    assert all(i.iterations > 0 for s in infos(layer) for i in s)
    moved = basis + 1e-6 * random_basis(problem, N, batch=2, seed=5)
    layer(moved.requires_grad_(), data)
    assert all(i.warm and i.iterations == 0 for s in infos(layer) for i in s), infos(layer)


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("kind", ["pihc", "coupled"])
def test_a_diverging_warm_start_is_repeated_cold(kind, monkeypatch):
    from fem_moe.coupling import CoupledSolver
    from fem_moe.errors import SolverDivergedError
    from fem_moe.expert import Expert
    problem = nonlinear_diffusion(n=6)
    layer = layers(problem, warm_start=True)[kind]()
    data, basis = batch(problem, [1.0]), random_basis(problem, N)
    u_cold = layer(basis, data)
    # Every warm-started solve diverges, on every rank, where SNES would report it.
    cls = Expert if kind == "pihc" else CoupledSolver
    solve = cls.solve

    def diverging_when_warm(self, *args, **kwargs):
        out = solve(self, *args, **kwargs)
        if out[-1].warm:
            raise SolverDivergedError("injected", sample=kwargs.get("sample"),
                                      reason="DIVERGED_MAX_IT")
        return out

    monkeypatch.setattr(cls, "solve", diverging_when_warm)
    u = layer(basis, data)
    assert not infos(layer)[0][0].warm and layer.warm_starts.hits == 1
    assert torch.allclose(u, u_cold, rtol=0, atol=1e-10 * u_cold.abs().max())


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("kind", ["pihc", "coupled", "independent"])
def test_a_start_worse_than_cold_is_not_used(kind):
    """A stored start whose objective is above the cold start's (a stale sample after the basis
    moved, in a worse basin of a nonlinear PDE) is dropped for the cold start: the same output
    and no more iterations than a cold solve."""
    problem = nonlinear_diffusion(n=6)
    warm, cold = layers(problem, warm_start=True)[kind](), layers(problem)[kind]()
    data, basis = batch(problem, [2.0]), random_basis(problem, N)
    u_cold = cold(basis, data)
    warm(basis, data)
    # The stored entry (the sample's solution, per expert for a mixture) turned far away.
    keys, _ = warm.warm_starts.lookup(data.numpy())
    entry = warm.warm_starts[keys[0]]
    far = lambda u: -30.0 * u
    warm.warm_starts[keys[0]] = far(entry) if kind == "pihc" else {k: far(u)
                                                                   for k, u in entry.items()}
    u = warm(basis, data)
    assert warm.warm_starts.hits == 2
    assert not any(i.warm for i in infos(warm)[0])
    assert sum(i.iterations for i in infos(warm)[0]) <= sum(i.iterations for i in infos(cold)[0])
    assert torch.allclose(u, u_cold, rtol=0, atol=1e-8 * u_cold.abs().max())


def test_no_warm_start_without_data_or_when_off():
    problem = nonlinear_diffusion(n=4)
    off = fem_moe.HardConstraint(problem, N)
    data, basis = batch(problem, [1.0]), random_basis(problem, N)
    off(basis, data), off(basis, data)
    assert not off.diagnostics[0].warm and len(off.warm_starts) == 0
    # A problem whose samples differ only through the basis: nothing to know a sample by.
    import firedrake as fd
    V = problem.V
    plain = fem_moe.ConstrainedProblem(
        V, lambda u, v, m: (fd.inner(fd.grad(u), fd.grad(v)) - v) * fd.dx,
        bcs=fd.DirichletBC(V, 0.0, "on_boundary"))
    layer = fem_moe.HardConstraint(plain, N, warm_start=True)
    layer(basis), layer(basis)
    assert not layer.diagnostics[0].warm and len(layer.warm_starts) == 0


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("kind", ["pihc", "coupled"])
def test_training_rtol_applies_to_training_forwards_only(kind):
    problem = nonlinear_diffusion(n=6)
    loose = layers(problem, training_rtol=1e-3)[kind]()
    tight = layers(problem)[kind]()
    data, basis = batch(problem, [3.0]), random_basis(problem, N)
    u_tight = tight(basis, data)
    its_tight = infos(tight)[0][0].iterations
    # Training forward: fewer iterations, an answer a loose tolerance away.
    u = loose(basis.clone().requires_grad_(), data)
    assert infos(loose)[0][0].iterations < its_tight
    assert not torch.allclose(u, u_tight, rtol=0, atol=1e-10 * u_tight.abs().max())
    # Evaluation (no_grad, or eval mode): the options' tolerance, the tight answer.
    with torch.no_grad():
        assert torch.allclose(loose(basis, data), u_tight, rtol=0, atol=1e-10 * u_tight.abs().max())
    loose.eval()
    assert torch.allclose(loose(basis.clone().requires_grad_(), data), u_tight, rtol=0,
                          atol=1e-10 * u_tight.abs().max())
    with pytest.raises(InputError, match="training_rtol"):
        fem_moe.HardConstraint(problem, N, training_rtol=2.0)


def test_trainer_passes_warm_start_and_training_rtol():
    from fem_moe.train import Trainer
    from test_training import config, shared_dir
    layer = Trainer(config(shared_dir(), model={"kind": "pihc"})).model.constraint
    assert layer.training_rtol is None and layer.warm_starts.capacity > 0
    layer = Trainer(config(shared_dir(), model={"kind": "pihc", "warm_start": False,
                                                "training_rtol": 1e-8})).model.constraint
    assert layer.training_rtol == 1e-8 and layer.warm_starts.capacity == 0
    # Jacobians are kept for Galerkin layers only, within model.warm_start_memory MiB per rank.
    assert Trainer(config(shared_dir(),
                          model={"kind": "pihc"})).model.constraint.jacobians.capacity == 0
    layer = Trainer(config(shared_dir(), model={"kind": "moe", "mode": "galerkin",
                                                "warm_start_memory": 3})).model.constraint
    assert layer.jacobians.memory == 3 * 2 ** 20 and layer.jacobians.capacity is None


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("kind", ["pihc", "coupled"])
def test_chord_steps_keep_the_first_jacobian_and_give_newtons_solution_and_gradient(kind,
                                                                                    monkeypatch):
    """Galerkin mode: a warm-started solve keeps the reduced Jacobian of its first iterate while
    each step cuts |G| by chord_contraction (chord steps: one sparse Jacobian assembly where
    Newton takes one per iterate), and gives Newton's solution and, since the backward
    assembles its own Jacobian at the solution, Newton's gradient."""
    from fem_moe.expert import Expert
    assembled = []
    real = Expert._assemble_jacobian
    monkeypatch.setattr(Expert, "_assemble_jacobian",
                        lambda self: assembled.append(1) or real(self))

    mesh = nonlinear_diffusion(n=8).V.mesh()

    def run(contraction):
        # A 5x stronger nonlinearity than the other tests' (the source's scale), so that Newton
        # needs several iterates from the warm start.
        problem = nonlinear_diffusion(mesh=mesh,
                                      solver_parameters={"chord_contraction": contraction})
        layer = layers(problem, warm_start=True, mode="galerkin",
                       **({} if kind == "pihc"
                          else {"coupling_parameters": {"chord_contraction": contraction}}))[kind]()
        data, basis = batch(problem, [5.0, 8.0]), random_basis(problem, N, batch=2)
        layer(basis, data)
        moved = (basis + 1e-3 * random_basis(problem, N, batch=2, seed=5)).requires_grad_()
        assembled.clear()
        u = layer(moved, data)
        forward = len(assembled)
        u.square().sum().backward()
        return u.detach(), moved.grad, forward, infos(layer)

    u_newton, g_newton, jac_newton, newton = run(0.0)
    u_chord, g_chord, jac_chord, chord = run(1e-2)
    assert all(i.warm for s in chord for i in s)
    assert all(i.chord_steps == 0 for s in newton for i in s)
    assert sum(i.chord_steps for s in chord for i in s) > 0, chord
    assert jac_chord < jac_newton, (jac_chord, jac_newton)
    assert torch.allclose(u_chord, u_newton, rtol=0, atol=1e-10 * u_newton.abs().max())
    assert torch.allclose(g_chord, g_newton, rtol=0, atol=1e-8 * g_newton.abs().max())


@pytest.mark.parallel([1, 2, 3])
@pytest.mark.parametrize("kind", ["pihc", "coupled"])
def test_a_revisit_takes_its_stored_jacobian_and_gives_the_same_solution_and_gradient(kind):
    """A warm-started Galerkin layer keeps each sample's Jacobian at the solution its backward
    assembled, and its residual at the lifting: the sample's next solve takes that Jacobian as
    its first chord matrix and assembles fewer of its own (none where it contracts), and gives
    the solution and gradient of a layer that keeps nothing."""
    mesh = nonlinear_diffusion(n=8).V.mesh()
    problem = nonlinear_diffusion(mesh=mesh)
    keeping = layers(problem, warm_start=True, mode="galerkin")[kind]()
    plain = layers(problem, warm_start=True, mode="galerkin", warm_start_memory=0)[kind]()
    data, basis = batch(problem, [5.0, 8.0]), random_basis(problem, N, batch=2)
    moved = basis + 1e-3 * random_basis(problem, N, batch=2, seed=5)
    out = {}
    for name, layer in (("keeping", keeping), ("plain", plain)):
        b = basis.clone().requires_grad_()
        layer(b, data).square().sum().backward()
        b = moved.clone().requires_grad_()
        u = layer(b, data)
        u.square().sum().backward()
        out[name] = u.detach(), b.grad, [i for s in infos(layer) for i in s]
    assert len(keeping.jacobians) == 2 and len(plain.jacobians) == 0
    used = sum(i.jacobians for i in out["keeping"][2])
    own = sum(i.jacobians for i in out["plain"][2])
    assert all(i.warm for i in out["keeping"][2] + out["plain"][2])
    assert used < own, (used, own)
    u, g = out["plain"][:2]
    assert torch.allclose(out["keeping"][0], u, rtol=0, atol=1e-10 * u.abs().max())
    assert torch.allclose(out["keeping"][1], g, rtol=0, atol=1e-8 * g.abs().max())
    if kind == "pihc":
        # The kept lifting residual is the sample's: the residual rows at u = g, m = its data.
        keys, _ = keeping.warm_starts.lookup(data.numpy())
        lifting = torch.tensor(keeping.expert.g_vec)[None].expand(2, -1)
        assert np.allclose(np.stack([keeping.jacobians.lifting_residual(k) for k in keys]),
                           fem_moe.layer.residual_rows(problem, lifting, data), rtol=0, atol=1e-13)


@pytest.mark.parallel([1, 2])
def test_stored_jacobians_stay_within_their_memory():
    """At most as many samples as warm_start_memory bytes per rank hold (at least one), the
    least recently used dropped; the count agreed over the ranks; only training forwards keep."""
    problem = nonlinear_diffusion(n=6)
    layer = fem_moe.HardConstraint(problem, N, mode="galerkin", warm_start=True,
                                   warm_start_memory=1)
    basis = random_basis(problem, N, batch=3).requires_grad_()
    layer(basis, batch(problem, [1.0, 2.0, 3.0])).sum().backward()
    assert layer.jacobians.capacity == 1 and len(layer.jacobians) == 1
    keys, _ = layer.warm_starts.lookup(batch(problem, [3.0]).numpy())
    assert layer.jacobians.jacobian(keys[0]) is not None
    # An evaluation forward (validation inputs) takes what is kept and keeps nothing: it would
    # push the training samples' Jacobians out.
    with torch.no_grad():
        layer(random_basis(problem, N, batch=2), batch(problem, [4.0, 5.0]))
    assert len(layer.jacobians) == 1 and layer.jacobians.jacobian(keys[0]) is not None
    # Nor does the backward of an evaluation-mode forward.
    quiet = fem_moe.HardConstraint(problem, N, mode="galerkin", warm_start=True).eval()
    quiet(random_basis(problem, N).requires_grad_(), batch(problem, [1.0])).sum().backward()
    assert len(quiet.jacobians) == 0
    for bad in (-1, "lots", float("nan")):
        with pytest.raises(InputError, match="warm_start_memory"):
            fem_moe.HardConstraint(problem, N, mode="galerkin", warm_start=True,
                                   warm_start_memory=bad)


def test_chord_steps_keep_a_matrix_that_contracts_or_finishes():
    """ChordSteps: keep the matrix while |G| falls by the contraction per step, or while the
    last rate reaches the tolerance within CHORD_FINISH steps; never with contraction 0, never
    at the first request, and not on a rate that gains less than half per step."""
    from fem_moe.expert import CHORD_FINISH, ChordSteps
    chord = ChordSteps(1e-2)
    chord.start(target=1e-14)
    assert not chord.keep(1e-5)                 # the first request: no matrix yet
    assert chord.keep(1e-8)                     # cut 1000-fold
    assert chord.keep(2e-10)                    # rate 2e-2 > 1e-2, but 2.5 steps to 1e-14
    assert not chord.keep(1e-10)                # rate 0.5 and far: a new matrix
    chord.start(target=1e-14)
    chord.keep(1e-5)
    assert not chord.keep(3e-7)                 # rate 3e-2, 5.5 steps to go (> CHORD_FINISH)
    assert CHORD_FINISH < 5.5
    chord.start()                               # no tolerance known: contraction alone
    chord.keep(1e-5)
    assert not chord.keep(2e-7) and chord.kept == 0
    newton = ChordSteps(0.0)
    newton.start(target=1e-14)
    newton.keep(1e-5)
    assert not newton.keep(1e-12)
