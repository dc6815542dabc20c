"""Every collective of bgtrain and cluster, in one place, on the device its backend needs.

NCCL takes CUDA tensors only and gloo CPU tensors only, so a tensor built on the wrong side (a CPU table
gathered under NCCL) fails the first multi-GPU run and never a single-rank one. The helpers here move
their inputs to :func:`group_device` and hand results back on the caller's device; without a process
group they return their input (a world of one).

Per-step exchanges (ROLE's table gradient, EM+APL's soft targets) use the fixed-size helpers
(:func:`all_gather_fixed`, :func:`all_gather_padded`, :func:`all_to_all_fixed`, :func:`all_reduce`): no size
round and no host read, so the device keeps its queue. The others (:func:`all_gather_rows`,
:func:`all_to_all_rows`, :func:`gather_rows`, :func:`all_to_all_pieces`, the object helpers) agree on sizes
first or read counts on the host, and belong in once-per-epoch or once-per-checkpoint work.

``tests/test_collectives.py`` fails when a module of bgtrain or cluster calls a torch.distributed collective
directly.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
_forced = False  # see force_collectives


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_device(group: Any = None) -> torch.device:
    """Where the running group's collectives take their tensors: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size() -> int:
    """Ranks in the running process group; 1 without one."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@contextlib.contextmanager
def force_collectives() -> Iterator[None]:
    """Run every helper's collective even in a group of one rank.

    The helpers skip the backend in a world of one, so a one-GPU check would never hand NCCL a tensor;
    inside this block they do (``python -m bgtrain.gpu_check``, ``cluster.preflight``).
    """
    global _forced
    saved, _forced = _forced, True
    try:
        yield
    finally:
        _forced = saved


def _active(group: Any = None) -> bool:
    """Whether a helper runs its collective: in a group of several ranks, or in any group under force_collectives."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return _forced or dist.get_world_size(group) > 1


