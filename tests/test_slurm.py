"""A real 2-node Slurm cluster on this machine: sbatch jobs, preflight, training, requeue, teardown."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.local_slurm import SlurmUnavailable, down, is_running, up
from cluster.slurm_config import ClusterError, ClusterSpec, slurm_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed  # torchrun / Slurm / several processes: not in `make test-fast`


def free_base_port(count: int) -> int:
    """A port p with p..p+count-1 all free (slurmctld plus one slurmd per node)."""
    for base in range(17817, 30000, 50):
        try:
            for p in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range for the test cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> ClusterSpec:
    # One counted GPU per node (gres without a device): jobs can ask for it, and no GPU is visible inside them.
    spec = ClusterSpec(dir=tmp_path_factory.mktemp("slurm-cluster"), nodes=2, port=free_base_port(3), gpus=1)
    try:
        up(spec)
    except SlurmUnavailable as e:
        pytest.skip(f"Slurm not installed and apt-get could not install it: {e}")
    yield spec
    down(spec)
    assert not is_running(spec)
    assert not spec.dir.exists()
    assert f"bgtrain-slurm:{spec.dir}" not in Path("/etc/hosts").read_text()


@pytest.fixture
def job_env(cluster: ClusterSpec) -> dict[str, str]:
    """What a user's shell has: SLURM_CONF, the venv on PATH, the repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BGTRAIN_"))}
    env.update(slurm_env(cluster), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin", "/sbin"]))
    return env


def sbatch(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Submit, wait, return (exit code of sbatch --wait, job id)."""
    proc = subprocess.run(["sbatch", "--wait", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    m = re.search(r"Submitted batch job (\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return proc.returncode, m.group(1)


def test_cluster_up_is_idempotent_and_refuses_another_shape(cluster: ClusterSpec) -> None:
    up(cluster)  # second call: reuses the running daemons
    assert is_running(cluster)
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env={**os.environ, **slurm_env(cluster)},
                           capture_output=True, text=True, check=True).stdout.split("\n")
    assert sorted(line for line in sinfo if line) == ["node1 idle", "node2 idle"]
    with pytest.raises(ClusterError, match="already runs"):
        up(ClusterSpec(dir=cluster.dir, nodes=3, port=cluster.port))


def test_two_node_job_runs_preflight_on_both_nodes(cluster: ClusterSpec, job_env: dict, tmp_path: Path) -> None:
    script = tmp_path / "two_nodes.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output=job.out
srun bash -c 'echo "task node_id=$SLURM_NODEID node=$SLURMD_NODENAME host=$(hostname)"'
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) MASTER_PORT={free_base_port(1)}
srun python -m cluster.preflight --timeout 60 --checkpoint-dir ck --min-free-gb 0.01
""")
    rc, _ = sbatch([str(script)], job_env, tmp_path)
    out = (tmp_path / "job.out").read_text()
    flat = " ".join(out.split())
    assert rc == 0, out
    assert "task node_id=0 node=node1" in out and "task node_id=1 node=node2" in out
    assert "sum 2 of 2 ranks on 2 node(s)" in flat
    assert "node1: ranks 0; node2: ranks 1" in flat


def test_train_openimages_script_on_two_cpu_nodes(cluster: ClusterSpec, job_env: dict, tmp_path: Path) -> None:
    import torch

    shards = make_shards(tmp_path, job_env)
    env = {**job_env, "BGTRAIN_CONFIG": str(REPO / "configs" / "smoke.yaml"),
           "BGTRAIN_OVERRIDES": f"data.shards={shards} data.workers=1 optim.epochs=1 data.max_batches=4"}
    rc, job = sbatch(["--nodes=2", str(REPO / "slurm" / "train_openimages.sh")], env, tmp_path)
    run = tmp_path / "runs" / "slurm" / job
    batch_log = (run / "batch.log").read_text()
    assert rc == 0, batch_log + "".join(p.read_text() for p in run.glob("node*.log"))
    assert "falling back to 2 CPU process(es) per node on gloo" in batch_log
    assert "preflight passed on 2 rank(s)" in batch_log
    assert "CPU job: no BoostLU extension to prebuild" in batch_log and not list(run.glob("prebuild-node*.log"))
    for node_id, name in ((0, "node1"), (1, "node2")):
        log = (run / f"node{node_id}.log").read_text()
        assert f"[node {node_id} {name}" in log and "torchrun exited with 0" in log
    assert (run / "metrics.jsonl").stat().st_size > 0
    checkpoints = sorted((run / "checkpoints").glob("*.pt"))
    assert checkpoints
    state = torch.load(checkpoints[-1], weights_only=True, map_location="cpu")
    assert len(state["rng"]) == 4  # one RNG state per rank: 2 nodes x 2 processes took part


def test_usr1_before_time_limit_checkpoints_requeues_and_resumes(cluster: ClusterSpec, job_env: dict,
                                                                 tmp_path: Path) -> None:
    shards = make_shards(tmp_path, job_env)
    env = {**job_env, "BGTRAIN_CONFIG": str(REPO / "configs" / "smoke.yaml"), "NPROC": "1",
           "BGTRAIN_OVERRIDES": f"data.shards={shards} data.workers=1 optim.epochs=2 data.batch_size=4 "
                                "checkpoint.every_steps=0"}
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", str(REPO / "slurm" / "train_openimages.sh")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    job = proc.stdout.strip().split(";")[0]
    run = tmp_path / "runs" / "slurm" / job
    wait_for(lambda: (run / "metrics.jsonl").exists(), 180, "training to start")
    # What --signal=B:USR1@300 does 300 s before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    seen: list[tuple[str, int]] = []
    # MinJobAge drops a finished job from scontrol after a few seconds: remember its last state.
    wait_for(lambda: seen.append(job_state(job, env)) or seen[-1][0] in FINAL, 420, "the requeued job to end")
    state, restarts = seen[-1]
    batch_log = (run / "batch.log").read_text()
    nodes = "".join(p.read_text() for p in sorted(run.glob("node*.log")))
    assert (state, restarts) == ("COMPLETED", 1), batch_log
    assert "SIGUSR1 received" in batch_log and f"requeueing job {job}" in batch_log
    assert f"job {job} restart 1" in batch_log and "training finished (exit code 0)" in batch_log
    assert "SIGUSR1: forwarding to the training processes" in nodes
    assert "restart 1" in nodes and "resumed from" in nodes
    assert '"kind": "test"' in (run / "metrics.jsonl").read_text()


def test_gpu_job_prebuilds_the_extension_per_node_and_a_cuda_config_never_trains_on_cpu(
        cluster: ClusterSpec, job_env: dict, tmp_path: Path) -> None:
    """--gpus-per-node=1 on nodes whose GPU is only counted: the build runs once per node before torchrun
    (BGTRAIN_PREBUILD=1 builds the CPU extensions here), then every rank of a device=cuda run stops in one line."""
    shards = make_shards(tmp_path, job_env)
    env = {**job_env, "BGTRAIN_CONFIG": str(REPO / "configs" / "smoke.yaml"), "NPROC": "1",
           "BGTRAIN_PREFLIGHT": "0", "BGTRAIN_PREBUILD": "1", "BGTRAIN_MAX_RESTARTS": "0",
           "BGTRAIN_OVERRIDES": f"data.shards={shards} data.workers=1 optim.epochs=1 device=cuda"}
    rc, job = sbatch(["--nodes=2", "--gpus-per-node=1", str(REPO / "slurm" / "train_openimages.sh")], env, tmp_path)
    run = tmp_path / "runs" / "slurm" / job
    batch_log = (run / "batch.log").read_text()
    nodes = "".join(p.read_text() for p in sorted(run.glob("node*.log")))
    assert rc != 0, batch_log
    assert "asked Slurm for GPUs (1 per node) but none is visible" in batch_log
    assert "GPUS_REQUESTED=1" in (run / "job.env").read_text()
    prebuild = batch_log.index("prebuilding the BoostLU extension on each of 2 node(s)")
    assert prebuild < batch_log.index("BoostLU extension ready on every node") < batch_log.index("training; per-node")
    rows = [json.loads(line) for p in sorted(run.glob("prebuild-node*.log")) for line in p.read_text().splitlines()
            if line.startswith("{")]
    assert sorted(r["extension"] for r in rows) == ["bgtrain_ap_cpu"] * 2 + ["bgtrain_boostlu_cpu"] * 2, batch_log
    for node_id in (0, 1):
        log = (run / f"node{node_id}.log").read_text()
        assert "bgtrain.train: device=cuda but no GPU is visible" in log, nodes
    assert not (run / "metrics.jsonl").exists(), "a device=cuda run trained on CPU"


def test_reproduce_slurm_asks_for_gpus_and_a_row_without_one_stops(cluster: ClusterSpec, job_env: dict,
                                                                   tmp_path: Path) -> None:
    """`reproduce --slurm --gpus-per-node 1`: the job asks Slurm for the GPU, runs device=cuda, and preflight stops
    it on a node where none is visible instead of training on CPU."""
    shards = make_shards(tmp_path, job_env)
    configs = tmp_path / "configs" / "mini"
    configs.mkdir(parents=True)
    (configs / "AN.yaml").write_text(yaml.safe_dump({"name": "AN", "model": {"depth": 18},
                                                     "data": {"image_size": 32, "workers": 0}}))
    proc = subprocess.run([sys.executable, "-m", "bgtrain.reproduce", "--table", "baselines", "--dataset", "mini",
                           "--configs", str(configs.parent), "--rows", "AN", "--shards", str(shards), "--out",
                           str(tmp_path / "out"), "--slurm", "--gpus-per-node", "1", "optim.epochs=1"],
                          cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "out" / "AN.log").read_text()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:] + log
    flat = " ".join(log.split())
    assert "asked Slurm for GPUs (1 per node) but none is visible" in flat
    assert "preflight failed" in flat and "device: cuda" in flat
    (job_env_file,) = (tmp_path / "runs" / "slurm").glob("*/job.env")
    recorded = job_env_file.read_text()
    assert "GPUS_REQUESTED=1" in recorded and "device=cuda" in recorded
    assert not (tmp_path / "out" / "AN" / "metrics.jsonl").exists()


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE"}


def make_shards(tmp_path: Path, env: dict) -> Path:
    out = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "shards", "synthetic", "--out", str(out), "--classes", "6", "--train", "96",
                    "--val", "24", "--test", "24", "--size", "32", "--shard-size", "24"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    return out


def job_state(job: str, env: dict) -> tuple[str, int]:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "GONE"), int(restarts.group(1)) if restarts else -1


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
