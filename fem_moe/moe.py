"""The mixture of hard-constraint experts (PI-HC-MoE) on a partitioned Firedrake mesh."""
import functools
import time

import numpy as np
import torch
import firedrake as fd
import ufl
from ufl.algorithms.analysis import extract_type
from ufl.domain import extract_unique_domain
from ufl.geometry import GeometricQuantity

from torch.autograd.function import once_differentiable

from .coupling import CoupledRows, CoupledSolver
from .errors import InputError, SolverDivergedError, raise_on_all_ranks
from .expert import Expert, SampleInfo, dirichlet_dofs
from .norms import WholeMesh, check_norm
from .layer import (HardConstraint, check_inputs, check_rtol, delivered_precision, sample_jacobians,
                    wants_gradient, _like, _to_numpy)
from .distributed import DistributedPartition
from .partition import ExchangePlan, Partition
from .lifetime import collect_garbage
from .problem import ConstrainedProblem, owned_values
from .warmstart import WarmStarts, solve_from

__all__ = ["MoEHardConstraint"]


class _ExpertSpace:
    """What one expert holds: its subdomain mesh and spaces, its dof maps, and (after
    ``set_dofs`` and ``build``) its dofs' owners and its Expert."""

    def __init__(self, k, partition, layout, data_layouts, problem):
        self.mesh = partition.expert_submesh(k)
        self.V = fd.FunctionSpace(self.mesh, problem.V.ufl_element())
        self.data_spaces = [fd.FunctionSpace(self.mesh, Vd.ufl_element())
                            for Vd in problem.data_spaces]
        self.ids = layout.space_ids(self.V, k)
        self.data_ids = [dl.space_ids(Vd, k) for dl, Vd in zip(data_layouts, self.data_spaces)]
        self.k, self.n_cells = k, len(partition.expert_cells[k])

    def set_dofs(self, values):
        """``values`` [n_sub, 3]: each dof's owner expert, Dirichlet flag and lifting value."""
        self.dof_owner = np.rint(values[:, 0]).astype(np.int64)
        self.rows = self.dof_owner == self.k
        self.bc, self.g = values[:, 1] > 0.5, values[:, 2]

    def build(self, problem, whole, functions, kwargs):
        """The expert's Expert; ``whole``: placeholders (u, v, m) on the whole mesh,
        ``functions``: {Function on the whole mesh: its copy on this submesh}, for the
        residual's fixed coefficients (see _OntoSubmesh)."""
        k = self.k
        residual = _OntoSubmesh(problem.residual, whole, problem.mesh, self.mesh, functions)
        sub = ConstrainedProblem(self.V, residual, data_spaces=self.data_spaces,
                                 solver_parameters=problem.solver_parameters,
                                 options_prefix="expert_")
        self.expert = Expert(sub, kwargs["n_basis"], mode=kwargs["mode"], row_mask=self.rows,
                             on_rank_deficient=kwargs["on_rank_deficient"], ridge=kwargs["ridge"],
                             ridge_always=kwargs["ridge_always"], norm=kwargs["norm"],
                             expert_id=k, dirichlet=(self.bc, self.g),
                             options_prefix=f"expert_{k}_",
                             option_set=("expert_", range(kwargs["n_experts"])))
        if not self.expert.row_mask.any():
            raise InputError(f"expert {k} owns no residual rows (its {int(self.rows.sum())} dofs "
                             "are all Dirichlet dofs): use fewer experts or a finer mesh")


class _OntoSubmesh:
    """The user's residual callable on an expert's submesh, written as Firedrake users write
    forms: it may hold the whole mesh's SpatialCoordinate and other geometric quantities,
    Constants, fixed Functions on the whole mesh and integrals over it (plain ``dx``). The form
    is made on the whole mesh, with the ``whole`` placeholders (u, v, m) there, then carried
    onto the submesh: u, v, m and each fixed Function (``functions``: {whole-mesh Function:
    submesh copy}) replaced by the submesh's, geometric quantities and integration domains by
    the submesh's."""

    def __init__(self, residual, whole, mesh, submesh, functions):
        self.residual, self.whole, self.mesh, self.submesh = residual, whole, mesh, submesh
        self.functions = functions

    def __call__(self, u, v, m):
        u0, v0, m0 = self.whole
        F = self.residual(u0, v0, m0)
        mapping = {u0: u, v0: v, **dict(zip(m0, m)), **self.functions}
        for q in extract_type(F, GeometricQuantity):
            if extract_unique_domain(q) is self.mesh:
                mapping[q] = type(q)(self.submesh)
        F = ufl.replace(F, mapping)
        return ufl.Form([itg.reconstruct(domain=self.submesh) if itg.ufl_domain() is self.mesh
                         else itg for itg in F.integrals()])


