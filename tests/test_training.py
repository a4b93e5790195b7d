"""Training (fem_moe.train): each model kind with each loss learns; physics-informed training
needs no solution data; resume equals uninterrupted training; replicas stay equal; bad configs,
bad data and diverging experts are reported on every rank; the CLI runs under mpiexec."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch
import firedrake as fd
from mpi4py import MPI
from pytest_mpi import parallel_assert

import fem_moe
import fem_moe.checkpoint
import fem_moe.losses
from fem_moe import pdes
from fem_moe.data import Dataset, generate
from fem_moe.train import Trainer
from problems import write_config

PDE = ("reaction_diffusion", {"n": 6})
N_SAMPLES = 8


def shared_dir(comm=MPI.COMM_WORLD):
    """A fresh directory, the same on every rank."""
    path = tempfile.mkdtemp(prefix="fem_moe_test_") if comm.rank == 0 else None
    return comm.bcast(path, root=0)


_DATA = {}


def dataset_path(comm=MPI.COMM_WORLD):
    """A tiny dataset made once per process and rank count (collective)."""
    if comm.size not in _DATA:
        path = os.path.join(shared_dir(comm), "rd.h5")
        generate(pdes.get(PDE[0], **PDE[1]), path, N_SAMPLES, seed=3, comm=comm, progress=False)
        _DATA[comm.size] = path
    return _DATA[comm.size]


def config(out, **sections):
    cfg = {"pde": {"name": PDE[0], "options": dict(PDE[1])},
           "data": {"path": dataset_path(), "n_train": 4, "n_val": 2, "n_test": 2},
           "model": {"kind": "moe", "n_basis": 4, "n_experts": 2, "width": 24, "depth": 2,
                     "latent": 16},
           "train": {"steps": 8, "batch_size": 4, "lr": 5e-3, "schedule": "none", "val_every": 4,
                     "checkpoint_every": 4, "out": out, "progress": False}}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def digest(module):
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["soft", "pihc", "moe"])
@pytest.mark.parametrize("loss", ["physics", "supervised", "mixed"])
def test_each_kind_and_loss_lowers_the_loss(kind, loss):
    """20 full-batch steps on one batch: the training loss must fall (the soft constraint, whose
    output starts near zero, needs a larger step to move in 20 steps)."""
    trainer = Trainer(config(shared_dir(), model={"kind": kind},
                             train={"loss": loss, "steps": 20,
                                    "lr": 3e-2 if kind == "soft" else 5e-3}))
    history = trainer.fit()
    losses = [h["loss"] for h in history]
    assert not any(h["skipped"] for h in history)
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    parts = {"physics": ["physics"], "supervised": ["supervised"],
             "mixed": ["physics", "supervised"]}[loss]
    assert all(all(p in h for p in parts) for h in history)


def test_fno_backbone_trains():
    """The paper's backbone: an FNO on a grid over the mesh's box, interpolated to the dofs."""
    trainer = Trainer(config(shared_dir(), model={"kind": "pihc", "backbone": "fno", "grid": 16,
                                                  "modes": 4, "width": 8, "depth": 2},
                             train={"steps": 15, "lr": 5e-3}))
    losses = [h["loss"] for h in trainer.fit()]
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


@pytest.mark.parallel([1, 2])
def test_fno_sees_the_input_field_on_a_periodic_mixed_space():
    """On the turbulence problem (periodic square, a mixed space of 2 x 2 components) the FNO's
    grid is one period, its input is the initial vorticity on that grid (the PDE's input
    fields, not the 24 coefficients), each dof reads its own component, and it trains."""
    from fem_moe.backbones import ParametricFNOBasis
    comm = MPI.COMM_WORLD
    options = {"steps": 2, "t_end": 0.2}
    path = os.path.join(shared_dir(), "turbulence.h5")
    generate(pdes.get("decaying_turbulence", **options), path, 6, seed=1, comm=comm, progress=False)
    trainer = Trainer(config(shared_dir(), pde={"name": "decaying_turbulence", "options": options},
                             data={"path": path, "n_train": 4, "n_val": 1, "n_test": 1},
                             model={"kind": "pihc", "mode": "galerkin", "backbone": "fno",
                                    "grid": 8,
                                    "modes": 3, "width": 8, "depth": 2},
                             train={"steps": 6}))
    net = trainer.model.backbone
    where = ParametricFNOBasis.grid_points([0.0, 0.0], [1.0, 1.0], 8, [1.0, 1.0]).numpy()
    expected = trainer.dataset.pde.input_fields(where).reshape(-1, 1, 8, 8)
    parallel_assert(net.input_fields is not None and np.allclose(net.input_fields.numpy(), expected)
                    and net.basis.n_components == 4, "the FNO does not see the initial vorticity")
    losses = [h["loss"] for h in trainer.fit()]
    parallel_assert(all(np.isfinite(losses)) and min(losses[1:]) < losses[0], f"{losses}")


@pytest.mark.parallel([1, 2])
def test_a_mixture_starts_from_a_global_layers_backbone():
    """model.backbone_from: a mixture's backbone starts with the weights a PI-HC run trained
    (the optimiser afresh); a checkpoint of another backbone shape is refused on every rank."""
    base = shared_dir()
    pihc = Trainer(config(os.path.join(base, "pihc"), model={"kind": "pihc"}, train={"steps": 3}))
    pihc.fit()
    path = pihc.checkpoint_path
    moe = Trainer(config(os.path.join(base, "moe"), model={"kind": "moe", "backbone_from": path}))
    same = all(torch.equal(a, b) for a, b in zip(pihc.model.backbone.parameters(),
                                                   moe.model.backbone.parameters()))
    parallel_assert(same and moe.step == 0, "the mixture's backbone is not the PI-HC run's")
    with pytest.raises(fem_moe.InputError, match="backbone_from"):
        Trainer(config(os.path.join(base, "wide"), model={"kind": "moe", "width": 32,
                                                           "backbone_from": path}))


@pytest.mark.parametrize("kind", ["pihc", "moe"])
def test_physics_informed_training_needs_no_solutions(kind):
    """Trained with the targets replaced by NaN (the physics loss never reads them), the outputs
    on the training inputs move towards the classical solutions. (With 6 inputs of a
    4-parameter family nothing is claimed about held-out inputs; the demos measure those.)"""
    trainer = Trainer(config(shared_dir(), model={"kind": kind}, data={"n_train": 6, "n_test": 0},
                             train={"steps": 40, "lr": 3e-3, "batch_size": 3, "val_every": 40}))
    targets = trainer._tensors["targets"].clone()
    trainer._tensors["targets"][:] = float("nan")

    def rel_l2():
        with torch.no_grad():
            idx = trainer.splits["train"]
            return fem_moe.losses.relative_l2(trainer.comm, trainer.predict(idx),
                                              targets[idx]).item()
    before = rel_l2()
    trainer.fit()
    after = rel_l2()
    assert np.isfinite(after) and after < 0.8 * before, (before, after)


@pytest.mark.parallel([1, 2])
def test_evaluation_reports_each_sample_and_the_spread():
    """evaluate(): per-sample relative L2 errors (each against its classical solution, computed
    here from the predictions and the dataset's solutions over every rank's dofs), their mean,
    max and standard deviation over the samples, as the issue's tables report them."""
    trainer = Trainer(config(shared_dir(), model={"kind": "pihc"},
                             data={"n_train": 3, "n_val": 2, "n_test": 3},
                             train={"steps": 2, "val_every": 2, "batch_size": 3}))
    trainer.fit()
    out = trainer.evaluate("test", write=False)
    idx = trainer.splits["test"]
    with torch.no_grad():
        u = trainer.predict(idx).numpy()
    truth = trainer.physical_target(idx).numpy()
    num = trainer.comm.allreduce(((u - truth) ** 2).sum(axis=1))
    den = trainer.comm.allreduce((truth ** 2).sum(axis=1))
    expected = np.sqrt(num / den)
    assert np.allclose(out["rel_l2_samples"], expected, rtol=1e-10), (out["rel_l2_samples"],
                                                                      expected)
    assert np.isclose(out["rel_l2"], expected.mean()) and np.isclose(out["rel_l2_max"],
                                                                     expected.max())
    assert np.isclose(out["rel_l2_std"], expected.std()) and out["rel_l2_std"] > 0
    # The norm over the domain, by Firedrake's errornorm (its own quadrature, a degree higher).
    fields = [(trainer.problem.function(a), trainer.problem.function(b)) for a, b in zip(u, truth)]
    expected = np.array([fd.errornorm(b, a) / fd.norm(b) for a, b in fields])
    assert np.allclose(out["rel_l2_field_samples"], expected,
                       rtol=1e-8), (out["rel_l2_field_samples"], expected)
    assert np.isclose(out["rel_l2_field"], expected.mean()) and np.isclose(out["rel_l2_field_max"],
                                                                           expected.max())


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("fresh", [False, True])
def test_resume_equals_uninterrupted_training(fresh):
    comm = MPI.COMM_WORLD
    base = shared_dir()
    train = {"batch_size": 2, "checkpoint_every": 3, "schedule": "cosine", "fresh_inputs": fresh}
    straight = Trainer(config(os.path.join(base, "a"), train=train))
    straight.fit(6)
    interrupted = Trainer(config(os.path.join(base, "b"), train=train))
    interrupted.fit(3)
    del interrupted
    resumed = Trainer(config(os.path.join(base, "b"), train=train))
    parallel_assert(resumed.step == 3, f"resumed at step {resumed.step}")
    resumed.fit(6)
    a = np.array([h["loss"] for h in straight.history])
    b = np.array([h["loss"] for h in resumed.history])
    parallel_assert(np.allclose(a, b, rtol=1e-12, atol=0), f"losses differ: {a} vs {b}")
    # Bitwise equality would need the same mesh distribution in both runs (summation order).
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        parallel_assert(torch.allclose(p, q, rtol=1e-10, atol=1e-14), "weights differ after resume")
    digests = comm.allgather(digest(resumed.model))
    parallel_assert(len(set(digests)) == 1, f"replicas differ across ranks: {digests}")
    if comm.rank == 0:
        metrics = json.load(open(os.path.join(base, "b", "metrics.json")))
        assert [s["step"] for s in metrics["steps"]] == [1, 2, 3, 4, 5, 6]
        assert open(os.path.join(base, "b", "metrics.csv")).read().count("\n") == 7


