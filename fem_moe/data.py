"""Datasets on disk: inputs, classical solutions and their mesh in one Firedrake CheckpointFile.

A dataset file holds the mesh (so it loads on any number of ranks: Firedrake redistributes it),
for every sample i the data Functions ``input<j>_<i>`` and the classical solution
``target_<i>``, and under ``fem_moe/`` the parameter vectors
(``params`` [n, n_params]), the classical solve's time and Newton iterations per sample, and
the PDE's name and options (JSON) so that a file is checked against the config that reads it.
"""
import json
import os
import time

import numpy as np
import firedrake as fd
from mpi4py import MPI

from .config import as_config
from .errors import InputError, raise_on_all_ranks
from .pdes import config_section, get as get_pde, reference
from .problem import owned_values

__all__ = ["generate", "ensure_dataset", "Dataset", "describe", "is_current"]

MESH_NAME = "fem_moe_mesh"
FORMAT = 2      # 1: fields saved with idx (one name per field); 2: one name per sample


def generate(pde, path, n, seed=0, comm=MPI.COMM_WORLD, progress=True):
    """Draw ``n`` inputs of ``pde`` (numpy seed ``seed``), solve each with the classical solver
    and write the dataset to ``path`` (atomically: a temporary file, renamed when complete).
    Collective over ``comm``. Returns the path."""
    from tqdm import tqdm
    params = pde.sample(np.random.default_rng(seed), n)
    mesh = pde.mesh(comm)
    mesh.name = MESH_NAME
    problem = pde.problem(mesh)
    times, iterations = np.zeros(n), np.zeros(n, dtype=np.int64)
    tmp = f"{path}.tmp{os.getpid() if comm.rank == 0 else ''}"
    tmp = comm.bcast(tmp, root=0)
    if comm.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    comm.barrier()
    with fd.CheckpointFile(tmp, "w", comm=comm) as f:
        f.save_mesh(mesh)
        for i in tqdm(range(n), desc=f"generate {pde.name}",
                      disable=not progress or comm.rank != 0):
            data = pde.data(problem, params[i])
            u, times[i], iterations[i] = pde.classical_solve(problem, data)
            # One name per sample rather than save_function's idx: with idx, Firedrake kept only
            # the last sample of a mixed (velocity-pressure) Function (measured, 2026.10.0).
            for j, m in enumerate(data):
                m.rename(f"input{j}_{i}")
                f.save_function(m)
            u.rename(f"target_{i}")
            f.save_function(u)
        times = np.max(comm.allgather(times), axis=0)   # the slowest rank sets the time
        h5 = f.h5pyfile
        group = h5.require_group("fem_moe")
        # Dataset creation is collective in parallel HDF5; every rank writes the same values.
        for key, value in (("params", params), ("solve_time", times),
                           ("newton_iterations", iterations)):
            ds = group.create_dataset(key, shape=value.shape, dtype=value.dtype)
            if comm.rank == 0:
                ds[...] = value
            del ds
        del group, h5       # HDF5 will not close the file while h5py objects are open in it
        f.set_attr("fem_moe", "pde", json.dumps(config_section(pde)))
        f.set_attr("fem_moe", "n_samples", n)
        f.set_attr("fem_moe", "seed", seed)
        f.set_attr("fem_moe", "format", FORMAT)
        f.set_attr("fem_moe", "created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    if comm.rank == 0:
        os.replace(tmp, path)
    comm.barrier()
    return path


class Dataset:
    """A dataset file, loaded on ``comm`` (any number of ranks).

    Attributes: ``pde`` (the PDE the file was made with), ``mesh``, ``problem`` (built on the
    loaded mesh, ``problem_kwargs`` passed on), ``params`` [n, n_params], ``inputs`` [n,
    n_inputs] (what the backbone sees), ``data`` [n, n_data_dofs] and ``targets`` [n, n_dofs]
    (this rank's owned dofs, numpy float64), ``lifting`` [n, n_dofs] or None (added to the
    constrained unknown to give the physical field), ``solve_time`` [n] (classical solve,
    seconds, max over the ranks that made the file). Collective.

    ``expect``: a (name, options) pair; if given, a file made for another PDE or other options
    raises InputError on every rank. ``pde``: the PDE instance to use (a PDE of your own made in
    your script) instead of one made from the file's name and options, which must be its own.
    """

    def __init__(self, path, comm=MPI.COMM_WORLD, expect=None, problem_kwargs=None, pde=None):
        err = None
        if not os.path.isfile(path):
            err = f"dataset {path!r} not found (make it with `python -m fem_moe generate CONFIG`)"
        raise_on_all_ranks(comm, err)
        self.path = path
        # Checked with h5py on one rank first: PETSc's HDF5 viewer on a file that is not one
        # fails later, inside garbage collection.
        meta = comm.bcast(describe(path) if comm.rank == 0 else None, root=0)
        raise_on_all_ranks(comm, None if meta else
                           f"{path!r} is not a fem_moe dataset (cannot read it as HDF5 with a "
                           "fem_moe/pde attribute)")
        if pde is not None:
            expect = (reference(pde), pde.opts)
        with fd.CheckpointFile(path, "r", comm=comm) as f:
            try:
                if expect is not None:
                    name, options = expect
                    want = get_pde(name, **options).opts if pde is None else pde.opts
                    if meta["name"] != name or _pde_options(meta) != want:
                        err = (f"dataset {path!r} was made for {meta['name']} {meta['options']}, "
                               f"but the config asks for {name} {want}: regenerate it")
                self.pde = pde if pde is not None else get_pde(meta["name"], **meta["options"])
            except InputError as e:
                err = e
            raise_on_all_ranks(comm, err)
            self.mesh = f.load_mesh(MESH_NAME)
            self.problem = self.pde.problem(self.mesh, **(problem_kwargs or {}))
            n = meta["n_samples"]
            self.params = f.h5pyfile["fem_moe/params"][...]
            self.solve_time = f.h5pyfile["fem_moe/solve_time"][...]
            n_inputs = len(self.problem.data_spaces)
            data, targets, lifts = [], [], []
            for i in range(n):
                if meta["format"] >= 2:
                    fields = [f.load_function(self.mesh, f"input{j}_{i}") for j in range(n_inputs)]
                    target = f.load_function(self.mesh, f"target_{i}")
                else:
                    fields = [f.load_function(self.mesh, f"input{j}", idx=i)
                              for j in range(n_inputs)]
                    target = f.load_function(self.mesh, "target", idx=i)
                if target.function_space().ufl_element() != self.problem.V.ufl_element():
                    err = (f"{path!r}: the stored solution is in "
                           f"{target.function_space().ufl_element()} but the problem's space is "
                           f"{self.problem.V.ufl_element()}")
                raise_on_all_ranks(comm, err)
                row, lift = sample_arrays(self.pde, self.problem, fields)
                data.append(row)
                targets.append(owned_values(target))
                if lift is not None:
                    lifts.append(lift)
        self.data, self.targets = np.array(data), np.array(targets)
        self.lifting = np.array(lifts) if lifts else None
        self.inputs = self.pde.inputs(self.params)

    def __len__(self):
        return len(self.params)


def sample_arrays(pde, problem, fields):
    """One sample's problem data as the layers take it (the data spaces' owned dofs,
    concatenated) and its lifting (owned dofs, or None), from its data fields."""
    row = np.concatenate([owned_values(m) for m in fields]) if fields else np.zeros(0)
    return row, pde.lifting(problem, fields)


def describe(path):
    """What a dataset file holds, read without Firedrake (one process): {"name", "options",
    "n_samples", "seed"}, or None if it is not a readable fem_moe dataset."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            attrs = f["fem_moe"].attrs
            meta = json.loads(attrs["pde"])
            return {"name": meta["name"], "options": meta["options"],
                    "n_samples": int(attrs["n_samples"]), "seed": int(attrs["seed"]),
                    "format": int(attrs.get("format", 1))}
    except (OSError, KeyError, ValueError):
        return None


def _pde_options(meta):
    """A dataset's PDE options as the PDE resolves them: an option the file lacks (written
    before the option existed) counts as its default, the behaviour of the version that wrote
    it."""
    return get_pde(meta["name"], **meta["options"]).opts


def is_current(path, pde, n, seed, comm=MPI.COMM_WORLD):
    """Does ``path`` hold the dataset ``generate(pde, path, n, seed)`` would make, in the
    current format? Collective (rank 0 reads the file)."""
    have = comm.bcast(describe(path) if comm.rank == 0 and os.path.isfile(path) else None, root=0)
    if have is None or have["name"] != reference(pde):
        return False
    return {**have, "options": _pde_options(have)} == {
        "name": reference(pde), "options": pde.opts, "n_samples": n, "seed": seed,
        "format": FORMAT}


def ensure_dataset(config, comm=MPI.COMM_WORLD, progress=True, force=False, pde=None):
    """Make ``config``'s dataset (its ``pde`` and ``data`` sections, or the PDE instance ``pde``)
    with the classical solver, unless an identical one (same PDE, options, sample count, seed and
    format) is already there and not ``force``. Returns (pde, number of samples, whether it was
    made). Collective."""
    config = as_config(config)
    if pde is None:
        pde = get_pde(config["pde"]["name"], **config["pde"]["options"])
    d = config["data"]
    n = d["n_train"] + d["n_val"] + d["n_test"]
    if is_current(d["path"], pde, n, d["seed"], comm) and not force:
        return pde, n, False
    generate(pde, d["path"], n, seed=d["seed"], comm=comm, progress=progress)
    return pde, n, True