def _whole_mesh_functions(problem, whole):
    """The Functions on the whole mesh that the residual holds besides the placeholders
    ``whole`` = (u, v, m) (a material field, a fixed velocity): each expert needs its own copy.
    Collective (forms the residual)."""
    u, v, m = whole
    F = problem.residual(u, v, m)
    mine = {u, *m}
    topology = problem.mesh.topology
    return [c for c in F.coefficients() if isinstance(c, fd.Function) and c not in mine
            and c.function_space().mesh().topology is topology]


#: Up to this many cells the mixture's default partition is the canonical one.
CANONICAL_MAX_CELLS = 250_000

PARTITIONS = ("canonical", "distributed")


def _make_partition(mesh, K, partitioner_type, scheme):
    """The partition ``scheme`` (None: "canonical" up to CANONICAL_MAX_CELLS cells, else
    "distributed") of ``mesh`` into K subdomains. Collective."""
    if scheme is None:
        cells = mesh.comm.allreduce(mesh.cell_set.size)
        scheme = "canonical" if cells <= CANONICAL_MAX_CELLS else "distributed"
    if scheme == "canonical":
        return Partition(mesh, K, partitioner_type)
    if scheme == "distributed":
        return DistributedPartition(mesh, K, partitioner_type)
    raise InputError(f"partition must be one of {PARTITIONS} or None, got {scheme!r}")


