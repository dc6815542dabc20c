"""The lr a run uses (bgtrain.schedule): scaling by the global batch, warm-up, cosine; the defaults are the paper's
recipe bit for bit; the start-up line and the warning; a resume continues the schedule exactly; DeepSpeed steps
with the scheduled lr."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bgtrain.config import OptimConfig, load_config
from bgtrain.data import build_loader
from bgtrain.distributed import WorldInfo
from bgtrain.engines import build_engine
from bgtrain.losses import build_criterion
from bgtrain.model import build_model
from bgtrain.schedule import build_scheduler, lr_factor, lr_scale, scaling_warning, startup_line
from tests.conftest import REPO, free_port, join_gloo_group

SMOKE = REPO / "configs/smoke.yaml"


def test_the_defaults_are_the_paper_recipe_and_a_factor_of_exactly_one():
    cfg = OptimConfig()
    assert (cfg.lr, cfg.head_lr_mult, cfg.reference_batch, cfg.lr_scaling, cfg.warmup_steps, cfg.schedule) == (
        1e-5, 10.0, 16, "none", 0, "constant")
    assert all(lr_factor(cfg, batch, 1000, step) == 1.0 for batch in (1, 16, 1024) for step in (0, 1, 999, 5000))
    assert scaling_warning(cfg, 16, 1) is None


def test_scaling_warm_up_and_cosine():
    linear, sqrt = OptimConfig(lr_scaling="linear"), OptimConfig(lr_scaling="sqrt")
    assert lr_scale(linear, 1024) == 64 and lr_scale(sqrt, 1024) == 8 and lr_scale(sqrt, 16) == 1
    warm = OptimConfig(warmup_steps=4)
    assert [lr_factor(warm, 16, 100, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = OptimConfig(warmup_steps=2, schedule="cosine", lr_scaling="sqrt")
    f = [lr_factor(cos, 64, 12, s) for s in range(13)]
    assert f[:3] == [1.0, 2.0, 2.0] and f[7] == pytest.approx(1.0) and f[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam([{"params": [m.weight], "lr": 1e-5}, {"params": [m.bias], "lr": 1e-4}])
    sched = build_scheduler(opt, cos, 64, 12)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-4]  # step 0: half of twice the lr
    opt.step()
    sched.step()
    trunk, head = (g["lr"] for g in opt.param_groups)
    assert trunk == pytest.approx(2e-5) and head == pytest.approx(2e-4) and head / trunk == pytest.approx(10)


def test_the_startup_line_and_the_warning_name_the_keys():
    line = startup_line(OptimConfig(lr_scaling="sqrt", grad_accum=2), 16, 8)
    assert "global batch 256" in line and "optim.reference_batch 16" in line and "optim.lr_scaling sqrt" in line
    assert "lr trunk 4e-05, head 0.0004" in line
    warning = scaling_warning(OptimConfig(), 16, 64)
    assert warning is not None and "\n" not in warning
    for key in ("1024", "optim.reference_batch 16", "optim.lr_scaling", "data.batch_size", "optim.grad_accum"):
        assert key in warning
    assert scaling_warning(OptimConfig(lr_scaling="linear"), 16, 64) is None


def test_the_default_schedule_leaves_training_bit_identical(smoke_shards):
    """Three steps with the default scheduler attached and stepped equal three steps of the engine alone."""
    from bgtrain.trainer import train_step
    cfg = load_config(SMOKE, [f"data.shards={smoke_shards}", "data.workers=0", "data.max_batches=3"])
    info, device = WorldInfo(), torch.device("cpu")
    loader = build_loader(cfg.data, "train", info, device, train=True, seed=0)
    batches = list(loader)

    def run(with_schedule: bool) -> dict:
        torch.manual_seed(0)
        engine = build_engine(cfg, build_model(cfg.model, loader.num_classes), info, device)
        sched = build_scheduler(engine.optimizer, cfg.optim, 16, 0) if with_schedule else None  # type: ignore[attr-defined]
        criterion = build_criterion(cfg.loss, "synthetic", batch_rows=16)
        for b in batches:
            train_step(engine, criterion, b, 2)
            if sched is not None:
                sched.step()
        return {**engine.module.state_dict(), **{f"lr{i}": torch.tensor(g["lr"])
                                                 for i, g in enumerate(engine.optimizer.param_groups)}}  # type: ignore[attr-defined]

    a, b = run(False), run(True)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def trainer(smoke_shards, out: Path, *overrides: str):
    from bgtrain.trainer import Trainer
    return Trainer(load_config(SMOKE, [f"data.shards={smoke_shards}", f"out_dir={out}", "data.workers=0",
                                       "log.tensorboard=false", "eval.select_on=none", *overrides]))


def test_startup_line_and_warning_of_a_run(smoke_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # the console's lines unwrapped
    trainer(smoke_shards, tmp_path / "a", "data.batch_size=8").log.close()
    err = capsys.readouterr().err
    assert ("global batch 8 (data.batch_size 8 x world 1 x optim.grad_accum 1), optim.reference_batch 16, "
            "optim.lr_scaling none (x1): lr trunk 0.0001, head 0.001; no warm-up, schedule constant") in err
    (warning,) = [line for line in err.splitlines() if "warning:" in line]
    assert "global batch 8 differs from optim.reference_batch 16 and optim.lr_scaling is none" in warning

    trainer(smoke_shards, tmp_path / "b", "data.batch_size=8", "optim.lr_scaling=linear").log.close()
    err = capsys.readouterr().err
    assert "optim.lr_scaling linear (x0.5): lr trunk 5e-05, head 0.0005" in err and "warning:" not in err
    trainer(smoke_shards, tmp_path / "c").log.close()  # the smoke config on one rank: global batch 16, no warning
    err = capsys.readouterr().err
    assert "global batch 16 " in err and "warning:" not in err


def test_a_resume_continues_the_schedule_exactly(smoke_shards, tmp_path):
    """Warm-up then cosine over 2 epochs of 3 steps with grad_accum 2: the run resumed from its step-2
    checkpoint logs the same lrs and losses and ends with the same weights."""
    common = ("optim.epochs=2", "data.max_batches=3", "log_every=1", "checkpoint.every_steps=2",
              "checkpoint.keep_last=10", "optim.warmup_steps=2", "optim.schedule=cosine", "optim.grad_accum=2",
              "optim.lr_scaling=sqrt", "optim.reference_batch=4")
    full = tmp_path / "full"
    trainer(smoke_shards, full, *common).fit()
    lrs = [(r["step"], r["lr"], r["lr_head"]) for r in records(full, "train")]
    assert len({lr for _, lr, _ in lrs}) >= 3  # the lr moved
    assert all(head == pytest.approx(10 * lr) for _, lr, head in lrs)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    start = full / "checkpoints" / f"step-{2:09d}.pt"
    shutil.copy(start, resumed / "checkpoints" / start.name)
    trainer(smoke_shards, resumed, *common, f"checkpoint.resume={resumed / 'checkpoints' / start.name}").fit()
    again = [(r["step"], r["lr"], r["lr_head"]) for r in records(resumed, "train")]
    assert again == [x for x in lrs if x[0] > 2]
    assert ([r["loss"] for r in records(resumed, "train")]
            == [r["loss"] for r in records(full, "train") if r["step"] > 2])
    last = f"step-{6:09d}.pt"
    a = torch.load(full / "checkpoints" / last, weights_only=True)
    b = torch.load(resumed / "checkpoints" / last, weights_only=True)
    assert a["schedule"] == b["schedule"] and a["schedule"]["micro_steps"] == 6
    for key, value in a["engine"]["model"].items():
        assert torch.equal(value, b["engine"]["model"][key]), key


def test_a_checkpoint_without_schedule_state_still_resumes(smoke_shards, tmp_path):
    """Checkpoints written before schedules were saved load, and continue the (constant) lr."""
    out = tmp_path / "old"
    trainer(smoke_shards, out, "optim.epochs=1", "data.max_batches=2", "checkpoint.every_steps=2").fit()
    path = out / "checkpoints" / f"step-{2:09d}.pt"
    state = torch.load(path, weights_only=True)
    del state["schedule"]
    torch.save(state, path)
    t = trainer(smoke_shards, out, "optim.epochs=1", "data.max_batches=2", f"checkpoint.resume={path}")
    try:
        assert t.micro_steps == 2 and t.scheduler.last_epoch == 2 and t.scheduler.get_last_lr() == [1e-4, 1e-3]
    finally:
        t.log.close()


# ------------------------------------------------------------------------------------------------ DeepSpeed
def _deepspeed_worker(rank: int, world: int, port: int, shards: str, stage: int) -> None:
    join_gloo_group(rank, world, port)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    try:
        cfg = load_config(SMOKE, [f"data.shards={shards}", "data.workers=0", "engine.engine=deepspeed",
                                  f"engine.zero_stage={stage}", "optim.warmup_steps=4"])
        info, device = WorldInfo(), torch.device("cpu")
        engine = build_engine(cfg, build_model(cfg.model, 10), info, device)
        sched = build_scheduler(engine.optimizer, cfg.optim, 16, 0)  # type: ignore[attr-defined]
        ds = engine.model  # type: ignore[attr-defined]
        assert ds.get_lr() == [0.25e-4, 0.25e-3], ds.get_lr()  # what DeepSpeed steps with
        criterion = build_criterion(cfg.loss, "synthetic", batch_rows=16)
        labels = torch.full((2, 10), -1, dtype=torch.int8)
        engine.step(torch.randn(2, 3, 64, 64), lambda logits: criterion(logits, labels, 1))
        sched.step()
        assert ds.get_lr() == [0.5e-4, 0.5e-3], ds.get_lr()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed  # a spawned process with its own gloo group
@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_steps_with_the_scheduled_lr(smoke_shards, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional dependency")
    mp.spawn(_deepspeed_worker, args=(1, free_port(), str(smoke_shards), stage), nprocs=1, join=True)


def test_cosine_total_steps_is_the_runs_optimizer_steps():
    cfg = OptimConfig(schedule="cosine", epochs=3, grad_accum=2)
    total = cfg.epochs * 5 // cfg.grad_accum  # 5 steps per epoch
    assert lr_factor(cfg, 16, total, total) == 0.0
    assert lr_factor(cfg, 16, total, total // 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * (total // 2) / total)))
