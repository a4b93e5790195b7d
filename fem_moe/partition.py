"""K subdomains of a mesh that do not depend on the number of MPI ranks, and the maps between
the distributed function spaces and the experts' subdomain spaces.

Every rank gathers the mesh's cells (vertex coordinates) and numbers cells, vertices and dofs
canonically, by their coordinates. PETSc's graph partitioner (MatPartitioning, PTScotch by default;
``-fem_moe_partition_mat_partitioning_type`` changes it) splits the canonical dual graph into K
parts on rank 0, so a given K yields the same subdomains on any number of ranks. Memory: every
rank holds the cell list and the canonical dof tables of the whole mesh (O(cells) per rank), which
is cheap next to the solves at the mesh sizes the layers are for; the solves themselves are local.

Dof identity is by coordinates (and component), so the spaces must have one dof per point and
component: continuous Lagrange of any degree, or DG0 (checked); a mixed space is numbered
subspace by subspace. On a periodic mesh (Firedrake's, or a periodic gmsh mesh: discontinuous
coordinates) the periods are found from the coordinates, keys are taken modulo them, and an
expert's submesh is periodic where its cells wrap around.

Interface dofs: each dof belongs to exactly one expert, the lowest-numbered expert among the
cells that contain it. Expert k's residual rows are the dofs it owns; they need u_k on every cell
touching them, so expert k's subdomain is those cells (its own cells plus at most one layer of
neighbours): the (VERTEX, 1) overlap of the design. The stitched output takes each dof from its
owner. (Any dof owned by k lies on no artificial boundary facet of k's subdomain, so boundary
integrals over the whole boundary, ``ds``, never touch k's rows.)
"""
import os

import numpy as np
import scipy.sparse
import firedrake as fd
from firedrake.petsc import PETSc
from mpi4py import MPI

from .errors import InputError
from .options import set_up, used
from .problem import subspaces

__all__ = ["Partition", "SpaceLayout", "ExchangePlan", "mesh_periods", "graph_partition"]

_DIGITS = 1e9   # coordinates are keyed to 1e-9 of the mesh's extent


def _find(sorted_keys, keys, what):
    """Positions of ``keys`` in ``sorted_keys`` (both from _void); InputError naming ``what`` if
    one is missing."""
    ids = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    if not np.array_equal(sorted_keys[ids], keys):
        raise InputError(what)
    return ids