class MoEHardConstraint(torch.nn.Module):
    """The mixture of hard-constraint experts: ``u = layer(basis, data=None)``, the same call,
    tensors and meaning as :class:`fem_moe.HardConstraint` (this rank's owned dofs).

    The mesh is split into ``n_experts`` = K subdomains (default: one per rank of the mesh
    communicator) by :class:`fem_moe.partition.Partition`: the same subdomains on any number of
    ranks. Each expert lives on one rank (by owned dofs, largest first onto the least loaded
    rank) and owns the dofs of its subdomain (each dof is owned by one expert, see
    :mod:`fem_moe.partition`); the output is u = g + sum_k P_k Phi^T w_k, each dof's value from
    its owner's coefficients w_k. K = 1 is the global layer.

    ``coupled=True`` (the default): the coefficients of all experts are solved together, so that
    the *stitched* field minimises the global residual (lstsq) or makes it orthogonal to every
    expert's block basis (galerkin): see :mod:`fem_moe.coupling`. With ``local_first=True``
    each expert first solves its own problem with its own SNES (options prefix ``expert_<k>_``;
    ``-expert_...`` applies to every expert) for the initial guess; by default the coupled
    solve starts from w = 0 (``benchmarks/coupled_step.py``, the plate, K = 4: the same 4-5
    coupled iterations either way, and the first stage cost more than half of the step). Then
    one SNES
    on the mesh communicator (options prefix ``moe_``:
    ``-moe_snes_monitor``, ``-moe_ksp_type``, ``-moe_pc_type``; ``coupling_parameters``
    updates its defaults, :data:`fem_moe.coupling.DEFAULT_COUPLING_PARAMETERS`) solves the
    block-sparse coupled problem, each rank holding its experts' rows. The coupled least
    squares nests the global layer: its residual is never larger than the global layer's with
    the same basis, measured in the same norm (both Euclidean, or the whole mesh's dual norm).
    The backward is one block-sparse transposed solve per sample.

    ``norm``: the least-squares residual's norm, as :class:`fem_moe.HardConstraint`'s
    (:mod:`fem_moe.norms`). "dual": the whole mesh's H1-dual norm over every expert's rows (one
    Riesz solve on the mesh communicator per vector, options prefix ``moe_riesz_``); it couples
    every row with every other, so the coupled reduced matrix is dense (K N x K N): refused for 16
    experts or more. "dual_blocks": each expert's rows in their own dual norm, block diagonal over
    the experts (the coupled problem stays block sparse, any K); the default (None), chosen by the
    demos' numbers (``benchmarks/studies/mode_norm_study.py``): better than the Euclidean norm on
    the plate and the channel (0.10 against 0.27, 0.18 against 0.30), equal on diffusion-sorption,
    where "dual" once jumped to a 10x worse basis during training (the paper's ridge on a block
    turned rank deficient, since replaced by a 1e-10 one: 0.012 there now). Independent experts
    weigh their own rows, so both are the same for them.

    ``training_rtol``: as :class:`fem_moe.HardConstraint`'s (the coupled SNES's, or each
    independent expert's). ``warm_start``: as :class:`fem_moe.HardConstraint`'s; a warm-started
    sample skips the first stage (``local_first``) and starts the coupled solve (or each
    independent expert) from its last coefficients; a warm-started coupled Galerkin mixture
    also keeps each sample's expert Jacobians at its last solution and residual rows at the
    lifting (``layer.jacobians``, up to ``warm_start_memory`` bytes per rank, as
    :class:`fem_moe.HardConstraint`'s).

    ``coupled=False``: the paper's independent experts. Each solves its own coefficients from
    the residual rows of the dofs it owns, evaluated on its own field, with no interface
    condition; its backward is its own IFT solve.

    Collectives: construction, forward and backward are collective over the mesh communicator.
    A diverging solve raises SolverDivergedError on every rank, naming the expert (or the
    coupled solve), the sample and PETSc's reason; any other exception inside a forward or
    backward reaches every rank too.

    ``layer.diagnostics``: per expert on this rank, a dict (expert, rank, cells, dofs, owned_dofs,
    samples: list of SampleInfo of its own solves, solve_time, backward_time);
    ``layer.all_diagnostics()`` gathers them from every rank (collective), with ``.coupling``:
    the coupled solve's SampleInfo per sample.

    ``partition``: how the subdomains are made. "canonical" (:class:`fem_moe.partition.Partition`):
    every rank gathers the mesh and numbers it by coordinates, so a given K gives the same
    subdomains, outputs and gradients on any number of ranks (reproducibility studies, tests);
    O(cells) memory and time per rank. "distributed"
    (:class:`fem_moe.distributed.DistributedPartition`): built from each rank's cells and its
    neighbours' (PETSc's parallel partitioner on the distributed dual graph), O(cells / ranks +
    halo) per rank; the subdomains depend on the number of ranks. Default (None): canonical up
    to :data:`CANONICAL_MAX_CELLS` cells (250,000 triangles: ~35 MB more per rank than the
    distributed setup on 2 ranks, benchmarks/scale.py), distributed
    past that.

    ``partitioner_type``: PETSc's MatPartitioning type for the subdomains (default "ptscotch");
    "strips": K slabs of equal cell counts across the first coordinate (on a space-time mesh,
    experts that each span the whole time window); or "random": cells dealt to the experts at
    random (a control experiment: the same sizes, no spatial locality; each dof then belongs to
    the expert of its first cell).

    The residual callable is called on each expert's submesh. It may use the whole mesh's
    ``SpatialCoordinate``, Constants and fixed Functions (continuous Lagrange or DG0: copied onto
    each submesh at construction; later changes to them are not seen), as Firedrake users write
    forms.
    """

    def __init__(self, problem, n_basis, n_experts=None, mode="lstsq", on_rank_deficient="ridge",
                 ridge=None, partitioner_type=None, ridge_always=False, coupled=True,
                 local_first=False, coupling_parameters=None, norm=None,
                 warm_start=False, training_rtol=None, partition=None, warm_start_memory=None):
        super().__init__()
        self.training_rtol = check_rtol(training_rtol)
        self.coupled, self.local_first = bool(coupled), bool(local_first)
        comm = problem.comm
        self.warm_starts = WarmStarts(comm, warm_start and bool(problem.data_spaces))
        # Kept for the coupled solve (HardConstraint's warm_start_memory).
        self.jacobians = sample_jacobians(problem, mode, warm_start and self.coupled,
                                          warm_start_memory)
        K = comm.size if n_experts is None else int(n_experts)
        self.problem, self.n_basis, self.mode, self.n_experts = problem, int(n_basis), mode, K
        t0 = time.perf_counter()
        self.partition = p = _make_partition(problem.mesh, K, partitioner_type, partition)
        self.layout = p.assign(problem.V)
        self.data_layouts = [p.layout(Vd) for Vd in problem.data_spaces]
        mask, g = dirichlet_dofs(problem)
        self.norm = check_norm(norm, mode, default="dual_blocks")
        whole_mesh_norm = self.coupled and self.norm == "dual"
        if whole_mesh_norm and K >= 16:
            raise InputError(f"norm='dual' couples every expert's rows with every other's: a dense "
                             f"{K * n_basis} x {K * n_basis} reduced matrix, refused for K >= 16 "
                             f"(here K = {K}); norm='dual_blocks' keeps the coupled problem block "
                             "sparse (each expert's rows in their own dual norm)")
        # Each expert's own solves (the independent mixture, the first stage) weigh its rows
        # in their own dual norm where the whole mesh's is asked for.
        kwargs = dict(n_basis=n_basis, n_experts=K, mode=mode, on_rank_deficient=on_rank_deficient,
                      ridge=ridge, ridge_always=ridge_always,
                      norm="dual_blocks" if self.norm == "dual" else self.norm)
        self.experts, err = {}, None
        try:
            for k in p.my_experts:
                self.experts[k] = _ExpertSpace(k, p, self.layout, self.data_layouts, problem)
        except Exception as e:     # noqa: BLE001 -- reaches every rank
            err = e
        raise_on_all_ranks(comm, err)
        self.plan = ExchangePlan(self.layout, {k: e.ids for k, e in self.experts.items()})
        self.data_plans = [ExchangePlan(dl, {k: e.data_ids[j] for k, e in self.experts.items()})
                           for j, dl in enumerate(self.data_layouts)]
        # Each expert's dofs learn their owner expert, Dirichlet flag and lifting from their
        # owning ranks.
        dofs = self.plan.scatter(np.column_stack([p.dof_expert, mask, g]).astype(np.float64))
        for k, e in self.experts.items():
            e.set_dofs(dofs[k])
        functions = {k: {} for k in self.experts}
        whole = (fd.Function(problem.V), fd.TestFunction(problem.V),
                 tuple(fd.Function(Vd) for Vd in problem.data_spaces))
        for f in _whole_mesh_functions(problem, whole):
            for k, copy in self._copies(f).items():
                functions[k][f] = copy
        try:
            for k, e in self.experts.items():
                e.build(problem, whole, functions[k], kwargs)
        except Exception as e:     # noqa: BLE001
            err = e
        raise_on_all_ranks(comm, err)
        self.coupling = None
        if self.coupled:
            rows = {k: CoupledRows(e) for k, e in self.experts.items()}
            weight = None
            if whole_mesh_norm:
                weight = WholeMesh(self.plan, problem.V, ~mask,
                                   {k: r.expert.row_mask for k, r in rows.items()}, "moe_")
            self.coupling = CoupledSolver(
                comm, rows, p.expert_rank, n_basis, mode, solver_parameters=coupling_parameters,
                ridge_always=ridge_always, ridge_factor=ridge, norm=weight,
                on_rank_deficient=on_rank_deficient)
        self.setup_time = time.perf_counter() - t0
        self.diagnostics = Diagnostics()
        self.coupling_diagnostics = []

    def _copies(self, f):
        """{k: f's copy on expert k's submesh} for a Function ``f`` on the whole mesh (its values
        copied now). Collective."""
        V = f.function_space()
        try:
            layout = self.partition.layout(V)
        except InputError as exc:
            raise InputError(f"the residual uses the Function {f.name()!r} on the whole mesh, in "
                             f"{V.ufl_element()}, which cannot be copied onto the experts' "
                             f"submeshes ({exc}); make it a data space of the problem, or use "
                             "a continuous Lagrange or DG0 space") from exc
        spaces = {k: fd.FunctionSpace(e.mesh, V.ufl_element()) for k, e in self.experts.items()}
        plan = ExchangePlan(layout, {k: layout.space_ids(Vk, k) for k, Vk in spaces.items()})
        values = plan.scatter(owned_values(f)[:, None])
        copies = {}
        for k, Vk in spaces.items():
            copies[k] = fd.Function(Vk, name=f.name())
            with copies[k].dat.vec_wo as vec:
                vec.array[:] = values[k][:, 0]
        return copies

    # ------------------------------------------------------------------ tensors
    def _scatter_data(self, D):
        """[B, n_data] owned -> {k: [B, n_data_k]} (the expert's data spaces concatenated)."""
        parts = [plan.scatter(Dj.copy())
                 for plan, Dj in zip(self.data_plans, self.problem.split_data(D.T))]
        return {k: (np.concatenate([part[k] for part in parts]).T if parts
                    else np.zeros((D.shape[0], 0))) for k in self.experts}

    def _gather_data(self, grads, B):
        """{k: [B, n_data_k]} (summed where experts overlap) -> [B, n_data] owned."""
        split = {k: e.expert.problem.split_data(grads[k].T) for k, e in self.experts.items()}
        out = [plan.gather_sum({k: parts[j] for k, parts in split.items()}, B).T
               for j, plan in enumerate(self.data_plans)]
        return np.concatenate(out, axis=1) if out else np.zeros((B, 0))

    def interface_mask(self):
        """This rank's owned dofs whose residual row mixes two experts' fields, bool [n_dofs].
        Elsewhere the stitched output's residual equals its owner expert's; the residual at
        these rows is what the mixture gives up (measure it with fem_moe.residual_rows)."""
        return self.partition.interface.copy()

    def dof_experts(self):
        """The expert owning each of this rank's owned dofs, int [n_dofs]."""
        return self.partition.dof_expert.copy()

    recording, rtol_now = HardConstraint.recording, HardConstraint.rtol_now

    def forward(self, basis, data=None):
        data = check_inputs(self.problem, "basis", basis,
                            (None, self.n_basis, self.problem.n_dofs), data)
        # autograd.Function.forward runs without grad mode
        self._rtol, self._recording = self.rtol_now, self.recording
        self._precision = delivered_precision(basis)
        return _MoESolve.apply(self, basis, data)

    def all_diagnostics(self):
        """Every expert's diagnostics, gathered on every rank (collective), sorted by expert;
        ``.coupling``: the coupled solve's SampleInfo per sample (iterations, reason, the global
        residual before and after coupling, its time and the coupling's own share of it,
        ``coupling_time``), the same on every rank."""
        out = [d for part in self.problem.comm.allgather(list(self.diagnostics)) for d in part]
        out = Diagnostics(sorted(out, key=lambda d: d["expert"]))
        out.coupling = list(self.coupling_diagnostics)
        return out

    def extra_repr(self):
        return (f"{self.problem}, n_basis={self.n_basis}, n_experts={self.n_experts}, "
                f"mode={self.mode!r}, coupled={self.coupled}")


