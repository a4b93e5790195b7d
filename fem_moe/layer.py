"""Hard-constraint layers as torch modules, and the soft-constraint residual loss."""
import functools

import numpy as np
import torch
from mpi4py import MPI
from torch.autograd.function import once_differentiable

from .errors import InputError, raise_on_all_ranks
from .expert import Expert, ResidualNorm
from .points import FieldPoint, field_points
from .lifetime import collect_garbage
from .problem import as_array
from .warmstart import SampleJacobians, WarmStarts, solve_from

__all__ = ["HardConstraint", "residual_loss", "residual_rows"]


def check_tensor(comm, name, x, shape, dtype=None, device=None):
    """Collective: every rank raises InputError if, on any rank, ``x`` is not a floating tensor
    of ``shape`` (None entries must merely agree across ranks), of ``dtype``/``device`` if given,
    with finite values."""
    err = None
    if not isinstance(x, torch.Tensor):
        err = f"{name} must be a torch.Tensor, got {type(x).__name__}"
    elif x.dtype not in (torch.float32, torch.float64):
        err = f"{name} must be float32 or float64, got {x.dtype}"
    elif dtype is not None and x.dtype != dtype:
        err = f"{name} has dtype {x.dtype} but the basis has {dtype}"
    elif device is not None and x.device != device:
        err = f"{name} is on {x.device} but the basis is on {device}"
    elif x.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        err = f"{name} has shape {list(x.shape)}, expected {want}"
    elif not torch.isfinite(x.detach().sum()):
        # A finite sum has finite terms (an inf or nan term makes it inf or nan); a sum that
        # overflowed is looked at element by element. One pass instead of two over the basis.
        bad = ~torch.isfinite(x.detach())
        if bad.any():
            idx = bad.nonzero()[0].tolist()
            err = f"{name} has {int(bad.sum())} non-finite values (first at index {idx})"
    raise_on_all_ranks(comm, err)
    # Free dimensions (the batch) must agree across ranks, or the collectives would mismatch.
    free = tuple(int(x.shape[i]) for i, s in enumerate(shape) if s is None)
    sizes = comm.allgather(free)
    if len(set(sizes)) > 1:
        raise_on_all_ranks(comm, f"{name}: batch sizes differ across ranks: {sizes}")


def check_rtol(rtol):
    """A relative tolerance in (0, 1), or None."""
    if rtol is not None and not 0 < float(rtol) < 1:
        raise InputError(f"training_rtol must be in (0, 1) or None, got {rtol!r}")
    return None if rtol is None else float(rtol)


_to_numpy = as_array    # a tensor on any device, as float64 numpy


def wants_gradient(ctx, index, comm):
    """Whether the autograd Function's input ``index`` needs a gradient on any rank of
    ``comm`` (collective): a backward skips the assemblies of a gradient nothing asks for (the
    problem data's, in training), and every rank must take the same branch."""
    return bool(comm.allreduce(bool(ctx.needs_input_grad[index]), op=MPI.LOR))


def _like(a, x):
    """A numpy array (any strides: a transposed view too) as a contiguous tensor with the dtype
    and device of ``x``, in one copy (a contiguous copy first and a cast after cost two passes
    over arrays of batch x N x dofs)."""
    a = np.asarray(a)
    if any(st < 0 for st in a.strides):
        a = np.ascontiguousarray(a)
    out = torch.empty(a.shape, dtype=x.dtype, device=x.device)
    out.copy_(torch.from_numpy(a))
    return out


def delivered_precision(basis):
    """The relative precision of an output in ``basis``'s dtype where it is coarser than the
    float64 solves' (float32: its epsilon), else None: the solves stop where their next step
    would change the output by less (:class:`fem_moe.expert.PrecisionStop`)."""
    return None if basis.dtype == torch.float64 else torch.finfo(basis.dtype).eps


def sample_jacobians(problem, mode, warm_start, memory):
    """A layer's :class:`SampleJacobians`: kept only by a warm-started Galerkin layer on a problem
    with data (samples are known by their data); ``memory`` bytes per rank (None: the default)."""
    try:
        ok = memory is None or (np.isfinite(float(memory)) and float(memory) >= 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"warm_start_memory must be a number of bytes >= 0, got {memory!r}")
    keep = warm_start and bool(problem.data_spaces) and mode == "galerkin"
    return SampleJacobians(problem.comm, memory if keep else 0)


