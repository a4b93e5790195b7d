"""Does an MPI job that uses fem_moe always end? Runs ``tests/exit_job.py`` (every collective
path a user's script takes, then ``sys.exit(0)``) under ``mpiexec -n P`` many times, each with a
time limit, and reports per rank count how many runs ended, how many hung and how long they took.

A run that printed ``done`` on every rank and then outlived its limit hung at exit (the PETSc
garbage cleanup of ``PetscFinalize``, if ranks disagree on what is left to clean up). With
``--backtraces`` such a run's processes are shown with gdb before they are killed.

    scripts/run python benchmarks/exit_stress.py --ranks 2 3 --runs 20

The table goes to the terminal, the rows to ``benchmarks/results/exit_stress.json``.
"""
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
JOB = os.path.join(REPO, "tests", "exit_job.py")


def _backtraces(session):
    """gdb backtraces of the python processes of process group ``session``."""
    pids = subprocess.run(["pgrep", "-g", str(session), "-f", "exit_job.py"],
                          capture_output=True, text=True).stdout.split()
    out = []
    for pid in pids:
        if not pid.isdigit() or int(pid) == session:
            continue
        bt = subprocess.run(["gdb", "-batch", "-p", pid, "-ex", "bt 20"], capture_output=True,
                            text=True, timeout=60).stdout
        out.append(f"--- pid {pid}\n" + "\n".join(line for line in bt.splitlines()
                                                 if line.startswith("#")))
    return "\n".join(out)


def launch(n, timeout, backtraces=False):
    """Run the job once under ``mpiexec -n n``; kill it past ``timeout`` seconds. Returns a dict:
    ranks, returncode (None: killed), seconds, done (how many ranks printed done), output (the
    last lines; for a killed run, also the backtraces where asked for)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", FIREDRAKE_DISABLE_OPTIONS_LEFT="1")
    with tempfile.TemporaryDirectory(prefix="fem_moe_exit_") as work:
        cmd = ["mpiexec", "-n", str(n), "--oversubscribe", "--bind-to", "none",
               sys.executable, JOB, work]
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=env, start_new_session=True)
        try:
            output, _ = child.communicate(timeout=timeout)
            returncode = child.returncode
        except subprocess.TimeoutExpired:
            traces = _backtraces(child.pid) if backtraces else ""
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            output, returncode = output + traces, None
        seconds = time.perf_counter() - t0
    # Ranks print at once: their lines may run together.
    done = len(set(re.findall(r"rank (\d+): done", output)))
    return {"ranks": n, "returncode": returncode, "seconds": seconds, "done": done,
            "output": "\n".join(output.splitlines()[-60:])}


def main():
    from common import benchmark_parser, print_table, write_json
    parser = benchmark_parser(__doc__, out="exit_stress.json")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3], help="rank counts")
    parser.add_argument("--runs", type=int, default=20, help="runs per rank count")
    parser.add_argument("--timeout", type=float, default=240,
                        help="seconds a run may take before it counts as hung and is killed")
    parser.add_argument("--backtraces", action="store_true", help="gdb backtraces of hung runs")
    args = parser.parse_args()

    rows = []
    for n in args.ranks:
        runs = []
        for i in range(args.runs):
            r = launch(n, args.timeout, args.backtraces)
            state = "ended" if r["returncode"] == 0 else (
                "hung at exit" if r["returncode"] is None and r["done"] == n else
                "hung" if r["returncode"] is None else f"failed ({r['returncode']})")
            print(f"-n {n} run {i + 1}: {state} in {r['seconds']:.1f} s", flush=True)
            if state != "ended":
                print(r["output"], flush=True)
            runs.append((state, r["seconds"]))
        ended = [s for state, s in runs if state == "ended"]
        rows.append({"ranks": n, "runs": len(runs), "ended": len(ended),
                     "hung_at_exit": sum(state == "hung at exit" for state, _ in runs),
                     "other": sum(state not in ("ended", "hung at exit") for state, _ in runs),
                     "median_s": statistics.median(ended) if ended else None,
                     "max_s": max(ended) if ended else None})
    print_table(rows, [("ranks", "ranks", "{}"), ("runs", "runs", "{}"), ("ended", "ended", "{}"),
                       ("hung_at_exit", "hung at exit", "{}"), ("other", "other", "{}"),
                       ("median_s", "median s", "{:.1f}"), ("max_s", "max s", "{:.1f}")],
                title=f"tests/exit_job.py under mpiexec, limit {args.timeout:.0f} s per run")
    write_json(args.out, "exit_stress", rows, timeout_s=args.timeout)
    return 0 if all(r["ended"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
