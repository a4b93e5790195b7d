"""A trained model applied to new inputs (fem_moe.load(...).predict), and a PDE of one's own
(demos/bratu.py's Bratu, which fem_moe does not ship) through the dataset generator, the
trainer, the command line and inference, on 1 and 2 ranks."""
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch
import firedrake as fd
from mpi4py import MPI
from pytest_mpi import parallel_assert

import fem_moe
from fem_moe.data import ensure_dataset
from fem_moe.train import Trainer

from problems import write_config
from test_training import _cli as run_cli, config, shared_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "demos"))
from bratu import Bratu  # noqa: E402


def by_coordinates(problem, values):
    """Every rank's dofs of ``values`` [batch, n_dofs], ordered by their coordinates: what two
    meshes of the same geometry, distributed differently, agree on."""
    X = np.concatenate(MPI.COMM_WORLD.allgather(problem.dof_coordinates()))
    V = np.concatenate(MPI.COMM_WORLD.allgather(np.asarray(values).T))
    order = np.lexsort(X.T[::-1])
    return V[order].T


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("kind", ["pihc", "moe", "soft"])
def test_a_loaded_model_predicts_what_the_trainer_gives(kind):
    """fem_moe.load rebuilds the trained model on the PDE's own mesh; its predictions for the
    test inputs' parameter vectors equal the trainer's for the same samples to 1e-12."""
    out = shared_dir()
    trainer = Trainer(config(out, model={"kind": kind, "warm_start": False},
                             train={"steps": 3, "checkpoint_every": 3}))
    trainer.fit()
    idx = trainer.splits["test"]
    with torch.no_grad():
        expected = by_coordinates(trainer.problem, trainer.predict(idx).numpy())
    model = fem_moe.load(out)
    fields = model.predict(trainer.dataset.params[idx])
    got = by_coordinates(model.problem, np.array([f.dat.data_ro for f in fields]))
    parallel_assert(len(fields) == len(idx) and model.step == 3 and model.model.kind == kind)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    parallel_assert(error < 1e-12, f"loaded model's predictions differ by {error:.2e}")
    parallel_assert(len(model.times) == len(idx) and all(t > 0 for t in model.times))


@pytest.mark.parallel([1, 2])
def test_predict_reports_bad_parameters_on_every_rank():
    out = shared_dir()
    Trainer(config(out, model={"kind": "pihc"}, train={"steps": 1, "checkpoint_every": 1})).fit()
    model = fem_moe.load(os.path.join(out, "checkpoint.pt"))
    with pytest.raises(fem_moe.InputError, match=r"expected \[n, 4\]"):
        model.predict(np.zeros((2, 3)))
    with pytest.raises(fem_moe.InputError, match="non-finite"):
        model.predict(np.full((1, 4), np.nan))
    mine = np.full((1, 4), float(MPI.COMM_WORLD.rank))
    if MPI.COMM_WORLD.size > 1:
        with pytest.raises(fem_moe.InputError, match="differ from rank 0's"):
            model.predict(mine)


def bratu_config(out):
    return {"pde": {"name": "bratu:Bratu", "options": {"n": 4}},
            "data": {"path": os.path.join(out, "bratu.h5"), "n_train": 4, "n_val": 1,
                     "n_test": 1},
            "model": {"kind": "moe", "n_basis": 4, "n_experts": 2, "mode": "galerkin",
                      "width": 16, "depth": 2, "latent": 8},
            "train": {"steps": 2, "batch_size": 2, "val_every": 2, "checkpoint_every": 2,
                      "out": os.path.join(out, "run"), "progress": False}}


@pytest.mark.parallel([1, 2])
def test_a_pde_of_ones_own_trains_and_predicts():
    """The docs' worked example: a PDE subclass fem_moe does not ship, through ensure_dataset,
    the trainer (by instance and by name), fem_moe.load and predict."""
    out = shared_dir()
    cfg = bratu_config(out)
    pde = Bratu(n=4)
    ensure_dataset(cfg, pde=pde, progress=False)
    trainer = Trainer(cfg, pde=pde)
    trainer.fit()
    parallel_assert(trainer.step == 2 and np.isfinite(trainer.history[-1]["loss"]))
    by_name = Trainer(cfg)          # "bratu:Bratu" imported from the path; resumes the run
    parallel_assert(by_name.step == 2 and isinstance(by_name.dataset.pde, Bratu))
    params = np.array([[1.5, 2.0, -3.0], [0.7, -1.0, 4.0]])
    model = fem_moe.load(cfg["train"]["out"])
    u, v = model.predict(params)
    parallel_assert(isinstance(model.pde, Bratu) and u.function_space() == model.problem.V)
    parallel_assert(np.isfinite(fd.norm(u)) and fd.norm(u - v) > 0)


