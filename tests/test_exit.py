"""An MPI job that uses fem_moe ends: tests/exit_job.py (the global layer, the coupled mixture
with both partitions, bad inputs that raise, a training step, the bridge; then sys.exit(0)) run
under mpiexec -n 2 and -n 3, several times each, every run within its time limit and with
status 0. ``benchmarks/exit_stress.py`` runs it more times (20 per rank count by default)."""
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "exit_stress", os.path.join(os.path.dirname(HERE), "benchmarks", "exit_stress.py"))
exit_stress = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exit_stress)

RUNS = int(os.environ.get("FEM_MOE_EXIT_RUNS", "3"))
LIMIT = 300     # seconds; a run takes 20-40 s on 2 cores


@pytest.mark.parallel(1)
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_job_ends_every_time(ranks):
    for i in range(RUNS):
        r = exit_stress.launch(ranks, LIMIT)
        where = "at exit, after every rank finished its work" if r["done"] == ranks else ""
        assert r["returncode"] is not None, (
            f"run {i + 1} of mpiexec -n {ranks} hung {where} (killed after {LIMIT} s):\n"
            + r["output"])
        assert r["returncode"] == 0 and r["done"] == ranks, (
            f"run {i + 1} of mpiexec -n {ranks} failed (status {r['returncode']}):\n"
            + r["output"])
