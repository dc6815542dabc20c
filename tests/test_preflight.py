"""cluster.preflight: a real 2-process torchrun run, a rank that never arrives, bad shards and configs."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bgtrain.distributed import expand_tasks_per_node, world_info_from_env
from tests.conftest import REPO, free_port


def run_env(**extra: str) -> dict[str, str]:
    """This environment minus any launcher variables, plus ``extra``."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def preflight(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.preflight", *args], cwd=REPO, env=run_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from shards.synthetic import build
    out = tmp_path_factory.mktemp("preflight") / "shards"
    build(out, num_classes=4, n_train=40, n_val=10, n_test=10, size=32, seed=0, shard_size=20)
    return out


@pytest.mark.distributed
def test_two_process_torchrun_all_reduce_passes(shards: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "cluster.preflight", "--timeout", "60", "--shards", str(shards), "--checkpoint-dir", str(tmp_path / "ck"),
           "--min-free-gb", "0.01"]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "sum 2 of 2 ranks" in out
    assert "ranks 0-1" in out
    assert "no GPU: CPU processes on gloo" in out or "GPU(s)" in out
    n_tars = sum(len(list((shards / split).glob("*.tar"))) for split in ("train", "val", "test"))
    assert f"{n_tars} tars readable" in out
    assert (tmp_path / "ck").is_dir()


def test_rank_that_never_arrives_times_out_with_clear_message() -> None:
    port = free_port()
    t0 = time.monotonic()
    proc = preflight(["--timeout", "2"], RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    took = time.monotonic() - t0
    err = " ".join((proc.stdout + proc.stderr).split())  # rich wraps lines
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in err
    assert "timed out after 2 s" in err
    assert "rank(s) 1 never arrived" in err
    assert took < 2 + 15, f"took {took:.1f} s for a 2 s timeout"


def test_rank_whose_host_never_starts_times_out_with_clear_message() -> None:
    port = free_port()
    t0 = time.monotonic()
    proc = preflight(["--timeout", "2"], RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    took = time.monotonic() - t0
    err = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert f"rank 1 could not reach the rendezvous at 127.0.0.1:{port} within 2 s" in err
    assert "expected ranks 0-1" in err
    assert took < 2 + 15, f"took {took:.1f} s for a 2 s timeout"


def test_unreadable_tar_fails_and_names_it(shards: Path, tmp_path: Path) -> None:
    broken = tmp_path / "shards"
    subprocess.run(["cp", "-r", str(shards), str(broken)], check=True)
    victim = sorted((broken / "train").glob("*.tar"))[0]
    victim.write_bytes(b"not a tar")
    proc = preflight(["--shards", str(broken), "--timeout", "10"])
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1
    assert victim.name in out
    assert "1/" in out and "tars unreadable" in out


def test_missing_manifest_and_full_disk_fail(tmp_path: Path) -> None:
    proc = preflight(["--shards", str(tmp_path / "nothing"), "--checkpoint-dir", str(tmp_path / "ck"),
                      "--min-free-gb", "1e9", "--timeout", "10"])
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1
    assert "manifest.json: no shard manifest here" in out
    assert "needs --min-free-gb 1e+09" in out


def test_config_error_fails_before_any_rendezvous(tmp_path: Path) -> None:
    # World of 2 with nobody else coming: a config error must be reported at once, not after a timeout.
    t0 = time.monotonic()
    proc = preflight(["--config", "configs/smoke.yaml", "--timeout", "60", "model.depth=7"],
                     RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1
    assert "model.depth" in out and "bad config" in out
    assert time.monotonic() - t0 < 30


def test_config_gives_shards_and_checkpoint_dir(shards: Path, tmp_path: Path) -> None:
    proc = preflight(["--config", "configs/smoke.yaml", "--min-free-gb", "0.01", f"data.shards={shards}",
                      f"out_dir={tmp_path / 'run'}"])
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0, out
    assert f"shards {shards}" in out
    assert (tmp_path / "run").is_dir()


def test_slurm_tasks_per_node_expands() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="tasks-per-node"):
        expand_tasks_per_node("x")


def test_world_info_reads_torchrun_then_srun_then_nothing() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
                "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    w = world_info_from_env(torchrun)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.master_addr, w.master_port, w.launcher) == \
        (3, 4, 1, 2, "h", 1234, "torchrun")
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "MASTER_ADDR": "node1", "SLURM_JOB_ID": "77",
            "SLURMD_NODENAME": "node3"}
    w = world_info_from_env(srun)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.master_addr, w.master_port, w.node) == \
        (5, 6, 1, 2, "node1", 20077, "node3")
    # Inside the batch script (no srun step) SLURM_NTASKS counts tasks that do not exist: stay single.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77"}
    assert world_info_from_env(batch).world_size == 1
