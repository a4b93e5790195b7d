"""Warm starts: each sample's reduced solve starts from that sample's last solution.

Training revisits the samples of a fixed dataset every epoch while the basis changes by one
optimiser step at a time. What is stored per sample is its last solution *field* (owned dofs;
per expert for a mixture), and a revisit starts from that field's best fit by the current
basis (:func:`fem_moe.expert.fit_coefficients`): the coefficients themselves belong to the
basis they were solved in, and after the 8 optimiser steps between two visits of a sample
(diffusion-sorption, 32 inputs, batch 4) they started further from the solution than w = 0 --
every one was refused -- where the fitted field starts 2-3 orders of magnitude closer in ‖G‖.
A warm-started solve then stops where a cold solve would (its tolerance measured from ‖G‖ at
w = 0, :func:`fem_moe.expert.tolerance`), not a full relative tolerance below its own start.
A sample is recognised by its problem data (the data spaces' dofs, hashed): the same data is
the same physical problem, whatever the backbone's inputs. Samples of problems without data
spaces are known by their basis alone, which changes every step: they get no warm starts.
The solvers drop a start that is worse than the cold one (a stale start in a worse basin of a
nonlinear PDE), and one that diverges is repeated from w = 0 before anything is raised.
Measured (``benchmarks/training_step.py``): at diffusion-sorption's paper size,
Galerkin, 3.8 -> 3.1 reduced iterations per PI-HC solve and 3.7 -> 2.3 per coupled solve. A
stored field costs its sample's dofs of memory (0.4 MB per sample at 1e5 dofs per rank).
"""
import hashlib
from collections import OrderedDict

import numpy as np
from firedrake.petsc import PETSc
from mpi4py import MPI

from .errors import SolverDivergedError

__all__ = ["WarmStarts", "SampleJacobians", "JACOBIAN_MEMORY"]

#: Bytes per rank a layer's :class:`SampleJacobians` may hold by default (1 GiB: 230 samples of
#: diffusion-sorption at PDEBench's size on 2 ranks).
JACOBIAN_MEMORY = 2 ** 30


class WarmStarts:
    """The last solution (field) of each sample seen, least recently used first out.

    ``keys, hits = starts.lookup(data)`` (collective over ``comm``): per sample of ``data``
    [batch, n_data] (this rank's dofs), its key (a digest of every rank's dofs of the sample,
    the same on every rank) and whether an entry is stored for it. ``starts[key]`` is the
    stored entry, ``starts[key] = entry`` stores one (every rank stores its own part of the
    solution at the same time, so the ranks agree on what is stored). ``capacity`` 0: nothing
    is stored, no sample is looked up (as with ``enabled`` False).
    """

    def __init__(self, comm, enabled=True, capacity=65536):
        self.comm, self.capacity = comm, int(capacity) if enabled else 0
        self._entries = OrderedDict()
        self.hits = self.misses = 0

    def lookup(self, data):
        batch = data.shape[0]
        if not self.capacity:
            return [None] * batch, [False] * batch
        data = np.ascontiguousarray(data, dtype=np.float64)
        mine = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in data]
        everyone = self.comm.allgather(mine)
        keys = [hashlib.blake2b(b"".join(parts), digest_size=16).digest()
                for parts in zip(*everyone)]
        hits = [k in self._entries for k in keys]
        self.hits += sum(hits)
        self.misses += batch - sum(hits)
        return keys, hits

    def __getitem__(self, key):
        self._entries.move_to_end(key)
        return self._entries[key]

    def __setitem__(self, key, entry):
        if key is None or not self.capacity:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def state(self):
        """This rank's entries, least recently used first: [(key, entry)] (for a checkpoint)."""
        return list(self._entries.items())

    def load_state(self, items):
        self._entries = OrderedDict(items)

    def __len__(self):
        return len(self._entries)

    def clear(self):
        self._entries.clear()


def solve_from(solve, w0):
    """``solve(w0)`` from a stored start, or ``solve(None)`` (cold) without one. A warm-started
    solve that diverges is repeated cold: a poor start must not cost a sample that a cold start
    solves. Every rank takes the same branch (SolverDivergedError is raised on every rank).
    Returns what ``solve`` returns."""
    if w0 is None:
        return solve(None)
    try:
        return solve(w0)
    except SolverDivergedError:
        return solve(None)