def check_inputs(problem, name, x, shape, data):
    """Collective check of a tensor ``x`` named ``name`` (``shape`` as in check_tensor, batch
    first) and of the problem data going with it; returns ``data``, or an empty [batch, 0]
    tensor for a problem without data spaces."""
    comm = problem.comm
    check_tensor(comm, name, x, shape)
    if problem.data_spaces:
        if data is None:
            raise_on_all_ranks(comm, "the problem has data spaces, so data is required")
        check_tensor(comm, "data", data, (x.shape[0], problem.n_data_dofs), x.dtype, x.device)
        return data
    if data is not None:
        raise_on_all_ranks(comm, "data given, but the problem has no data_spaces")
    return x.new_zeros((x.shape[0], 0))


class _ConstrainedSolve(torch.autograd.Function):
    """u = g + Phi^T w(Phi, m) per sample; backward by the implicit function theorem."""

    @staticmethod
    def forward(ctx, layer, basis, data):
        Phi, D = _to_numpy(basis), _to_numpy(data)
        has_data = D.shape[1] > 0
        ws, rhos, us, infos, residuals, err = [], [], [], [], [], None
        expert, stored = layer.expert, layer.jacobians
        keys = [None] * Phi.shape[0]
        precision = delivered_precision(basis)

        def solve(b, u0):
            return expert.solve(Phi[b], D[b] if has_data else None, u0=u0, sample=b,
                                rtol=layer._rtol, jacobian=stored.jacobian(keys[b]),
                                lifting_residual=stored.lifting_residual(keys[b]),
                                precision=precision)

        try:
            keys, hits = layer.warm_starts.lookup(D)
            for b in range(Phi.shape[0]):
                w, u, info = solve_from(functools.partial(solve, b),
                                        layer.warm_starts[keys[b]] if hits[b] else None)
                layer.warm_starts[keys[b]] = u
                if layer._recording:
                    stored.keep_lifting_residuals(keys[b], {None: expert.lifting_residual})
                ws.append(w), rhos.append(info.ridge), us.append(u), infos.append(info)
                residuals.append(expert.solution_residual)
        except Exception as exc:     # noqa: BLE001 -- reaches every rank
            err = exc
        raise_on_all_ranks(layer.problem.comm, err)
        collect_garbage(layer.problem.comm)
        layer.diagnostics = infos
        ctx.layer, ctx.ws, ctx.rhos, ctx.keys, ctx.residuals = layer, ws, rhos, keys, residuals
        ctx.recording = layer._recording
        ctx.save_for_backward(basis, data)
        ctx.Phi = Phi       # float64 already: the backward need not convert the basis again
        U = np.stack(us)
        out = _like(U, basis)
        # A training forward's fields, where the physics loss and this backward share one
        # Jacobian (fem_moe.points): the fields as delivered (float32: rounded), with the solve's
        # residual where they are its solutions bit for bit, else to carry to the rounded field.
        ctx.points = None
        if ctx.recording:
            exact = basis.dtype == torch.float64
            delivered = U if exact else _to_numpy(out)
            ctx.points = [FieldPoint(expert, delivered[b], D[b] if has_data else None,
                                     residual=residuals[b] if exact else None,
                                     near=None if exact else (U[b], residuals[b]))
                          for b in range(len(us))]
            for point in ctx.points:
                field_points(layer.problem).add(point)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, u_bar):
        basis, data = ctx.saved_tensors
        Phi, D, Ub = ctx.Phi, _to_numpy(data), _to_numpy(u_bar)
        comm = ctx.layer.problem.comm
        has_data = D.shape[1] > 0
        want_data = has_data and wants_gradient(ctx, 2, comm)
        gPhi, gD = np.empty_like(Phi), np.zeros_like(D)     # every sample's gPhi is written
        expert = ctx.layer.expert
        for b in range(Phi.shape[0]):
            err = None
            point = ctx.points[b] if ctx.points else None
            try:
                J = None if point is None else point.jacobian()
                gPhi[b], gd = expert.vjp(Phi[b], D[b] if has_data else None, ctx.ws[b], Ub[b],
                                         rho=ctx.rhos[b], sample=b, data_gradient=want_data,
                                         residual=ctx.residuals[b], jacobian=J)
                if want_data:
                    gD[b] = gd
            except Exception as exc:     # noqa: BLE001 -- reaches every rank
                err = exc
            raise_on_all_ranks(comm, err)
            # The Jacobian at the sample's solution (a training forward's point's): its next
            # visit's first chord matrix.
            if point is not None:
                ctx.layer.jacobians.keep_jacobians(ctx.keys[b], {None: J})
                point.release()
        collect_garbage(comm)
        return None, _like(gPhi, basis), _like(gD, data) if want_data or not has_data else None