@pytest.mark.parallel([1, 2])
def test_an_unknown_pde_is_a_config_error_naming_it():
    out = shared_dir()
    for name, message in (("no_such_module:Thing", "cannot import module 'no_such_module'"),
                          ("bratu:Nothing", "module 'bratu' has no 'Nothing'"),
                          ("bratu:main", "main is not a subclass of fem_moe.pdes.PDE"),
                          ("laplace", "unknown PDE 'laplace'")):
        cfg = bratu_config(out)
        cfg["pde"]["name"] = name
        with pytest.raises(fem_moe.InputError, match=f"pde.name: .*{message}"):
            Trainer(cfg)


def _cli(*args, cwd=None):
    return run_cli(*args, cwd=cwd, path=os.path.join(REPO, "demos"))


@pytest.mark.parallel(1)
def test_the_cli_generates_trains_and_predicts_a_pde_of_ones_own():
    """python -m fem_moe generate|train|predict under mpiexec -n 2 with pde.name
    "bratu:Bratu"; predict writes ParaView and CheckpointFile output and times both solvers; an
    unimportable PDE exits with status 2, naming it."""
    work = tempfile.mkdtemp(prefix="fem_moe_cli_")
    try:
        write_config(os.path.join(work, "bratu.toml"),
                     pde={"name": "bratu:Bratu", "options": {"n": 4}},
                     data={"path": "bratu.h5", "n_train": 4, "n_val": 1, "n_test": 1},
                     model={"kind": "pihc", "n_basis": 4, "width": 16, "depth": 2, "latent": 8},
                     train={"steps": 2, "batch_size": 2, "val_every": 2, "checkpoint_every": 2,
                            "out": "run", "progress": False})
        r = _cli("generate", "bratu.toml", cwd=work)
        assert r.returncode == 0 and "wrote" in r.stdout, r.stdout + r.stderr
        r = _cli("train", "bratu.toml", cwd=work)
        assert r.returncode == 0 and "trained pihc: 2 steps" in r.stdout, r.stdout + r.stderr
        r = _cli("predict", "bratu.toml", "--params", "1.5,2,-3", "--params", "0.7,-1,4",
                 "--out", "u.pvd", cwd=work)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "predicted 2 field(s) with pihc (step 2) on 2 rank(s)" in r.stdout
        assert r.stdout.count("classical solver") == 2
        assert os.path.getsize(os.path.join(work, "u.pvd")) > 0
        r = _cli("predict", "bratu.toml", "--params", "1.5,2,-3", "--out", "u.h5",
                 "--no-classical", cwd=work)
        assert r.returncode == 0 and "classical" not in r.stdout, r.stdout + r.stderr
        assert os.path.getsize(os.path.join(work, "u.h5")) > 0
        r = _cli("predict", "bratu.toml", "--params", "1.5,2", cwd=work)
        assert r.returncode == 2 and r.stderr.count("expected [n, 3]") == 1, r.stdout + r.stderr
        r = _cli("train", "bratu.toml", "--set", 'pde.name="mine:Missing"', cwd=work)
        assert r.returncode == 2 and "cannot import module 'mine'" in r.stderr, r.stdout + r.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parallel([1, 2])
def test_resuming_from_a_checkpoint_that_would_run_code_refuses_it_on_every_rank():
    """A checkpoint.pt handed to the trainer (train.out of a shared run) carrying a pickled
    call is refused with an InputError on every rank, and the call never runs."""
    from test_checkpoint import Payload
    out = shared_dir()
    marker = os.path.join(out, "payload_ran")
    if MPI.COMM_WORLD.rank == 0:
        torch.save({"step": 1, "config": Payload(marker)}, os.path.join(out, "checkpoint.pt"))
    MPI.COMM_WORLD.barrier()
    with pytest.raises(fem_moe.InputError, match="not plain data"):
        Trainer(config(out, train={"steps": 2}))
    parallel_assert(not os.path.exists(marker), "the checkpoint's payload ran")
