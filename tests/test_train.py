"""End to end: 2-process torchrun (gloo DDP) training, and that stopping or killing loses nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.distributed  # torchrun / Slurm / several processes: not in `make test-fast`

STEPS_PER_EPOCH = 7  # ceil(200 / (2 ranks x batch 16)): the epoch plan cuts whole batches (bgtrain.data.plan)
MID_EPOCH_2 = 9  # a checkpoint.every_steps=3 checkpoint inside epoch 2 (steps 8-14)


def torchrun_cmd(out: Path, shards: Path, extra: list[str] = (), max_restarts: int = 3) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "-m", "bgtrain.train", "--config", str(REPO / "configs/smoke.yaml"),
            f"data.shards={shards}", f"out_dir={out}", "loss.scheme=LL-Cp", "loss.delta_rel=0.02",
            "optim.epochs=3", "checkpoint.every_steps=3", "checkpoint.resume=latest", *extra]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, **kw)


def final_weights(out: Path) -> dict:
    last = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(last, weights_only=True)["engine"]["model"]


@pytest.fixture(scope="module")
def uninterrupted(smoke_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run(torchrun_cmd(out, smoke_shards))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_process_training_writes_results_metrics_and_checkpoints(uninterrupted):
    results = json.loads((uninterrupted / "results.json").read_text())
    assert 0 <= results["test_map"] <= 100 and results["best_epoch"] in (1, 2, 3)
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"train", "val", "test"} <= kinds
    assert sum(r["kind"] == "val" for r in records) == 3
    # train lines every log_every=2 steps: the last one is at step 20 or 21 of 3 * 7
    assert 3 * STEPS_PER_EPOCH - 2 < max(r["step"] for r in records if r["kind"] == "train") <= 3 * STEPS_PER_EPOCH
    assert (uninterrupted / "checkpoints" / f"step-{3 * STEPS_PER_EPOCH:09d}.pt").is_file(), "the last epoch's end"
    assert any(r["corrections"] > 0 for r in records if r["kind"] == "train"), "LL-Cp made no corrections"
    assert (uninterrupted / "checkpoints" / "best.pt").is_file()
    assert (uninterrupted / "config.yaml").is_file()


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(proc.pid).children(recursive=True)
    return [c for c in children if "bgtrain.train" in " ".join(c.cmdline())]


def _wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen) -> None:
    target = out / "checkpoints" / f"step-{step:09d}.pt"
    deadline = time.time() + 600
    while not target.exists():
        assert proc.poll() is None, "training ended before the checkpoint to interrupt at"
        assert time.time() < deadline, f"no {target} after 600 s"
        time.sleep(0.02)


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra["test_map"] == rb["test_map"] and ra["val_map"] == rb["val_map"]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"weights differ at {key}"


def run_killing_rank_1_mid_epoch(cmd: list[str], out: Path) -> None:
    """Run ``cmd`` (a torchrun with restarts), SIGKILL local rank 1 at the mid-epoch-2 checkpoint, and check that
    the restarted run resumed and finished."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(out, MID_EPOCH_2, proc)
    victim = next(w for w in _workers(proc) if w.environ().get("LOCAL_RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    log, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, log[-3000:]
    assert "resumed from" in log


def test_sigkill_of_one_rank_mid_epoch_restarts_and_matches_uninterrupted(smoke_shards, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    run_killing_rank_1_mid_epoch(torchrun_cmd(out, smoke_shards), out)
    _assert_same_run(uninterrupted, out)


def test_stop_signal_then_resume_latest_matches_uninterrupted(smoke_shards, tmp_path, uninterrupted):
    out = tmp_path / "stopped"
    proc = subprocess.Popen(torchrun_cmd(out, smoke_shards), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(out, MID_EPOCH_2, proc)
    for worker in _workers(proc):
        worker.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, log[-3000:]
    assert "stop requested" in log and not (out / "results.json").exists()
    resumed = run(torchrun_cmd(out, smoke_shards))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _assert_same_run(uninterrupted, out)


def test_config_error_fails_before_any_process_group(tmp_path):
    proc = run([sys.executable, "-m", "bgtrain.train", "--config", str(REPO / "configs/smoke.yaml"),
                "loss.scheme=LLR"], env={**os.environ, "RANK": "0", "WORLD_SIZE": "2",
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert proc.returncode == 2
    assert "loss.scheme" in proc.stderr and "'LL-R'" in proc.stderr


def test_evaluate_cli_on_two_ranks_reproduces_the_trainings_test_map(smoke_shards, uninterrupted, tmp_path):
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--max-restarts=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                "-m", "bgtrain.evaluate",
                "--checkpoint", str(uninterrupted / "checkpoints" / "best.pt"), "--shards", str(smoke_shards),
                "--groups", "2", "--timeout", "60", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "map_test.json").read_text())
    trained = json.loads((uninterrupted / "results.json").read_text())
    assert report["all"]["map"] == pytest.approx(trained["test_map"], abs=1e-9)
    assert [g["n_classes"] for g in report["groups"]] == [5, 5]


def test_rank_that_never_arrives_gets_a_clear_timeout(tmp_path):
    port = free_port()
    proc = run([sys.executable, "-m", "bgtrain.train", "--config", str(REPO / "configs/smoke.yaml"),
                "engine.timeout_s=5", f"out_dir={tmp_path}"],
               env={**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)})
    assert proc.returncode != 0
    assert f"rank 0/2: process group at 127.0.0.1:{port} did not form within 5s" in proc.stderr


def test_a_torchrun_restart_continues_the_run_even_without_resume(smoke_shards, tmp_path):
    """A restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) resumes from the latest checkpoint, not from scratch."""
    cmd = [sys.executable, "-m", "bgtrain.train", "--config", str(REPO / "configs/smoke.yaml"),
           f"data.shards={smoke_shards}", f"out_dir={tmp_path}", "optim.epochs=1", "data.max_batches=2",
           "log_every=1", "checkpoint.every_steps=0"]
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RESTART_COUNT"}
    first = run(cmd, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run(cmd, env={**env, "TORCHELASTIC_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 2, "the restart trained again instead of continuing"
    assert kinds.count("test") == 2  # the finished run is evaluated again: nothing is lost, nothing retrained
