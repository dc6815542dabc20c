"""Every collective of bgtrain and cluster, in one place, on the device its backend needs.

NCCL takes CUDA tensors only and gloo CPU tensors only, so a tensor built on the wrong side (a CPU table
gathered under NCCL) fails the first multi-GPU run and never a single-rank one. The helpers here move
their inputs to :func:`group_device` and hand results back on the caller's device; without a process
group they return their input (a world of one).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_device() -> torch.device:
    """Where the running group's collectives take their tensors: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_to_all_rows(rows: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Send row i of ``rows`` to rank ``dest[i]``; returns the rows this rank received, in source-rank order.

    Rows keep their relative order within each (source, destination) pair. Collective; a size round and a
    host read of the counts, so it belongs in once-per-epoch work, not in a step.
    """
    if not is_distributed():
        return rows
    world, home = dist.get_world_size(), rows.device
    device = group_device()
    order = torch.argsort(dest, stable=True)
    send = rows.to(device)[order.to(device)]
    send_counts = torch.bincount(dest.to(device).long(), minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    width = _row_width(rows)
    recv = torch.empty((int(recv_counts.sum()), *rows.shape[1:]), dtype=rows.dtype, device=device)
    # all_to_all_single splits flat tensors by element counts; gloo and NCCL both accept uneven and empty splits.
    dist.all_to_all_single(recv.view(-1), send.reshape(-1), [int(c) * width for c in recv_counts.tolist()],
                           [int(c) * width for c in send_counts.tolist()])
    return recv.to(home)


def gather_rows(rows: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
    """Every rank's ``rows`` concatenated in rank order on rank ``dst``; None on the others (collective).

    Only the receiver holds the whole: a checkpoint writer needs it, the other ranks do not.
    """
    if not is_distributed():
        return rows
    world, home, device = dist.get_world_size(), rows.device, group_device()
    counts = torch.empty(world, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(counts, torch.tensor([rows.shape[0]], dtype=torch.int64, device=device))
    sizes = counts.tolist()
    padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == dst else None
    dist.gather(padded, parts, dst=dst)
    if parts is None:
        return None
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(home)


def _row_width(rows: torch.Tensor) -> int:
    """Elements per row of a (K, ...) tensor."""
    return int(torch.Size(rows.shape[1:]).numel())
