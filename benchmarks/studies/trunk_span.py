"""Can the DeepONet's trunk represent a problem's solutions? Every basis field of a DeepONet is
a combination of its trunk fields, so the constrained output can be no closer to a solution
than the solution's projection on their span. This fits the trunk alone to span the training
solutions of a fem_moe dataset (Adam on the mean squared relative projection error of the
training solutions, less the lifting) and reports the test solutions' projection error, per
field component: the backbone's share of a model's error, without training a model.

    python benchmarks/studies/trunk_span.py demos/results/flow_past_obstacle/data.h5 \\
        --variants 0 32 [--scale 3] [--width 64] [--depth 3] [--steps 2000]

``--variants``: numbers of random Fourier features (model.fourier_features; 0: the plain trunk).
One rank. Prints a table; writes ``benchmarks/studies/results/trunk_span_<pde>.json``.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py
from common import benchmark_parser, parse_arguments  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def residue(F, Y):
    """Y - P Y for Y [samples, n], P the orthogonal projection on the rows of F [m, n] (a tiny
    ridge keeps the Gram matrix invertible)."""
    import torch
    G = F @ F.T
    G = G + 1e-10 * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype)
    return Y - torch.linalg.solve(G, F @ Y.T).T @ F


def projection_error(F, Y):
    """Per row of Y: |Y - P Y| / |Y|."""
    return residue(F, Y).norm(dim=1) / Y.norm(dim=1)


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("data", help="a fem_moe dataset (data.h5 of a demo's output directory)")
    parser.add_argument("--variants", type=int, nargs="+", default=[0, 32])
    parser.add_argument("--scale", type=float, default=3.0, help="model.fourier_scale")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=24)
    parser.add_argument("--n-test", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parse_arguments(parser)
    import numpy as np
    import torch
    from mpi4py import MPI
    from fem_moe.data import describe
    from fem_moe.train import Trainer
    from common import print_table, write_json
    if MPI.COMM_WORLD.size != 1:
        sys.exit("trunk_span.py runs on one rank")
    info = describe(args.data)
    if info is None:
        sys.exit(f"{args.data}: not a fem_moe dataset")
    rows = []
    for m in args.variants:
        config = {"pde": {"name": info["name"], "options": info["options"]},
                  "data": {"path": os.path.abspath(args.data), "n_train": args.n_train, "n_val": 0,
                           "n_test": args.n_test, "seed": info["seed"]},
                  "model": {"kind": "soft", "width": args.width, "depth": args.depth,
                            "latent": args.latent, "fourier_features": m,
                            "fourier_scale": args.scale},
                  "train": {"out": os.path.join("/tmp", "trunk_span"), "progress": False,
                            "resume": False, "batch_size": 1}}
        trainer = Trainer(config)       # the demos' trunk, scaled to the mesh, seeded as they are
        net, model = trainer.model.backbone, trainer.model
        lift = 0 if trainer._lift is None else trainer._lift
        solutions = trainer._tensors["targets"] - lift
        train, test = solutions[trainer.splits["train"]], solutions[trainer.splits["test"]]
        components = (np.zeros(train.shape[1], dtype=int) if model._components is None
                      else model._components.numpy())
        optimiser = torch.optim.Adam(net.trunk.parameters(), lr=2e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.steps)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            F = net.trunk_fields(model._points, model._components).T
            loss = projection_error(F, train).pow(2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        with torch.no_grad():
            F = net.trunk_fields(model._points, model._components).T
            row = {"fourier_features": m, "scale": args.scale, "width": args.width,
                   "depth": args.depth, "steps": args.steps, "seconds": time.perf_counter() - t0,
                   "train": float(projection_error(F, train).mean()),
                   "test": float(projection_error(F, test).mean())}
            left = residue(F, test)
            for c in np.unique(components):
                # The whole field's projection, measured on one component's dofs.
                where = torch.as_tensor(components == c)
                part = left[:, where].norm(dim=1) / test[:, where].norm(dim=1)
                row[f"test_component_{c}"] = float(part.mean())
        rows.append(row)
    columns = [("fourier_features", "Fourier features", "{}"),
               ("train", "train proj. err.", "{:.3e}"),
               ("test", "test proj. err.", "{:.3e}")] + [
        (k, k.replace("test_component_", "test, component "), "{:.3e}") for k in rows[0]
                                                         if k.startswith("test_component_")] + [
        ("seconds", "s", "{:.0f}")]
    print_table(rows, columns, f"{info['name']}: the trunk's span fitted to the training solutions "
                f"({args.width} x {args.depth}, latent {args.latent}, scale {args.scale}, "
                f"{args.steps} steps)")
    write_json(args.out or os.path.join(HERE, "results", f"trunk_span_{info['name']}.json"),
               "trunk_span", rows)


if __name__ == "__main__":
    main()