@pytest.mark.parallel([1, 2])
def test_a_pihc_step_takes_the_layers_jacobian_into_its_physics_loss(monkeypatch):
    """Where the physical field is the model's output plus a lifting (diffusion-sorption), the
    physics loss is taken on the output itself: in a PI-HC training step it then finds the
    layer's fields (fem_moe.points) and assembles no transposed-Jacobian action of its own."""
    comm = MPI.COMM_WORLD
    path = os.path.join(shared_dir(comm), "ds.h5")
    options = {"nx": 12, "nt": 6}
    generate(pdes.get("diffusion_sorption", **options), path, 6, seed=1, comm=comm, progress=False)
    trainer = Trainer(config(shared_dir(), pde={"name": "diffusion_sorption", "options": options},
                             data={"path": path, "n_train": 4, "n_val": 1, "n_test": 1},
                             model={"kind": "pihc", "mode": "galerkin"}, train={"batch_size": 2}))
    assert trainer._lift is not None
    actions = []
    assemble = fem_moe.expert.Expert._assemble

    def counted(self, form, *args, **kwargs):
        actions.append(form is self.JT_r)
        return assemble(self, form, *args, **kwargs)

    monkeypatch.setattr(fem_moe.expert.Expert, "_assemble", counted)
    record = trainer.train_step()
    assert not record["skipped"] and np.isfinite(record["loss"])
    assert any(not a for a in actions) and not any(actions), sum(actions)


