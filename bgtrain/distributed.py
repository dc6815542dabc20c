"""Distributed set-up: the only module that reads RANK / WORLD_SIZE and starts the process group."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_info_from_env() -> WorldInfo:
    """Ranks from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or, failing that, from Slurm's srun variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", 1)))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        # Step variables, not job ones: inside sbatch but outside srun, SLURM_NTASKS counts tasks that
        # do not exist yet. Tasks per node may differ per node ("2(x3),1"); this node's is SLURM_LOCALID's.
        node = int(env.get("SLURM_NODEID", 0))
        per_node = _expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"))
        return WorldInfo(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), per_node[min(node, len(per_node) - 1)])
    return WorldInfo()


def _expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed list "2(x3),1" -> [2, 2, 2, 1]."""
    out = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        out += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return out


def init_distributed(timeout_s: int = 300) -> tuple[WorldInfo, torch.device]:
    """Start the process group (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    info = world_info_from_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # a rank that never arrives surfaces here as a timeout
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise RuntimeError(f"rank {info.rank}/{info.world_size}: process group at {where} did not form "
                               f"within {timeout_s}s (engine.timeout_s); are all ranks started? ({e})") from e
    return info, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors of different lengths along dim 0 from every rank (rank order)."""
    if world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def broadcast_object(obj: object, src: int = 0) -> object:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
