"""Where a physics-informed training step goes, per model kind, at a PDE's full size.

    mpiexec -n 2 python benchmarks/training_step.py [--pde diffusion_sorption]
        [--options nx=1024,nt=100] [--kinds soft pihc moe] [--experts 4] [--n-basis 16]
        [--batch 4] [--warmup 8] [--steps 4] [--n-train 32] [--no-warm-start]
        [--training-rtol 0] [--dtype float64] [--backbone deeponet] [--profile DIR] [--label NAME]
        [--out benchmarks/results/training_step.json]

One step = a batch of a fixed training set of inputs drawn from the PDE's input family (one
permutation per epoch, as the trainer; ``--n-train 0``: fresh inputs every step) -> the
backbone's basis at this rank's dofs (the trainer's, ``fem_moe.train.build_backbone``, with the
config's default sizes: a DeepONet, or ``--backbone fno``) -> the model's constraint -> the
physics loss (residual_loss, the global residual) -> backward ->
bridge.allreduce_gradients -> Adam. Each phase is timed on every rank after a barrier; the table
shows the slowest rank's time per phase (mean over the steps after one warm-up step).

Inside the phases, PETSc's own log events split the time further (summed over the measured
steps, slowest rank, per step): every Firedrake assembly kernel (``ParLoopExecute``), the
products of sparse matrices with the dense basis (``MatMatMult``), the reduced and coupled SNES
(``SNESSolve``), and fem_moe's events (``FemMoe*``: reduced solves, IFT backwards, coupling).

Rows are appended to ``--out`` under ``--label`` (a row with the same label, kind and size is
replaced), so that the configurations measured sit in one file.
"""
import cProfile
import json
import os

from common import benchmark_parser, parse_arguments

HERE = os.path.dirname(os.path.abspath(__file__))
# This script's flags are not PETSc's: no unused-options report at exit.
os.environ.setdefault("FIREDRAKE_DISABLE_OPTIONS_LEFT", "1")

EVENTS = ("ParLoopExecute", "MatMatMultNum", "MatMatMultSym", "KSPSolve", "KSPMatSolve",
          "SNESSolve",
          "FemMoeReducedSolve", "FemMoeReducedVJP",
          "FemMoeCoupledSolve", "FemMoeCoupledVJP")