@pytest.mark.parallel([1, 2])
def test_fresh_inputs_draw_a_new_batch_every_step():
    comm = MPI.COMM_WORLD
    trainer = Trainer(config(shared_dir(), train={"fresh_inputs": True, "batch_size": 2}))
    stored = trainer._tensors["inputs"].clone()
    seen = []
    for _ in range(3):
        idx = trainer.batch(trainer.step)
        seen.append(trainer._tensors["inputs"][idx].clone())
        trainer.train_step()
    # New inputs each step, the same on every rank, none of them the dataset's.
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))
    parallel_assert(all(len(set(map(str, comm.allgather(x.tolist())))) == 1 for x in seen),
                    "ranks drew different inputs")
    assert all(not any(torch.equal(row, old) for old in stored) for x in seen for row in x)
    # The data (and lifting) written with them are the PDE's for those inputs: the classical
    # solution of the last batch's first input has a physics loss at round-off.
    pde = trainer.dataset.pde
    params = pde.sample(np.random.default_rng([0, 1, trainer.step - 1]), 2)   # train.seed 0
    u, _, _ = pde.classical_solve(trainer.problem, pde.data(trainer.problem, params[0]))
    physical = torch.tensor(fem_moe.problem.owned_values(u))[None]
    if trainer._lift is not None:
        physical = physical + trainer._lift[idx[:1]]
    assert trainer.physics_loss(physical, idx[:1]).item() < 1e-20
    assert all(np.isfinite(h["loss"]) for h in trainer.history)
    # Only the validation and test splits keep their solutions.
    assert torch.isnan(trainer._tensors["targets"][idx]).all()
    with pytest.raises(fem_moe.errors.InputError, match="fresh_inputs needs"):
        Trainer(config(shared_dir(), train={"fresh_inputs": True, "loss": "supervised"}))


