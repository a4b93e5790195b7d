"""Command lines of scripts that run fem_moe: the demos' shared options, PETSc's options left for
PETSc, and the provenance a results file records.

No Firedrake or torch here: a script parses its arguments *before* it imports Firedrake, which
hands ``sys.argv`` to PETSc -- so that ``-snes_monitor`` and the like reach PETSc, and the
script's own flags do not.
"""
import argparse
import os
import platform
import shlex
import subprocess
import sys
import time

__all__ = ["demo_parser", "parse", "provenance"]


def demo_parser(description, *, out, steps, n_train, n_test, experts, n_basis=16):
    """An argument parser with the options every comparison demo has, given the demo's own
    defaults: ``--n-train``, ``--n-test`` (dataset inputs to train on and to test on),
    ``--steps``, ``--n-basis``, ``--experts`` (K of the mixture), ``--models`` (which of the
    demo's models to train, by label), ``--out``, ``--tiny`` (a seconds-long run) and
    ``--no-figures``. ``description``: the demo's docstring (shown as written by ``--help``).
    The demo adds its own options to the returned parser."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other options starting with '-' go to PETSc.")
    parser.add_argument("--n-train", type=int, default=n_train, help="training inputs")
    parser.add_argument("--n-test", type=int, default=n_test, help="held-out test inputs")
    parser.add_argument("--steps", type=int, default=steps, help="training steps")
    parser.add_argument("--n-basis", type=int, default=n_basis, help="N: basis fields")
    parser.add_argument("--experts", type=int, default=experts, help="K of the mixture")
    parser.add_argument("--models", default=None,
                        help="comma-separated labels of the models to train (default: the demo's)")
    parser.add_argument("--out", default=out, help="the output directory")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (the test suite's)")
    parser.add_argument("--no-figures", action="store_true", help="no PNG figures")
    return parser


def parse(parser):
    """Parse the command line with ``parser``; the arguments it does not know stay in
    ``sys.argv`` for PETSc, which reads them when Firedrake is imported. Call before importing
    Firedrake."""
    args, petsc_options = parser.parse_known_args()
    sys.argv = sys.argv[:1] + petsc_options
    return args


def provenance(ranks):
    """What a results file records about how it was made: ``command`` (as typed, with the
    ``mpiexec -n`` of ``ranks`` > 1), ``machine`` (host, processor, CPU count), ``python``,
    ``date`` (UTC, ISO 8601) and ``commit`` (the git commit of the checkout that ran, with
    ``+changes`` where its tracked files differed from it; None outside a git checkout)."""
    argv = ["python"] + sys.orig_argv[1:]
    command = ("" if ranks == 1 else f"mpiexec -n {ranks} ") + shlex.join(argv)
    return {"command": command, "machine": _machine(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": _commit()}


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs"


def _commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        run = lambda *cmd: subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True,
                                          timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None
