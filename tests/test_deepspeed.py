"""DeepSpeed on CPU over gloo: agrees with DDP, and ZeRO-1/2 with bf16 resume from their checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.distributed  # torchrun / Slurm / several processes: not in `make test-fast`


def train(out: Path, shards: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--max-restarts=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "bgtrain.train",
           "--config", str(REPO / "configs/smoke.yaml"), f"data.shards={shards}", f"out_dir={out}",
           "data.max_batches=3", "log_every=1", "checkpoint.every_steps=0", "loss.scheme=LL-R", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_ddp_and_deepspeed_losses_agree_over_the_first_steps(smoke_shards, tmp_path):
    train(tmp_path / "ddp", smoke_shards, "optim.epochs=2")
    train(tmp_path / "ds", smoke_shards, "optim.epochs=2", "engine.engine=deepspeed")
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "ds")
    assert len(a) == len(b) == 6
    # Same maths (torch Adam, averaged gradients, rank 0's BN buffers); only reduction order differs.
    assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_bf16_resume_equals_uninterrupted(smoke_shards, tmp_path, stage):
    common = ["engine.engine=deepspeed", f"engine.zero_stage={stage}", "engine.precision=bf16",
              "checkpoint.resume=latest"]
    train(tmp_path / "full", smoke_shards, "optim.epochs=2", *common)
    train(tmp_path / "split", smoke_shards, "optim.epochs=1", *common)
    resumed = train(tmp_path / "split", smoke_shards, "optim.epochs=2", *common)
    assert "resumed from" in resumed.stderr
    final = lambda out: torch.load(sorted((out / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)  # noqa: E731
    a, b = final(tmp_path / "full"), final(tmp_path / "split")
    assert a["global_step"] == b["global_step"] == 6
    for key, value in a["engine"]["model"].items():
        assert torch.equal(value, b["engine"]["model"][key]), key
    assert losses(tmp_path / "full") == losses(tmp_path / "split")


def _buffers(rank: int) -> list[torch.Tensor]:
    """Buffers of every kind a model may hold, rank-dependent: odd-sized float32 (misaligning what follows),
    a 0-dim int64 (num_batches_tracked), bool, and a channels-last 4-D tensor."""
    return [torch.full((3,), rank + 0.5), torch.tensor(7 * rank), torch.tensor([rank == 0, True]),
            torch.full((2, 3, 2, 2), float(rank)).contiguous(memory_format=torch.channels_last)]


def _coalesced_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from bgtrain.collectives import broadcast_coalesced, gather_object
    from tests.conftest import join_gloo_group
    join_gloo_group(rank, world, port)
    try:
        buffers, calls = _buffers(rank), []
        original = dist.broadcast
        dist.broadcast = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        try:
            broadcast_coalesced(buffers, src=0)
        finally:
            dist.broadcast = original
        torch.save({"buffers": buffers, "broadcasts": len(calls), "gathered": gather_object({"rank": rank}),
                    "channels_last": buffers[3].is_contiguous(memory_format=torch.channels_last)},
                   Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_buffers_travel_in_one_broadcast_and_optimizer_state_gathers_to_the_writer_only(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_coalesced_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["broadcasts"] == 1
        for got, want in zip(out["buffers"], _buffers(0)):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert out["channels_last"]  # written in place: each buffer keeps its layout
        assert out["gathered"] == ([{"rank": 0}, {"rank": 1}] if rank == 0 else None)