class HardConstraint(torch.nn.Module):
    """The PI-HC layer: constrain N basis fields to the PDE of ``problem`` (one expert, K = 1).

    ``u = layer(basis, data=None)``

    * ``basis``: ``[batch, n_basis, n_dofs]``, float32 or float64, CPU or CUDA; ``n_dofs`` is
      ``problem.n_dofs``, this rank's owned dofs of V in Firedrake's order (see
      ``problem.dof_coordinates()``).
    * ``data``: ``[batch, problem.n_data_dofs]`` (the data spaces' owned dofs concatenated), same
      dtype and device as ``basis``; required iff the problem has data spaces.
    * returns ``u``: ``[batch, n_dofs]`` = g + sum_i w_i basis_i, with w solved per sample by
      PETSc SNES (options prefix ``problem.options_prefix``) so that the residual vanishes in the
      least-squares (``mode="lstsq"``) or Galerkin (``"galerkin"``) sense. Same dtype and device
      as ``basis``. Computation is in float64 on the CPU; for a float32 output the solves stop
      where their next step would change the field by less than float32's epsilon (relative,
      :class:`fem_moe.expert.PrecisionStop`): the output is the fully converged one to float32's
      precision, in fewer iterations.

    ``norm`` (least squares): the residual's norm, "euclidean" (its dof vector, the paper's),
    "lumped" (rows weighted by the inverse diagonal of the mass matrix: the L2 norm of the strong
    residual, mesh-grading independent) or "dual" (the dual norm of H1: errors weighed as Galerkin
    weighs them, one Riesz solve per vector, options prefix ``<problem prefix>riesz_``); see
    :mod:`fem_moe.norms`. The default (None) is "dual": on the demos' three problems it gave
    Galerkin's accuracy or better (plate 0.103 against the Euclidean norm's 0.42;
    ``benchmarks/studies/mode_norm_study.py``), at about the same cost per step there; at 1e5 dofs a
    step costs 2.8x the Euclidean norm's (an N-column Riesz solve per Gauss-Newton matrix), where
    Galerkin mode is both fast and accurate.

    ``warm_start``: start each sample's solve from that sample's last solution, fitted by
    the current basis (a sample is known by its data; see :mod:`fem_moe.warmstart`), for
    training on a fixed dataset, which revisits its samples with a slightly changed basis; a
    warm solve stops where a cold one would. Off by default, so that a layer's output is a
    function of its inputs alone; the trainer turns it on (``model.warm_start``): measured on
    diffusion-sorption, the coupled mixture then trains to a 3x smaller error
    (``benchmarks/studies/training_options.py``).
    ``layer.warm_starts.clear()`` forgets the stored starts. In Galerkin mode a warm-started
    layer also keeps each sample's Jacobian at its last solution and its residual at the
    lifting (:class:`fem_moe.warmstart.SampleJacobians`, ``layer.jacobians``), up to
    ``warm_start_memory`` bytes per rank (default
    :data:`fem_moe.warmstart.JACOBIAN_MEMORY`; 0: none): a revisit's solve then assembles no
    Jacobian of its own where the stored one contracts (SampleInfo.jacobians).

    ``training_rtol``: the reduced SNES's relative tolerance in a training forward (the module
    in training mode, autograd recording); other forwards keep the solver options' (1e-12 by
    default). The gradient is then the implicit-function gradient at a point where
    ‖G‖ <= training_rtol ‖G(0)‖ (at the cold start, also for a warm-started solve) instead
    of 0: fewer iterations, a less accurate gradient
    (``benchmarks/studies/training_options.py`` measures what that does to training). Default None.

    Gradients w.r.t. ``basis`` and ``data`` are exact implicit-function-theorem gradients: one
    N x N linear solve per sample, no unrolled iterations. ``layer.diagnostics`` holds a
    :class:`fem_moe.expert.SampleInfo` per sample of the last forward.

    On a distributed mesh every rank of the mesh communicator must call forward (and backward)
    with the same batch size; each passes and receives its owned dofs.
    """

    def __init__(self, problem, n_basis, mode="lstsq", on_rank_deficient="ridge", ridge=None,
                 ridge_always=False, norm=None, warm_start=False, training_rtol=None,
                 warm_start_memory=None):
        super().__init__()
        self.problem, self.n_basis, self.mode = problem, int(n_basis), mode
        self.training_rtol = check_rtol(training_rtol)
        self.warm_starts = WarmStarts(problem.comm, warm_start and bool(problem.data_spaces))
        self.jacobians = sample_jacobians(problem, mode, warm_start, warm_start_memory)
        self.expert = Expert(problem, n_basis, mode=mode, on_rank_deficient=on_rank_deficient,
                             ridge=ridge, ridge_always=ridge_always, norm=norm)
        self.norm = self.expert.norm
        self.diagnostics = []

    @property
    def recording(self):
        """Whether the current forward is a training one (training mode, autograd recording):
        it has the training tolerance, and keeps what the samples' next solves take
        (``jacobians``); other forwards (evaluation, validation) use what is kept."""
        return self.training and torch.is_grad_enabled()

    @property
    def rtol_now(self):
        """The reduced solves' relative tolerance in the current forward (None: the options')."""
        return self.training_rtol if self.recording else None

    def forward(self, basis, data=None):
        data = check_inputs(self.problem, "basis", basis,
                            (None, self.n_basis, self.problem.n_dofs), data)
        # autograd.Function.forward runs without grad mode
        self._rtol, self._recording = self.rtol_now, self.recording
        return _ConstrainedSolve.apply(self, basis, data)

    def extra_repr(self):
        return f"{self.problem}, n_basis={self.n_basis}, mode={self.mode!r}, norm={self.norm!r}"


