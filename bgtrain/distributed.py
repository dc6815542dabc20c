"""Distributed set-up: the only module that reads RANK / WORLD_SIZE and starts the process group.

The collectives themselves live in :mod:`bgtrain.collectives`.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # "torchrun" (or RANK/WORLD_SIZE set by hand: "env"), "slurm" or "single"
    node: str = ""            # Slurm node name, else the host name

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's ``SLURM_STEP_TASKS_PER_NODE`` form, e.g. ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse tasks-per-node {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def first_host(nodelist: str) -> str:
    """First host name of a Slurm nodelist such as ``node[1-2]``, via `scontrol show hostnames`."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def default_port(job_id: str | None) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    return 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else 29500


def world_info_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Rank, world size and rendezvous address from torchrun's variables, else from an srun step's."""
    env = os.environ if env is None else env
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or set by hand
        world = int(env["WORLD_SIZE"])
        return WorldInfo(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", 29500)), "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env",
                         node)
    # SLURM_STEP_NUM_TASKS is set inside an srun step only: in the batch script itself SLURM_NTASKS
    # counts tasks that do not exist yet, and waiting for them would hang.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]))
        node_id = int(env.get("SLURM_NODEID", 0))
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT") or default_port(env.get("SLURM_JOB_ID")))
        return WorldInfo(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         per_node[min(node_id, len(per_node) - 1)], addr, port, "slurm", node)
    return WorldInfo(node=node)


DEVICE_ENV = "BGTRAIN_DEVICE"  # auto|cuda: `cuda` makes every process started here require a GPU (as device: cuda)


class DeviceError(RuntimeError):
    """The run asks for CUDA and this process has no usable GPU; the message is one line naming the cause."""


def requested_device(configured: str = "auto") -> str:
    """``cuda`` when the config's ``device`` or $BGTRAIN_DEVICE asks for it, else ``auto``."""
    env = os.environ.get(DEVICE_ENV, "").strip().lower()
    if env not in ("", "auto", "cuda"):
        raise DeviceError(f"{DEVICE_ENV}={env!r} is not one of auto, cuda")
    return "cuda" if "cuda" in (env, configured) else "auto"


def check_device(requested: str, local_rank: int = 0) -> None:
    """Raise DeviceError (one line) when `requested` is ``cuda`` and this process would run on the CPU.

    A run configured for CUDA never falls back to CPU processes on gloo silently: no GPU visible (a job submitted
    without --gpus-per-node / --gres, CUDA_VISIBLE_DEVICES empty, a CPU-only torch) or fewer GPUs than this node's
    processes stops it here, before any process group starts.
    """
    if requested != "cuda":
        return
    where = f"rank {os.environ.get('RANK', '0')} on {os.environ.get('SLURMD_NODENAME') or socket.gethostname()}"
    if torch.version.cuda is None:
        raise DeviceError(f"device=cuda but torch {torch.__version__} is a CPU-only build ({where}): install a CUDA "
                          "build of torch, or set device=auto to allow CPU processes on gloo")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        cause = (f"CUDA_VISIBLE_DEVICES={visible!r} hides them" if visible is not None and not visible.strip(",")
                 else "no GPU is visible")
        raise DeviceError(f"device=cuda but {cause} ({where}): submit the job with GPUs (sbatch --gpus-per-node=N "
                          "or --gres=gpu:N; reproduce --slurm --gpus-per-node N), or set device=auto to allow CPU "
                          "processes on gloo")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"device=cuda but local rank {local_rank} has no GPU of its own: {count} visible ({where}); "
                          "start at most one process per GPU (torchrun --nproc_per_node / NPROC)")


def init_distributed(timeout_s: int = 300) -> tuple[WorldInfo, torch.device]:
    """Start the process group (NCCL on GPUs, gloo on CPU) and pick this rank's device.

    With $BGTRAIN_DEVICE=cuda a process without a GPU raises :class:`DeviceError` instead of running on the CPU.
    """
    info = world_info_from_env()
    check_device(requested_device(), info.local_rank)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        where = f"{info.master_addr}:{info.master_port}"
        message = (f"rank {info.rank}/{info.world_size}: process group at {where} did not form within "
                   f"{timeout_s}s (engine.timeout_s); are all ranks started?")
        # gloo's full-mesh connect does not always honour its timeout (seen after a peer was SIGKILLed and
        # torchrun restarted the group), so a watchdog ends a stuck start; torchrun --max-restarts retries.
        watchdog = threading.Timer(timeout_s + 5, _give_up, args=(message,))
        watchdog.daemon = True
        watchdog.start()
        try:
            dist.init_process_group(backend, store=_store(info, timeout_s), rank=info.rank,
                                    world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # a rank that never arrives surfaces here as a timeout
            raise RuntimeError(f"{message} ({e})") from e
        finally:
            watchdog.cancel()
    return info, device


def _store(info: WorldInfo, timeout_s: int) -> dist.Store:
    """The rendezvous store, with keys private to this restart of the group.

    Under torchrun the agent hosts the store and keeps it across restarts; without a per-restart prefix a
    restarted rank can read the address its killed predecessor published and gloo then connects to a dead
    port. Elsewhere rank 0 hosts it.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(info.master_addr, info.master_port, info.world_size,
                          is_master=info.rank == 0 and not agent,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.PrefixStore(f"bgtrain/restart-{restart_count()}", store)


def restart_count() -> int:
    """How many times torchrun has restarted this group (``--max-restarts``); 0 for a first attempt or no torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _give_up(message: str) -> None:
    logging.getLogger("bgtrain.distributed").critical("%s (watchdog: exiting)", message)
    os._exit(3)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
