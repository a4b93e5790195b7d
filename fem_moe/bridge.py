"""The bridge between the torch backbone and the MPI ranks.

Every rank holds a replica of the backbone, on its GPU when torch sees one (local rank -> device),
else on the CPU; each rank evaluates it at its own dofs and feeds its share to the constraint
layer, which moves the shares to the experts and back. The replicas stay identical because they
start identical (:func:`broadcast_parameters`) and take the same steps: after each backward the
gradients are summed over the ranks with torch.distributed (:func:`allreduce_gradients`; gloo on
CPU, NCCL on GPUs), since each rank's backward only saw its own part of the loss.

:class:`BackboneRanks` is the other layout: the backbone on some ranks only (one per GPU), each
serving the other ranks of its node over MPI.

torch and MPI only: this module imports without Firedrake (e.g. on a GPU node benchmarked alone).
"""
import datetime
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI
from torch.autograd.function import once_differentiable

from .collective import InputError, raise_on_all_ranks
from .lifetime import free_at_exit

__all__ = ["init_process_group", "device_for_rank", "broadcast_parameters", "allreduce_gradients",
           "BackboneRanks"]


def device_for_rank(comm=MPI.COMM_WORLD):
    """This rank's torch device: ``cuda:<local rank mod #GPUs>`` when torch sees a GPU, else CPU.
    Collective over ``comm`` (the local rank comes from a shared-memory split)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = local.rank
    local.Free()
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(comm=MPI.COMM_WORLD, backend=None, timeout=120):
    """Start torch.distributed over the ranks of ``comm`` (idempotent). Collective.

    The rendezvous needs no environment variables: rank 0 opens a TCP store on a free port of its
    host (``FEM_MOE_MASTER_ADDR`` overrides the address it announces) and broadcasts it over MPI.
    ``backend``: default "nccl" when torch sees a GPU for each rank of a node, else "gloo" (NCCL
    refuses two ranks on one GPU, the usual layout of FEM jobs; gloo reduces CUDA tensors too).
    """
    if dist.is_available() and dist.is_initialized():
        return
    backend = backend or ("nccl" if _gpu_each(comm, True) else "gloo")
    store = None
    if comm.rank == 0:
        host = os.environ.get("FEM_MOE_MASTER_ADDR") or (
            "127.0.0.1" if comm.size == 1 or _single_host(comm, True) else socket.gethostname())
        store = dist.TCPStore(host, 0, comm.size, True, datetime.timedelta(seconds=timeout),
                              wait_for_workers=False)
        address = (host, store.port)
    else:
        _single_host(comm, False)
        address = None
    host, port = comm.bcast(address, root=0)
    if comm.rank != 0:
        store = dist.TCPStore(host, port, comm.size, False, datetime.timedelta(seconds=timeout))
    dist.init_process_group(backend, store=store, rank=comm.rank, world_size=comm.size,
                            timeout=datetime.timedelta(seconds=timeout))


def _gpu_each(comm, mine):
    """Whether torch sees a GPU for each rank of ``comm`` that passes ``mine`` (True/False here),
    node by node: what NCCL needs. Collective over ``comm``."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    count = local.allreduce(int(bool(mine)))
    local.Free()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return bool(comm.allreduce(0 < gpus and count <= gpus, op=MPI.LAND))


def _single_host(comm, root):
    names = comm.gather(MPI.Get_processor_name(), root=0)
    return root and len(set(names)) == 1


def broadcast_parameters(module, src=0, comm=MPI.COMM_WORLD):
    """Make every rank's parameters and buffers equal to rank ``src``'s. Collective over
    ``comm`` (the ranks of the process group). The replicas must have the same architecture on
    every rank (checked first: a backbone whose input size is rank-dependent, e.g. built from
    this rank's dof count, raises InputError on every rank instead of aborting MPI)."""
    shapes = [tuple(t.shape) for t in list(module.parameters()) + list(module.buffers())]
    everyone = comm.allgather(shapes)
    raise_on_all_ranks(comm, None if all(s == everyone[src] for s in everyone) else
                       f"the backbone replicas differ across ranks: parameter shapes {shapes} "
                       f"here, {everyone[src]} on rank {src}; give the backbone inputs of the "
                       "same size on every rank")
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def allreduce_gradients(module):
    """Sum the parameters' gradients over the ranks, in one flat all-reduce (a parameter without
    a gradient on some rank counts as zero there, so every rank takes part). Collective."""
    _allreduce([p for p in module.parameters() if p.requires_grad])


