"""A resume equals the run that never stopped, bit for bit, on 4 gloo ranks (issue 24, item 9).

With 2 ranks a + b = b + a, so a change in the order in which the gradient all-reduce adds the ranks' values
cannot show; from 3 ranks on it can, and before DDPEngine._settle_buckets it did (DDP regroups its buckets after a
model's first step, so a resumed run's first step summed in another order). Each resumed run here starts from a
checkpoint the uninterrupted run wrote, copied into a fresh out_dir: one taken mid-epoch, one at an epoch's end.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RANKS = 4
STEPS_PER_EPOCH = 4  # ceil(200 / (4 ranks x batch 16))


def train(out: Path, shards: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={RANKS}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "bgtrain.train",
           "--config", str(REPO / "configs/smoke.yaml"), f"data.shards={shards}", f"out_dir={out}",
           "loss.scheme=LL-Cp", "loss.delta_rel=0.02", "optim.epochs=3", "checkpoint.every_steps=2",
           "checkpoint.keep_last=10", "checkpoint.resume=latest", "eval.select_on=none", "log.tensorboard=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def val_maps(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: r["val_map"] for r in records if r["kind"] == "val"}


def last_weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / f"step-{3 * STEPS_PER_EPOCH:09d}.pt", weights_only=True)["engine"]


@pytest.fixture(scope="module")
def uninterrupted(smoke_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(out, smoke_shards)
    return out


@pytest.mark.parametrize("step,where", [(6, "mid-epoch"), (STEPS_PER_EPOCH, "epoch end")])
def test_resume_on_four_ranks_equals_the_uninterrupted_run(smoke_shards, uninterrupted, tmp_path, step, where):
    source = uninterrupted / "checkpoints" / f"step-{step:09d}.pt"
    state = torch.load(source, weights_only=True)
    at_epoch_end = state["loader"]["batches_done"] == 0
    assert at_epoch_end == (where == "epoch end"), f"step {step} is not a {where} checkpoint"
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(source, out / "checkpoints" / source.name)
    proc = train(out, smoke_shards)
    assert f"resuming from {out / 'checkpoints' / source.name}" in proc.stderr

    want, got = last_weights(uninterrupted), last_weights(out)
    for key in ("model", "optimizer"):
        flat_want, flat_got = _tensors(want[key]), _tensors(got[key])
        assert flat_want.keys() == flat_got.keys()
        differ = [k for k in flat_want if not torch.equal(flat_want[k], flat_got[k])]
        assert not differ, f"{where} resume: {len(differ)} {key} tensors differ, e.g. {differ[:3]}"
    resumed_epochs = val_maps(out)
    assert resumed_epochs and all(val_maps(uninterrupted)[e] == v for e, v in resumed_epochs.items())
    a, b = (json.loads((p / "results.json").read_text()) for p in (uninterrupted, out))
    assert a["test_map"] == b["test_map"]


def _tensors(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _tensors(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _tensors(value, f"{prefix}/{i}").items()}
    return {}