def _void(keys):
    """Rows of an int64 array as opaque scalars, for sorting and searching whole rows."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    return keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).ravel()


class CoordinateKeys:
    """Integer keys of points, by which dofs, vertices and cells are matched across meshes:
    coordinates relative to ``lower`` in units of 1e-9 of ``extent``, modulo ``periods`` (0
    where not periodic). Subclasses set the three attributes."""

    def keys(self, points):
        """Integer keys of points [n, gdim] (1e-9 of the mesh's extent; modulo the periods)."""
        keys = self._raw_keys(points)
        for d in np.flatnonzero(self.periods):
            keys[:, d] %= self._period_keys[d]
        return keys

    def _raw_keys(self, points):
        return np.rint((np.asarray(points) - self.lower) / self.extent * _DIGITS).astype(np.int64)

    @property
    def _period_keys(self):
        return np.rint(self.periods / self.extent * _DIGITS).astype(np.int64)

    def wrap(self, points):
        """Points [n, gdim] moved by whole periods into the mesh's box [lower, lower + period)."""
        points = np.array(points, dtype=float)
        raw = self._raw_keys(points)
        for d in np.flatnonzero(self.periods):
            points[:, d] -= (raw[:, d] // self._period_keys[d]) * self.periods[d]
        return points

    def _begin(self, mesh, n_experts, partitioner_type):
        """What every partition of ``mesh`` into ``n_experts`` starts with; returns mesh.comm."""
        self.mesh, self.comm, self.n_experts = mesh, mesh.comm, int(n_experts)
        self.partitioner_type = partitioner_type
        if self.n_experts < 1:
            raise InputError(f"n_experts must be >= 1, got {n_experts}")
        check_affine(mesh)
        self.tdim, self.gdim = mesh.topological_dimension, mesh.geometric_dimension
        return mesh.comm

    def make_submesh(self, cell_vertices, vertex_coords, facet_markers, cell_markers, values,
                     name, vertex_ids=None):
        """A Firedrake mesh on COMM_SELF from cells [C, nv] of vertices ``vertex_coords`` [nV,
        gdim] (in the mesh's box), with the markers (see label_submesh: ``vertex_ids`` number
        the vertices as the facet markers do, default 0, 1, ...; ``cell_markers``: (cells,
        values) arrays; ``values``: every marker value of the whole mesh, {"Face Sets": [...],
        "Cell Sets": [...]}); on a periodic mesh its cells connect across the seam as the whole
        mesh's do (PETSc localizes the coordinates of the cells that cross it)."""
        plex = PETSc.DMPlex().createFromCellList(
            self.tdim, np.asarray(cell_vertices, dtype=PETSc.IntType), vertex_coords,
            comm=PETSc.COMM_SELF)
        label_submesh(plex, np.arange(len(vertex_coords)) if vertex_ids is None else vertex_ids,
                      facet_markers, cell_markers, values)
        if self.periods.any():
            periodic = self.periods > 0
            plex.setPeriodicity(np.where(periodic, 0.5 * self.periods, -1.0), self.lower,
                                np.where(periodic, self.periods, -1.0))
            plex.localizeCoordinates()
        return fd.Mesh(plex, comm=MPI.COMM_SELF, name=name)


def label_submesh(plex, vertex_ids, facet_markers, cell_markers, values):
    """Copy markers onto a submesh DMPlex made by createFromCellList. Its vertex i is vertex
    ``vertex_ids[i]`` of the numbering ``facet_markers`` uses ({sorted vertex ids of a boundary
    facet: [marker values]}); ``cell_markers``: (cells, values), arrays of the plex's cells (its
    cell i is the list's cell i) and their markers. Every value in ``values`` ({label name:
    values}) gets a stratum, empty where the subdomain does not touch it, so that a form with
    ds(id) or dx(id) is valid on each expert. Loops over the boundary facets only."""
    if values.get("Cell Sets"):
        plex.createLabel("Cell Sets")
        label = plex.getLabel("Cell Sets")
        cells, markers = (np.asarray(a, dtype=np.int64) for a in cell_markers)
        c0, _ = plex.getHeightStratum(0)
        for value in values["Cell Sets"]:
            points = (c0 + cells[markers == value]).astype(PETSc.IntType)
            label.setStratumIS(value, PETSc.IS().createGeneral(points, comm=PETSc.COMM_SELF))
    if values.get("Face Sets"):
        plex.createLabel("Face Sets")
        label = plex.getLabel("Face Sets")
        for value in values["Face Sets"]:
            label.addStratum(value)
        v0, v1 = plex.getDepthStratum(0)
        plex.createLabel("fem_moe_boundary")
        plex.markBoundaryFaces("fem_moe_boundary", 1)
        boundary = plex.getStratumIS("fem_moe_boundary", 1).getIndices() \
            if plex.getLabel("fem_moe_boundary").getStratumSize(1) else []
        for point in boundary:
            closure = plex.getTransitiveClosure(point)[0]
            key = tuple(sorted(int(vertex_ids[p - v0]) for p in closure if v0 <= p < v1))
            for value in facet_markers.get(key, ()):
                plex.setLabelValue("Face Sets", point, value)
        plex.removeLabel("fem_moe_boundary")


def check_affine(mesh):
    """InputError unless ``mesh`` has P1/Q1 coordinates (or their DG1 version, periodic)."""
    element = mesh.coordinates.function_space().ufl_element()
    scalar = element.sub_elements[0]
    if scalar.embedded_superdegree != 1 or not ("Lagrange" in scalar.family()
                                                or "Discontinuous" in scalar.family()
                                                or scalar.family() in ("Q", "DQ")):
        raise InputError("mixture of experts needs affine meshes (P1/Q1 coordinates, or their "
                         "DG1 version on a periodic mesh; curved meshes are not supported); got "
                         f"{element}")


def marked_points(mesh, name, height, geometry):
    """This rank's points (owned and halo) of ``mesh``'s DMPlex label ``name`` ("Face Sets",
    "Cell Sets") at ``height`` (1 facets, 0 cells): [(plex point, keys of its vertices [nv,
    gdim], value)]. The vertices' coordinates are Firedrake's coordinate field (which a user
    may have moved after the mesh was made, e.g. ``mesh.coordinates.interpolate``; the DMPlex
    keeps the original ones), or on a periodic mesh, whose coordinates are per cell, the
    DMPlex's own."""
    dm = mesh.topology_dm
    if not dm.hasLabel(name):
        return []
    gdim = mesh.geometric_dimension
    if geometry.periods.any():
        coords, section = dm.getCoordinatesLocal().array_r, dm.getCoordinateSection()
        vertex_coords = lambda p: coords[section.getOffset(p):section.getOffset(p) + gdim]
    else:
        X = mesh.coordinates.dat.data_ro_with_halos
        section = mesh.coordinates.function_space().dm.getLocalSection()
        vertex_coords = lambda p: X[section.getOffset(p)]
    v0, v1 = dm.getDepthStratum(0)
    h0, h1 = dm.getHeightStratum(height)
    found = []
    for value in dm.getLabelIdIS(name).getIndices():
        for point in dm.getStratumIS(name, value).getIndices():
            if h0 <= point < h1:
                closure = dm.getTransitiveClosure(point)[0]
                xs = np.array([vertex_coords(p) for p in closure if v0 <= p < v1])
                found.append((int(point), geometry.keys(xs), int(value)))
    return found


class Partition(CoordinateKeys):
    """K subdomains of ``mesh`` and the placement of the K experts on the mesh's ranks.

    Attributes (identical on every rank): ``n_experts``; ``cell_vertices`` [C, nv] canonical
    vertex numbers of the canonical cells; ``vertex_coords`` [nV, gdim]; ``cell_expert`` [C];
    ``expert_rank`` [K], the rank hosting each expert; ``my_experts``, this rank's experts.
    Collective over ``mesh.comm``.
    """

    def __init__(self, mesh, n_experts, partitioner_type=None):
        comm = self._begin(mesh, n_experts, partitioner_type)
        X = mesh.coordinates.dat.data_ro_with_halos
        n_owned = mesh.cell_set.size
        local = X[mesh.coordinates.cell_node_map().values[:n_owned]]      # [cells, nv, gdim]
        cells = np.concatenate(comm.allgather(local))
        if len(cells) < self.n_experts:
            raise InputError(f"{self.n_experts} experts for a mesh of {len(cells)} cells")
        self.lower = cells.reshape(-1, self.gdim).min(axis=0)
        self.extent = float(np.ptp(cells.reshape(-1, self.gdim), axis=0).max())
        self.periods = mesh_periods(mesh)
        # On a periodic mesh a cell's coordinates are its own (unwrapped) copy; keys are taken
        # modulo the periods, so a vertex on the seam is one vertex, as it is in the topology.
        vkeys = self.keys(cells.reshape(-1, self.gdim))
        ukeys, first, inverse = np.unique(_void(vkeys), return_index=True, return_inverse=True)
        self.vertex_coords = self.wrap(cells.reshape(-1, self.gdim)[first])
        cell_vertices = inverse.reshape(len(cells), -1)
        centres = cells.mean(axis=1)
        centre_keys = _void(self.keys(centres))
        order = np.argsort(centre_keys, kind="stable")
        self.cell_vertices = cell_vertices[order]
        self.cell_centres = self.wrap(centres[order])
        self.cell_keys = centre_keys[order]
        self.cell_expert = self._partition(partitioner_type)
        sizes = np.bincount(self.cell_expert, minlength=self.n_experts)
        if (sizes == 0).any():
            empty = np.flatnonzero(sizes == 0).tolist()
            raise InputError(f"the partitioner left experts {empty} empty")
        self.place(sizes)
        self._vertex_keys = ukeys
        # Boundary and cell markers ("Face Sets", "Cell Sets"), by canonical vertices/cells, so
        # that ds(id) and dx(id) keep their meaning on the experts' submeshes.
        self.facet_markers = self._gather_label(mesh, "Face Sets", 1)
        self.cell_markers = self._gather_label(mesh, "Cell Sets", 0)

    def _gather_label(self, mesh, name, height):
        """{sorted canonical vertex ids of a marked point: [markers]}, on every rank."""
        found = [(keys, value) for _, keys, value in marked_points(mesh, name, height, self)]
        markers = {}
        for part in self.comm.allgather(found):
            for keys, value in part:
                ids = _find(self._vertex_keys, _void(keys),
                            "a marked point has no vertex of the mesh")
                markers.setdefault(tuple(sorted(ids.tolist())), set()).add(value)
        return {key: sorted(values) for key, values in markers.items()}

    def marker_values(self):
        """{label name: every marker value of the whole mesh}."""
        return {"Face Sets": sorted({v for vs in self.facet_markers.values() for v in vs}),
                "Cell Sets": sorted({v for vs in self.cell_markers.values() for v in vs})}

    def submesh(self, cells, name):
        """The Firedrake mesh (COMM_SELF) of canonical cells ``cells``, with the whole mesh's
        markers (see CoordinateKeys.make_submesh)."""
        verts = self.cell_vertices[cells]
        used, local = np.unique(verts, return_inverse=True)
        marked = [(i, v) for i, cell in enumerate(np.sort(verts, axis=1).tolist())
                  for v in self.cell_markers.get(tuple(cell), ())] if self.cell_markers else []
        cell_markers = (tuple(np.array(x, dtype=np.int64) for x in zip(*marked))
                        or (np.zeros(0), np.zeros(0)))
        return self.make_submesh(local.reshape(verts.shape), self.vertex_coords[used],
                                 self.facet_markers, cell_markers, self.marker_values(),
                                 name, vertex_ids=used)

    def _partition(self, partitioner_type):
        K, C = self.n_experts, len(self.cell_vertices)
        if K == 1:
            return np.zeros(C, dtype=np.int64)
        if partitioner_type == "random":
            # The control for "are spatial subdomains what matters?": the same number of cells
            # per expert, scattered at random (seeded: the same on every rank and run).
            return np.random.default_rng(0).permutation(C) % K
        if partitioner_type == "strips":
            # K slabs of equal cell counts across the first coordinate: on a space-time mesh
            # (x, t) every expert then spans the whole time window and holds its own initial
            # values, instead of inheriting them through interface rows it does not see.
            order = np.argsort(self.cell_centres[:, 0], kind="stable")
            labels = np.empty(C, dtype=np.int64)
            labels[order] = np.arange(C) * K // C
            return labels
        labels = np.empty(C, dtype=np.int64)
        if self.comm.rank == 0:
            nv = self.cell_vertices.shape[1]
            incidence = scipy.sparse.csr_matrix(
                (np.ones(C * nv), (np.repeat(np.arange(C), nv), self.cell_vertices.ravel())))
            shared = (incidence @ incidence.T).tocsr()
            shared.setdiag(0)
            shared.data[shared.data < self.tdim] = 0   # neighbours share a facet
            shared.eliminate_zeros()
            shared.sort_indices()
            adj = PETSc.Mat().createAIJ(size=(C, C), csr=(shared.indptr.astype(PETSc.IntType),
                                                          shared.indices.astype(PETSc.IntType),
                                                          np.ones(shared.nnz)),
                                        comm=PETSc.COMM_SELF)
            labels[:] = graph_partition(adj, K, partitioner_type)
            adj.destroy()
        self.comm.Bcast(labels, root=0)
        return labels

    def place(self, weights):
        """Place the experts on the ranks by their ``weights`` [K] (cells at construction; the
        mixture of experts re-places by owned dofs): largest first onto the least loaded rank,
        ties to the lowest rank. Sets ``expert_rank`` and ``my_experts``."""
        load, rank_of = np.zeros(self.comm.size), np.empty(len(weights), dtype=np.int64)
        for k in sorted(range(len(weights)), key=lambda k: (-weights[k], k)):
            r = int(np.argmin(load))
            rank_of[k], load[r] = r, load[r] + weights[k]
        self.expert_rank = rank_of
        self.my_experts = [k for k in range(self.n_experts) if rank_of[k] == self.comm.rank]

    def assign(self, V):
        """Give each dof of ``V`` (the mixture's space) to one expert: the lowest-numbered
        expert among the cells containing it (for the "random" partitioner, the expert of its
        first canonical cell), and re-place the experts on the ranks by the dofs they own.
        Sets ``dof_expert`` (the expert of each owned dof of V, in tensor order),
        ``interface`` (bool, owned dofs of V whose rows' stencils hold dofs of two experts),
        ``expert_cells`` ({k: cells of k's subdomain} for this rank's experts: every cell
        containing a dof k owns). Returns V's layout. Collective."""
        layout = self.layout(V)
        cell_dofs = layout.cell_dofs()
        K, n_global = self.n_experts, layout.n_global
        if self.partitioner_type == "random":
            # Scattered cells: "lowest expert among the dof's cells" would hand nearly every dof
            # to expert 0; take the expert of the dof's first canonical cell instead (balanced).
            first = np.full(n_global, len(cell_dofs), dtype=np.int64)
            np.minimum.at(first, cell_dofs.ravel(),
                          np.repeat(np.arange(len(cell_dofs)), cell_dofs.shape[1]))
            owner = self.cell_expert[first]
        else:
            owner = np.full(n_global, K, dtype=np.int64)
            np.minimum.at(owner, cell_dofs.ravel(), np.repeat(self.cell_expert, cell_dofs.shape[1]))
        self.owner = owner
        self.place(np.bincount(owner, minlength=K))    # balance the ranks by the dofs experts own
        mixed_cells = (owner[cell_dofs] != owner[cell_dofs][:, :1]).any(axis=1)
        interface = np.zeros(n_global, dtype=bool)
        interface[cell_dofs[mixed_cells].ravel()] = True
        self.dof_expert = owner[layout.owned_ids]
        self.interface = interface[layout.owned_ids]
        self.expert_cells = {k: np.flatnonzero((owner[cell_dofs] == k).any(axis=1))
                             for k in self.my_experts}
        return layout

    def expert_submesh(self, k):
        """Expert k's subdomain mesh (COMM_SELF); k one of this rank's experts (after assign)."""
        return self.submesh(self.expert_cells[k], f"expert{k}")

    def layout(self, W):
        """The numbering of a space ``W`` on the mesh that the exchange plans use. Collective."""
        return SpaceLayout(W, self)

    def cell_ids(self, mesh):
        """Canonical ids of this rank's owned cells of ``mesh`` (the partitioned mesh or an
        expert's submesh), [owned cells]."""
        X = mesh.coordinates.dat.data_ro_with_halos
        cells = X[mesh.coordinates.cell_node_map().values[:mesh.cell_set.size]]
        keys = _void(self.keys(cells.mean(axis=1)))
        # Canonical cells are numbered in the sorted order of their keys.
        return _find(self.cell_keys, keys, "cells of the mesh do not match the partitioned mesh")

    def expert_indicator(self, mesh=None):
        """A DG0 Function on ``mesh`` (default: the partitioned mesh) holding each cell's expert
        (for plots and VTK output). Collective."""
        mesh = self.mesh if mesh is None else mesh
        f = fd.Function(fd.FunctionSpace(mesh, "DG", 0), name="expert")
        f.dat.data[:] = self.cell_expert[self.cell_ids(mesh)]
        return f


def mesh_periods(mesh):
    """The period of ``mesh`` along each coordinate, [gdim] (0 where it is not periodic).
    Firedrake's periodic meshes have discontinuous coordinates: each cell holds its own copy of
    its vertices, and the copies of a seam vertex differ by the period. Collective."""
    gdim = mesh.geometric_dimension
    coords = mesh.coordinates
    family = coords.function_space().ufl_element().sub_elements[0].family()
    if "Discontinuous" not in family and family != "DQ":
        return np.zeros(gdim)
    vertices = fd.FunctionSpace(mesh, "CG", 1).cell_node_map().values_with_halo
    # The DG1 and CG1 dofs of a cell both sit at its vertices, in the same reference order.
    X = coords.dat.data_ro_with_halos[coords.cell_node_map().values_with_halo].reshape(-1, gdim)
    n = vertices.max() + 1 if vertices.size else 0
    lo, hi = np.full((n, gdim), np.inf), np.full((n, gdim), -np.inf)
    np.minimum.at(lo, vertices.ravel(), X)
    np.maximum.at(hi, vertices.ravel(), X)
    local = (hi - lo).max(axis=0) if n else np.zeros(gdim)
    spread = np.empty(gdim)
    mesh.comm.Allreduce(np.ascontiguousarray(local, dtype=float), spread, op=MPI.MAX)
    extent = mesh.comm.allreduce(float(np.ptp(X, axis=0).max()) if len(X) else 0.0, op=MPI.MAX)
    return np.where(spread > 1e-9 * extent, spread, 0.0)


def graph_partition(adj, n_parts, partitioner_type=None):
    """Parts [local rows] of the graph with adjacency matrix ``adj`` (one row per vertex; on
    adj's communicator, each rank its rows) cut into ``n_parts`` by PETSc's MatPartitioning:
    ``partitioner_type`` (default "ptscotch"), options under ``fem_moe_partition_`` (e.g.
    ``-fem_moe_partition_mat_partitioning_type parmetis``, which wins over the argument).
    Collective over adj's communicator."""
    part = PETSc.MatPartitioning().create(comm=adj.getComm())
    part.setAdjacency(adj)
    set_up(part, "fem_moe_partition_", {},
           {"mat_partitioning_type": partitioner_type or "ptscotch",
            "mat_partitioning_nparts": int(n_parts)})
    if part.getType() == "ptscotch":
        _make_scotch_deterministic()
    result = PETSc.IS().create(comm=adj.getComm())
    with used(part):
        part.apply(result)
    labels = result.getIndices().astype(np.int64)
    result.destroy(), part.destroy()
    return labels


def _make_scotch_deterministic():
    """(PT-)Scotch partitions with threads and a random generator whose state carries over from
    call to call: the same graph then gets other partitions in another process, or later in the
    same one, and K experts would not be the same subdomains on another run or rank count. One
    thread (read by Scotch when it starts a partition) and a reset seed make it deterministic."""
    import ctypes
    os.environ["SCOTCH_PTHREAD_NUMBER"] = "1"
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps
                        if os.path.basename(line.split()[-1]).startswith("libptscotch")
                        and not os.path.basename(line.split()[-1]).startswith("libptscotcherr")
                        and ".so" in line})
    if not paths:
        raise InputError("cannot find the PTScotch library PETSc uses, to make the partition "
                         "deterministic; choose another -fem_moe_partition_mat_partitioning_type")
    # Sets the seed and resets the generator.
    ctypes.CDLL(paths[0]).SCOTCH_randomSeed(ctypes.c_long(1))


