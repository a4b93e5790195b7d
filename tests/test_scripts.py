"""The demos' and benchmarks' command lines: every script's ``--help`` says what it runs or
measures (its docstring, or the demo's title) and takes the shared options; a results file
records the command, the machine, the date and the commit that made it."""
import ast
import glob
import os
import shlex
import subprocess
import sys

import pytest

from fem_moe import arguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = sorted(p for p in glob.glob(os.path.join(REPO, "benchmarks", "**", "*.py"),
                                         recursive=True) if not p.endswith("common.py"))
COMPARISONS = [os.path.join(REPO, "demos", f"{name}.py") for name in
               ("reaction_diffusion", "diffusion_sorption", "flow_past_obstacle",
                "decaying_turbulence")]


def help_text(script):
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, f"{script} --help failed:\n{out.stderr[-2000:]}"
    return " ".join(out.stdout.split())


@pytest.mark.parallel(1)
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: os.path.relpath(p, REPO))
def test_a_benchmarks_help_states_what_it_measures(script):
    with open(script) as f:
        doc = ast.get_docstring(ast.parse(f.read()), clean=False)
    assert doc, f"{script} has no docstring to say what it measures"
    first = " ".join(doc.split("\n\n")[0].split())
    assert first in help_text(script)


@pytest.mark.parallel(1)
@pytest.mark.parametrize("script", COMPARISONS, ids=os.path.basename)
def test_a_comparison_demo_takes_the_shared_options(script):
    text = help_text(script)
    for option in ("--n-train", "--n-test", "--steps", "--n-basis", "--experts", "--models",
                   "--out", "--tiny", "--no-figures"):
        assert option in text, f"{os.path.basename(script)} --help lacks {option}"


@pytest.mark.parallel(1)
def test_provenance_records_the_command_as_typed():
    record = arguments.provenance(3)
    assert record["command"] == "mpiexec -n 3 " + shlex.join(["python", *sys.orig_argv[1:]])
    assert record["date"].endswith("Z") and "CPUs" in record["machine"]
    assert arguments.provenance(1)["command"].startswith("python ")