def all_reduce(t: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """``t`` reduced over every rank, in place, and returned (collective; no host read)."""
    if not _active():
        return t
    work = t.to(group_device())
    dist.all_reduce(work, op=_OPS[op])
    if work is not t:
        t.copy_(work)
    return t


def max_over_ranks(n: int) -> int:
    """The largest ``n`` of any rank (collective: a size round and a host read; ``n`` without a group)."""
    if not _active():
        return n
    return int(all_reduce(torch.tensor([n], dtype=torch.int64), "max").item())


def sum_over_ranks(counts: dict[str, int], device: torch.device | None = None) -> dict[str, int]:
    """Integer counts (same keys on every rank) summed over all ranks (collective; identity without a group)."""
    if not _active():
        return dict(counts)
    keys = sorted(counts)
    t = all_reduce(torch.tensor([counts[k] for k in keys], dtype=torch.int64, device=device))
    return dict(zip(keys, t.tolist()))


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` written into ``t`` on every rank, and returned (collective)."""
    if not _active():
        return t
    work = t.to(group_device())
    dist.broadcast(work, src=src)
    if work is not t:
        t.copy_(work)
    return t


def broadcast_coalesced(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Rank ``src``'s ``tensors`` written into ``tensors`` on every rank, in one broadcast (collective).

    For many small tensors (a model's BatchNorm buffers) one collective instead of one per tensor: their bytes
    travel in one flat uint8 buffer, whatever their dtypes and shapes. Every rank passes the same list (the
    same dtypes and shapes, in the same order).
    """
    if not _active() or not tensors:
        return
    with torch.no_grad():
        pieces = [t.detach().reshape(-1).view(torch.uint8) for t in tensors]
        flat = torch.cat([p.to(group_device()) for p in pieces])
        dist.broadcast(flat, src=src)
        for t, part in zip(tensors, flat.split([p.numel() for p in pieces])):
            t.copy_(part.clone().view(t.dtype).view(t.shape))  # the clone: aligned for the dtype's view


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)  # torch pickles onto the backend's device itself
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (collective; ``[obj]`` without a process group)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: T, dst: int = 0) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank ``dst``, None on the others (collective; ``[obj]`` without a
    process group). Only the receiver holds them all: a checkpoint writer needs them, the other ranks do not."""
    if not _active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)  # torch pickles onto the backend's device itself
    return out


def barrier() -> None:
    """Wait for every rank (collective; nothing without a process group)."""
    if not _active():
        return
    if dist.get_backend() == "nccl":  # NCCL would otherwise guess the device from the rank
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_gather_fixed(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's ``t`` stacked in rank order, (world, *t.shape); every rank passes the same shape and dtype.

    One ``all_gather_single`` (all_gather_into_tensor): no size round, no host read.
    """
    if not _active(group):
        return t.unsqueeze(0)
    device, world = group_device(group), dist.get_world_size(group)
    # Flat in and out: gloo splits the output along dim 0 only, so it takes the concatenated form, not the stacked.
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=device)
    dist.all_gather_single(out, t.to(device).reshape(-1).contiguous(), group=group)
    return out.view(world, *t.shape).to(t.device)


def pad_rows(rows: torch.Tensor, bound: int, fill: float | int) -> torch.Tensor:
    """``rows`` (n, ...) followed by ``bound - n`` rows of ``fill``: (bound, ...). n > bound is an error."""
    if rows.shape[0] > bound:
        raise ValueError(f"{rows.shape[0]} rows exceed the bound of {bound} every rank pads to")
    if rows.shape[0] == bound:
        return rows
    padding = torch.full((bound - rows.shape[0], *rows.shape[1:]), fill, dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, padding])


def all_gather_padded(rows: torch.Tensor, bound: int, fill: float | int) -> torch.Tensor:
    """Every rank's ``rows`` padded with ``fill`` to ``bound`` rows, in rank order: (world * bound, ...).

    ``bound`` must be the same on every rank and known on the host (a batch size), so there is no size round.
    """
    padded = all_gather_fixed(pad_rows(rows, bound, fill))
    return padded.reshape(-1, *rows.shape[1:])


def all_to_all_fixed(t: torch.Tensor) -> torch.Tensor:
    """``t[d]`` (of ``t``: (world, ...)) goes to rank ``d``; returns (world, ...) whose row ``s`` came from rank ``s``.

    Equal splits: no size round, no host read.
    """
    if not _active():
        return t
    device = group_device()
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    dist.all_to_all_single(out, t.to(device).contiguous())
    return out.to(t.device)


def all_to_all_pieces(send: Sequence[torch.Tensor], recv_shapes: Sequence[tuple[int, int]],
                      group: Any = None) -> torch.Tensor:
    """All-to-all of 2-D pieces of different sizes (``send[d]`` to rank ``d``); the received pieces stacked by rows.

    gloo's list ``all_to_all`` requires equal sizes (checked, torch 2.14), so pieces travel flattened through
    ``all_to_all_single`` with split sizes, which gloo and NCCL both accept uneven and empty. The shapes to
    receive are known on the host, so there is no size round.
    """
    if not _active(group):
        return torch.cat([t.reshape(shape) for t, shape in zip(send, recv_shapes)])
    home, device = send[0].device, group_device(group)
    flat = torch.cat([t.reshape(-1) for t in send]).to(device)
    out_splits = [r * c for r, c in recv_shapes]
    out = torch.empty(sum(out_splits), dtype=flat.dtype, device=device)
    dist.all_to_all_single(out, flat, out_splits, [t.numel() for t in send], group=group)
    del flat
    return torch.cat([p.view(shape) for p, shape in zip(out.split(out_splits), recv_shapes)]).to(home)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors of different lengths along dim 0 from every rank (rank order).

    A size round and a host read of the sizes: once-per-epoch work, not a step's.
    """
    if not _active():
        return t
    sizes = all_gather_fixed(torch.tensor(t.shape[0], dtype=torch.int64)).tolist()
    parts = all_gather_fixed(pad_rows(t, max(sizes), 0))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def all_to_all_rows(rows: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Send row i of ``rows`` to rank ``dest[i]``; returns the rows this rank received, in source-rank order.

    Rows keep their relative order within each (source, destination) pair. Collective; a size round and a
    host read of the counts, so it belongs in once-per-epoch work, not in a step.
    """
    if not _active():
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
    if not _active():
        return rows
    world, home, device = dist.get_world_size(), rows.device, group_device()
    counts = torch.empty(world, dtype=torch.int64, device=device)
    dist.all_gather_single(counts, torch.tensor([rows.shape[0]], dtype=torch.int64).to(device))
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