def _node_keys(V, partition, with_halos):
    """Coordinate keys of V's nodes (owned, or owned + halo), [nodes, gdim]."""
    mesh = V.mesh()
    element = V.ufl_element()
    scalar = element.sub_elements[0] if V.block_size > 1 else element
    family = scalar.family()
    if not ("Lagrange" in family or (scalar.embedded_superdegree == 0 and "Discontinuous" in family)
            or family in ("Q", "DQ") and scalar.embedded_superdegree == 0):
        raise InputError(f"mixture of experts needs continuous Lagrange or DG0 spaces (one dof per "
                         f"point and component); got {element}")
    X = fd.Function(fd.VectorFunctionSpace(mesh, scalar)).interpolate(fd.SpatialCoordinate(mesh))
    data = X.dat.data_ro_with_halos if with_halos else X.dat.data_ro
    return partition.keys(data.reshape(-1, partition.gdim))


def _dof_keys(node_keys, bs):
    n = len(node_keys)
    return np.column_stack([np.repeat(node_keys, bs, axis=0), np.tile(np.arange(bs), n)])


class _SingleLayout:
    """Canonical numbering of the dofs of one (non-mixed) space; see SpaceLayout."""

    def __init__(self, V, partition):
        comm = partition.comm
        self.V, self.partition, self.bs = V, partition, V.block_size
        keys = _dof_keys(_node_keys(V, partition, False), self.bs)
        all_keys = comm.allgather(keys)
        self.counts = [len(k) for k in all_keys]
        self.sorted_keys = _void(np.concatenate(all_keys))
        order = np.argsort(self.sorted_keys, kind="stable")
        self.sorted_keys = self.sorted_keys[order]
        if len(self.sorted_keys) > 1 and (self.sorted_keys[1:] == self.sorted_keys[:-1]).any():
            raise InputError(f"two dofs of {V.ufl_element()} share a point: mixture of experts "
                             "needs one dof per point and component")
        ids = np.empty(len(order), dtype=np.int64)
        ids[order] = np.arange(len(order))
        self.n_global = len(order)
        self.owner_rank = np.empty(self.n_global, dtype=np.int64)
        self.owner_index = np.empty(self.n_global, dtype=np.int64)
        start = 0
        for r, c in enumerate(self.counts):
            self.owner_rank[ids[start:start + c]] = r
            self.owner_index[ids[start:start + c]] = np.arange(c)
            start += c
        offset = sum(self.counts[:comm.rank])
        self.owned_ids = ids[offset:offset + self.counts[comm.rank]]

    def lookup(self, keys):
        return _find(self.sorted_keys, _void(keys),
                     "a dof of an expert's space has no match in the global space")

    def space_ids(self, Vk):
        return self.lookup(_dof_keys(_node_keys(Vk, self.partition, False), Vk.block_size))

    def cell_dofs(self):
        V, p = self.V, self.partition
        node_ids = self.lookup(_dof_keys(_node_keys(V, p, True), self.bs)).reshape(-1, self.bs)
        cnm = V.cell_node_map().values[:V.mesh().cell_set.size]
        local = node_ids[cnm].reshape(len(cnm), -1)
        cells = p.cell_ids(V.mesh())
        gathered = p.comm.allgather((cells, local))
        out = np.empty((len(p.cell_vertices), local.shape[1]), dtype=np.int64)
        for c, d in gathered:
            out[c] = d
        return out