# ---------------------------------------------------------------------- backbone ranks
class BackboneRanks:
    """Which ranks hold the backbone, and the traffic between them and the other ranks.

    FEM jobs run many MPI ranks per node and have few GPUs: one backbone per GPU is what the
    hardware wants, experts on every rank what the mesh wants. Each rank is served by one
    backbone rank (its node's, where it has one): a client sends its dof coordinates to its
    server, which evaluates the backbone at its own and its clients' points in one call and
    sends each client its basis fields; in the backward the clients send their fields' gradients
    back and the server's backbone backward sees them all. Gradients are then summed over the
    backbone ranks only (:meth:`allreduce_gradients`).

    ``ranks``: None (default) -- one backbone rank per GPU on each node (the node's first local
    ranks, found from a shared-memory split of ``comm``) when torch sees a GPU, every rank on
    CPU-only machines (then nothing moves: each rank evaluates its own points, as before);
    "all"; or a list of ranks of ``comm``, which must hold rank 0 (checkpoints are written by
    rank 0 from its backbone). A client is served by the lowest backbone rank on its node, or,
    with none there, by backbone rank ``client rank mod #backbone ranks``.

    ``device``: this rank's torch device (``cuda:<its GPU>`` on a backbone rank with CUDA, set
    with ``torch.cuda.set_device``; CPU on clients and without CUDA). Collective over ``comm``;
    starts torch.distributed over ``comm`` (:func:`init_process_group`) and, where the backbone
    ranks are not all ranks, a process group over the backbone ranks (``backend``: default NCCL
    where each backbone rank has a GPU of its own, gloo otherwise -- e.g. ``ranks="all"`` with
    several ranks per GPU, which NCCL refuses).
    """

    def __init__(self, comm=MPI.COMM_WORLD, ranks=None, backend=None):
        self.comm = comm
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, node_ranks = local.rank, local.allgather(comm.rank)
        local.Free()
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        error = None
        if ranks is None:
            chosen = [r for r in node_ranks[:gpus]] if gpus else list(node_ranks)
            ranks = sorted({r for part in comm.allgather(chosen) for r in part})
        elif ranks == "all":
            ranks = list(range(comm.size))
        else:
            ranks = sorted({int(r) for r in ranks})
            if not ranks or ranks[0] != 0 or ranks[-1] >= comm.size:
                error = InputError(f"backbone ranks {ranks}: they must include rank 0 (which "
                                   f"writes the checkpoints) and lie in 0..{comm.size - 1}")
        raise_on_all_ranks(comm, error)
        self.ranks = ranks
        self.is_backbone = comm.rank in ranks
        mine = [r for r in node_ranks if r in ranks]
        self.server = comm.rank if self.is_backbone else (mine[0] if mine
                                                          else ranks[comm.rank % len(ranks)])
        self.everywhere = len(ranks) == comm.size
        # The server is rank 0 of its group, its clients after it in rank order.
        self.group = comm.Split(self.server, 0 if self.is_backbone else 1 + comm.rank)
        free_at_exit(self.group)
        if self.is_backbone and gpus:
            index = local_rank % gpus      # the node's first local ranks are its backbone ranks
            torch.cuda.set_device(index)
            self.device = torch.device("cuda", index)
        else:
            self.device = torch.device("cpu")
        # NCCL between the backbone ranks where each has a GPU of its own, gloo otherwise.
        backend = backend or ("nccl" if _gpu_each(comm, self.is_backbone) else "gloo")
        init_process_group(comm, backend=backend if self.everywhere else "gloo")
        self.torch_group = None
        if not self.everywhere:
            # new_group is collective over every rank of the default group.
            self.torch_group = dist.new_group(ranks, backend=backend)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, backbone, inputs, points, components=None):
        """``backbone(inputs, points[, components])`` at this rank's ``points``, evaluated on
        its server: [batch, n_basis, len(points)], differentiable with respect to the backbone's
        parameters (on the server). ``inputs`` must be the same on every rank (the server's are
        used). Collective over the rank's group (its server and the server's clients)."""
        if self.everywhere:
            args = (inputs, points) + ((components,) if components is not None else ())
            return backbone(*args)
        group = self.group
        counts = np.array(group.allgather(len(points)))
        extra = 0 if components is None else 1
        mine = np.ascontiguousarray(np.column_stack(
            [points.detach().cpu().numpy()] + ([components.cpu().numpy()] if extra else [])),
            dtype=np.float64)
        width = mine.shape[1]
        if group.rank == 0:
            everything = np.empty((int(counts.sum()), width))
            group.Gatherv(mine, [everything, counts * width])
            pts = torch.tensor(everything[:, :width - extra], dtype=points.dtype,
                               device=points.device)
            args = (inputs, pts)
            if extra:
                args += (torch.tensor(everything[:, -1], dtype=components.dtype,
                                      device=components.device),)
            return _Serve.apply(backbone(*args), group, counts)
        group.Gatherv(mine, None)
        return _Receive.apply(next(backbone.parameters()), group, len(points))

    # ------------------------------------------------------------------ replicas
    def broadcast_parameters(self, module):
        """Every rank's parameters and buffers := rank 0's. Collective over ``comm``."""
        broadcast_parameters(module, comm=self.comm)

    def allreduce_gradients(self, module):
        """Sum the backbone's gradients over the backbone ranks (the clients' parts reached their
        servers in the backward) and any other parameter's (e.g. a soft constraint's weights)
        over every rank. Collective over ``comm``."""
        if self.everywhere:
            return allreduce_gradients(module)
        backbone = getattr(module, "backbone", module)
        own = {id(p) for p in backbone.parameters()}
        if self.is_backbone:
            _allreduce([p for p in backbone.parameters() if p.requires_grad], self.torch_group)
        others = [p for p in module.parameters() if p.requires_grad and id(p) not in own]
        for p in others:
            g = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().numpy()
            total = np.empty_like(g)
            self.comm.Allreduce(np.ascontiguousarray(g), total)
            p.grad = torch.tensor(total, dtype=p.dtype, device=p.device)


