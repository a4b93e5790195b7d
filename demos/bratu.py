# Your own PDE: the Bratu problem, trained and applied to new inputs
# ===================================================================
#
# fem_moe ships five PDEs, but a PDE of your own goes everywhere a shipped one does: the dataset
# generator, the trainer, the command line and inference from a trained model. This demo writes
# one that fem_moe does not ship -- the Bratu (solid-fuel ignition) problem with a random
# source::
#
#     -lap u = lam exp(u) + f   in the unit square,   u = 0 on its boundary,
#
#     f = theta_1 sin(pi x) sin(pi y) + theta_2 sin(2 pi x) sin(pi y),
#
# with the reaction strength lam ~ U(0.5, 2) and theta_1, theta_2 ~ U(-5, 5): three numbers per
# input, which the backbone sees. lam enters the problem as a constant data field, f as a P1
# one. Run it as::
#
#     python demos/bratu.py                     # generate, train, predict: about a minute
#     mpiexec -n 2 python demos/bratu.py        # the same on 2 ranks
#
# A PDE is a subclass of :class:`fem_moe.pdes.PDE` that says what its mesh, its constrained
# problem, its input distribution and its data fields are.
import argparse
import os

import numpy as np
import firedrake as fd

import fem_moe
from fem_moe import arguments
from fem_moe.pdes.base import PDE, sine_modes


class Bratu(PDE):
    """-lap u = lam exp(u) + f on the unit square (``n`` x ``n`` cells, P``degree``), u = 0 on
    the boundary; inputs (lam, theta_1, theta_2) ~ U(0.5, 2) x U(-5, 5)^2."""
    # Where Python finds this class, so that a dataset or checkpoint made while it runs as a
    # script (module ``__main__``) names it in a form that finds it again.
    name = "bratu:Bratu"
    options = dict(n=8, degree=1)
    n_params = 3

    def mesh(self, comm):
        return fd.UnitSquareMesh(self.opts["n"], self.opts["n"], comm=comm)

    def problem(self, mesh, **kwargs):
        V = fd.FunctionSpace(mesh, "CG", self.opts["degree"])
        R = fd.FunctionSpace(mesh, "DG", 0)

        # ``m`` holds the data Functions, in the order of ``data_spaces``.
        def residual(u, v, m):
            lam, f = m
            return (fd.inner(fd.grad(u), fd.grad(v)) - (lam * fd.exp(u) + f) * v) * fd.dx

        return fem_moe.ConstrainedProblem(V, residual, bcs=fd.DirichletBC(V, 0, "on_boundary"),
                                          data_spaces=(R, V), **kwargs)

    def sample(self, rng, n):
        return np.column_stack([rng.uniform(0.5, 2.0, n), rng.uniform(-5, 5, (n, 2))])

    def inputs(self, params):
        # What the backbone sees: each parameter scaled to [-1, 1].
        params = np.asarray(params, dtype=np.float64)
        return np.column_stack([(params[:, 0] - 1.25) / 0.75, params[:, 1:] / 5])

    def data(self, problem, params):
        R, V = problem.data_spaces
        lam = fd.Function(R, name="lam").assign(float(params[0]))
        f = self.mode_sum(V, params[1:], "sines", lambda W: sine_modes(W, [(1, 1), (2, 1)]),
                          name="f")
        return lam, f


# Training
# --------
# The config names the PDE by where Python finds it, ``"module:ClassName"``: with this file on
# the path, ``name = "bratu:Bratu"`` in a TOML file makes ``python -m fem_moe generate|train|
# evaluate|predict`` use it. From Python, the trainer also takes the instance itself.
def config(out, steps, n=8, samples=(16, 4, 4)):
    return {"pde": {"name": "bratu:Bratu", "options": {"n": n}},
            "data": {"path": os.path.join(out, "data.h5"), "n_train": samples[0],
                     "n_val": samples[1], "n_test": samples[2]},
            "model": {"kind": "moe", "n_basis": 8, "n_experts": 2, "mode": "galerkin",
                      "width": 32, "depth": 2, "latent": 16},
            "train": {"steps": steps, "batch_size": min(4, samples[0]), "lr": 3e-3,
                      "val_every": min(20, steps),
                      "checkpoint_every": min(20, steps), "out": os.path.join(out, "run"),
                      "progress": False}}


def main():
    parser = argparse.ArgumentParser(description="your own PDE (Bratu) end to end")
    parser.add_argument("--out", default="results/bratu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (the test suite's)")
    args = arguments.parse(parser)
    from mpi4py import MPI
    from fem_moe.data import ensure_dataset
    from fem_moe.train import Trainer

    comm = MPI.COMM_WORLD
    n, samples, steps = (4, (4, 1, 1), 2) if args.tiny else (8, (16, 4, 4), args.steps)
    pde = Bratu(n=n)
    cfg = config(os.path.abspath(args.out), steps, n, samples)
    ensure_dataset(cfg, comm, progress=False, pde=pde)
    trainer = Trainer(cfg, comm, pde=pde)
    trainer.fit()
    result = trainer.evaluate()

    # Inference
    # ---------
    # ``fem_moe.load`` rebuilds the trained model from its checkpoint; ``predict`` takes new
    # parameter vectors and gives Firedrake Functions, here compared with Firedrake's own
    # Newton solve of the same input.
    model = fem_moe.load(cfg["train"]["out"], comm, pde=pde)
    new = np.array([[1.5, 2.0, -3.0]])
    (u,) = model.predict(new)
    exact, seconds, _ = pde.classical_solve(model.problem, pde.data(model.problem, new[0]))
    error = fd.errornorm(exact, u) / fd.norm(exact)
    if comm.rank == 0:
        print(f"test split: relative L2 {result['rel_l2']:.3e} (mean over "
              f"{result['samples']} samples)")
        print(f"new input {new[0].tolist()}: relative L2 {error:.3e}; "
              f"{model.times[0]:.3f} s against the classical solver's {seconds:.3f} s")


if __name__ == "__main__":
    main()
