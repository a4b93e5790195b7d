"""The bridge between the torch backbone and the MPI ranks.

Every rank holds a replica of the backbone, on its GPU when torch sees one (local rank -> device),
else on the CPU; each rank evaluates it at its own dofs and feeds its share to the constraint
layer, which moves the shares to the experts and back. The replicas stay identical because they
start identical (:func:`broadcast_parameters`) and take the same steps: after each backward the
gradients are summed over the ranks with torch.distributed (:func:`allreduce_gradients`; gloo on
CPU, NCCL on GPUs), since each rank's backward only saw its own part of the loss.
"""
import datetime
import os
import socket

import torch
import torch.distributed as dist
from mpi4py import MPI

__all__ = ["init_process_group", "device_for_rank", "broadcast_parameters", "allreduce_gradients"]


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
    ``backend``: default "nccl" when torch sees a GPU, else "gloo".
    """
    if dist.is_available() and dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
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


def _single_host(comm, root):
    names = comm.gather(MPI.Get_processor_name(), root=0)
    return root and len(set(names)) == 1


def broadcast_parameters(module, src=0, comm=MPI.COMM_WORLD):
    """Make every rank's parameters and buffers equal to rank ``src``'s. Collective over
    ``comm`` (the ranks of the process group). The replicas must have the same architecture on
    every rank (checked first: a backbone whose input size is rank-dependent, e.g. built from
    this rank's dof count, raises InputError on every rank instead of aborting MPI)."""
    from .errors import raise_on_all_ranks
    shapes = [tuple(t.shape) for t in list(module.parameters()) + list(module.buffers())]
    everyone = comm.allgather(shapes)
    raise_on_all_ranks(comm, None if all(s == everyone[src] for s in everyone) else
                       f"the backbone replicas differ across ranks: parameter shapes {shapes} here, "
                       f"{everyone[src]} on rank {src}; give the backbone inputs of the same size "
                       "on every rank")
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def allreduce_gradients(module):
    """Sum the parameters' gradients over the ranks, in one flat all-reduce (a parameter without
    a gradient on some rank counts as zero there, so every rank takes part). Collective."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
