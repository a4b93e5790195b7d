"""Test configuration, after Firedrake's own: PETSc options and threads set before Firedrake is
imported, annotation off and the adjoint tape empty around every test."""
import os

# Firedrake passes sys.argv to PETSc at import: pytest's arguments would be reported as unused.
os.environ["FIREDRAKE_DISABLE_OPTIONS_LEFT"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import firedrake  # noqa: E402,F401
from firedrake.adjoint import pause_annotation, get_working_tape  # noqa: E402
from firedrake.petsc import PETSc  # noqa: E402

from fem_moe import lifetime  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@pytest.fixture(autouse=True)
def clean_tape():
    """No test leaks annotation or tape entries into the next."""
    pause_annotation()
    get_working_tape().clear_tape()
    yield
    pause_annotation()
    get_working_tape().clear_tape()


@pytest.fixture(autouse=True, scope="module")
def garbage_cleanup():
    """Between test modules, every rank releases the same objects and destroys them."""
    yield
    lifetime.clean_up()


@pytest.fixture
def repo():
    return REPO


@pytest.fixture(autouse=True)
def petsc_options():
    """``petsc_options(name=value, ...)`` sets PETSc options for this test, as the command line
    would. Every option that entered the database during a test is removed when it ends, not
    earlier: a solver built while an option was set holds it in its petsctools options manager as
    a command-line option and puts it back whenever it runs (under its own prefix too, for an
    option given under a shared prefix such as ``expert_``), so removing it mid-test would leak
    it into the next test."""
    opts = PETSc.Options()
    before = set(opts.getAll())

    def set_options(**options):
        for name, value in options.items():
            opts[name] = "" if value is None else value

    yield set_options
    for name in set(opts.getAll()) - before:
        opts.delValue(name)