class SpaceLayout:
    """Canonical numbering of the dofs of a space on the partitioned (distributed) mesh.

    ``owned_ids`` [n_owned]: canonical ids of this rank's owned dofs, in tensor order;
    ``owner_rank``, ``owner_index`` [n_global]: the rank owning each canonical dof and its index
    there. A mixed space is numbered subspace after subspace, as its tensors are (each
    subspace's dofs by their points and components). Collective over the mesh comm.
    """

    def __init__(self, V, partition):
        self.V, self.partition = V, partition
        self.parts = [_SingleLayout(S, partition) for S in subspaces(V)]
        self._offsets = np.cumsum([0] + [part.n_global for part in self.parts])
        self.n_global = int(self._offsets[-1])
        # A rank's tensor holds its owned dofs of each subspace one after the other.
        before = np.cumsum([[0] * partition.comm.size] + [part.counts for part in self.parts],
                           axis=0)
        self.owner_rank = np.concatenate([part.owner_rank for part in self.parts])
        self.owner_index = np.concatenate([part.owner_index + before[i][part.owner_rank]
                                           for i, part in enumerate(self.parts)])
        self.owned_ids = np.concatenate([part.owned_ids + off
                                         for part, off in zip(self.parts, self._offsets)])
        self.n_owned = len(self.owned_ids)

    def owned_numbers(self):
        """The numbers of this rank's owned dofs in this layout, in tensor order."""
        return self.owned_ids

    def locate(self, ids):
        """(rank, index in that rank's tensors) of the dofs ``ids``."""
        return self.owner_rank[ids], self.owner_index[ids]

    def space_ids(self, Vk, k=None):
        """Canonical ids of the dofs of a space ``Vk`` on an expert's submesh (same element),
        in the order of Vk's tensors."""
        return np.concatenate([part.space_ids(S) + off for part, S, off
                               in zip(self.parts, subspaces(Vk), self._offsets)])

    def cell_dofs(self):
        """Canonical dof ids of every canonical cell's nodes (all components and subspaces),
        gathered on every rank: [C, dofs per cell]."""
        return np.concatenate([part.cell_dofs() + off
                               for part, off in zip(self.parts, self._offsets)], axis=1)