def test_checkpoint_write_is_atomic():
    """A process killed while its checkpoint's bytes are going to disk leaves the previous
    checkpoint whole and loadable: a child writes half of a new checkpoint through the same
    write_atomic the trainer uses, flushes it to disk, and is killed (SIGKILL) there."""
    import signal
    trainer = Trainer(config(shared_dir(), train={"steps": 2, "checkpoint_every": 2}))
    trainer.fit()
    path = trainer.checkpoint_path
    before = open(path, "rb").read()
    child = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
from fem_moe.report import write_atomic
def half(f):
    data = open({path!r}, "rb").read()
    f.write(data[:len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    print("written", flush=True)
    time.sleep(60)
write_atomic({path!r}, half)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    # The old checkpoint is intact and loads; half of the new one is on disk beside it.
    assert open(path, "rb").read() == before
    partial = [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]
    assert partial and os.path.getsize(os.path.join(os.path.dirname(path), partial[0])) > 0
    resumed = Trainer(config(os.path.dirname(path), train={"steps": 2, "checkpoint_every": 2}))
    assert resumed.step == 2


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("policy", ["skip", "stop"])
@pytest.mark.parametrize("coupled", [False, True])
def test_diverging_expert_policy(policy, coupled):
    """Reduced solves allowed one SNES iteration fail (the experts' own, or the coupled solve):
    'skip' records every failure and drops the updates, 'stop' raises on every rank naming the
    expert (None for the coupled solve) and the dataset sample."""
    starved = ({"coupling_parameters": {"snes_max_it": 1}} if coupled
               else {"coupled": False, "solver_parameters": {"snes_max_it": 1}})
    experts = (None,) if coupled else (0, 1)
    trainer = Trainer(config(shared_dir(), model=starved, train={"steps": 2, "on_diverge": policy}))
    before = digest(trainer.model)
    if policy == "skip":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit()
        # The schedule steps with the step count, taken or not, and says nothing about it.
        parallel_assert(not [w for w in caught if "lr_scheduler.step()" in str(w.message)],
                        f"{[str(w.message) for w in caught]}")
        in_training = [d for d in trainer.diverged if d["phase"] == "train"]
        parallel_assert(len(in_training) == 2 and all(h["skipped"] for h in trainer.history),
                        f"{trainer.diverged}")
        parallel_assert(trainer.validation[-1]["failed"] == 2, f"{trainer.validation}")
        failure = trainer.diverged[0]
        parallel_assert(failure["reason"] == "DIVERGED_MAX_IT" and failure["expert"] in experts
                        and failure["sample"] in range(4), f"{failure}")
        parallel_assert(digest(trainer.model) == before, "a skipped step changed the weights")
    else:
        with pytest.raises(fem_moe.SolverDivergedError, match="on_diverge = 'stop'") as info:
            trainer.fit()
        parallel_assert(info.value.expert in experts and info.value.sample in range(4))
        parallel_assert(os.path.isfile(trainer.checkpoint_path), "no checkpoint after the stop")


@pytest.mark.parallel([1, 2])
def test_resume_names_what_differs_and_accepts_older_checkpoints():
    """A checkpoint resumes where its config agrees option by option; one written before an
    option existed (its saved config lacks it) counts as that option's default; a differing
    option is named with both values, on every rank."""
    out = shared_dir()
    Trainer(config(out, train={"steps": 2, "checkpoint_every": 2})).fit()
    path = os.path.join(out, "checkpoint.pt")
    if MPI.COMM_WORLD.rank == 0:
        state = fem_moe.checkpoint.load(path)
        del state["config"]["model"]["fourier_features"]      # as before the option existed
        fem_moe.checkpoint.save(path, state)
    MPI.COMM_WORLD.barrier()
    resumed = Trainer(config(out, train={"steps": 2, "checkpoint_every": 2}))
    parallel_assert(resumed.step == 2, f"resumed at step {resumed.step}")
    with pytest.raises(fem_moe.InputError, match=r"model.mode = 'lstsq' \(the config now says "
                                                  r"'galerkin'\): use another train.out"):
        Trainer(config(out, model={"mode": "galerkin"}, train={"steps": 2, "checkpoint_every": 2}))
    with pytest.raises(fem_moe.InputError,
                       match=r"model.fourier_features = 0 \(the config now says 8\)"):
        Trainer(config(out, model={"fourier_features": 8},
                       train={"steps": 2, "checkpoint_every": 2}))


@pytest.mark.parallel([1, 2])
def test_training_stops_when_every_step_is_skipped():
    """Under on_diverge = 'skip', steps whose solves all diverge leave the weights as they were:
    after train.max_skipped_in_a_row of them in a row training stops on every rank, with a
    checkpoint and an error naming the steps; study.compare still evaluates such a model and
    says it stalled. A step taken between failures resets the count."""
    starved = {"coupling_parameters": {"snes_max_it": 1}}
    out = shared_dir()
    trainer = Trainer(config(out, model=starved, train={"steps": 8, "max_skipped_in_a_row": 3}))
    with pytest.raises(fem_moe.TrainingStalledError,
                       match=r"training stalled: the last 3 steps \(1-3\)"):
        trainer.fit()
    parallel_assert(trainer.step == 3 and os.path.isfile(trainer.checkpoint_path),
                    f"{trainer.step}")
    # A taken step between skipped ones: the count starts again.
    trainer.history = [{"skipped": s} for s in (True, True, False, True, True)]
    parallel_assert(trainer._skipped_in_a_row() == 2)
    from fem_moe import study
    rows, _ = study.compare(config(out, train={"steps": 4, "max_skipped_in_a_row": 2}),
                                    [("starved", {"kind": "moe", **starved})], out)
    parallel_assert(rows[0]["stalled"].startswith("training stalled: the last 2 steps")
                    and rows[0]["failed"] == 2, f"{rows[0]}")


@pytest.mark.parallel([1, 2])
def test_backbone_sees_the_exact_dof_coordinates():
    """A float64 model's backbone gets the dofs' coordinates as they are (built with a float32
    backbone then moved to float64, it got them rounded to float32)."""
    t = Trainer(config(shared_dir(), model={"kind": "pihc"}))
    exact = torch.tensor(t.problem.dof_coordinates(), dtype=torch.float64)
    parallel_assert(t.model._points.dtype == torch.float64 and torch.equal(t.model._points, exact),
                    f"{(t.model._points - exact).abs().max().item():.1e} off")


@pytest.mark.parallel([1, 2])
def test_mixture_trains_its_basis_globally_first():
    """model.global_steps: for its first steps a mixture's backbone trains through the global
    layer — the weights a PI-HC run of those steps reaches (to round-off: on several ranks two
    runs may distribute the mesh differently), also when resumed in between —, then the mixture
    takes over with the same optimiser: on the same basis and batch its loss is below the global
    layer's (nesting, in the loss's norm)."""
    base, S = shared_dir(), 3
    pihc = Trainer(config(os.path.join(base, "pihc"), model={"kind": "pihc"},
                          train={"steps": S + 1}))
    pihc.fit(S)
    mixture = {"kind": "moe", "norm": "dual", "global_steps": S}
    moe = Trainer(config(os.path.join(base, "moe"), model=mixture, train={"steps": S + 1}))
    moe.fit(2)
    moe = Trainer(config(os.path.join(base, "moe"), model=mixture,         # resumed at step 2
                         train={"steps": S + 1, "resume": True}))
    moe.fit(S)
    same = all(torch.allclose(p, q, rtol=1e-10, atol=1e-14) for p, q in
               zip(moe.model.backbone.parameters(), pihc.model.backbone.parameters()))
    parallel_assert(same and moe.step == S, "the global phase did not train as PI-HC does")
    pihc.fit(), moe.fit()
    after = moe.history[S]["loss"], pihc.history[S]["loss"]
    parallel_assert(after[0] < after[1] * (1 - 1e-6), f"mixture {after[0]} vs global {after[1]}")
    with pytest.raises(fem_moe.InputError, match="model.global_steps"):
        Trainer(config(base, model={"kind": "pihc", "global_steps": 2}))


@pytest.mark.parametrize("schedule", ["none", "cosine", "step"])
def test_warmup_ramps_the_learning_rate_up(schedule):
    """train.warmup_steps: the rate each step uses rises linearly to the schedule's over the
    warm-up (a fresh Adam's first step moves every weight by about lr: from a trained backbone
    the turbulence run's loss went 0.044 -> 0.70 at its second step), then follows it."""
    steps, warmup, lr = 8, 4, 5e-3
    train = {"steps": steps, "lr": lr, "schedule": schedule, "step_size": 3, "val_every": 8,
             "checkpoint_every": 8}
    runs = {}
    for w in (0, warmup):
        t = Trainer(config(os.path.join(shared_dir(), str(w)), model={"kind": "soft"},
                           train={**train, "warmup_steps": w}))
        t.fit()
        runs[w] = np.array([r["lr"] for r in t.history])
    ramp = np.minimum(1.0, np.arange(1, steps + 1) / warmup)
    np.testing.assert_allclose(runs[warmup], ramp * runs[0], rtol=1e-12)
    assert runs[warmup][0] == pytest.approx(lr / warmup)


@pytest.mark.parallel([1, 2])
def test_bad_config_and_data_raise_everywhere():
    out = shared_dir()
    cases = [
        ({"model": {"kind": "transformer"}}, "model.kind"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"speed": 3}}, "unknown option 'train.speed'"),
        ({"data": {"path": os.path.join(out, "missing.h5")}}, "not found"),
        ({"pde": {"name": PDE[0], "options": {"n": 5}}}, "was made for"),
        ({"pde": {"name": PDE[0], "options": {"size": 5}}}, "unknown option"),
        ({"data": {"n_train": 7}}, "dataset holds 8"),
        ({"train": {"batch_size": 5}}, "exceeds data.n_train"),
        ({"model": {"fourier_features": -1}}, "model.fourier_features must be >= 0"),
        ({"model": {"fourier_features": 8, "fourier_scale": 0.0}}, "model.fourier_scale"),
        ({"train": {"max_skipped_in_a_row": -1}}, "train.max_skipped_in_a_row"),
        ({"train": {"warmup_steps": -2}}, "train.warmup_steps"),
    ]
    for change, message in cases:
        with pytest.raises(fem_moe.InputError, match=message):
            Trainer(config(out, **change))
    bad = os.path.join(out, "bad.h5")
    if MPI.COMM_WORLD.rank == 0:
        open(bad, "w").write("not hdf5")
    MPI.COMM_WORLD.barrier()
    with pytest.raises(fem_moe.InputError, match="not a fem_moe dataset"):
        Trainer(config(out, data={"path": bad}))


