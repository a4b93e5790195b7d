"""Losses over fields distributed across ranks (each rank holds its owned dofs)."""
import numpy as np
import torch
from mpi4py import MPI

from .layer import residual_loss

__all__ = ["global_sum", "relative_l2", "relative_l2_field", "residual_loss", "lifting_residual"]


class _GlobalSum(torch.autograd.Function):
    """Sum over the ranks. Backward: each rank's part gets the (rank-independent) incoming
    gradient; the parameters' gradients are then summed by the bridge's all-reduce."""

    @staticmethod
    def forward(ctx, x, comm):
        out = comm.allreduce(x.detach().cpu().double().numpy(), op=MPI.SUM)
        return torch.as_tensor(out, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, g):
        return g, None


def global_sum(x, comm):
    """``x`` summed over the ranks of ``comm`` (same shape on every rank), differentiable.
    Collective."""
    return _GlobalSum.apply(x, comm)


def relative_l2(comm, u, target, reduction="mean"):
    """||u - target|| / ||target|| per sample over all ranks' dofs (u, target: ``[batch,
    n_dofs]``, this rank's owned dofs; Euclidean norm of the dof vectors). Differentiable w.r.t.
    ``u``. ``reduction``: "mean" | "none". Collective over ``comm``."""
    err = global_sum(((u - target) ** 2).sum(dim=1), comm)
    ref = global_sum((target.detach() ** 2).sum(dim=1), comm)
    vals = torch.sqrt(err / ref.clamp_min(torch.finfo(ref.dtype).tiny))
    return vals.mean() if reduction == "mean" else vals


def relative_l2_field(problem, u, target):
    """||u - target||_L2 / ||target||_L2 per sample: the L2 norm over the domain of the fields
    in ``problem.V`` (every component of a mixed or vector space) that ``u`` and ``target``
    (``[batch, n_dofs]``, this rank's owned dofs) hold. Where the dof-vector norm of
    :func:`relative_l2` weighs every dof alike, this one weighs each by the measure it spans:
    on a graded or locally refined mesh the small cells' dofs stop dominating. A float64 tensor
    ``[batch]`` on ``u``'s device, no gradient. Collective over ``problem.V``'s communicator."""
    import firedrake as fd
    errors = []
    for a, b in zip(problem.function(u.detach()), problem.function(target.detach())):
        e = fd.Function(problem.V).assign(a - b)
        num, den = (fd.assemble(fd.inner(f, f) * fd.dx) for f in (e, b))
        errors.append(np.sqrt(num / max(den, np.finfo(float).tiny)))
    return torch.as_tensor(errors, dtype=torch.float64, device=u.device)


def lifting_residual(problem, data, norm="l2"):
    """:func:`residual_loss` per sample (``reduction="none"``, no gradient) at the lifting of the
    Dirichlet data, u = g, for data ``[batch, n_data_dofs]``: the scale relative residuals are
    measured against (1 for the trivial prediction). Collective."""
    from .expert import dirichlet_dofs
    _, g = dirichlet_dofs(problem)
    lifting = torch.as_tensor(np.broadcast_to(g, (data.shape[0], len(g))).copy(), dtype=data.dtype,
                              device=data.device)
    with torch.no_grad():
        return residual_loss(problem, lifting, data, reduction="none", norm=norm)
