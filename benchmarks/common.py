"""Helpers of the benchmark scripts: their command line, memory readings, timing, the table and
the JSON file. No Firedrake at import: a script parses its command line before PETSc reads it."""
import argparse
import json
import math
import os
import time

from fem_moe.arguments import parse as parse_arguments, provenance  # noqa: F401
from fem_moe.report import peak_rss_mb, print_table, reset_peak_rss, write_atomic  # noqa: F401

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def benchmark_parser(doc, out=None, results=RESULTS):
    """A benchmark's argument parser. ``doc``: the script's docstring, which says what it
    measures and how; ``--help`` prints it as written. ``out``: the name of the results file
    in the folder ``results`` (adds ``--out``; ``benchmarks/results/`` by default, the design
    studies' is ``benchmarks/studies/results/``)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options starting with '-' that are not listed go to PETSc. The results file "
               "records the command, the machine and the date.")
    if out is not None:
        parser.add_argument("--out", default=os.path.join(results, out),
                            help="the JSON file of the results (default: %(default)s)")
    return parser


def rss_mb():
    """Current resident memory of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak():
    """Reset the kernel's resident high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    if not reset_peak_rss():
        raise OSError("cannot reset the resident high-water mark (/proc/self/clear_refs)")


def peak_mb():
    """Resident high-water mark of this process since the last reset_peak(), MiB."""
    peak = peak_rss_mb()
    if math.isnan(peak):
        raise RuntimeError("no VmHWM in /proc/self/status")
    return peak


def peak_above(base):
    """The high-water mark above ``base`` (MiB), 0 if memory was returned meanwhile."""
    return max(peak_mb() - base, 0.0)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def forward_backward(layer, basis, data, comm):
    """One forward and backward pass of a constraint layer on a fresh leaf copy of ``basis``:
    (forward s, backward s), the slowest rank's. Collective."""
    from mpi4py import MPI
    b = basis.clone().requires_grad_()
    comm.Barrier()
    with Timer() as tf:
        u = layer(b, data)
    with Timer() as tb:
        (u ** 2).sum().backward()
    return comm.allreduce(tf.seconds, MPI.MAX), comm.allreduce(tb.seconds, MPI.MAX)


def relative_distance(fine, other):
    """||fine - other|| / ||fine|| in L2 over ``fine``'s mesh, ``other`` (a Function on any
    mesh of the same domain, e.g. a coarser level) interpolated there: exact where the meshes
    are nested."""
    import firedrake as fd
    on_fine = fd.assemble(fd.interpolate(other, fine.function_space()))
    return fd.errornorm(fine, on_fine) / fd.norm(fine)


def parse_options(text):
    """PDE options from "key=value,key=value": an int where the value reads as one, else a
    float, else the string (``lifting=erfc``)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, value = item.split("=")
        for kind in (int, float, str):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
    return out


def write_json(path, name, rows, ranks=1, **meta):
    """``rows`` and ``meta`` of benchmark ``name`` to ``path``, with the command that ran (on
    ``ranks`` MPI ranks), the machine and the date."""
    meta.update(provenance(ranks))
    doc = {"benchmark": name, "meta": meta, "rows": rows}
    write_atomic(path, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    print(f"wrote {path}")


def merged_rows(path, rows, key):
    """``rows`` after the rows of earlier runs in the JSON file ``path`` (if it exists) that this
    run did not measure again (the same ``key(row)``): one file gathers several runs."""
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        earlier = json.load(f)["rows"]
    new = {key(r) for r in rows}
    return [r for r in earlier if key(r) not in new] + rows


def run_child(cmd):
    """Run a measurement child process; return the JSON object it printed on a line of its own.
    Its command-line flags are ours, not PETSc's: silence PETSc's unused-options report."""
    import subprocess
    import sys
    env = dict(os.environ, FIREDRAKE_DISABLE_OPTIONS_LEFT="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not rows:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(rows[-1])


def nonlinear_diffusion(n, degree=1):
    """The benchmarks' problem: -div((1 + u^2) grad u) = m on an n x n unit square (P1, or
    ``degree``), u = x + y on the boundary, m = 1 + 10 x y. Returns (problem, data tensor
    [1, n_dofs])."""
    import torch
    import firedrake as fd
    import fem_moe
    mesh = fd.UnitSquareMesh(n, n)
    V = fd.FunctionSpace(mesh, "CG", degree)
    x, y = fd.SpatialCoordinate(mesh)
    residual = lambda u, v, m: ((1 + u**2) * fd.inner(fd.grad(u), fd.grad(v)) - m[0] * v) * fd.dx
    problem = fem_moe.ConstrainedProblem(V, residual, bcs=fd.DirichletBC(V, x + y, "on_boundary"),
                                         data_spaces=V)
    data = torch.tensor(fd.Function(V).interpolate(1 + 10 * x * y).dat.data_ro.copy())[None]
    return problem, data
