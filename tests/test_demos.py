"""The demos run as users run them: in-process, serially and under mpiexec -n 2."""
import os
import runpy
import sys

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


def test_no_demo_left_untested():
    tested = {"nonlinear_poisson.py"}
    assert {f for f in os.listdir(DEMOS) if f.endswith(".py")} == tested
