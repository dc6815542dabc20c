"""``torchrun -m bgtrain.train --config configs/X.yaml [key.sub=value ...]``: wires config, data,
model, loss, engine, checkpoints and evaluation together. The logic lives in those modules."""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bgtrain import checkpoint as ckpt
from bgtrain.config import ConfigError, TrainConfig, load_config, save_config, to_dict
from bgtrain.data import build_loader
from bgtrain.distributed import WorldInfo, broadcast_object, init_distributed, shutdown
from bgtrain.engine import DTYPES, build_engine
from bgtrain.evaluate import report, sharded_ap_with_counts
from bgtrain.labels import CorrectionStore
from bgtrain.losses import build_criterion
from bgtrain.metrics import mean_ap
from bgtrain.model import build_model
from bgtrain.ops import active_implementation
from bgtrain.predict import predict
from bgtrain.progress import RankZeroProgress
from shards.format import read_manifest


class StopRequested:
    """SIGUSR1 / SIGTERM (Slurm's warning before the time limit): checkpoint at the next step, exit 0."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, *_: object) -> None:
        self.flag = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank was signalled, so that all stop at the same step."""
        if not dist.is_initialized():
            return self.flag
        t = torch.tensor([float(self.flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


class MetricsLog:
    """``metrics.jsonl`` on rank 0, one JSON object per line."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: object) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def seed_everything(seed: int, rank: int) -> None:
    torch.manual_seed(seed)  # same on all ranks: identical initial weights even before DDP's broadcast
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    torch.use_deterministic_algorithms(True, warn_only=True)


def score_split(engine, cfg: TrainConfig, split: str, world: WorldInfo, device: torch.device,
                label_set: str | None = None):
    """(scores, labels, sample ids) of this rank's share of a split, in eval mode (the evaluation alpha)."""
    loader = build_loader(cfg.data, split, world, device, train=False, seed=cfg.seed,
                          channels_last=cfg.model.channels_last, label_set=label_set)
    engine.train(False)
    try:
        return predict(engine.eval_logits, loader, with_ids=True)
    finally:
        engine.train(True)


def evaluate_map(engine, cfg: TrainConfig, split: str, world: WorldInfo, device: torch.device) -> tuple[float, dict]:
    """mAP (%) of the current model on a split (full labels); all ranks take part."""
    scores, labels, _ = score_split(engine, cfg, split, world, device)
    result = sharded_ap_with_counts(scores, labels)
    value, info = mean_ap(result.ap, cfg.eval.no_positive, result.n_pos)
    if cfg.eval.groups:
        groups = report(result.ap, read_manifest(cfg.data.shards), cfg.eval.groups, cfg.eval.no_positive,
                        result.n_pos)["groups"]
        info["groups"] = groups
    return value, info


def run(cfg: TrainConfig) -> dict:
    """Train, select the best epoch on validation, evaluate it on test; returns the final results."""
    world, device = init_distributed(cfg.engine.timeout_s)
    seed_everything(cfg.seed, world.rank)
    out_dir = Path(cfg.out_dir)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    log = MetricsLog(out_dir / "metrics.jsonl", world.is_main)
    dtype = DTYPES[cfg.engine.precision] if device.type == "cuda" else torch.float32
    train_loader = build_loader(cfg.data, "train", world, device, train=True, seed=cfg.seed,
                                channels_last=cfg.model.channels_last, dtype=dtype)
    model = build_model(cfg.model, train_loader.num_classes)
    engine = build_engine(cfg, model, world, device)
    criterion = build_criterion(cfg.loss, train_loader.info.dataset, train_loader.info.num_samples,
                                train_loader.num_classes, epochs=cfg.optim.epochs,
                                lr=cfg.optim.lr * cfg.optim.head_lr_mult, seed=cfg.seed)
    store = CorrectionStore(train_loader.num_classes, world.rank, world.world_size)
    saver = ckpt.CheckpointSaver(out_dir / "checkpoints", cfg.checkpoint.keep_last)
    progress = RankZeroProgress(world.is_main)
    progress.log(f"world {world.world_size} on {device}, engine {engine.name}, precision {cfg.engine.precision}, "
                 f"BoostLU op: {active_implementation(device)}, alpha train/eval "
                 f"{cfg.model.alpha_train}/{cfg.model.alpha_eval}")

    epoch, batches_done, global_step, best = 1, 0, 0, {"val_map": -1.0, "epoch": 0}
    resume = saver.resolve(cfg.checkpoint.resume) if world.is_main else None
    resume = broadcast_object(str(resume) if resume else None)
    if resume:
        state = ckpt.load(resume)
        engine.load_state_dict(state["engine"])
        store.load_state_dict(state["corrections"])
        if hasattr(criterion, "load_state_dict"):
            criterion.load_state_dict(state["criterion"])
        ckpt.set_rng_state(state["rng"][world.rank % len(state["rng"])])
        epoch, batches_done = state["loader"]["epoch"], state["loader"]["batches_done"]
        global_step, best = state["global_step"], state["best"]
        progress.log(f"resumed from {resume}: epoch {epoch}, batch {batches_done}")

    def save(is_best: bool = False) -> None:
        rngs = [None] * world.world_size
        if dist.is_initialized():
            dist.all_gather_object(rngs, ckpt.rng_state())
        else:
            rngs = [ckpt.rng_state()]
        state = {"engine": engine.state_dict(), "corrections": store.state_dict(), "rng": rngs,
                 "criterion": criterion.state_dict() if hasattr(criterion, "state_dict") else {},
                 "loader": train_loader.state_dict(), "global_step": global_step, "best": best,
                 "config": to_dict(cfg)}
        if world.is_main:
            saver.save(state, global_step, is_best)

    stop = StopRequested()
    uses_corrections = cfg.loss.scheme == "LL-Cp"
    while epoch <= cfg.optim.epochs:
        train_loader.set_epoch(epoch, batches_done)
        engine.train(True)
        task = progress.start(f"epoch {epoch}", total=len(train_loader), completed=batches_done)
        tick = time.perf_counter()
        for batch in train_loader:
            data_s = time.perf_counter() - tick
            labels = store.apply(batch.labels, batch.sample_id) if uses_corrections else batch.labels
            out = engine.step(batch.image, lambda logits: criterion(logits, labels, epoch, batch.valid,
                                                                    batch.sample_id))
            if hasattr(criterion, "after_step"):
                criterion.after_step()
            if out.corrections is not None:
                store.record(batch.sample_id, out.corrections & batch.valid[:, None])
            global_step += 1
            step_s = time.perf_counter() - tick
            progress.advance(task, f"loss {out.loss.item():.4f}  data {data_s:.3f}s / step {step_s:.3f}s")
            if global_step % cfg.log_every == 0:
                log.write(kind="train", epoch=epoch, step=global_step, loss=out.loss.item(),
                          selected=int(out.selected.sum()), corrections=len(store), data_s=round(data_s, 4),
                          step_s=round(step_s, 4), img_s=round(batch.image.shape[0] * world.world_size / step_s, 1))
            if cfg.checkpoint.every_steps and global_step % cfg.checkpoint.every_steps == 0:
                save()
            if stop.agreed(device):
                save()
                progress.log(f"stop requested: checkpoint at step {global_step}, exiting")
                progress.close()
                return {"stopped_at_step": global_step}
            tick = time.perf_counter()
        progress.finish(task)
        if hasattr(criterion, "end_epoch"):
            criterion.end_epoch(epoch, lambda: score_split(engine, cfg, "train", world, device, cfg.data.labels))
        val_map, info = evaluate_map(engine, cfg, "val", world, device) if cfg.eval.select_on == "val" else (0.0, {})
        is_best = cfg.eval.select_on == "none" or val_map > best["val_map"]
        if is_best:
            best = {"val_map": val_map, "epoch": epoch}
        log.write(kind="val", epoch=epoch, step=global_step, val_map=val_map, **info)
        progress.log(f"epoch {epoch}: val mAP {val_map:.2f} (best {best['val_map']:.2f} at epoch {best['epoch']})")
        epoch, batches_done = epoch + 1, 0
        train_loader.set_epoch(epoch, 0)
        save(is_best)

    best_path = broadcast_object(str(saver.folder / "best.pt") if world.is_main else None)
    if dist.is_initialized():
        dist.barrier()
    engine.load_state_dict(ckpt.load(best_path)["engine"])
    test_map, info = evaluate_map(engine, cfg, "test", world, device)
    results = {"name": cfg.name, "scheme": cfg.loss.scheme, "alpha_train": cfg.model.alpha_train,
               "alpha_eval": cfg.model.alpha_eval, "best_epoch": best["epoch"], "val_map": best["val_map"],
               "test_map": test_map, **info}
    log.write(kind="test", **results)
    if world.is_main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    progress.log(f"test mAP {test_map:.2f} (epoch {best['epoch']} selected on val)")
    progress.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun -m bgtrain.train",
        description="Train a CAM ResNet with BoostLU / large-loss schemes on WebDataset shards.",
        epilog="example: torchrun --standalone --nproc_per_node=2 -m bgtrain.train "
               "--config configs/smoke.yaml loss.scheme=LL-R optim.epochs=2")
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and the README)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.alpha_eval=5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # fails before any process group starts
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
