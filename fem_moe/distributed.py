"""K subdomains of a distributed mesh, built from each rank's own cells and its neighbours'.

:class:`fem_moe.partition.Partition` gathers the whole mesh on every rank to number it
canonically (the same subdomains on any number of ranks); :class:`DistributedPartition` never
does. Setup memory and time per rank are O(owned cells + halo):

- cells are numbered by Firedrake's DG0 layout (each rank numbers its owned cells after the
  ranks before it) and dofs by the layout of the mixture's tensors (each rank's owned dofs after
  the ranks before it); halo copies learn their numbers from their owners over the function
  space's halo star forest (Firedrake's own halo exchange);
- the dual graph is distributed: each rank holds the rows of its owned cells, with neighbours
  across an interior facet, owned or in the halo (so the mesh needs an overlap of at least one
  facet, Firedrake's default); PETSc's parallel partitioner (PTScotch, or ParMETIS by
  ``-fem_moe_partition_mat_partitioning_type parmetis``) cuts it into K parts on the mesh
  communicator. "strips" (K slabs of equal cell counts across the first coordinate) finds its
  K - 1 cuts by bisection over per-rank counts; "random" deals cells out by a hash of their
  number;
- each expert lives on the rank holding most of its cells, as long as that keeps the ranks'
  cell loads within 10 % of even (else on the least loaded rank);
- a dof belongs to the lowest-numbered expert among the cells containing it, as in the
  canonical partition: each rank takes the minimum over its owned cells, and the dof's owner
  reduces the ranks' minima over the halo star forest and sends the result back;
- every owned cell is sent to the rank of each expert owning one of its dofs (one all-to-all),
  with its vertices' coordinates and the markers of the cell and of its boundary facets; an
  expert's submesh is made from what it received alone. The spaces' dof numbers travel with
  the cells the same way, per space.

What depends on the number of ranks: the subdomains (PTScotch cuts a graph distributed
differently) and so the mixture's output, which, for a given partition, does not otherwise
depend on where experts live. What does not: the meaning of every output (each dof's value from
its owner expert, every residual row equal to the global residual's).
"""
import numpy as np
import scipy.sparse
import firedrake as fd
from firedrake.petsc import PETSc
from mpi4py import MPI

from .errors import InputError
from .partition import (CoordinateKeys, graph_partition, marked_points,
                        mesh_periods, _find, _node_keys, _void)
from .problem import subspaces

__all__ = ["DistributedPartition", "DistributedLayout"]


def _halo_sf(V):
    """The star forest of V's nodes (roots: owned nodes; leaves: halo copies), or None on one
    rank."""
    halo = V.dof_dset.halo
    return halo.sf if (halo is not None and V.comm.size > 1) else None


def _to_halo(V, values):
    """Copy the owners' entries of ``values`` [V's nodes with halo] into the halo, in place."""
    sf = _halo_sf(V)
    if sf is not None:
        sf.bcastBegin(MPI.INT64_T, values, values, MPI.REPLACE)
        sf.bcastEnd(MPI.INT64_T, values, values, MPI.REPLACE)
    return values


def _combine_at_nodes(V, cell_nodes, cell_values, op, start):
    """For each node of V (with halo): ``op`` (MPI.MIN or MPI.MAX) over the owned cells of every
    rank that contain it of ``cell_values`` [owned cells]; ``start`` is op's identity. Each rank
    combines its own cells, the owners combine the ranks' results over the halo star forest,
    and send them back."""
    values = np.full(V.node_set.total_size, start, dtype=np.int64)
    ufunc = np.minimum if op is MPI.MIN else np.maximum
    ufunc.at(values, cell_nodes.ravel(), np.repeat(cell_values, cell_nodes.shape[1]))
    sf = _halo_sf(V)
    if sf is not None:
        sf.reduceBegin(MPI.INT64_T, values, values, op)
        sf.reduceEnd(MPI.INT64_T, values, values, op)
    return _to_halo(V, values)


