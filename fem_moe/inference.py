"""A trained model applied to new inputs: what a surrogate is for.

``model = fem_moe.load(run)`` rebuilds the model a run trained from its checkpoint (its config is
inside) on the PDE's mesh; ``model.predict(params)`` gives the physical fields for new parameter
vectors as Firedrake Functions. Collective over ``comm``, on any number of ranks (another than
the run's too): every rank passes the same parameter vectors and receives its part of each field.

The model is rebuilt without its warm starts, so that an output is a function of its input alone
(the trainer's warm starts only change where each solve begins; every solve ends at the same
tolerance).
"""
import os
import time

import numpy as np
import torch
from mpi4py import MPI

from . import checkpoint
from .collective import InputError, raise_on_all_ranks
from .data import sample_arrays
from .diagnostics import WarningSummary
from .errors import RankDeficientBasisWarning
from .pdes import config_section, get as get_pde
from .train import CHECKPOINT, build_backbone, solver_from_config

__all__ = ["load", "TrainedModel"]


def load(path, comm=MPI.COMM_WORLD, pde=None, mesh=None, device=None):
    """The model trained in ``path`` (a run's directory, ``train.out``, or its checkpoint file),
    ready for :meth:`TrainedModel.predict`. ``pde``: the PDE instance to use (needed for a PDE of
    your own defined in a script, which cannot be imported by name; by default it is made from
    the checkpoint's config); ``mesh``: the mesh to predict on (default the PDE's own,
    ``pde.mesh(comm)``); ``device``: the backbone's torch device (default CPU). Collective over
    ``comm``; every rank reads the file. Loading runs no code from the file
    (:mod:`fem_moe.checkpoint`)."""
    file = os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path
    err, state = None, None
    try:
        state = checkpoint.load(file, map_location="cpu")
        config = state["config"]
        if pde is None:
            pde = get_pde(config["pde"]["name"], **config["pde"]["options"])
        else:
            config_section(pde)     # InputError unless it is a PDE
    except (InputError, KeyError, TypeError) as e:
        err = e if isinstance(e, InputError) else InputError(f"{file} is not a fem_moe checkpoint "
                                                             f"(no {e})")
    raise_on_all_ranks(comm, err)
    return TrainedModel(state, pde, comm, mesh=mesh, device=device)


class TrainedModel:
    """A trained model, rebuilt from its checkpoint's ``state`` for ``pde`` (see :func:`load`).

    Attributes: ``config`` (the run's), ``pde``, ``problem`` (the PDE's constrained problem on
    the mesh predicted on), ``model`` (the :class:`fem_moe.model.NeuralSolver`, in eval mode),
    ``step`` (training steps its weights had), ``times`` (seconds per input of the last
    :meth:`predict`, the slowest rank's). Collective over ``comm``.
    """

    def __init__(self, state, pde, comm=MPI.COMM_WORLD, mesh=None, device=None):
        self.config, self.pde, self.comm = state["config"], pde, comm
        self.step = state.get("step", 0)
        model_config = self.config["model"]
        mesh = pde.mesh(comm) if mesh is None else mesh
        self.problem = pde.problem(mesh, solver_parameters=model_config["solver_parameters"])
        self.device = torch.device(device or "cpu")
        n_inputs = pde.inputs(np.zeros((1, pde.n_params))).shape[1]
        backbone = build_backbone(model_config, self.problem, pde, n_inputs, comm)
        cold = {} if model_config["kind"] == "soft" else {"warm_start": False}
        self.model = solver_from_config(self.config, self.problem, backbone, device=self.device,
                                        **cold)
        err = None
        try:
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as e:
            err = f"the checkpoint's weights do not fit the model its config describes: {e}"
        raise_on_all_ranks(comm, err)
        self.model.eval()
        self.dtype = getattr(torch, self.config["train"]["dtype"])
        self.times = []
        self._rank_deficiency = WarningSummary(RankDeficientBasisWarning)

    def _params(self, params):
        """``params`` as a float64 array [n, n_params], checked to be the same on every rank."""
        err = None
        params = np.atleast_2d(np.asarray(params, dtype=np.float64))
        if params.ndim != 2 or params.shape[1] != self.pde.n_params:
            err = (f"params of shape {params.shape}: expected [n, {self.pde.n_params}] (the "
                   f"parameter vectors of {self.pde.describe()})")
        elif not np.isfinite(params).all():
            err = "params hold non-finite values"
        raise_on_all_ranks(self.comm, err)
        first = self.comm.bcast(params, root=0)
        raise_on_all_ranks(self.comm, None if np.array_equal(first, params) else
                           "params differ from rank 0's: every rank must pass the same inputs")
        return params

    def arrays(self, params):
        """The physical fields for parameter vectors ``params`` [n, n_params] (the same on every
        rank) as a tensor [n, n_dofs] of this rank's owned dofs (float64), one batch."""
        params = self._params(params)
        rows, lifts = zip(*(sample_arrays(self.pde, self.problem, self.pde.data(self.problem, p))
                            for p in params))
        tensor = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=self.dtype,
                                        device=self.device)
        inputs, data = tensor(self.pde.inputs(params)), tensor(np.array(rows))
        self.comm.Barrier()
        t0 = time.perf_counter()
        with torch.no_grad(), self._rank_deficiency.gathering("predict", self.step,
                                                              range(len(params))):
            u = self.model(inputs, data).to(device="cpu", dtype=torch.float64)
        seconds = self.comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        self._rank_deficiency.issue(self.comm, f"{self!r}")
        self.times = [seconds / len(params)] * len(params)
        if lifts[0] is not None:
            u = u + torch.tensor(np.array(lifts))
        return u

    def predict(self, params, name="u"):
        """The physical fields for parameter vectors ``params`` [n, n_params] (the same on every
        rank): a list of n Firedrake Functions on the problem's space, batched in one forward."""
        return self.problem.function(self.arrays(params), name=name)

    def __repr__(self):
        return (f"TrainedModel({self.model.kind}, {self.pde.describe()}, step {self.step}, "
                f"{self.comm.size} rank(s))")