class Diagnostics(list):
    """Per expert, a dict (see MoEHardConstraint); ``coupling``: per sample of the last forward,
    the coupled solve's SampleInfo (iterations, global residual before/after coupling, time), or
    an empty list for independent experts."""
    coupling = ()


class _MoESolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, basis, data):
        B, N, n = basis.shape
        Phi = layer.plan.scatter(_to_numpy(basis).transpose(2, 0, 1).reshape(n, B * N))
        D = layer._scatter_data(_to_numpy(data))
        Pk = {k: Phi[k].reshape(-1, B, N).transpose(1, 2, 0) for k in layer.experts}   # [B, N, n_k]
        Dk = {k: D[k] if D[k].shape[1] > 0 else None for k in layer.experts}
        solve = _solve_coupled if layer.coupled else _solve_independent
        starts = layer.warm_starts.lookup(_to_numpy(data))
        outputs, ws, diagnostics, coupling = solve(layer, Pk, Dk, B, starts)
        layer.diagnostics, layer.coupling_diagnostics = diagnostics, coupling
        outputs = {k: np.where(layer.experts[k].rows[:, None], outputs[k], 0.0) for k in outputs}
        # Keys of the samples whose Jacobians the backward keeps (a training forward's).
        ctx.layer, ctx.saved = layer, (Pk, Dk, ws)
        ctx.keys = starts[0] if layer._recording else None
        ctx.shape = (B, N, n)
        ctx.save_for_backward(basis)
        out = _like(layer.plan.gather_sum(outputs, B).T, basis)
        collect_garbage(layer.problem.comm)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, u_bar):
        layer, (B, N, n) = ctx.layer, ctx.shape
        Pk, Dk, ws = ctx.saved
        Ub = layer.plan.scatter(_to_numpy(u_bar).T.copy())
        # Only the owned rows reach the output.
        Ub = {k: np.where(e.rows[:, None], Ub[k], 0.0) for k, e in layer.experts.items()}
        vjp = _vjp_coupled if layer.coupled else _vjp_independent
        want_data = wants_gradient(ctx, 2, layer.problem.comm)
        g_Phi, g_D = vjp(layer, Pk, Dk, ws, Ub, B, want_data, ctx.keys)
        g_Phi = {k: np.stack(g_Phi[k]).transpose(2, 0, 1).reshape(-1, B * N) for k in g_Phi}
        gb = layer.plan.gather_sum(g_Phi, B * N).reshape(n, B, N).transpose(1, 2, 0)
        basis, = ctx.saved_tensors
        gd = None
        if want_data:
            g_D = {k: np.stack(g_D[k]) if Dk[k] is not None else np.zeros((B, 0)) for k in g_D}
            gd = _like(layer._gather_data(g_D, B), basis)
        collect_garbage(layer.problem.comm)
        return None, _like(gb, basis), gd


