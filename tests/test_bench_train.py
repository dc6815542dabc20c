"""`bench train`: the issue's CPU command end to end, the step-time split, a synthetic batch shaped as the loader's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bgtrain.bench.train import measure, synthetic_batch
from bgtrain.config import DataConfig
from bgtrain.data import build_loader
from bgtrain.distributed import WorldInfo

REPO = Path(__file__).resolve().parents[1]
CPU_COMMAND = ["--device", "cpu", "--synthetic", "64", "--depth", "18", "--image-size", "64", "--classes", "20",
               "--steps", "6"]


@pytest.mark.slow  # the benchmark CLI end to end
def test_cpu_command_prints_every_mode_and_input_efficiency():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bgtrain.bench", "train", *CPU_COMMAND], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines()]  # stdout holds JSON lines only
    setup, modes, summaries = lines[0], lines[1:-1], lines[-1:]
    assert setup["bench"] == "train" and setup["device"] == "cpu" and setup["classes"] == 20
    assert setup["unique_samples"] == 64 and setup["depth"] == 18 and setup["steps"] == 6
    assert [(m["mode"], m.get("backend")) for m in modes] == [("synthetic", None), ("loader", "dali"),
                                                              ("loader_only", "dali")]
    for m in modes:
        assert m["steps"] == 6 and m["img_per_s"] > 0 and m["peak_mem_mib"] > 0
        assert m["peak_mem_kind"] == "process_peak_rss"
        assert abs(m["data_wait_ms"] + m["compute_ms"] - m["step_ms"]) <= 0.02
        # img/s is the batch (16 on the CPU) times the timed steps over their wall time
        assert abs(m["img_per_s"] - 6 * 16 / m["seconds"]) <= 0.05 * m["img_per_s"] + 0.1
    (summary,) = summaries
    ceiling, fed, alone = (m["img_per_s"] for m in modes)
    assert summary["summary"] is True and summary["backend"] == "dali" and summary["decode"] == "cpu"
    assert summary["rounds"] == 1 and summary["data_wait_ms"] == modes[1]["data_wait_ms"]
    assert summary["ceiling_img_per_s"] == ceiling and summary["end_to_end_img_per_s"] == fed
    assert summary["loader_alone_img_per_s"] == alone
    assert summary["input_efficiency"] == round(fed / ceiling, 3) > 0


def _slow_batches(seconds: float):
    while True:
        time.sleep(seconds)
        yield None


def test_step_time_splits_into_data_wait_and_compute():
    m = measure(lambda batch: time.sleep(0.01), _slow_batches(0.02), warmup=1, steps=5, batch_size=4,
                device=torch.device("cpu"))
    rec = m.record()
    assert rec["data_wait_ms"] >= 20 and rec["compute_ms"] >= 10
    assert rec["step_ms"] >= 30 and rec["img_per_s"] == round(5 * 4 / m.seconds, 1)


def test_synthetic_batch_has_the_loaders_shape_dtype_layout_and_label_coding(smoke_shards):
    cfg = DataConfig(shards=str(smoke_shards), backend="webdataset", image_size=32, batch_size=8, workers=0)
    loader = build_loader(cfg, "train", WorldInfo(), torch.device("cpu"), train=True, seed=0, channels_last=True)
    real = next(iter(loader))
    fake = synthetic_batch(8, 32, loader.num_classes, torch.device("cpu"), torch.float32, channels_last=True)
    for a, b in ((real.image, fake.image), (real.labels, fake.labels), (real.valid, fake.valid)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert fake.image.is_contiguous(memory_format=torch.channels_last)
    assert real.image.is_contiguous(memory_format=torch.channels_last)
    # observed single-positive coding: one 1 per row, -1 (unknown) elsewhere, as the training split has
    assert ((real.labels == 1).sum(1) == 1).all() and ((fake.labels == 1).sum(1) == 1).all()
    assert set(fake.labels.unique().tolist()) == set(real.labels.unique().tolist()) == {-1, 1}