@pytest.mark.parallel(2)
def test_dataset_reads_on_another_rank_count():
    """Made by one rank, read by two: the same fields (norms over all dofs) and parameters."""
    comm = MPI.COMM_WORLD
    path = os.path.join(shared_dir(), "serial.h5")
    ref = None
    if comm.rank == 0:
        generate(pdes.get(PDE[0], **PDE[1]), path, 3, seed=5, comm=MPI.COMM_SELF, progress=False)
        serial = Dataset(path, comm=MPI.COMM_SELF)
        ref = (serial.params, (serial.targets ** 2).sum(axis=1), (serial.data ** 2).sum(axis=1))
    ref = comm.bcast(ref, root=0)
    ds = Dataset(path)
    parallel_assert(ds.problem.n_dofs < ds.problem.V.dim(), "not distributed")
    parallel_assert(np.array_equal(ds.params, ref[0]))
    targets = comm.allreduce((ds.targets ** 2).sum(axis=1))
    data = comm.allreduce((ds.data ** 2).sum(axis=1))
    parallel_assert(np.allclose(targets, ref[1], rtol=1e-12)
                    and np.allclose(data, ref[2], rtol=1e-12))


@pytest.mark.parallel([1, 2])
def test_dataset_written_before_a_pde_option_existed_still_loads():
    """A dataset whose stored PDE options lack one added since (diffusion-sorption's
    ``grading``) is the dataset of that option's default: it loads, and counts as current (no
    regeneration), where the config asks for the default; a config asking for another value
    is refused."""
    import h5py
    from fem_moe.data import is_current
    comm = MPI.COMM_WORLD
    path = os.path.join(shared_dir(), "before_grading.h5")
    pde = pdes.get("diffusion_sorption", nx=4, nt=3)
    generate(pde, path, 2, seed=3, progress=False)
    if comm.rank == 0:      # as a version before the option wrote it
        with h5py.File(path, "r+") as f:
            meta = json.loads(f["fem_moe"].attrs["pde"])
            del meta["options"]["grading"]
            f["fem_moe"].attrs["pde"] = json.dumps(meta)
    comm.barrier()
    Dataset(path, expect=("diffusion_sorption", {"nx": 4, "nt": 3}))
    parallel_assert(is_current(path, pde, 2, 3), "an old dataset of the default counts as stale")
    parallel_assert(not is_current(path, pdes.get("diffusion_sorption", nx=4, nt=3, grading=2.0),
                                   2, 3))
    with pytest.raises(fem_moe.InputError, match="regenerate"):
        Dataset(path, expect=("diffusion_sorption", {"nx": 4, "nt": 3, "grading": 2.0}))