def main():
    parser = benchmark_parser(__doc__, out="training_step.json")
    parser.add_argument("--pde", default="diffusion_sorption")
    parser.add_argument("--options", default=None,
                        help="the PDE's options, key=value,...; default nx=1024,nt=100 for "
                             "diffusion_sorption (the paper's size), the PDE's own otherwise")
    parser.add_argument("--kinds", nargs="+", default=["soft", "pihc", "moe"])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--n-basis", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="measured steps")
    parser.add_argument("--warmup", type=int, default=8,
                        help="steps before the measured ones (the first compiles kernels; one "
                             "epoch stores every sample's warm start)")
    parser.add_argument("--n-train", type=int, default=32,
                        help="the fixed training set's size (0: fresh inputs every step)")
    parser.add_argument("--no-warm-start", action="store_true")
    parser.add_argument("--training-rtol", type=float, default=0.0,
                        help="the constraint's training_rtol (0, the trainer's default: the "
                             "solver options' tolerance)")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                        help="the backbone's (solves are float64)")
    parser.add_argument("--norm", default=None,
                        help="the layers' least-squares norm (default: theirs)")
    parser.add_argument("--mode", default=None, choices=["lstsq", "galerkin"],
                        help="the layers' reduced problem (default: theirs)")
    parser.add_argument("--backbone", default="deeponet", choices=["deeponet", "fno"],
                        help="the trainer's backbone with the config's default sizes")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="cProfile the measured steps of each kind into DIR/<kind>.<rank>.prof")
    parser.add_argument("--label", default="default", help="the rows' name in --out")
    parser.add_argument("--backbone-ranks", type=int, nargs="+", default=None,
                        help="ranks holding the backbone (bridge.BackboneRanks; default every "
                             "rank): the backbone phase then includes the fields' transfers")
    args = parse_arguments(parser)
    import numpy as np
    import torch
    from firedrake.petsc import PETSc
    from mpi4py import MPI
    import fem_moe
    from fem_moe import bridge, pdes
    from fem_moe.data import sample_arrays
    from fem_moe.config import DEFAULTS
    from fem_moe.train import build_backbone
    from fem_moe.model import NeuralSolver
    from common import Timer, parse_options, print_table, write_json

    comm = MPI.COMM_WORLD
    PETSc.Log.begin()
    bridge.init_process_group(comm)
    if args.options is None:
        args.options = "nx=1024,nt=100" if args.pde == "diffusion_sorption" else ""
    pde = pdes.get(args.pde, **parse_options(args.options))
    problem = pde.problem(pde.mesh(comm))
    rng = np.random.default_rng(0)
    phases = ["backbone", "constraint forward", "loss forward", "backward", "bridge all-reduce",
              "optimiser"]
    dtype = getattr(torch, args.dtype)

    def draw(n):
        params = comm.bcast(pde.sample(rng, n))
        inputs = torch.tensor(np.asarray(pde.inputs(params)), dtype=torch.float64)
        # As the datasets hold it (a mixed or vector data field's owned dofs, flattened).
        data = torch.tensor(np.stack([sample_arrays(pde, problem, pde.data(problem, p))[0]
                                      for p in params]))
        return inputs.to(dtype), data

    if args.n_train:
        train_inputs, train_data = draw(args.n_train)
    rows = []
    for kind in args.kinds:
        torch.manual_seed(0)
        n_inputs = len(pde.inputs(pde.sample(rng, 1))[0])
        config = {**DEFAULTS["model"], "n_basis": args.n_basis, "backbone": args.backbone}
        backbone = build_backbone(config, problem, pde, n_inputs, comm).to(dtype)
        bridge.broadcast_parameters(backbone)
        options = {}
        if kind != "soft" and not args.no_warm_start:
            options["warm_start"] = True
        if kind != "soft" and args.training_rtol:
            options["training_rtol"] = args.training_rtol
        for name in ("norm", "mode"):
            if kind != "soft" and getattr(args, name):
                options[name] = getattr(args, name)
        served = bridge.BackboneRanks(comm, args.backbone_ranks) if args.backbone_ranks else None
        model = NeuralSolver(problem, backbone, kind=kind, n_basis=args.n_basis,
                             n_experts=args.experts if kind == "moe" else None,
                             backbone_ranks=served, **options)
        model.to(dtype=dtype)
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        times = {p: [] for p in phases}
        iterations, jacobians = [], []

        def timed(name, fn, *args, times=times):
            comm.Barrier()
            with Timer() as t:
                out = fn(*args)
            times[name].append(comm.allreduce(t.seconds, MPI.MAX))
            return out

        def event_seconds():
            out = {}
            for name in EVENTS:
                info = PETSc.Log.Event(name).getPerfInfo()
                out[name] = (comm.allreduce(info["time"], MPI.MAX), int(info["count"]))
            return out

        for step in range(args.warmup + args.steps):
            if step == args.warmup:     # the warm-up's measurements are dropped
                for seconds in times.values():
                    seconds.clear()
                iterations, jacobians = [], []
                start = event_seconds()
                if args.profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
            if args.n_train:     # the trainer's batches: a permutation of the set per epoch
                per_epoch = args.n_train // args.batch
                epoch, i = divmod(step, per_epoch)
                order = np.random.default_rng([0, epoch]).permutation(args.n_train)
                idx = order[i * args.batch:(i + 1) * args.batch]
                inputs, data = train_inputs[idx], train_data[idx]
            else:
                inputs, data = draw(args.batch)
            basis = timed("backbone", model.basis, inputs)
            data = data.to(basis.dtype)
            if kind == "soft":
                u = timed("constraint forward", torch.einsum, "bnp,n->bp", basis, model.weights)
            else:
                u = timed("constraint forward", model.constraint, basis, data)
                iterations += _per_solve(model.constraint)
                jacobians += _per_solve(model.constraint, "jacobians")
            loss = timed("loss forward", fem_moe.residual_loss, problem, u, data)
            optimiser.zero_grad()
            timed("backward", loss.backward)
            timed("bridge all-reduce", (served or bridge).allreduce_gradients, model)
            timed("optimiser", optimiser.step)
        end = event_seconds()
        if args.profile:
            profiler.disable()
            os.makedirs(args.profile, exist_ok=True)
            profiler.dump_stats(os.path.join(args.profile, f"{kind}.{comm.rank}.prof"))
        total = sum(np.mean(times[p]) for p in phases)
        row = {"label": args.label, "kind": kind, "backbone": args.backbone,
               "options": args.options,
               "ranks": comm.size,
               "dofs": problem.V.dim(),
               "backbone_ranks": args.backbone_ranks or "all",
               "experts": model.constraint.n_experts if kind == "moe"
               else (1 if kind == "pihc" else 0),
               "n_basis": args.n_basis, "batch": args.batch, "steps": args.steps,
               "warmup": args.warmup, "n_train": args.n_train, "dtype": args.dtype,
               "warm_start": bool(options.get("warm_start", False)),
               "training_rtol": options.get("training_rtol"),
               "norm": options.get("norm"), "mode": options.get("mode"),
               "step_seconds": float(total),
               "phases": {p: float(np.mean(times[p])) for p in phases},
               "events": {name: {"seconds_per_step": (end[name][0] - start[name][0]) / args.steps,
                                 "calls_per_step": (end[name][1] - start[name][1]) / args.steps}
                          for name in EVENTS if end[name][1] > start[name][1]},
               "iterations_mean": float(np.mean(iterations)) if iterations else None,
               # Sparse Jacobians a forward solve assembled, per sample (the backward: one more).
               "jacobians_mean": float(np.mean(jacobians)) if jacobians else None}
        rows.append(row)
        if comm.rank == 0:
            print(f"\n{args.label}: {kind}, {comm.size} ranks, {row['dofs']} dofs, "
                  f"N = {args.n_basis}, batch {args.batch}: {total:.3f} s per step"
                  + (f", {row['iterations_mean']:.1f} reduced iterations per solve"
                     if iterations else "")
                  + (f", {row['jacobians_mean']:.2f} Jacobians assembled per forward solve"
                     if jacobians else ""))
            table = [{"what": p, "s": row["phases"][p], "share": row["phases"][p] / total}
                     for p in phases]
            table += [{"what": f"  event {n}", "s": e["seconds_per_step"],
                       "share": e["seconds_per_step"] / total}
                      for n, e in row["events"].items()]
            print_table(table,
                        [("what", "phase", "{}"), ("s", "s per step (slowest rank)", "{:.4f}"),
                                ("share", "share", "{:.1%}")])
    if comm.rank == 0:
        old = []
        if os.path.exists(args.out):
            with open(args.out) as f:
                doc = json.load(f)
            key = lambda r: (r.get("label"), r.get("kind"), r.get("ranks"), r.get("dofs"),
                             r.get("dtype"), r.get("warm_start"), r.get("n_train"),
                             r.get("training_rtol"), r.get("norm"), r.get("mode"),
                             r.get("backbone", "deeponet"))
            new = {key(r) for r in rows}
            old = [r for r in doc.get("rows", []) if "label" in r and key(r) not in new]
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        write_json(args.out, "training_step", old + rows, pde=args.pde, options=args.options)


def _per_solve(constraint, key="iterations"):
    """``key`` (iterations, jacobians) per solve of the last forward: the coupled solve's per
    sample where there is one, else every reduced solve's (whatever the measured version of
    fem_moe keeps; none where it lacks the key)."""
    gather = getattr(constraint, "all_diagnostics", None)
    diags = gather() if gather is not None else getattr(constraint, "diagnostics", [])
    coupled = [s[key] for s in getattr(diags, "coupling", ()) if key in s]
    if coupled:
        return coupled
    found = []
    for d in diags:
        for s in (d.get("samples", [d]) if isinstance(d, dict) else [d]):
            if isinstance(s, dict) and key in s:
                found.append(s[key])
    return found


if __name__ == "__main__":
    main()
