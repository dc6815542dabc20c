"""A run configured for CUDA never ends up on CPU processes silently: `device: cuda` (or $BGTRAIN_DEVICE=cuda)
stops a rank without a GPU in one line, preflight requires GPUs, and `reproduce --slurm` asks Slurm for them or
refuses to submit; the sbatch scripts build the BoostLU extension before torchrun."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bgtrain import distributed
from bgtrain.config import ConfigError, load_config
from bgtrain.reproduce import check_slurm_devices, sbatch_command
from tests.conftest import REPO

NO_GPU = "a GPU is visible here: the refusal concerns machines without one"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("BGTRAIN_", "SLURM_"))}


def test_device_key_defaults_to_auto_and_takes_cuda():
    assert load_config("configs/smoke.yaml").device == "auto"
    assert load_config("configs/smoke.yaml", ["device=cuda"]).device == "cuda"
    with pytest.raises(ConfigError, match="device: got 'gpu', expected one of 'auto', 'cuda'"):
        load_config("configs/smoke.yaml", ["device=gpu"])


def test_check_device_names_the_cause(monkeypatch):
    distributed.check_device("auto")  # auto never refuses
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(distributed.DeviceError, match="device=cuda but CUDA_VISIBLE_DEVICES='' hides them"):
        distributed.check_device("cuda")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(distributed.DeviceError, match=r"device=cuda but no GPU is visible .*--gpus-per-node=N"):
        distributed.check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(distributed.DeviceError, match="is a CPU-only build"):
        distributed.check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    distributed.check_device("cuda", local_rank=1)
    with pytest.raises(distributed.DeviceError, match="local rank 2 has no GPU of its own: 2 visible"):
        distributed.check_device("cuda", local_rank=2)


def test_bgtrain_device_variable_makes_init_distributed_refuse_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(distributed.DEVICE_ENV, "cuda")
    with pytest.raises(distributed.DeviceError, match="device=cuda but"):
        distributed.init_distributed(timeout_s=5)
    assert distributed.requested_device("cuda") == "cuda"
    monkeypatch.setenv(distributed.DEVICE_ENV, "auto")
    assert distributed.requested_device("auto") == "auto"
    assert distributed.init_distributed(timeout_s=5)[1] == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason=NO_GPU)
def test_train_configured_for_cuda_exits_2_in_one_line_on_a_cpu_machine(smoke_shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bgtrain.train", "--config", "configs/smoke.yaml",
                           f"data.shards={smoke_shards}", f"out_dir={tmp_path / 'run'}", "device=cuda"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert re.match(r"bgtrain\.train: device=cuda but (no GPU is visible|torch .* CPU-only build)", proc.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason=NO_GPU)
def test_preflight_requires_a_gpu_for_a_cuda_config(smoke_shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.preflight", "--config", "configs/smoke.yaml",
                           "--checkpoint-dir", str(tmp_path / "ck"), "--min-free-gb", "0.01",
                           f"data.shards={smoke_shards}", "device=cuda"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    flat = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1, flat
    assert "preflight FAILED: rank 0 devices: no GPU" in flat and "device: cuda" in flat


def _row_configs(root: Path, device: str) -> Path:
    folder = root / "mini"
    folder.mkdir(parents=True)
    (folder / "AN.yaml").write_text(yaml.safe_dump({"name": "AN", "device": device, "model": {"depth": 18}}))
    return root


def test_reproduce_slurm_refuses_a_cuda_row_without_gpus_in_one_line(smoke_shards, tmp_path):
    configs = _row_configs(tmp_path / "configs", "cuda")
    env = {**_env(), "PATH": str(tmp_path / "no-sbatch-here")}  # it must refuse before calling sbatch
    proc = subprocess.run([sys.executable, "-m", "bgtrain.reproduce", "--table", "baselines", "--dataset", "mini",
                           "--configs", str(configs), "--rows", "AN", "--shards", str(smoke_shards), "--out",
                           str(tmp_path / "runs"), "--slurm"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "reproduce: rows AN have device: cuda" in proc.stderr and "pass --gpus-per-node N" in proc.stderr


def test_reproduce_gpus_per_node_goes_to_sbatch_and_needs_slurm(smoke_shards, tmp_path):
    cmd = sbatch_command(2, tmp_path / "AN.log", 4)
    assert cmd[:4] == ["sbatch", "--wait", "--nodes=2", "--gpus-per-node=4"]
    assert Path(cmd[-1]) == REPO / "slurm" / "train_openimages.sh"
    assert "--gpus-per-node" not in " ".join(sbatch_command(1, tmp_path / "AN.log", None))
    cfg = load_config(_row_configs(tmp_path / "configs", "cuda") / "mini" / "AN.yaml")
    check_slurm_devices({"AN": (Path("AN.yaml"), [], cfg)}, 4)
    with pytest.raises(ConfigError, match="--gpus-per-node"):
        check_slurm_devices({"AN": (Path("AN.yaml"), [], cfg)}, None)
    proc = subprocess.run([sys.executable, "-m", "bgtrain.reproduce", "--table", "demo", "--shards", "x",
                           "--gpus-per-node", "2"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=_env())
    assert proc.returncode == 2 and "--gpus-per-node takes a count >= 1 and goes with --slurm" in proc.stderr


@pytest.mark.parametrize("script", ["train_openimages.sh", "evaluate.sh"])
def test_sbatch_scripts_prebuild_the_extension_before_torchrun(script):
    lines = (REPO / "slurm" / script).read_text().splitlines()
    calls = [i for i, line in enumerate(lines) if re.match(r"^(\[ .* \] && )?prebuild_ops\s*$", line)]
    launch = [i for i, line in enumerate(lines) if line.startswith("srun") and "node%n.log" in line]
    preflight = [i for i, line in enumerate(lines) if "cluster.preflight" in line]
    assert len(calls) == 1 and len(launch) == 1 and preflight
    assert preflight[0] < calls[0] < launch[0], "the build must run after preflight and before torchrun"
    common = (REPO / "slurm" / "common.sh").read_text()
    assert re.search(r'srun --ntasks-per-node=1 .*\n\s*"\$PYTHON" -m bgtrain.ops build --cache "\$BGTRAIN_OPS_CACHE"',
                     common)
    assert 'export BGTRAIN_OPS_CACHE=' in common