def _expert_record(layer, k, samples, solve_time):
    e = layer.experts[k]
    return dict(expert=k, rank=layer.problem.comm.rank, cells=e.n_cells, dofs=len(e.ids),
                owned_dofs=int(e.rows.sum()), samples=samples, solve_time=solve_time,
                backward_time=0.0)


def _solve_independent(layer, Pk, Dk, B, starts):
    """Each expert solves its own rows on its own field; no communication. A warm start's entry
    holds each of this rank's experts' w."""
    outputs, ws, diagnostics, err = {}, {}, [], None
    keys, hits = starts
    stored = [layer.warm_starts[keys[b]] if hits[b] else {} for b in range(B)]

    def solve(k, b, u0):
        data = None if Dk[k] is None else Dk[k][b]
        return layer.experts[k].expert.solve(Pk[k][b], data, u0=u0, sample=b, rtol=layer._rtol,
                                             precision=layer._precision)

    try:
        for k in layer.experts:
            t0 = time.perf_counter()
            sols = []
            for b in range(B):
                w, u, info = solve_from(functools.partial(solve, k, b), stored[b].get(k))
                stored[b][k] = u
                sols.append((w, u, info))
            outputs[k] = np.stack([u for _, u, _ in sols], axis=1)
            ws[k] = [(w, i.ridge) for w, _, i in sols]
            diagnostics.append(_expert_record(layer, k, [i for *_, i in sols],
                                              time.perf_counter() - t0))
    except Exception as exc:     # noqa: BLE001 -- any error reaches every rank
        err = exc
    raise_on_all_ranks(layer.problem.comm, err)
    for b in range(B):
        layer.warm_starts[keys[b]] = stored[b]
    return outputs, ws, Diagnostics(diagnostics), []


