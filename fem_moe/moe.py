"""The mixture of hard-constraint experts (PI-HC-MoE) on a partitioned Firedrake mesh."""
import time

import numpy as np
import torch
import firedrake as fd

from .errors import FemMoeError, InputError, raise_on_all_ranks
from .expert import Expert, dirichlet_dofs
from .layer import check_inputs, _like, _to_numpy
from .partition import ExchangePlan, Partition, SpaceLayout
from .problem import ConstrainedProblem

__all__ = ["MoEHardConstraint"]


class _ExpertSpace:
    """What one expert holds: its subdomain mesh and spaces, its Expert, its dof maps."""

    def __init__(self, k, cells, partition, layout, data_layouts, problem, owner, bc, g, kwargs):
        self.mesh = partition.submesh(cells, f"expert{k}")
        V = fd.FunctionSpace(self.mesh, problem.V.ufl_element())
        data_spaces = [fd.FunctionSpace(self.mesh, Vd.ufl_element()) for Vd in problem.data_spaces]
        self.ids = layout.space_ids(V)
        self.data_ids = [dl.space_ids(Vd) for dl, Vd in zip(data_layouts, data_spaces)]
        self.rows = owner[self.ids] == k
        sub = ConstrainedProblem(V, problem.residual, data_spaces=data_spaces,
                                 solver_parameters=problem.solver_parameters,
                                 options_prefix="expert_")
        self.expert = Expert(sub, kwargs["n_basis"], mode=kwargs["mode"], row_mask=self.rows,
                             on_rank_deficient=kwargs["on_rank_deficient"], ridge=kwargs["ridge"],
                             ridge_always=kwargs["ridge_always"],
                             expert_id=k, dirichlet=(bc[self.ids], g[self.ids]),
                             options_prefix=f"expert{k}_")
        self.k, self.n_cells = k, len(cells)
        if not self.expert.row_mask.any():
            raise InputError(f"expert {k} owns no residual rows (its {int(self.rows.sum())} dofs "
                             "are all Dirichlet dofs): use fewer experts or a finer mesh")


class MoEHardConstraint(torch.nn.Module):
    """The mixture of hard-constraint experts: ``u = layer(basis, data=None)``, the same call,
    tensors and meaning as :class:`fem_moe.HardConstraint` (this rank's owned dofs).

    The mesh is split into ``n_experts`` = K subdomains (default: one per rank of the mesh
    communicator) by :class:`fem_moe.partition.Partition`: the same subdomains on any number of
    ranks. Each expert lives on one rank (by owned dofs, largest first onto the least loaded rank) and
    solves its *own* coefficients w_k on its subdomain mesh (COMM_SELF), with its own SNES (options
    prefix ``expert<k>_``; options given as ``-expert_...`` apply to every expert), from the
    residual rows of the dofs it owns. Each dof is owned by one expert; the output takes every dof's
    value from its owner (see :mod:`fem_moe.partition` for why this is well defined). K = 1 is the
    global layer. The backward of each expert is its own IFT solve.

    Collectives: construction, forward and backward are collective over the mesh communicator
    (two all-to-all exchanges and one error check each); the expert solves in between are local,
    so no expert waits on another. A diverging expert raises SolverDivergedError on every rank,
    naming the expert, the sample and PETSc's reason.

    ``layer.diagnostics``: per expert on this rank, a dict (expert, rank, cells, dofs, owned_dofs,
    samples: list of SampleInfo, solve_time, backward_time); ``layer.all_diagnostics()`` gathers
    them from every rank (collective).

    ``partitioner_type``: PETSc's MatPartitioning type for the subdomains (default "ptscotch");
    "strips": K slabs of equal cell counts across the first coordinate (on a space-time mesh,
    experts that each span the whole time window); or "random": cells dealt to the experts at
    random (a control experiment: the same sizes, no spatial locality; each dof then belongs to
    the expert of its first cell).

    The residual callable is called on each expert's submesh: it must build its form from its
    arguments only (use ``SpatialCoordinate(u.function_space().mesh())``, not the global mesh's).
    """

    def __init__(self, problem, n_basis, n_experts=None, mode="lstsq", on_rank_deficient="ridge",
                 ridge=1e-4, partitioner_type=None, ridge_always=False):
        super().__init__()
        comm = problem.comm
        K = comm.size if n_experts is None else int(n_experts)
        self.problem, self.n_basis, self.mode, self.n_experts = problem, int(n_basis), mode, K
        t0 = time.perf_counter()
        self.partition = p = Partition(problem.mesh, K, partitioner_type)
        self.layout = SpaceLayout(problem.V, p)
        self.data_layouts = [SpaceLayout(Vd, p) for Vd in problem.data_spaces]
        cell_dofs = self.layout.cell_dofs()
        n_global = self.layout.n_global
        if partitioner_type == "random":
            # Scattered cells: "lowest expert among the dof's cells" would hand nearly every dof
            # to expert 0; take the expert of the dof's first canonical cell instead (balanced).
            first = np.full(n_global, len(cell_dofs), dtype=np.int64)
            np.minimum.at(first, cell_dofs.ravel(), np.repeat(np.arange(len(cell_dofs)), cell_dofs.shape[1]))
            owner = p.cell_expert[first]
        else:
            owner = np.full(n_global, K, dtype=np.int64)
            np.minimum.at(owner, cell_dofs.ravel(), np.repeat(p.cell_expert, cell_dofs.shape[1]))
        self.owner = owner
        p.place(np.bincount(owner, minlength=K))    # balance the ranks by the dofs experts own
        # Rows whose stencil (the dofs of the cells around them) holds dofs of another expert:
        # there the stitched output's residual mixes two experts' fields.
        mixed_cells = (owner[cell_dofs] != owner[cell_dofs][:, :1]).any(axis=1)
        interface = np.zeros(n_global, dtype=bool)
        interface[cell_dofs[mixed_cells].ravel()] = True
        self._interface = interface
        mask, g = dirichlet_dofs(problem)
        bc, gg = np.zeros(n_global, dtype=bool), np.zeros(n_global)
        for ids, m, v in comm.allgather((self.layout.owned_ids, mask, g)):
            bc[ids], gg[ids] = m, v
        kwargs = dict(n_basis=n_basis, mode=mode, on_rank_deficient=on_rank_deficient, ridge=ridge,
                      ridge_always=ridge_always)
        self.experts, err = {}, None
        try:
            for k in p.my_experts:
                cells = np.flatnonzero((owner[cell_dofs] == k).any(axis=1))
                self.experts[k] = _ExpertSpace(k, cells, p, self.layout, self.data_layouts,
                                               problem, owner, bc, gg, kwargs)
        except FemMoeError as e:
            err = e
        raise_on_all_ranks(comm, err)
        needs = {k: (e.ids, e.data_ids) for k, e in self.experts.items()}
        gathered = {}
        for d in comm.allgather(needs):
            gathered.update(d)
        self.plan = ExchangePlan(self.layout, [gathered[k][0] for k in range(K)], p.expert_rank)
        self.data_plans = [ExchangePlan(dl, [gathered[k][1][j] for k in range(K)], p.expert_rank)
                           for j, dl in enumerate(self.data_layouts)]
        self.setup_time = time.perf_counter() - t0
        self.diagnostics = []

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
        return self._interface[self.layout.owned_ids].copy()

    def forward(self, basis, data=None):
        data = check_inputs(self.problem, "basis", basis, (None, self.n_basis, self.problem.n_dofs), data)
        return _MoESolve.apply(self, basis, data)

    def all_diagnostics(self):
        """Every expert's diagnostics, gathered on every rank (collective), sorted by expert."""
        out = [d for part in self.problem.comm.allgather(self.diagnostics) for d in part]
        return sorted(out, key=lambda d: d["expert"])

    def extra_repr(self):
        return (f"{self.problem}, n_basis={self.n_basis}, n_experts={self.n_experts}, "
                f"mode={self.mode!r}")


