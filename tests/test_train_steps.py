"""The training step's contract with the device and the other ranks (issues 14 and 18):

- no host sync (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``) and no ``all_reduce`` on steps that do not log;
- a step without data on any rank changes nothing (weights, optimizer, BatchNorm, criterion, scaler) and runs no
  collective, under real gloo DDP and DeepSpeed;
- padding rows feed neither the loss nor BatchNorm, and a rank without valid rows still joins DDP's all-reduce.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bgtrain.config import load_config
from bgtrain.data import build_loader
from bgtrain.distributed import WorldInfo
from bgtrain.engines import build_engine
from bgtrain.losses import build_criterion
from bgtrain.model import build_model
from tests.conftest import REPO, free_port, join_gloo_group

SMOKE = REPO / "configs/smoke.yaml"
HOST_READS = ("item", "__float__", "__bool__", "tolist")


def _set_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ.pop("TORCHELASTIC_RESTART_COUNT", None)
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ no host sync per step
def _spy_worker(rank: int, world: int, port: int, shards: str, out_dir: str, scheme: str) -> None:
    _set_env(rank, world, port)
    import bgtrain.trainer as trainer_module
    cfg = load_config(SMOKE, [f"data.shards={shards}", f"out_dir={out_dir}", f"loss.scheme={scheme}",
                              "loss.delta_rel=0.05", "optim.epochs=2", "data.max_batches=6", "log_every=3",
                              "checkpoint.every_steps=0", "data.workers=0"])
    trainer = trainer_module.Trainer(cfg)
    trainer.epoch = 2  # the large-loss rule selects entries from epoch 2 on
    step = [0]
    events: list[tuple[int, str, str, str]] = []

    def spied(kind: str, original, anywhere: bool):
        def call(*args, **kwargs):
            caller = sys._getframe(1)
            # bgtrain.collectives.all_reduce only hands the call on to torch.distributed: name its caller
            if caller.f_code.co_filename.endswith("bgtrain/collectives.py") and caller.f_code.co_name == "all_reduce":
                caller = caller.f_back
            where = caller.f_code.co_filename
            # bgtrain's own reads count; the loader's reads of host-side tensors (before they move to the
            # device) do not. Every Python all_reduce counts, wherever it comes from.
            if anywhere or ("/bgtrain/" in where and "/bgtrain/data/" not in where):
                events.append((step[0], kind, f"{where}:{caller.f_lineno}", caller.f_code.co_name))
            return original(*args, **kwargs)
        return call

    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    original_all_reduce, original_step = dist.all_reduce, trainer_module.train_step

    def marked_step(*args, **kwargs):
        step[0] += 1
        return original_step(*args, **kwargs)

    for name, fn in originals.items():
        setattr(torch.Tensor, name, spied(name, fn, anywhere=False))
    dist.all_reduce = spied("all_reduce", original_all_reduce, anywhere=True)
    trainer_module.train_step = marked_step
    stop = trainer_module.StopRequested()
    try:
        assert trainer._train_epoch(stop)  # the loop only: validation syncs by design
    finally:
        stop.restore()
        trainer.log.close()
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        dist.all_reduce, trainer_module.train_step = original_all_reduce, original_step
        Path(out_dir, f"events{rank}.json").write_text(json.dumps(events))
        dist.destroy_process_group()


@pytest.mark.distributed  # two gloo ranks
@pytest.mark.parametrize("scheme", ["LL-R", "LL-Cp"])
def test_no_host_sync_or_all_reduce_on_steps_that_do_not_log(smoke_shards, tmp_path, scheme):
    """LL-R and LL-Cp at epoch 2 on two gloo ranks, six steps logging every third.

    LL-Cp's store labels a batch and records its corrections on the rank itself (tests/test_llcp_store.py).
    ROLE and EM+APL are left out: they exchange per-step data with the other ranks by design."""
    mp.spawn(_spy_worker, args=(2, free_port(), str(smoke_shards), str(tmp_path), scheme), nprocs=2, join=True)
    steps, log_every = 6, 3
    quiet = [s for s in range(1, steps) if s % log_every]  # neither logging nor the epoch's last step
    assert quiet == [1, 2, 4, 5]
    for rank in (0, 1):
        events = json.loads((tmp_path / f"events{rank}.json").read_text())
        assert {e[0] for e in events} >= {3, 6}, "the spy saw nothing at the logging steps"
        during = [e for e in events if e[0] in quiet]
        assert during == [], f"rank {rank}: host syncs on non-logging steps: {during[:5]}"
    rank1 = json.loads((tmp_path / "events1.json").read_text())
    # At logging steps rank 1 only takes part in agreeing on the stop flag; rank 0 alone reads the loss. After the
    # epoch's last step (6) the ranks also sum the epoch's sample counts once (skipped samples are counted).
    assert {e[3] for e in rank1 if e[0] == 3} == {"agreed"}
    assert {e[3] for e in rank1 if e[0] == 6} == {"agreed", "sum_over_ranks"}
    rank0 = json.loads((tmp_path / "events0.json").read_text())
    assert {e[3] for e in rank0 if e[0] == 3} == {"agreed", "_train_epoch"}
    assert {e[3] for e in rank0 if e[0] == 6} == {"agreed", "_train_epoch", "sum_over_ranks"}


# ------------------------------------------------------------------------------------ empty and partial steps
def _snapshot(engine, criterion) -> bytes:
    buf = io.BytesIO()
    torch.save({"engine": engine.state_dict(), "criterion": criterion.state_dict()}, buf)
    return buf.getvalue()


def _loaded(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), weights_only=False)


def _assert_same(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def _without_data(batch, step_has_data: bool):
    """The same batch with every row padding (the loader's placeholders carry id -1)."""
    return dataclasses.replace(batch, valid=torch.zeros_like(batch.valid), num_valid=0,
                               sample_id=torch.full_like(batch.sample_id, -1), step_has_data=step_has_data)


def _engine_worker(rank: int, world: int, port: int, shards: str, out_dir: str, engine_name: str) -> None:
    _set_env(rank, world, port)
    join_gloo_group(rank, world, port + 1)
    from bgtrain.trainer import train_step
    try:
        cfg = load_config(SMOKE, [f"data.shards={shards}", f"engine.engine={engine_name}", "loss.scheme=ROLE",
                                  "loss.expected_positives=2.0",
                                  "data.workers=0"])
        info, device = WorldInfo(rank, world), torch.device("cpu")
        loader = build_loader(cfg.data, "train", info, device, train=True, seed=0)
        batches = [b for _, b in zip(range(3), loader)]
        torch.manual_seed(0)
        engine = build_engine(cfg, build_model(cfg.model, loader.num_classes), info, device)
        criterion = build_criterion(cfg.loss, loader.info.dataset, loader.info.num_samples, loader.num_classes,
                                    epochs=2, lr=1e-3, seed=0)
        assert train_step(engine, criterion, batches[0], 1) is not None  # Adam and the ROLE table have momentum
        before = _snapshot(engine, criterion)

        calls = []
        names = ("all_reduce", "all_gather", "broadcast", "all_gather_object", "barrier")
        originals = {n: getattr(dist, n) for n in names}
        for n, fn in originals.items():
            setattr(dist, n, lambda *a, _n=n, _fn=fn, **k: (calls.append(_n), _fn(*a, **k))[1])
        try:
            out = train_step(engine, criterion, _without_data(batches[1], step_has_data=False), 1)
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)
        assert out is None and calls == []
        _assert_same(_loaded(before), _loaded(_snapshot(engine, criterion)))

        # Rank 1 has no valid row in a step where rank 0 has data: both finish the step, and agree.
        module = engine.module

        def running_stats() -> torch.Tensor:
            return torch.cat([v.flatten().float() for k, v in module.state_dict().items() if "running" in k])

        bn_before = running_stats()
        step = batches[1] if rank == 0 else _without_data(batches[1], step_has_data=True)
        assert train_step(engine, criterion, step, 1) is not None
        flat = torch.cat([p.detach().flatten() for p in module.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree after a step where one had no rows"
        # Before each forward both engines copy rank 0's BatchNorm buffers to every rank; after that, only real
        # rows may move them: rank 0's moved, rank 1's 0-row forward left rank 0's previous statistics as they were.
        before_on_rank0 = bn_before.clone()
        dist.broadcast(before_on_rank0, src=0)
        bn_after = running_stats()
        if rank == 0:
            assert not torch.equal(bn_after, bn_before), "real rows must move BatchNorm statistics"
        else:
            assert torch.equal(bn_after, before_on_rank0), "a rank without rows must not move BatchNorm statistics"
        Path(out_dir, f"ok{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed  # two gloo ranks
@pytest.mark.parametrize("engine_name", ["ddp", "deepspeed"])
def test_a_step_without_data_changes_nothing_and_an_empty_rank_still_joins(smoke_shards, tmp_path, engine_name):
    if engine_name == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional dependency")
    mp.spawn(_engine_worker, args=(2, free_port(), str(smoke_shards), str(tmp_path), engine_name), nprocs=2,
             join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_padding_rows_feed_neither_the_loss_nor_batchnorm(smoke_shards):
    """One step on 16 rows of which the last 6 are padding equals one step on the 10 real rows alone."""
    from bgtrain.trainer import train_step
    cfg = load_config(SMOKE, [f"data.shards={smoke_shards}", "loss.scheme=AN", "data.workers=0"])
    info, device = WorldInfo(), torch.device("cpu")
    loader = build_loader(cfg.data, "train", info, device, train=True, seed=0)
    batch = next(iter(loader))
    assert batch.num_valid == batch.image.shape[0] == 16
    valid = torch.arange(16) < 10
    padded = dataclasses.replace(batch, valid=valid, num_valid=10,
                                 sample_id=torch.where(valid, batch.sample_id, -1),
                                 image=torch.where(valid[:, None, None, None], batch.image, 3.0))
    real = dataclasses.replace(batch, image=batch.image[:10], labels=batch.labels[:10],
                               sample_id=batch.sample_id[:10], valid=batch.valid[:10], num_valid=10)

    def one_step(b) -> dict:
        torch.manual_seed(0)
        engine = build_engine(cfg, build_model(cfg.model, loader.num_classes), info, device)
        train_step(engine, build_criterion(cfg.loss, "synthetic"), b, 1)
        return engine.module.state_dict()

    a, b, everything = one_step(padded), one_step(real), one_step(dataclasses.replace(padded, num_valid=16))
    _assert_same(a, b)
    assert not torch.equal(a["trunk.1.running_mean"], everything["trunk.1.running_mean"])  # the stem's BN