def _coupled_solve(layer, key, b, w0, start):
    """Sample ``b``'s coupled solve (prepared), from ``start`` (a warm start: each expert's
    field, fitted by the current basis) or else from ``w0``."""
    solver, stored = layer.coupling, layer.jacobians
    return solver.solve(w0 if start is None else solver.fit(start), sample=b, rtol=layer._rtol,
                        warm=start is not None, precision=layer._precision,
                        jacobians={k: stored.jacobian(key, k) for k in layer.experts},
                        lifting_residuals={k: stored.lifting_residual(key, k)
                                           for k in layer.experts})


def _solve_coupled(layer, Pk, Dk, B, starts):
    """Per sample: the experts' own solves (the first stage: the initial guess; an expert whose
    own problem has no solution, e.g. free directions in Galerkin mode, starts from 0), then the
    coupled solve over every expert's coefficients."""
    comm, N = layer.problem.comm, layer.n_basis
    outputs = {k: np.zeros((len(e.ids), B)) for k, e in layer.experts.items()}
    ws = {k: [] for k in layer.experts}
    samples = {k: [] for k in layer.experts}
    times = {k: 0.0 for k in layer.experts}
    coupling = []
    keys, hits = starts
    for b in range(B):
        w0 = {k: np.zeros(N) for k in layer.experts}
        warm = layer.warm_starts[keys[b]] if hits[b] else None
        if layer.local_first and warm is None:
            err = None
            try:
                for k, e in layer.experts.items():
                    t0 = time.perf_counter()
                    d = None if Dk[k] is None else Dk[k][b]
                    try:
                        w0[k], _, info = e.expert.solve(Pk[k][b], d, sample=b, rtol=layer._rtol,
                                                        precision=layer._precision)
                    except SolverDivergedError as exc:
                        info = SampleInfo(reason=exc.reason, failed=str(exc))
                    samples[k].append(info)
                    times[k] += time.perf_counter() - t0
            except Exception as exc:     # noqa: BLE001
                err = exc
            raise_on_all_ranks(comm, err)
        solver = layer.coupling
        solver.prepare({k: Pk[k][b] for k in layer.experts},
                       {k: None if Dk[k] is None else Dk[k][b] for k in layer.experts}, sample=b)
        stored = layer.jacobians
        result, info = solve_from(functools.partial(_coupled_solve, layer, keys[b], b, w0), warm)
        layer.warm_starts[keys[b]] = {k: u for k, (_, u) in result.items()}
        if layer._recording:
            stored.keep_lifting_residuals(keys[b], solver.lifting_residuals or {})
        coupling.append(info)
        blocks = solver.blocks()
        for k, (w, u) in result.items():
            outputs[k][:, b] = u
            # The blocks, for the backward's prepare; the residual rows at the solution.
            ws[k].append((w, 0.0, blocks[k], solver.solution_residuals[k]))
    diagnostics = Diagnostics(_expert_record(layer, k, samples[k], times[k]) for k in layer.experts)
    return outputs, ws, diagnostics, coupling


