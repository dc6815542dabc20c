"""Shared fixtures: small synthetic shards built with the real CLI code."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory) -> Path:
    """The smoke dataset of configs/smoke.yaml, with uneven shards (60, 60, 60, 20 training samples)."""
    from shards.synthetic import build
    out = tmp_path_factory.mktemp("smoke")
    build(out, num_classes=10, n_train=200, n_val=50, n_test=50, size=64, seed=0, shard_size=60)
    return out


@pytest.fixture(scope="module")
def s3_server():
    """One moto S3 server per test module (it takes seconds to start on a busy machine), with the standard AWS
    environment pointing at it for the module's tests (tests/servers.py)."""
    from tests.servers import moto_s3
    with pytest.MonkeyPatch.context() as mp, moto_s3(mp) as endpoint:
        yield endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(cmds: list[list[str]], timeout: float = 300, **popen: object) -> list[subprocess.CompletedProcess]:
    """Run commands at once and wait for all of them (captured text output).

    A CLI test's subprocess spends most of its seconds importing torch, so two at a time on two cores cost little
    more than one; a command still running at ``timeout`` is killed with the others.
    """
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
             for cmd in cmds]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
        return [subprocess.CompletedProcess(cmd, proc.returncode, out, err)
                for cmd, proc, (out, err) in zip(cmds, procs, outputs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def join_gloo_group(rank: int, world: int, port: int) -> None:
    """In a spawned test process: one thread, and a gloo group on localhost that fails within 60 s, not hangs."""
    import datetime

    import torch
    import torch.distributed as dist
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