class ExchangePlan:
    """Moves values between the owners of a space's dofs (the distributed layout) and the
    experts that need them: ``needs`` {k: ids} for this rank's experts, in the numbering of
    ``layout`` (whose ``locate(ids)`` gives each id's owning rank and its index there). Built by
    one all-to-all of counts and one of indices over the mesh comm (no rank learns more than
    what it sends and receives); every rank must call in step.

    ``scatter(values [n_owned, M]) -> {k: [len(needs[k]), M]}`` for this rank's experts;
    ``gather_sum({k: [len(needs[k]), M]}) -> [n_owned, M]``, contributions to one dof summed.
    """

    def __init__(self, layout, needs):
        comm = layout.partition.comm
        self.comm, self.size, self.rank = comm, comm.size, comm.rank
        self.n_owned = layout.n_owned
        self.my_experts = sorted(needs)
        # As a receiver: per source rank, the (expert, positions) its values fill, in that order.
        self.recv_slots = [[] for _ in range(self.size)]
        wanted = [[] for _ in range(self.size)]
        for k in self.my_experts:
            ranks, index = layout.locate(np.asarray(needs[k], dtype=np.int64))
            order = np.argsort(ranks, kind="stable")
            bounds = np.searchsorted(ranks[order], np.arange(self.size + 1))
            for s in range(self.size):
                pos = order[bounds[s]:bounds[s + 1]]
                if len(pos):
                    self.recv_slots[s].append((k, pos))
                    wanted[s].append(index[pos])
        wanted = [np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in wanted]
        self.recv_counts = np.array([len(x) for x in wanted])
        # As a sender: the local indices each rank asked for, in the order it asked.
        self.send_counts = np.empty(self.size, dtype=np.int64)
        comm.Alltoall(self.recv_counts.astype(np.int64), self.send_counts)
        index = np.empty(int(self.send_counts.sum()), dtype=np.int64)
        comm.Alltoallv([np.concatenate(wanted).astype(np.int64), self.recv_counts, MPI.INT64_T],
                       [index, self.send_counts, MPI.INT64_T])
        self._index = index
        self.sizes = {k: len(needs[k]) for k in self.my_experts}
        # gather_sum's sum of the values sent back for each owned dof, as one sparse product
        # (np.add.at over [n, batch x N] arrays cost ~50 ms per call at 1e5 dofs).
        self._summation = scipy.sparse.csr_matrix(
            (np.ones(len(index)), (index, np.arange(len(index)))), shape=(self.n_owned, len(index)))

    def _alltoallv(self, send, send_counts, recv_counts, M):
        recv = np.empty((int(recv_counts.sum()), M))
        self.comm.Alltoallv([np.ascontiguousarray(send), send_counts * M, MPI.DOUBLE],
                            [recv, recv_counts * M, MPI.DOUBLE])
        return recv

    def scatter(self, values):
        M = values.shape[1]
        send = values[self._index] if self.n_owned else np.zeros((0, M))
        recv = self._alltoallv(send, self.send_counts, self.recv_counts, M)
        out = {k: np.zeros((n, M)) for k, n in self.sizes.items()}
        start = 0
        for s in range(self.size):
            for k, pos in self.recv_slots[s]:
                out[k][pos] = recv[start:start + len(pos)]
                start += len(pos)
        return out

    def gather_sum(self, arrays, M):
        send = np.concatenate([arrays[k][pos] for s in range(self.size)
                               for k, pos in self.recv_slots[s]] or [np.zeros((0, M))])
        recv = self._alltoallv(send, self.recv_counts, self.send_counts, M)
        return self._summation @ recv