def _vjp_independent(layer, Pk, Dk, ws, Ub, B, data_gradient=True, keys=None):
    g_Phi, g_D, err = {}, {}, None
    by_expert = {d["expert"]: d for d in layer.diagnostics}
    try:
        for k, e in layer.experts.items():
            t0 = time.perf_counter()
            grads = [e.expert.vjp(Pk[k][b], None if Dk[k] is None else Dk[k][b], ws[k][b][0],
                                  Ub[k][:, b], rho=ws[k][b][1], sample=b,
                                  data_gradient=data_gradient) for b in range(B)]
            g_Phi[k], g_D[k] = [g for g, _ in grads], [g for _, g in grads]
            if k in by_expert:
                by_expert[k]["backward_time"] = time.perf_counter() - t0
    except Exception as exc:     # noqa: BLE001 -- a failing backward on one rank reaches all
        err = exc
    raise_on_all_ranks(layer.problem.comm, err)
    return g_Phi, g_D


def _vjp_coupled(layer, Pk, Dk, ws, Ub, B, data_gradient=True, keys=None):
    g_Phi = {k: [] for k in layer.experts}
    g_D = {k: [] for k in layer.experts}
    solver = layer.coupling
    t0 = time.perf_counter()
    for b in range(B):
        solver.prepare({k: Pk[k][b] for k in layer.experts},
                       {k: None if Dk[k] is None else Dk[k][b] for k in layer.experts},
                       sample=b, report=False, blocks={k: ws[k][b][2] for k in layer.experts})
        gp, gd = solver.vjp({k: ws[k][b][0] for k in layer.experts},
                            {k: Ub[k][:, b] for k in layer.experts}, sample=b,
                            data_gradient=data_gradient,
                            residuals={k: ws[k][b][3] for k in layer.experts})
        # The Jacobians at the sample's solution: its next visit's first chord matrices.
        if keys is not None:
            layer.jacobians.keep_jacobians(keys[b], solver.jacobians())
        for k in layer.experts:
            g_Phi[k].append(gp[k]), g_D[k].append(gd[k])
    for d in layer.diagnostics:
        d["backward_time"] = time.perf_counter() - t0
    return g_Phi, g_D
