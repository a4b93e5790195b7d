"""``python -m fem_moe generate|train|evaluate|predict CONFIG [--set section.key=value ...]
[PETSc options]``

``predict CONFIG --params "0.1,0.3" [--params ...] --out u.pvd``: the trained model's fields for
new parameter vectors (ParaView's .pvd, or a Firedrake CheckpointFile for .h5), with the wall
time per input beside the classical solver's. ``convert-checkpoint PATH``: rewrite a checkpoint
of an older fem_moe as plain data (it unpickles the file: only for files you made).

Runs under ``mpirun -n P`` as it runs serially. Options with a single dash go to PETSc (e.g.
``-expert_snes_monitor``, ``-classical_snes_monitor``); ``--set train.steps=50`` overrides a
config entry (TOML syntax). An error in the config or the data is reported once, by rank 0,
and every rank exits with status 2; a failure mid-run with status 1.
"""
import argparse
import sys


def _parser():
    p = argparse.ArgumentParser(prog="python -m fem_moe", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("generate", "train", "evaluate", "predict",
                                       "convert-checkpoint"),
                   help="generate: make the dataset with the classical solver; train: train (and "
                   "resume) the model, then evaluate it on the test split; evaluate: measure the "
                   "last checkpoint; predict: apply the trained model to new inputs; "
                   "convert-checkpoint: rewrite an older checkpoint as plain data")
    p.add_argument("config", help="a TOML file (see fem_moe.config); convert-checkpoint: the "
                   "checkpoint file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set model.kind=pihc (repeatable)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="evaluate: which samples (default test)")
    p.add_argument("--force", action="store_true", help="generate: remake an existing dataset")
    p.add_argument("--params", action="append", default=[], metavar="P1,P2,...",
                   help="predict: one input's parameter vector, comma-separated (repeatable)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="predict: where the fields go: .pvd (ParaView) or .h5 (CheckpointFile)")
    p.add_argument("--no-classical", action="store_true",
                   help="predict: do not time the classical solver on the same inputs")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, petsc = _split_values(argv)
    args = _parser().parse_args(ours)
    sys.argv = [sys.argv[0]] + petsc
    from mpi4py import MPI
    from .errors import FemMoeError
    comm = MPI.COMM_WORLD
    try:
        return _run(args, comm)
    except FemMoeError as e:       # raised on every rank alike: report once, exit everywhere
        if comm.rank == 0:
            print(f"fem_moe {args.command}: error: {e}", file=sys.stderr)
        return 2 if type(e).__name__ == "InputError" else 1
    except Exception:     # noqa: BLE001 -- reported, then the whole job aborted
        # Anything else may have struck one rank only, leaving the others in a collective:
        # print it and abort the whole job rather than hang.
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        if comm.size > 1:
            comm.Abort(1)
        return 1


def _split_values(argv):
    """Split argv into ours and PETSc's: "-name" (single dash) is a PETSc option, and the word
    after it its value once our two positional arguments (command, config) have been seen."""
    ours, petsc, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and not a.startswith("--") and a != "-h" and not _is_number(a):
            petsc.append(a)
            positional = [x for x in ours if not x.startswith("-")]
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and len(positional) >= 2 and (not nxt.startswith("-")
                                                             or _is_number(nxt)):
                petsc.append(nxt)
                i += 1
        else:
            ours.append(a)
        i += 1
    return ours, petsc


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def _run(args, comm):
    from .config import load_config
    from .errors import raise_on_all_ranks, FemMoeError
    from .lifetime import run_first_at_exit
    run_first_at_exit()     # Firedrake and PETSc are imported: every command ends through it
    if args.command == "convert-checkpoint":
        from .checkpoint import convert
        if comm.rank == 0:
            print(f"rewrote {convert(args.config)} as plain data")
        return 0
    err, config = None, None
    try:
        config = load_config(args.config, args.overrides)
    except FemMoeError as e:
        err = e
    raise_on_all_ranks(comm, err)
    if args.command == "generate":
        return _generate(config, comm, args.force)
    if args.command == "predict":
        return _predict(config, comm, args)
    from .train import Trainer
    trainer = Trainer(config, comm)
    if args.command == "train":
        trainer.fit()
        if comm.rank == 0:
            last = trainer.validation[-1] if trainer.validation else {}
            print(f"trained {trainer.model.kind}: {trainer.step} steps; validation {last}; "
                  f"checkpoint {trainer.checkpoint_path}")
    elif trainer.step == 0 and comm.rank == 0:
        print(f"note: no checkpoint in {trainer.out}: evaluating the untrained model")
    if config["data"]["n_test"] or args.command == "evaluate":
        result = trainer.evaluate(args.split)
        if comm.rank == 0:
            _print_result(result)
    return 0


def _generate(config, comm, force):
    from .data import ensure_dataset
    pde, n, made = ensure_dataset(config, comm, progress=config["train"]["progress"], force=force)
    if comm.rank == 0:
        path = config["data"]["path"]
        print(f"wrote {path}: {n} samples of {pde.describe()} on {comm.size} rank(s)" if made else
              f"{path} is up to date ({n} samples of {pde.describe()}); --force remakes it")
    return 0


def _predict(config, comm, args):
    import numpy as np
    import firedrake as fd
    from .errors import InputError
    from .inference import load
    err, params = None, None
    try:
        params = np.array([[float(x) for x in p.split(",")] for p in args.params])
    except ValueError as e:
        err = f"--params: {e}"
    if not args.params:
        err = "predict needs at least one --params"
    if args.out and not args.out.endswith((".pvd", ".h5")):
        err = f"--out {args.out}: the file must end in .pvd (ParaView) or .h5 (CheckpointFile)"
    if err:
        raise InputError(err)
    model = load(config["train"]["out"], comm)
    fields = model.predict(params)
    classical = []
    if not args.no_classical:
        for p in params:
            data = model.pde.data(model.problem, p)
            classical.append(model.pde.classical_solve(model.problem, data)[1])
    if args.out:
        _write_fields(fd, args.out, fields, model.problem.mesh)
    if comm.rank == 0:
        print(f"predicted {len(fields)} field(s) with {model.model.kind} (step {model.step}) on "
              f"{comm.size} rank(s)" + (f"; wrote {args.out}" if args.out else ""))
        for i, p in enumerate(params):
            line = f"  input {i} ({', '.join(f'{x:g}' for x in p)}): {model.times[i]:.4f} s"
            if classical:
                line += (f"; classical solver {classical[i]:.4f} s "
                         f"({classical[i] / model.times[i]:.1f}x)")
            print(line)
    return 0


def _write_fields(fd, path, fields, mesh):
    """Predicted fields to ``path``: ParaView (one time step per input) or a CheckpointFile."""
    if path.endswith(".pvd"):
        out = fd.VTKFile(path, comm=mesh.comm)
        for i, u in enumerate(fields):
            parts = u.subfunctions if len(u.function_space()) > 1 else (u,)
            out.write(*parts, time=float(i))
        return
    with fd.CheckpointFile(path, "w", comm=mesh.comm) as f:
        f.save_mesh(mesh)
        for i, u in enumerate(fields):
            f.save_function(u, idx=i)


def _print_result(r):
    rows = [("samples", r["samples"]), ("relative L2 (mean)", f"{r['rel_l2']:.4e}"),
            ("relative L2 (max)", f"{r['rel_l2_max']:.4e}"),
            ("relative L2 over the domain (mean)", f"{r['rel_l2_field']:.4e}"),
            ("relative residual^2 (mean)", f"{r['residual']:.4e}")]
    if "residual_interface" in r:
        rows += [("RMS residual at interfaces (rel.)", f"{r['residual_interface']:.4e}"),
                 ("RMS residual elsewhere (rel.)", f"{r['residual_interior']:.4e}")]
    rows += [("inference s/sample", f"{r['inference_time']:.4e}"),
             ("classical solver s/sample", f"{r['classical_time']:.4e}"),
             ("peak RSS per rank (MiB)", ", ".join(f"{m:.0f}" for m in r["peak_rss_mb"]))]
    width = max(len(k) for k, _ in rows)
    print(f"evaluation of {r['kind']} ({r['ranks']} rank(s), {r['dofs']} dofs, step {r['step']}), "
          f"{r['split']} split:")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


if __name__ == "__main__":
    sys.exit(main())