@pytest.mark.parallel([1, 2])
def test_mixed_space_dataset_keeps_every_sample():
    """Velocity-pressure samples written and read back, each its own (a save with idx kept
    only the last mixed sample)."""
    path = os.path.join(shared_dir(), "flow.h5")
    generate(pdes.get("flow_past_obstacle"), path, 3, seed=1, progress=False)
    ds = Dataset(path)
    norms = MPI.COMM_WORLD.allreduce((ds.targets ** 2).sum(axis=1))
    data = MPI.COMM_WORLD.allreduce((ds.data ** 2).sum(axis=1))
    parallel_assert(np.all(norms > 0) and np.all(data > 0) and len(set(np.round(norms, 8))) == 3,
                    f"{norms} {data}")


def _cli(*args, n=2, cwd=None, timeout=600, path=None):
    """``python -m fem_moe *args`` under ``mpiexec -n n``; ``path``: a folder put on
    PYTHONPATH (where a PDE of one's own is found)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    if path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")]))
    env.pop("FIREDRAKE_DISABLE_OPTIONS_LEFT", None)
    cmd = ["mpiexec", "-n", str(n), sys.executable, "-m", "fem_moe", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_under_mpiexec():
    """generate, train (then resume further) and evaluate under mpiexec -n 2 at a tiny size."""
    work = tempfile.mkdtemp(prefix="fem_moe_cli_")
    try:
        write_config(os.path.join(work, "tiny.toml"),
                     pde={"name": "reaction_diffusion", "options": {"n": 4}},
                     data={"path": "data/tiny.h5", "n_train": 4, "n_val": 2, "n_test": 2},
                     model={"kind": "moe", "n_basis": 4, "n_experts": 2, "width": 16, "depth": 2,
                            "latent": 8},
                     train={"steps": 4, "batch_size": 2, "val_every": 2, "checkpoint_every": 2,
                            "out": "run"})
        r = _cli("generate", "tiny.toml", cwd=work)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "wrote" in r.stdout and os.path.isfile(os.path.join(work, "data", "tiny.h5"))
        r = _cli("generate", "tiny.toml", cwd=work)
        assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
        r = _cli("train", "tiny.toml", "-moe_snes_monitor", cwd=work)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "trained moe: 4 steps" in r.stdout and "SNES Function norm" in r.stdout
        assert "relative L2" in r.stdout and "interfaces" in r.stdout
        assert "WARNING! There are options you set that were not used" not in r.stdout + r.stderr
        r = _cli("train", "tiny.toml", "--set", "train.steps=6", cwd=work)
        assert r.returncode == 0 and "trained moe: 6 steps" in r.stdout, r.stdout + r.stderr
        metrics = json.load(open(os.path.join(work, "run", "metrics.json")))
        assert len(metrics["steps"]) == 6 and metrics["validation"][-1]["step"] == 6
        r = _cli("evaluate", "tiny.toml", "--split", "val", cwd=work)
        assert r.returncode == 0 and "val split" in r.stdout, r.stdout + r.stderr
        evaluation = json.load(open(os.path.join(work, "run", "evaluation_val.json")))
        assert evaluation["ranks"] == 2 and evaluation["step"] == 6
        r = _cli("train", "tiny.toml", "--set", "model.kind=hybrid", cwd=work)
        assert r.returncode == 2 and r.stderr.count("model.kind") == 1, r.stdout + r.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parallel([1, 2])
def test_pod_basis_is_orthonormal_and_the_constraint_check_is_sane():
    """POD modes of the training solutions: orthonormal over all ranks' dofs, spanning the
    training solutions when there are as many modes; in pod_check the truth's projection is
    at least as close as PI-HC's output (both lie in the lifting + the modes' span). After
    training on fresh inputs (whose solutions nobody computed) the modes are still the
    dataset's solutions'."""
    from fem_moe import study
    trainer = Trainer(config(shared_dir(), train={"steps": 1, "fresh_inputs": True}))
    trainer.fit()
    comm = trainer.comm
    modes = study.pod_basis(trainer, 8)
    n_train = len(trainer.splits["train"])
    gram = comm.allreduce(modes @ modes.T)
    parallel_assert(len(modes) == n_train and np.allclose(gram, np.eye(n_train), atol=1e-10),
                    f"{len(modes)} modes, Gram off by "
                    f"{np.abs(gram - np.eye(len(modes))).max():.1e}")
    T = trainer.dataset.targets[trainer.splits["train"]]
    rest = T - comm.allreduce(T @ modes.T) @ modes
    parallel_assert(np.sqrt(comm.allreduce((rest ** 2).sum())) < 1e-10
                    * np.sqrt(comm.allreduce((T ** 2).sum())),
                    "the modes do not span the training solutions")
    rows = {r["label"]: r["rel_l2"] for r in study.pod_check(trainer, 2, 2)}
    parallel_assert(rows["projection (oracle)"] <= rows["PI-HC"] + 1e-12
                    and np.isfinite(rows["MoE K=2"]),
                    f"{rows}")


@pytest.mark.parallel([2, 3])
def test_training_with_one_backbone_rank_follows_the_replicated_run():
    """model.backbone_ranks = [0]: rank 0 alone evaluates and trains the backbone for every
    rank; the losses follow the all-replica run's, and validation and a checkpoint work."""
    base = shared_dir()
    runs = {}
    for label, ranks in (("all", "all"), ("one", [0])):
        trainer = Trainer(config(os.path.join(base, label), model={"backbone_ranks": ranks}))
        trainer.fit(4)
        runs[label] = [h["loss"] for h in trainer.history]
        parallel_assert(trainer.backbone_ranks.everywhere == (ranks == "all"), "backbone ranks")
    parallel_assert(np.allclose(runs["all"], runs["one"], rtol=1e-9, atol=0),
                    f"losses differ: {runs}")
    parallel_assert(runs["one"][-1] < runs["one"][0], f"no learning: {runs['one']}")
    parallel_assert(os.path.isfile(os.path.join(base, "one", "checkpoint.pt")), "no checkpoint")