def _scramble(ids):
    """A fixed pseudo-random permutation of int64 ids (splitmix64's finaliser)."""
    z = np.asarray(ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class DistributedPartition(CoordinateKeys):
    """K subdomains of ``mesh`` built without gathering it (see the module's docstring), with
    the interface of :class:`fem_moe.partition.Partition` that the mixture uses: ``n_experts``,
    ``expert_rank`` [K], ``my_experts``; after :meth:`assign`, ``dof_expert``, ``interface``,
    ``expert_cells`` and :meth:`expert_submesh`; :meth:`layout`, :meth:`expert_indicator`.
    ``cell_expert`` [owned cells]: each of this rank's cells' expert. Collective over
    ``mesh.comm``."""

    def __init__(self, mesh, n_experts, partitioner_type=None):
        comm = self._begin(mesh, n_experts, partitioner_type)
        self.n_cells = n = mesh.cell_set.size
        X = mesh.coordinates.dat.data_ro_with_halos
        # [n, nv, gdim]
        self.cell_coords = X[mesh.coordinates.cell_node_map().values_with_halo[:n]]
        points = self.cell_coords.reshape(-1, self.gdim)
        lo, hi = np.full(self.gdim, np.inf), np.full(self.gdim, -np.inf)
        if len(points):
            lo, hi = points.min(axis=0), points.max(axis=0)
        self.lower, upper = np.empty(self.gdim), np.empty(self.gdim)
        comm.Allreduce(np.ascontiguousarray(lo), self.lower, op=MPI.MIN)
        comm.Allreduce(np.ascontiguousarray(hi), upper, op=MPI.MAX)
        self.extent = float((upper - self.lower).max())
        self.periods = mesh_periods(mesh)
        # Cells are numbered as DG0's owned nodes are: rank by rank.
        V0 = self._V0 = fd.FunctionSpace(mesh, "DG", 0)
        n0 = V0.node_set.size
        offset = comm.exscan(n0) or 0
        numbers = np.full(V0.node_set.total_size, -1, dtype=np.int64)
        numbers[:n0] = offset + np.arange(n0)
        _to_halo(V0, numbers)
        self._cell_node = V0.cell_node_map().values_with_halo[:, 0]    # local cell -> DG0 node
        self.cell_number = numbers[self._cell_node]                    # owned and halo cells
        self.n_global_cells = comm.allreduce(n0)
        if self.n_global_cells < self.n_experts:
            raise InputError(f"{self.n_experts} experts for a mesh of {self.n_global_cells} cells")
        self.cell_expert = self._partition(partitioner_type, numbers)
        counts = np.bincount(self.cell_expert, minlength=self.n_experts)
        per_rank = np.array(comm.allgather(counts))                    # [ranks, K]
        sizes = per_rank.sum(axis=0)
        if (sizes == 0).any():
            empty = np.flatnonzero(sizes == 0).tolist()
            raise InputError(f"the partitioner left experts {empty} empty")
        self._place(per_rank)

    # ------------------------------------------------------------------ the K parts
    def _partition(self, partitioner_type, numbers):
        K, n = self.n_experts, self.n_cells
        if K == 1:
            return np.zeros(n, dtype=np.int64)
        if partitioner_type == "random":
            return (_scramble(self.cell_number[:n]) % np.uint64(K)).astype(np.int64)
        if partitioner_type == "strips":
            return self._strips(self.wrap(self.cell_coords.mean(axis=1))[:, 0])
        V0, n0 = self._V0, self._V0.node_set.size
        # The distributed dual graph: the rows of this rank's cells (DG0 owned nodes), a
        # neighbour across each interior facet (this rank's and its halo's).
        pairs = V0.interior_facet_node_map().values_with_halo.reshape(-1, 2)
        rows, cols = [], []
        for a, b in ((0, 1), (1, 0)):
            mine = (pairs[:, a] >= 0) & (pairs[:, a] < n0) & (pairs[:, b] >= 0)
            rows.append(pairs[mine, a]), cols.append(numbers[pairs[mine, b]])
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        graph = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                        shape=(n0, self.n_global_cells))
        graph.sum_duplicates()
        graph.sort_indices()
        adj = PETSc.Mat().createAIJ(size=((n0, self.n_global_cells), (n0, self.n_global_cells)),
                                    csr=(graph.indptr.astype(PETSc.IntType),
                                         graph.indices.astype(PETSc.IntType),
                                         np.ones(graph.nnz)), comm=self.comm)
        parts = graph_partition(adj, K, partitioner_type)
        adj.destroy()
        return parts[self._cell_node[:n]]

    def _strips(self, x):
        """K slabs of (about) equal cell counts across x: the K - 1 cuts by bisection on the
        global counts (one small allreduce per step)."""
        K, comm = self.n_experts, self.comm
        xs = np.sort(x)
        lo = comm.allreduce(float(xs[0]) if len(xs) else np.inf, op=MPI.MIN)
        hi = comm.allreduce(float(xs[-1]) if len(xs) else -np.inf, op=MPI.MAX)
        targets = np.arange(1, K) * self.n_global_cells / K
        a, b = np.full(K - 1, lo), np.full(K - 1, hi + 1e-12 * max(abs(hi), 1.0))
        counts = np.empty(K - 1, dtype=np.int64)
        for _ in range(64):
            middle = 0.5 * (a + b)
            comm.Allreduce(np.searchsorted(xs, middle).astype(np.int64), counts, op=MPI.SUM)
            below = counts < targets
            a, b = np.where(below, middle, a), np.where(below, b, middle)
        return np.searchsorted(b, x, side="right").astype(np.int64)

    def _place(self, per_rank):
        """Each expert on the rank holding most of its cells unless that rank's load would pass
        1.1x an even share; else on the least loaded rank. Largest experts first."""
        sizes = per_rank.sum(axis=0)
        share = 1.1 * sizes.sum() / self.comm.size
        load = np.zeros(self.comm.size)
        rank_of = np.empty(self.n_experts, dtype=np.int64)
        for k in sorted(range(self.n_experts), key=lambda k: (-sizes[k], k)):
            near = [r for r in np.argsort(-per_rank[:, k], kind="stable")
                    if per_rank[r, k] > 0 and load[r] + sizes[k] <= share]
            r = int(near[0]) if near else int(np.argmin(load))
            rank_of[k], load[r] = r, load[r] + sizes[k]
        self.expert_rank = rank_of
        self.my_experts = [k for k in range(self.n_experts) if rank_of[k] == self.comm.rank]

    # ------------------------------------------------------------------ dofs and experts
    def assign(self, V):
        """Give each dof of ``V`` to one expert (see the module's docstring), send each expert's
        cells to its rank and make its submesh's ingredients. Sets ``dof_expert`` (owned dofs of
        V, tensor order), ``interface`` (owned dofs whose rows mix two experts' fields),
        ``expert_cells`` ({k: global numbers of k's cells}). Returns V's layout. Collective."""
        K, n = self.n_experts, self.n_cells
        random = self.partitioner_type == "random"
        subs = subspaces(V)
        cell_nodes = [S.cell_node_map().values_with_halo[:n] for S in subs]
        # The "random" control takes each dof's expert from its first cell (by number), as the
        # canonical partition does, not the lowest expert around it (which would be 0 nearly
        # everywhere).
        key = self.cell_number[:n] * K + self.cell_expert if random else self.cell_expert
        node_expert = [_combine_at_nodes(S, cn, key, MPI.MIN, np.iinfo(np.int64).max) % K
                       for S, cn in zip(subs, cell_nodes)]
        labels = np.concatenate([e[cn] for e, cn in zip(node_expert, cell_nodes)], axis=1)
        mixed = (labels != labels[:, :1]).any(axis=1).astype(np.int64)
        mixed_nodes = [_combine_at_nodes(S, cn, mixed, MPI.MAX, 0)
                       for S, cn in zip(subs, cell_nodes)]
        owned = [(S.node_set.size, S.block_size) for S in subs]
        self.dof_expert = np.concatenate([np.repeat(e[:m], bs)
                                          for e, (m, bs) in zip(node_expert, owned)])
        self.interface = np.concatenate([np.repeat(f[:m] > 0, bs)
                                         for f, (m, bs) in zip(mixed_nodes, owned)])
        owning = self.comm.allreduce(np.bincount(self.dof_expert, minlength=K))
        if (owning == 0).any():
            raise InputError(f"experts {np.flatnonzero(owning == 0).tolist()} own no dof of "
                             f"{V.ufl_element()} (every dof of their cells has a lower-numbered "
                             "expert): use fewer experts or another partitioner")
        # Each owned cell goes to the rank of every expert owning one of its dofs.
        pairs = (np.unique((np.arange(n)[:, None] * K + labels).ravel()) if n
                 else np.zeros(0, np.int64))
        cells, experts = pairs // K, pairs % K
        dest = self.expert_rank[experts]
        order = np.argsort(dest, kind="stable")
        self._sent = (cells[order], experts[order],
                      np.searchsorted(dest[order], np.arange(self.comm.size + 1)))
        marked = [self._markers_by_cell("Face Sets", 1), self._markers_by_cell("Cell Sets", 0)]

        def geometry(c):     # c: cells sent to one expert, ascending
            out = dict(number=self.cell_number[c], coords=self.cell_coords[c])
            for name, (cell, keys, value) in zip(("facets", "cells"), marked):
                hit = np.isin(cell, c)
                out[name] = (np.searchsorted(c, cell[hit]), keys[hit], value[hit])
            return out

        self._submesh_parts = {}
        for k, parts in self._ship(geometry).items():
            number = np.concatenate([p["number"] for p in parts])
            # Cells by number, wherever they came from.
            order = np.argsort(number, kind="stable")
            where = np.empty(len(order), dtype=np.int64)
            where[order] = np.arange(len(order))
            base = np.cumsum([0] + [len(p["number"]) for p in parts])
            markers = [tuple(np.concatenate(x) for x in zip(*[
                (where[b + p[name][0]], p[name][1], p[name][2]) for b, p in zip(base, parts)]))
                for name in ("facets", "cells")]
            self._submesh_parts[k] = (number[order],
                                      np.concatenate([p["coords"] for p in parts])[order], markers)
        self.expert_cells = {k: parts[0] for k, parts in self._submesh_parts.items()}
        values = {}
        mine = {name: set(value.tolist())
                for name, (_, _, value) in zip(("Face Sets", "Cell Sets"), marked)}
        for part in self.comm.allgather(mine):
            for name, vs in part.items():
                values.setdefault(name, set()).update(vs)
        self._marker_values = {name: sorted(vs) for name, vs in values.items()}
        return self.layout(V)

    def _markers_by_cell(self, name, height):
        """The marked points of label ``name`` at ``height`` in the closure of this rank's owned
        cells, as arrays (owned cell [m], keys of the point's vertices [m, nv, gdim] (for
        facets; cells are known by their number), value [m]); a facet between two owned cells
        is listed with each."""
        dm = self.mesh.topology_dm
        numbering = self.mesh.topology._cell_numbering
        cells, keys, values = [], [], []
        if height == 0:          # every cell may be marked (gmsh's physical volumes): no closures
            if dm.hasLabel(name):
                for value in dm.getLabelIdIS(name).getIndices():
                    points = dm.getStratumIS(name, value).getIndices()
                    c0, c1 = dm.getHeightStratum(0)
                    mine = [numbering.getOffset(p) for p in points if c0 <= p < c1]
                    mine = [c for c in mine if 0 <= c < self.n_cells]
                    cells += mine
                    values += [int(value)] * len(mine)
            return (np.array(cells, dtype=np.int64),
                    np.zeros((len(cells), 0, self.gdim), dtype=np.int64),
                    np.array(values, dtype=np.int64))
        for point, point_keys, value in marked_points(self.mesh, name, height, self):
            for p in dm.getSupport(point):
                cell = numbering.getOffset(p)
                if 0 <= cell < self.n_cells:
                    cells.append(cell), keys.append(point_keys), values.append(value)
        nv = self.tdim if self.mesh.ufl_cell().is_simplex else 2 ** (self.tdim - 1)
        return (np.array(cells, dtype=np.int64),
                np.array(keys, dtype=np.int64).reshape(-1, nv, self.gdim),
                np.array(values, dtype=np.int64))

    def _ship(self, payload):
        """Send, for each (owned cell, expert) pair of assign, ``payload(cells)`` (a dict of
        per-cell arrays and lists) to the expert's rank: {k: [its parts, by source rank]} for
        this rank's experts. One all-to-all over the mesh comm."""
        cells, experts, bounds = self._sent
        send = []
        for r in range(self.comm.size):
            c, e = cells[bounds[r]:bounds[r + 1]], experts[bounds[r]:bounds[r + 1]]
            send.append({int(k): payload(c[e == k]) for k in np.unique(e)} or None)
        out = {k: [] for k in self.my_experts}
        for part in self.comm.alltoall(send):
            for k, data in (part or {}).items():
                out[k].append(data)
        return out

    def expert_submesh(self, k):
        """Expert k's subdomain mesh (COMM_SELF), from the cells sent to this rank."""
        number, coords, (facets, cells) = self._submesh_parts[k]
        flat = coords.reshape(-1, self.gdim)
        unique, first, inverse = np.unique(_void(self.keys(flat)), return_index=True,
                                           return_inverse=True)
        cell_vertices = inverse.reshape(len(number), -1)
        facet_markers = {}
        _, facet_keys, facet_values = facets
        facet_ids = _find(unique, _void(facet_keys.reshape(-1, self.gdim)),
                          "a marked facet has no vertex among its cell's")
        facet_ids = facet_ids.reshape(facet_keys.shape[:2])
        for ids, value in zip(np.sort(facet_ids, axis=1).tolist(), facet_values.tolist()):
            facet_markers.setdefault(tuple(ids), set()).add(value)
        cell_markers = (cells[0], cells[2])
        return self.make_submesh(cell_vertices, self.wrap(flat[first]), facet_markers,
                                 cell_markers, self._marker_values, f"expert{k}")

    def layout(self, W):
        """The numbering of space ``W`` that the exchange plans use (see DistributedLayout).
        Collective."""
        return DistributedLayout(W, self)

    def expert_indicator(self, mesh=None):
        """A DG0 Function on the partitioned mesh holding each cell's expert. Collective."""
        if mesh is not None and mesh is not self.mesh:
            raise InputError("a distributed partition describes the mesh it was made on only")
        f = fd.Function(self._V0, name="expert")
        f.dat.data[self._cell_node[:self.n_cells]] = self.cell_expert
        return f