class _MoESolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, basis, data):
        B, N, n = basis.shape
        comm = layer.problem.comm
        Phi = layer.plan.scatter(_to_numpy(basis).transpose(2, 0, 1).reshape(n, B * N))
        D = layer._scatter_data(_to_numpy(data))
        outputs, saved, diagnostics, err = {}, {}, [], None
        try:
            for k, e in layer.experts.items():
                t0 = time.perf_counter()
                Pk = Phi[k].reshape(-1, B, N).transpose(1, 2, 0)          # [B, N, n_k]
                has_data = D[k].shape[1] > 0
                sols = [e.expert.solve(Pk[b], D[k][b] if has_data else None, sample=b)
                        for b in range(B)]
                outputs[k] = np.where(e.rows[:, None], np.stack([u for _, u, _ in sols], axis=1), 0.0)
                saved[k] = (Pk, D[k], [w for w, _, _ in sols], [i.ridge for _, _, i in sols])
                diagnostics.append(dict(expert=k, rank=comm.rank, cells=e.n_cells, dofs=len(e.ids),
                                        owned_dofs=int(e.rows.sum()), samples=[i for *_, i in sols],
                                        solve_time=time.perf_counter() - t0, backward_time=0.0))
        except FemMoeError as exc:
            err = exc
        raise_on_all_ranks(comm, err)
        layer.diagnostics = diagnostics
        ctx.layer, ctx.saved = layer, saved
        ctx.shape = (B, N, n)
        ctx.save_for_backward(basis)
        return _like(layer.plan.gather_sum(outputs, B).T, basis)

    @staticmethod
    def backward(ctx, u_bar):
        layer, (B, N, n) = ctx.layer, ctx.shape
        Ub = layer.plan.scatter(_to_numpy(u_bar).T.copy())
        g_Phi, g_D = {}, {}
        by_expert = {d["expert"]: d for d in layer.diagnostics}
        for k, e in layer.experts.items():
            t0 = time.perf_counter()
            Pk, Dk, ws, rhos = ctx.saved[k]
            has_data = Dk.shape[1] > 0
            ub = np.where(e.rows[:, None], Ub[k], 0.0)    # only the owned rows reach the output
            grads = [e.expert.vjp(Pk[b], Dk[b] if has_data else None, ws[b], ub[:, b], rho=rhos[b])
                     for b in range(B)]
            g_Phi[k] = np.stack([gp for gp, _ in grads]).transpose(2, 0, 1).reshape(-1, B * N)
            g_D[k] = np.stack([gd for _, gd in grads]) if has_data else np.zeros((B, 0))
            if k in by_expert:
                by_expert[k]["backward_time"] = time.perf_counter() - t0
        gb = layer.plan.gather_sum(g_Phi, B * N).reshape(n, B, N).transpose(1, 2, 0)
        gd = layer._gather_data(g_D, B)
        basis, = ctx.saved_tensors
        return None, _like(gb, basis), _like(gd, basis)
