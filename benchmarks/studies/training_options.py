"""What the training options do to accuracy: warm starts, the training tolerance, fresh inputs.

    python benchmarks/studies/training_options.py [--kinds pihc moe] [--steps 300] [--seeds 0 1 2]
        [--variants cold warm cold_rtol1e-8 warm_rtol1e-8 fresh]
        [--out benchmarks/studies/results/training_options.json]

Diffusion-sorption as the demo sets it up (32 x 16 space-time cells, 32 training inputs, 16 test
inputs, DeepONet, N = 16, K = 4, physics loss, batch 4, lr 2e-3, cosine schedule); each variant
is trained for ``--steps`` steps per seed and evaluated on the test split against the classical
solutions (relative L2, mean over the test inputs). Variants:

* ``cold``: every solve from w = 0 at the options' tolerance (``model.warm_start = false``);
* ``warm``: warm starts (the trainer's default);
* ``cold_rtol1e-8``: cold starts and ``model.training_rtol = 1e-8``;
* ``warm_rtol1e-8``: both;
* ``fresh``: ``train.fresh_inputs``: a new batch of inputs every step (cold starts).

Rows (kind, variant, seed, rel_l2, residual, skipped steps, seconds) go to ``--out``; the table
shows the mean and spread over seeds.
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py
from common import benchmark_parser, parse_arguments  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("FIREDRAKE_DISABLE_OPTIONS_LEFT", "1")

VARIANTS = {
    "cold": ({"warm_start": False}, {}),
    "warm": ({"warm_start": True}, {}),
    "cold_rtol1e-8": ({"warm_start": False, "training_rtol": 1e-8}, {}),
    "warm_rtol1e-8": ({"warm_start": True, "training_rtol": 1e-8}, {}),
    "fresh": ({"warm_start": False}, {"fresh_inputs": True}),
}


def main():
    parser = benchmark_parser(__doc__, out="training_options.json",
                              results=os.path.join(HERE, "results"))
    parser.add_argument("--kinds", nargs="+", default=["pihc", "moe"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parse_arguments(parser)
    import numpy as np
    from mpi4py import MPI
    from fem_moe import study
    from fem_moe.train import Trainer
    from common import merged_rows, print_table, write_json

    comm = MPI.COMM_WORLD
    work = comm.bcast(tempfile.mkdtemp(prefix="fem_moe_options_") if comm.rank == 0 else None)
    base = {"pde": {"name": "diffusion_sorption", "options": {"nx": 32, "nt": 16, "t_end": 500.0}},
            "data": {"path": os.path.join(work, "ds.h5"), "n_train": 32, "n_val": 4, "n_test": 16,
                     "seed": 0},
            "model": {"n_basis": 16, "n_experts": 4, "width": 64, "depth": 3, "latent": 64},
            "train": {"loss": "physics", "steps": args.steps, "batch_size": 4, "lr": 2e-3,
                      "val_every": args.steps, "checkpoint_every": args.steps, "progress": False,
                      "resume": False}}
    study.ensure_dataset(base, comm, progress=False)
    rows = []
    for kind in args.kinds:
        for variant in args.variants:
            model, train = VARIANTS[variant]
            for seed in args.seeds:
                cfg = json.loads(json.dumps(base))
                cfg["model"].update(kind=kind, **model)
                cfg["train"].update(seed=seed, out=os.path.join(work, f"{kind}_{variant}_{seed}"),
                                    **train)
                t0 = time.perf_counter()
                trainer = Trainer(cfg, comm)
                trainer.fit()
                ev = trainer.evaluate("test", write=False)
                rows.append({"kind": kind, "variant": variant, "seed": seed, "rel_l2": ev["rel_l2"],
                             "residual": ev["residual"], "failed": ev["failed"],
                             "skipped": sum(bool(h.get("skipped")) for h in trainer.history),
                             "seconds": time.perf_counter() - t0})
                if comm.rank == 0:
                    print(f"{kind} {variant} seed {seed}: rel. L2 {ev['rel_l2']:.4f}, "
                          f"{rows[-1]['skipped']} steps skipped, {rows[-1]['seconds']:.0f} s",
                          flush=True)
    if comm.rank == 0:
        # Rows of earlier runs in --out stay, unless this run measured the same kind, variant
        # and seed.
        rows = merged_rows(args.out, rows, lambda r: (r["kind"], r["variant"], r["seed"]))
        table = []
        for kind in dict.fromkeys(r["kind"] for r in rows):
            for variant in dict.fromkeys(r["variant"] for r in rows if r["kind"] == kind):
                errs = [r["rel_l2"] for r in rows if r["kind"] == kind and r["variant"] == variant]
                table.append({"kind": kind, "variant": variant, "mean": float(np.mean(errs)),
                              "min": float(np.min(errs)), "max": float(np.max(errs))})
        print_table(table, [("kind", "kind", "{}"), ("variant", "variant", "{}"),
                            ("mean", "rel. L2 mean", "{:.4f}"), ("min", "min", "{:.4f}"),
                            ("max", "max", "{:.4f}")])
        write_json(args.out, "training_options", rows, steps=args.steps, ranks=comm.size)


if __name__ == "__main__":
    main()