def _allreduce(params, group=None):
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


class _Serve(torch.autograd.Function):
    """On a backbone rank: the backbone's fields at its own and its clients' points -> its own
    share, which stays on its device; each client's share is sent to it as one contiguous
    [batch, N, n_client] block (cut on the device, one copy to the host), and the clients'
    gradients come back the same way in the backward."""

    @staticmethod
    def forward(ctx, fields, group, counts):
        B, N, _ = fields.shape
        offsets = np.concatenate([[0], np.cumsum(counts)])
        blocks = [fields[:, :, a:b].reshape(-1) for a, b in zip(offsets[1:-1], offsets[2:])]
        send = (torch.cat(blocks) if blocks else fields.new_empty(0)).detach().cpu().numpy()
        sizes = counts * B * N             # what each rank receives; the server keeps its own
        sizes[0] = 0
        ctx.group, ctx.sizes, ctx.dtype = group, sizes, send.dtype
        group.bcast((B, N, send.dtype.str), root=0)
        group.Scatterv([send, sizes], np.empty(0, dtype=send.dtype))
        return fields[:, :, :counts[0]].detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        B, N, _ = grad.shape
        sizes = ctx.sizes
        theirs = np.empty(int(sizes.sum()), dtype=ctx.dtype)
        ctx.group.Gatherv(np.empty(0, dtype=ctx.dtype), [theirs, sizes])
        theirs = torch.from_numpy(theirs).to(device=grad.device, dtype=grad.dtype)
        blocks = [grad] + [block.view(B, N, -1)
                           for block in torch.split(theirs, sizes[1:].tolist())]
        return torch.cat(blocks, dim=2), None, None


class _Receive(torch.autograd.Function):
    """On a client: its share of its server's fields, a contiguous [batch, N, n] block; in the
    backward, its gradient goes to the server (``anchor``, a backbone parameter, only ties the
    call into the autograd graph)."""

    @staticmethod
    def forward(ctx, anchor, group, n):
        B, N, dtype = group.bcast(None, root=0)
        fields = np.empty((B, N, n), dtype=np.dtype(dtype))
        group.Scatterv(None, fields)
        ctx.group, ctx.dtype = group, fields.dtype
        return torch.from_numpy(fields)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ctx.group.Gatherv(np.ascontiguousarray(grad.detach().cpu().numpy(), dtype=ctx.dtype), None)
        return None, None, None