class SampleJacobians:
    """What a sample's next Galerkin solve can take from its last visit instead of assembling
    it again: the sparse Jacobian at the sample's last solution (assembled by the last
    backward, at that solution) and the residual rows at the lifting (w = 0).

    Both depend on the sample's data and a field, not on the basis. The Jacobian becomes the
    revisit's first chord matrix (``chord_contraction``; :meth:`fem_moe.expert.Expert.solve`): the
    fitted warm start lies as near the last solution as to the new one, so the stored matrix
    contracts as a Jacobian assembled at the start would, and with exact gradients a training step
    then assembles one Jacobian per sample, in its backward, where it assembled two or three. The
    lifting's residual gives the cold ‖G‖ (the warm start's yardstick) as a product with the basis.
    Measured at diffusion-sorption's paper size: ``benchmarks/training_step.py``.

    Entries are per sample key (:class:`WarmStarts`'), each a dict per part (an expert id, or
    None for the global layer) of this rank's pieces. Least recently used first out, at most
    as many samples as ``memory`` bytes per rank hold (the Jacobians' values and column
    indices); that number is agreed over ``comm`` when the first Jacobians are kept (every rank
    keeps and drops the same samples, so every rank of a solve takes the same branch).
    ``memory`` 0: nothing is kept. Not checkpointed: after a restart each sample assembles
    once more. :meth:`keep_jacobians` is collective over ``comm`` (every rank, same key); the
    rest is local.
    """

    def __init__(self, comm, memory=JACOBIAN_MEMORY):
        if memory is None:
            memory = JACOBIAN_MEMORY
        self.comm, self.memory = comm, int(memory)
        self.capacity = None if self.memory > 0 else 0     # samples, once the first are kept
        self._entries = OrderedDict()

    def __len__(self):
        return len(self._entries)

    def jacobian(self, key, part=None):
        """The stored Jacobian (a PETSc Mat) of a sample's part, or None."""
        return self._entries.get(key, {}).get("jacobian", {}).get(part)

    def lifting_residual(self, key, part=None):
        """The stored residual rows at the lifting of a sample's part, or None."""
        return self._entries.get(key, {}).get("lifting", {}).get(part)

    def keep_lifting_residuals(self, key, residuals):
        """Keep {part: rows} (None values skipped) for the sample ``key``. Local."""
        if key is None or self.capacity == 0:
            return
        entry = self._entry(key)
        entry["lifting"].update({p: r for p, r in residuals.items() if r is not None})
        self._trim()

    def keep_jacobians(self, key, matrices):
        """Keep a copy of each {part: Mat} for the sample ``key`` (into the matrices kept for it
        before, whose sparsity is the same). Collective over ``comm``."""
        if key is None or self.capacity == 0:
            return
        if self.capacity is None:
            size = sum(_bytes(m) for m in matrices.values())
            self.capacity = max(1, self.memory // max(self.comm.allreduce(size, op=MPI.MAX), 1))
        kept = self._entry(key)["jacobian"]
        for part, mat in matrices.items():
            if part in kept:
                mat.copy(kept[part], structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN)
            else:
                kept[part] = mat.copy()
        self._trim()

    def clear(self):
        """Forget every entry (their matrices destroyed: collective over ``comm``)."""
        while self._entries:
            self._drop()

    def _entry(self, key):
        entry = self._entries.setdefault(key, {"jacobian": {}, "lifting": {}})
        self._entries.move_to_end(key)
        return entry

    def _trim(self):
        while self.capacity is not None and len(self._entries) > self.capacity:
            self._drop()

    def _drop(self):
        _, entry = self._entries.popitem(last=False)
        for mat in entry["jacobian"].values():
            mat.destroy()


def _bytes(mat):
    """Memory of a sparse matrix's values and column indices on this rank."""
    return int(mat.getInfo(PETSc.Mat.InfoType.LOCAL)["nz_allocated"]) * 12
