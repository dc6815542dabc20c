"""Engine options an engine cannot honour fail at config validation or at start-up, with one clear line."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bgtrain.config import ConfigError, load_config
from bgtrain.engines.base import check_device
from tests.conftest import REPO

SMOKE = REPO / "configs/smoke.yaml"


@pytest.mark.parametrize("option", ["engine.compile", "engine.sync_bn"])
def test_deepspeed_refuses_what_it_would_silently_ignore(option):
    with pytest.raises(ConfigError, match=f"{option}: is not supported with engine.engine=deepspeed"):
        load_config(SMOKE, ["engine.engine=deepspeed", f"{option}=true"])
    assert getattr(load_config(SMOKE, [f"{option}=true"]).engine, option.split(".")[1])  # DDP keeps it


def test_fp16_on_a_cpu_device_is_refused_with_the_reason():
    cfg = load_config(SMOKE, ["engine.precision=fp16"])
    with pytest.raises(ConfigError, match="engine.precision=fp16: runs ~40x slower than bf16 on a CPU"):
        check_device(cfg, torch.device("cpu"))
    check_device(load_config(SMOKE, ["engine.precision=bf16"]), torch.device("cpu"))  # bf16 is fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal concerns CPU devices")
def test_the_train_command_says_so_in_one_line(tmp_path, smoke_shards):
    proc = subprocess.run([sys.executable, "-m", "bgtrain.train", "--config", str(SMOKE), f"out_dir={tmp_path}",
                           f"data.shards={smoke_shards}", "engine.precision=fp16"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: engine.precision=fp16: runs ~40x slower")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("deterministic", [True, False])
def test_engine_deterministic_sets_torch_and_never_nan_fills(deterministic):
    from bgtrain.engines.base import apply_determinism
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    try:
        apply_determinism(load_config(SMOKE, [f"engine.deterministic={str(deterministic).lower()}"]),
                          torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = before[1]