class _ResidualNorm2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, norm, u, data):
        U, D = _to_numpy(u), _to_numpy(data)
        D = D if D.shape[1] else None
        ctx.norm = norm
        ctx.save_for_backward(u, data)
        # A field a PI-HC layer delivered in training brings its residual, and its Jacobian for
        # the backward (fem_moe.points).
        ctx.points = field_points(norm.problem).find(U, D)
        # Each sample's rows (r, W r, Dirichlet misfit) are kept for the backward, which would
        # otherwise assemble and weigh them again at the same u.
        evaluated = [norm.evaluate(U[b], None if D is None else D[b],
                                   residual=None if p is None else p.residual())
                     for b, p in enumerate(ctx.points)]
        ctx.rows = [rows for _, rows in evaluated]
        collect_garbage(norm.problem.comm)
        return _like(np.array([value for value, _ in evaluated]), u)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        u, data = ctx.saved_tensors
        U, D, G = _to_numpy(u), _to_numpy(data), _to_numpy(g)
        comm = ctx.norm.problem.comm
        has_data = D.shape[1] > 0
        want_data = has_data and wants_gradient(ctx, 2, comm)
        gu, gd = np.empty_like(U), np.zeros_like(D)         # every sample's gu is written
        for b, point in enumerate(ctx.points):
            du, dd = ctx.norm.gradient(U[b], D[b] if has_data else None, rows=ctx.rows[b],
                                       data_gradient=want_data,
                                       jacobian=None if point is None else point.jacobian())
            gu[b] = G[b] * du
            if want_data:
                gd[b] = G[b] * dd
        collect_garbage(comm)
        return None, _like(gu, u), _like(gd, data) if want_data or not has_data else None


def residual_rows(problem, u, data=None):
    """The assembled residual of fields ``u`` [batch, n_dofs] (this rank's owned rows; Dirichlet
    rows zero), as a numpy array [batch, n_dofs], for diagnostics (no gradient). Collective."""
    norm = _residual_norm(problem)
    data = check_inputs(problem, "u", u, (None, problem.n_dofs), data)
    U, D = _to_numpy(u), _to_numpy(data)
    return np.stack([norm._residual_at(U[b], D[b] if D.shape[1] else None)[0]
                     for b in range(U.shape[0])])


def _residual_norm(problem, norm="l2"):
    """The problem's ResidualNorm of this kind, built once (collective on first use)."""
    cache = problem.__dict__.setdefault("_residual_norms", {})
    if norm not in cache:
        cache[norm] = ResidualNorm(problem, norm)
    return cache[norm]


def residual_loss(problem, u, data=None, reduction="mean", norm="l2"):
    """The soft-constraint (and physics-informed) loss: ‖P R(u; m)‖^2 + ‖B(u - g)‖^2 per
    sample, the squared norm of the assembled residual on non-Dirichlet rows plus the Dirichlet
    misfit. ``norm``: "l2" (= "euclidean", the paper's), "lumped" (rows weighted by the inverse
    mass diagonal) or "dual" (the dual norm of H1, see
    :class:`fem_moe.expert.ResidualNorm`). Differentiable w.r.t. ``u`` [batch, n_dofs] and
    ``data`` [batch, n_data_dofs]. ``reduction``: "mean" | "sum" | "none" (per sample, [batch]).
    Summed over ranks: every rank gets the same value. Collective over ``problem.comm``.

    A field that a :class:`HardConstraint` of the same problem delivered in a training forward
    (the same values and data, bit for bit) brings its residual and sparse Jacobian
    (:mod:`fem_moe.points`): the gradient is then a sparse product with the Jacobian the layer's
    backward takes too, instead of an assembly of its own."""
    if reduction not in ("mean", "sum", "none"):
        raise InputError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    norm = _residual_norm(problem, norm)
    data = check_inputs(problem, "u", u, (None, problem.n_dofs), data)
    vals = _ResidualNorm2.apply(norm, u, data)
    return {"mean": vals.mean, "sum": vals.sum, "none": lambda: vals}[reduction]()
