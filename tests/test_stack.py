"""Smoke tests of the stack fem_moe stands on: Firedrake, PETSc SNES, pyadjoint, torch, MPI."""
import numpy as np
import pytest
import firedrake as fd
from firedrake.adjoint import (Control, ReducedFunctional, continue_annotation, pause_annotation,
                               set_working_tape, taylor_test)
from mpi4py import MPI
from pytest_mpi import parallel_assert


def poisson_error(n, comm):
    """L2 error of P1 Poisson with u = sin(pi x) sin(pi y) on an n x n mesh over ``comm``."""
    mesh = fd.UnitSquareMesh(n, n, comm=comm)
    V = fd.FunctionSpace(mesh, "CG", 1)
    x, y = fd.SpatialCoordinate(mesh)
    exact = fd.sin(fd.pi * x) * fd.sin(fd.pi * y)
    u, v = fd.TrialFunction(V), fd.TestFunction(V)
    uh = fd.Function(V)
    fd.solve(fd.inner(fd.grad(u), fd.grad(v)) * fd.dx == 2 * fd.pi**2 * exact * v * fd.dx, uh,
             bcs=fd.DirichletBC(V, 0, "on_boundary"),
             solver_parameters={"ksp_type": "preonly", "pc_type": "lu"})
    return fd.errornorm(exact, uh)


@pytest.mark.parallel([1, 2, 3])
def test_poisson_order_and_rank_independence():
    comm = MPI.COMM_WORLD
    errors = [poisson_error(n, comm) for n in (16, 32)]
    order = np.log2(errors[0] / errors[1])
    parallel_assert(abs(order - 2) < 0.1, f"P1 L2 order {order}, expected 2")
    # The same problem on one rank (each rank solves it alone): the same error.
    serial = [poisson_error(n, MPI.COMM_SELF) for n in (16, 32)]
    parallel_assert(np.allclose(errors, serial, rtol=1e-8, atol=0), f"{errors} vs serial {serial}")


def nonlinear_problem(n=16, comm=MPI.COMM_WORLD):
    mesh = fd.UnitSquareMesh(n, n, comm=comm)
    V = fd.FunctionSpace(mesh, "CG", 2)
    x, y = fd.SpatialCoordinate(mesh)
    f = fd.Function(V).interpolate(10 * fd.sin(fd.pi * x) * y)
    u, v = fd.Function(V), fd.TestFunction(V)
    F = (1 + u**2) * fd.inner(fd.grad(u), fd.grad(v)) * fd.dx - f * v * fd.dx
    solver = fd.NonlinearVariationalSolver(
        fd.NonlinearVariationalProblem(F, u, fd.DirichletBC(V, 0, "on_boundary")),
        solver_parameters={"snes_rtol": 1e-12, "snes_atol": 1e-14, "ksp_type": "preonly",
                           "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"})
    return u, f, F, solver


@pytest.mark.parallel([1, 2])
def test_nonlinear_snes_converges():
    u, f, F, solver = nonlinear_problem()
    solver.solve()
    reason = solver.snes.getConvergedReason()
    its = solver.snes.getIterationNumber()
    res = fd.assemble(F, bcs=solver._problem.bcs).riesz_representation("l2").dat.norm
    parallel_assert(reason > 0 and 2 <= its <= 10, f"reason {reason}, {its} iterations")
    parallel_assert(res < 1e-10, f"final residual {res}")


@pytest.mark.parallel([1, 2])
def test_taylor_through_nonlinear_solve():
    u, f, F, solver = nonlinear_problem()
    with set_working_tape() as tape:
        continue_annotation()
        solver.solve()
        J = fd.assemble(u**2 * u * fd.dx)
        Jhat = ReducedFunctional(J, Control(f))
        pause_annotation()
        x, y = fd.SpatialCoordinate(f.function_space().mesh())
        h = fd.Function(f.function_space()).interpolate(fd.cos(2 * x) * y)
        rate = taylor_test(Jhat, f, h)
        tape.clear_tape()
    parallel_assert(rate >= 1.9, f"Taylor rate {rate}")


@pytest.mark.parallel(2)
def test_torch_and_firedrake_in_one_process():
    import torch
    from firedrake.ml.pytorch import to_torch, from_torch
    comm = MPI.COMM_WORLD
    mesh = fd.UnitSquareMesh(8, 8)
    V = fd.FunctionSpace(mesh, "CG", 1)
    x, _ = fd.SpatialCoordinate(mesh)
    u = fd.Function(V).interpolate(x)
    t = to_torch(u)                            # this rank's owned dofs, [1, n_owned]
    total = comm.allreduce(float((2 * t).sum()))
    u2 = from_torch(2 * t[0], V)
    expected = 2 * comm.allreduce(float(u.dat.data_ro.sum()))
    parallel_assert(isinstance(t, torch.Tensor) and t.dtype == torch.float64,
                    f"to_torch gave {t!r}")
    parallel_assert(comm.size == 2 and abs(total - expected) < 1e-10, f"{total} != {expected}")
    parallel_assert(np.isclose(fd.assemble(u2 * fd.dx), 2 * fd.assemble(u * fd.dx)), "from_torch")


def test_pip_install_into_this_environment_replaces_nothing(repo, tmp_path):
    """Installing fem_moe into an environment that already has Firedrake, PETSc and torch (this
    one) would install fem_moe and nothing else: no pinned version pulls a different Firedrake,
    petsc4py or torch. Checked by pip itself (a dry run, no build isolation, so nothing is
    downloaded), and on pyproject.toml: ranges, not pins, for the packages users bring."""
    import json
    import subprocess
    import sys
    import tomllib
    deps = tomllib.load(open(f"{repo}/pyproject.toml", "rb"))["project"]["dependencies"]
    pinned = [d for d in deps if "==" in d]
    assert not pinned, f"exact pins in pyproject.toml: {pinned}"
    report = str(tmp_path / "pip_report.json")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run",
                          "--no-build-isolation",
                          "--quiet", "--report", report, repo], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    install = [i["metadata"]["name"] for i in json.load(open(report))["install"]]
    assert install == ["fem_moe"], f"pip would also install or replace: {install}"


def test_conda_environment_matches_the_install_script(repo):
    """environment.yml (not exercised: no conda channel here) names the PETSc and Firedrake
    versions scripts/install.sh builds and tests, and takes PETSc from conda-forge, where it is
    built with the packages fem_moe's defaults need, rather than from the PyPI sdist, which
    configures none of them."""
    import pathlib
    import re
    repo = pathlib.Path(repo)
    script = (repo / "scripts" / "install.sh").read_text()
    petsc = re.search(r"^PETSC_VERSION=(\S+)", script, re.M).group(1)
    firedrake = re.search(r"^FIREDRAKE_VERSION=(\S+)", script, re.M).group(1)
    env = (repo / "environment.yml").read_text()
    deps = [line.split("#")[0].strip()[2:] for line in env.splitlines()
            if line.strip().startswith("- ")]
    series = ".".join(petsc.split(".")[:2])
    assert f"petsc={series}.*=*real*" in deps and f"petsc4py={series}.*" in deps, deps
    assert not any(d.startswith("petsc==") for d in deps), "PETSc from its PyPI sdist: no MUMPS"
    assert f"firedrake=={firedrake}" in env
    assert "h5py=*=mpi_openmpi_*" in deps