@pytest.mark.parallel([1, 2])
def test_rank_deficient_bases_are_summarised_once_per_fit_and_evaluation(caplog):
    """Four experts on a 49-dof mesh with N = 16 fields: every expert's block is rank deficient
    at every input. Training warns once (rank 0), with the counts and the worst case; each
    occurrence is logged at DEBUG level for whoever asks; an evaluation and a prediction add
    one summary each."""
    comm = MPI.COMM_WORLD
    out = shared_dir()
    tr = Trainer(config(out, model={"n_basis": 16, "n_experts": 4, "mode": "galerkin"},
                        train={"steps": 3, "val_every": 3}))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("DEBUG", "fem_moe"):
        warnings.simplefilter("always")
        tr.fit()
        tr.evaluate(write=False)
        tr.predict(tr.splits["test"])
    summaries = [w for w in caught if issubclass(w.category, fem_moe.RankDeficientBasisWarning)]
    texts = [str(w.message) for w in summaries]
    parallel_assert(len(summaries) == (3 if comm.rank == 0 else 0), f"summaries: {texts}")
    if comm.rank == 0:
        assert ("12 of 12 inputs over 3 train steps; 2 of 2 inputs over 1 val evaluation;"
                in texts[0])
        assert "MoE K=4 (galerkin, coupled)" in texts[0] and "Worst: numerical rank" in texts[0]
        assert "2 of 2 inputs over 1 test evaluation;" in texts[1]
        assert "2 of 2 inputs over 1 predict evaluation;" in texts[2]
    logged = [r for r in caplog.records if "numerical rank" in r.getMessage()]
    parallel_assert(len(logged) >= 3 * 4 + 2 + 2, f"{len(logged)} occurrences logged")
    assert [r["rank_deficient"] for r in tr.history] == [4, 4, 4]


@pytest.mark.parallel([1, 2])
def test_a_rank_deficiency_summary_made_an_error_raises_on_every_rank():
    """A user's filter that turns the warning into an error: every rank raises (rank 0 alone
    would leave the others in the next collective)."""
    out = shared_dir()
    tr = Trainer(config(out, model={"n_basis": 16, "n_experts": 4, "mode": "galerkin"},
                        train={"steps": 1, "val_every": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fem_moe.RankDeficientBasisWarning)
        with pytest.raises(fem_moe.FemMoeError, match="linearly dependent"):
            tr.fit()


def test_other_warnings_pass_through_the_rank_deficiency_summary():
    """A warning of another kind raised during a training step reaches the caller as it was."""
    tr = Trainer(config(shared_dir(), model={"kind": "pihc"}, train={"steps": 1}))
    forward = tr.model.forward

    def warning_forward(*args, **kwargs):
        warnings.warn("a warning of the user's own", UserWarning)
        return forward(*args, **kwargs)

    tr.model.forward = warning_forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.train_step()
    assert [str(w.message) for w in caught if w.category is UserWarning] == \
        ["a warning of the user's own"]
