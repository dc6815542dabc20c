"""``python -m bgtrain.evaluate`` scores a checkpoint as the training's own validation did: the config's precision
(bf16 autocast here) and weight layout (channels-last), through the same scoring pass."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bgtrain.cli import run_cli
from tests.conftest import REPO

SMOKE = str(REPO / "configs/smoke.yaml")


def test_evaluate_reproduces_the_bf16_channels_last_runs_test_map(smoke_shards, tmp_path):
    from bgtrain.checkpoint import load_model_for_eval
    from bgtrain.engines.base import EvalEngine
    from bgtrain.evaluate import main as evaluate
    from bgtrain.train import main as train

    out = tmp_path / "run"
    assert run_cli(train, ["--config", SMOKE, f"data.shards={smoke_shards}", f"out_dir={out}", "data.image_size=32",
                           "data.workers=0", "data.max_batches=2", "optim.epochs=1", "checkpoint.every_steps=0",
                           "engine.precision=bf16", "model.channels_last=true", "eval.select_on=none"]) == 0
    trained = json.loads((out / "results.json").read_text())
    best = out / "checkpoints" / "best.pt"
    assert run_cli(evaluate, ["--checkpoint", str(best), "--shards", str(smoke_shards), "--groups", "2",
                              "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "map_test.json").read_text())
    assert report["all"]["map"] == pytest.approx(trained["test_map"], abs=1e-9)

    # The evaluation engine takes the checkpoint's precision and layout, and they matter: fp32 scores differ.
    model, cfg = load_model_for_eval(best)
    engine = EvalEngine(cfg, model, torch.device("cpu"))
    assert engine.dtype == torch.bfloat16
    convs = [p for p in engine.module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)
    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    fp32 = EvalEngine(dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, precision="fp32")), model,
                      torch.device("cpu"))
    assert not torch.equal(engine.eval_logits(images), fp32.eval_logits(images))


def test_eval_engine_layout_follows_the_engine_and_fp16_on_a_cpu_scores_in_fp32():
    from bgtrain.config import load_config
    from bgtrain.engines.base import EvalEngine, weight_memory_format
    from bgtrain.model import build_model

    assert weight_memory_format(load_config(SMOKE, ["model.channels_last=true"])) == torch.channels_last
    assert weight_memory_format(load_config(SMOKE, ["model.channels_last=true", "engine.engine=deepspeed"])) == (
        torch.contiguous_format)  # ZeRO's flat buffers keep the default layout in training too
    cfg = load_config(SMOKE, ["engine.precision=fp16", "model.depth=18"])
    engine = EvalEngine(cfg, build_model(cfg.model, 3), torch.device("cpu"))
    assert engine.dtype == torch.float32 and engine.fp32_instead_of == "fp16"
    engine.train(True)
    assert not engine.module.training  # evaluation only