class DistributedLayout:
    """The dofs of a space ``W`` numbered as the mixture's tensors are laid out: rank r's owned
    dofs (subspace after subspace, node by node, component by component) are numbers
    offsets[r] ... offsets[r + 1] - 1. ``locate(ids)`` is arithmetic; ``space_ids(Wk, k)``
    reads the numbers of the dofs of an expert's space from the numbers sent with its cells
    (matched by the dofs' points and components). Collective over the mesh comm."""

    def __init__(self, W, partition):
        comm = partition.comm
        self.partition = partition
        subs = subspaces(W)
        self.n_owned = sum(S.node_set.size * S.block_size for S in subs)
        self.offsets = np.concatenate([[0], np.cumsum(comm.allgather(self.n_owned))])
        start = self.offsets[comm.rank]
        n = partition.n_cells
        numbers, keys, cell_nodes = [], [], []
        for S in subs:
            m, bs = S.node_set.size, S.block_size
            node = np.full(S.node_set.total_size, -1, dtype=np.int64)
            node[:m] = start + np.arange(m) * bs
            numbers.append(_to_halo(S, node))
            keys.append(_node_keys(S, partition, True))
            cell_nodes.append(S.cell_node_map().values_with_halo[:n])
            start += m * bs
        received = partition._ship(lambda c: [(nb[cn[c]], kk[cn[c]]) for nb, kk, cn
                                              in zip(numbers, keys, cell_nodes)])
        # Per expert and subspace: the dofs' point keys, sorted, and their numbers.
        self._tables = {}
        for k, parts in received.items():
            tables = []
            for j, S in enumerate(subs):
                node_numbers = np.concatenate([p[j][0].ravel() for p in parts])
                node_keys = np.concatenate([p[j][1].reshape(-1, partition.gdim) for p in parts])
                voids, first, inverse = np.unique(_void(node_keys), return_index=True,
                                                  return_inverse=True)
                if (node_numbers[first][inverse] != node_numbers).any():
                    raise InputError(f"two dofs of {S.ufl_element()} share a point: mixture of "
                                     "experts needs one dof per point and component")
                node_numbers = node_numbers[first]
                tables.append((voids, node_numbers, S.block_size))
            self._tables[k] = tables

    def owned_numbers(self):
        """The numbers of this rank's owned dofs, in tensor order."""
        return self.offsets[self.partition.comm.rank] + np.arange(self.n_owned)

    def locate(self, ids):
        ranks = np.searchsorted(self.offsets, ids, side="right") - 1
        return ranks, ids - self.offsets[ranks]

    def space_ids(self, Wk, k):
        """The numbers of the dofs of ``Wk`` (a space on expert k's submesh, W's element), in
        the order of Wk's tensors."""
        out = []
        for (voids, node_numbers, bs), S in zip(self._tables[k], subspaces(Wk)):
            keys = _node_keys(S, self.partition, False)
            nodes = node_numbers[_find(voids, _void(keys), "a dof of an expert's space has no "
                                       "match among the dofs sent with its cells")]
            out.append((nodes[:, None] + np.arange(bs)).ravel())
        return np.concatenate(out)
