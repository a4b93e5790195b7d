"""Warm starts: each sample's reduced solve starts from that sample's last solution.

Training revisits the samples of a fixed dataset every epoch while the basis changes by one
optimiser step at a time. What is stored per sample is its last solution *field* (owned dofs;
per expert for a mixture), and a revisit starts from that field's best fit by the current
basis (:func:`fem_moe.expert.fit_coefficients`): the coefficients themselves belong to the
basis they were solved in, and after the 8 optimiser steps between two visits of a sample
(diffusion-sorption, 32 inputs, batch 4) they started further from the solution than w = 0 --
every one was refused -- where the fitted field starts 2-3 orders of magnitude closer in |G|.
A warm-started solve then stops where a cold solve would (its tolerance measured from |G| at
w = 0, :func:`fem_moe.expert.tolerance`), not a full relative tolerance below its own start.
A sample is recognised by its problem data (the data spaces' dofs, hashed): the same data is
the same physical problem, whatever the backbone's inputs. Samples of problems without data
spaces are known by their basis alone, which changes every step: they get no warm starts.
The solvers drop a start that is worse than the cold one (a stale start in a worse basin of a
nonlinear PDE), and one that diverges is repeated from w = 0 before anything is raised.
Measured (README, ``benchmarks/training_step.py``): at diffusion-sorption's paper size,
Galerkin, 3.8 -> 3.1 reduced iterations per PI-HC solve and 3.7 -> 2.3 per coupled solve. A
stored field costs its sample's dofs of memory (0.4 MB per sample at 1e5 dofs per rank).
"""
import hashlib
from collections import OrderedDict

import numpy as np

from .errors import SolverDivergedError

__all__ = ["WarmStarts"]


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
