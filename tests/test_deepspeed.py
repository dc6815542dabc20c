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
