"""The demos run as users run them: in-process, serially and under mpiexec -n 2."""
import os
import runpy
import sys
import tempfile

import pytest

DEMOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demos")


def run_demo(name, *args):
    argv = sys.argv
    sys.argv = [os.path.join(DEMOS, name), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit:
        assert exit.code in (0, None), f"{name} exited with {exit.code}"
    finally:
        sys.argv = argv


@pytest.mark.parallel([1, 2])
def test_nonlinear_poisson():
    run_demo("nonlinear_poisson.py", "--degree", "1")


@pytest.mark.parallel([1, 2])
@pytest.mark.parametrize("name", ["reaction_diffusion.py", "diffusion_sorption.py",
                                  "flow_past_obstacle.py", "decaying_turbulence.py"])
def test_study_demo_tiny(name):
    """The comparison demos at a seconds-long size: table, JSON, ParaView files, PNG figures."""
    import json
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = comm.bcast(tempfile.mkdtemp(prefix="fem_moe_demo_") if comm.rank == 0 else None)
    run_demo(name, "--tiny", "--out", out)
    if comm.rank == 0:
        rows = json.load(open(os.path.join(out, "results.json")))["rows"]
        kinds = [r["kind"] for r in rows]
        # The standard comparison first (turbulence adds a PI-HC control after its mixtures).
        assert kinds[:6] == ["soft", "pihc", "pihc", "moe", "moe", "moe"], kinds
        # Every least-squares model has a solution for every input; a Galerkin one may have no
        # root at all for a basis trained 3 steps (Navier-Stokes), and says so in its row.
        assert all(r["ranks"] == comm.size for r in rows)
        assert all(0 < r["rel_l2"] < 10 for r in rows if r["mode"] != "galerkin"), \
            [(r["label"], r["rel_l2"]) for r in rows]
        assert all(0 < r["rel_l2"] < 10 or r["failed"] == r["samples"] for r in rows), \
            [(r["label"], r["rel_l2"], r["failed"], r["samples"]) for r in rows]
        assert all(r["residual_interface"] >= 0 or r["failed"] == r["samples"]
                   for r in rows if r["kind"] == "moe")
        for f in ["solutions.png", "basis.png", "losses.png", "fields.pvd", "partition.png",
                  "partition.pvd"]:
            assert os.path.getsize(os.path.join(out, f)) > 0, f


@pytest.mark.parallel([1, 2])
def test_diffusion_sorption_demo_on_graded_levels_with_the_erfc_lifting():
    """The paper-size configuration's flags (demos/results/diffusion_sorption_paper: --grading 3
    --lifting erfc, with the faster step's --quadrature-degree 2 --dtype float32) reach the PDE and
    the trainer, and the run reports the error over the domain, extrapolation included."""
    import json
    import math
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = comm.bcast(tempfile.mkdtemp(prefix="fem_moe_demo_") if comm.rank == 0 else None)
    run_demo("diffusion_sorption.py", "--tiny", "--grading", "3", "--lifting", "erfc",
             "--quadrature-degree", "2", "--dtype", "float32",
             "--models", "MoE K=2 galerkin", "--no-figures", "--out", out)
    if comm.rank == 0:
        doc = json.load(open(os.path.join(out, "results.json")))
        config = doc["meta"]["config"]
        assert config["pde"]["options"] == {"nx": 8, "nt": 4, "t_end": 500.0, "grading": 3.0,
                                            "lifting": "erfc", "quadrature_degree": 2}
        assert config["train"]["dtype"] == "float32"
        (row,) = doc["rows"]
        assert 0 < row["rel_l2_field"] < 10 and math.isfinite(row["rel_l2_field_max"]), row
        assert os.path.getsize(os.path.join(out, "extrapolation.json")) > 0


@pytest.mark.parallel([1, 2])
def test_bratu_a_pde_of_ones_own():
    """The docs' worked example of a PDE fem_moe does not ship: generated, trained, evaluated,
    loaded and applied to a new input."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = comm.bcast(tempfile.mkdtemp(prefix="fem_moe_demo_") if comm.rank == 0 else None)
    sys.path.insert(0, DEMOS)
    try:
        run_demo("bratu.py", "--tiny", "--out", out)
    finally:
        sys.path.remove(DEMOS)
    assert os.path.isfile(os.path.join(out, "run", "checkpoint.pt"))


def test_no_demo_left_untested():
    tested = {"nonlinear_poisson.py", "reaction_diffusion.py", "diffusion_sorption.py",
              "flow_past_obstacle.py", "decaying_turbulence.py", "bratu.py"}
    assert {f for f in os.listdir(DEMOS) if f.endswith(".py")} == tested


@pytest.mark.parametrize("name", ["reaction_diffusion.toml", "diffusion_sorption.toml",
                                  "decaying_turbulence.toml"])
def test_demo_configs_are_valid_and_match_their_demo(name):
    """The configs that reproduce the demos' runs with the CLI load, and name real PDE options."""
    from fem_moe import pdes
    from fem_moe.config import load_config
    config = load_config(os.path.join(DEMOS, "configs", name))
    pdes.get(config["pde"]["name"], **config["pde"]["options"])
    assert config["pde"]["name"] == name[:-len(".toml")]
    assert config["train"]["loss"] == "physics" and config["model"]["n_basis"] == 16
