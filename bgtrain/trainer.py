"""One training run, end to end: :class:`Trainer` wires config, data, model, loss, engine, checkpoints and
evaluation together (the logic of each lives in its own module); ``bgtrain.train`` is the command line."""
from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bgtrain import checkpoint as ckpt
from bgtrain.collectives import all_gather_object, all_reduce, barrier, broadcast_object, sum_over_ranks
from bgtrain.config import TrainConfig, save_config, to_dict
from bgtrain.data import Batch, Loader, build_loader
from bgtrain.distributed import init_distributed, restart_count
from bgtrain.engines import DTYPES, build_engine
from bgtrain.engines.base import Engine
from bgtrain.evaluate import report, sharded_ap_with_counts
from bgtrain.losses import Criterion, LossOutput, build_criterion
from bgtrain.metrics import mean_ap
from bgtrain.model import CamResNet, build_model
from bgtrain.ops import active_implementation
from bgtrain.predict import score_split
from bgtrain.report.cams import EpochCams
from bgtrain.report.tensorboard import TensorBoardSink
from bgtrain.runlog import EpochTimes, RunLogger
from bgtrain.schedule import build_scheduler, continue_schedule, global_batch, reapply, scaling_warning, startup_line
from shards.format import read_manifest


class StopRequested:
    """SIGUSR1 / SIGTERM (Slurm's warning before the time limit): checkpoint at the next step, exit 0.

    The handlers last while the run does: ``restore`` puts back the ones found, so a process that trains in-line
    (a notebook, a test) and later forks workers does not hand them a SIGTERM that only sets a flag."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.flag = False
        self._previous = {sig: signal.signal(sig, self._set) for sig in self.SIGNALS}

    def _set(self, *_: object) -> None:
        self.flag = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank was signalled, so that all stop at the same step.

        A collective and a host read: the trainer asks only at logging steps and at the end of an epoch."""
        if not dist.is_initialized():
            return self.flag
        t = torch.tensor([float(self.flag)], device=device)
        all_reduce(t, "max")
        return bool(t.item())


def train_step(engine: Engine, criterion: Criterion, batch: Batch, epoch: int) -> LossOutput | None:
    """One training step on this rank's valid rows; None, and nothing changes, when no rank has data.

    A step without data anywhere (``batch.step_has_data`` is False, the same on every rank) is skipped by every
    rank alike: no forward, no optimizer, BatchNorm, criterion or scaler update, and no collective left waiting.
    Otherwise only the first ``batch.num_valid`` rows (the valid ones) are forwarded, as views, so padding feeds
    neither the loss nor BatchNorm; a rank with no valid row runs a 0-row step, which still joins DDP's
    gradient all-reduce (its gradient is zero, as the padded batch's was).
    """
    if not batch.step_has_data:
        return None
    n = batch.num_valid
    ids = batch.sample_id[:n]
    labels = criterion.prepare_labels(batch.labels[:n], ids)
    out = engine.step(batch.image[:n], lambda logits: criterion(logits, labels, epoch, None, ids))
    criterion.after_step(out, ids)
    return out


def seed_everything(seed: int, rank: int) -> None:
    torch.manual_seed(seed)  # same on all ranks: identical initial weights even before DDP's broadcast
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def evaluate_map(engine: Engine, cfg: TrainConfig, loader: Loader) -> tuple[float, dict]:
    """mAP (%) of the current model on a split (full labels), with the split's sample counts; all ranks take part."""
    counts: dict = {}
    scores, labels, _ = score_split(engine, loader, counts=counts)
    result = sharded_ap_with_counts(scores, labels)
    value, info = mean_ap(result.ap, cfg.eval.no_positive, result.n_pos, result.n_known - result.n_pos)
    if cfg.eval.groups:
        groups = report(result.ap, read_manifest(cfg.data.shards), cfg.eval.groups, cfg.eval.no_positive,
                        result.n_pos)["groups"]
        info["groups"] = groups
    info["data"] = counts
    return value, info


def shortfall(split: str, counts: dict) -> str | None:
    """A warning when a split was scored or trained on fewer samples than it holds (corrupt ones skipped)."""
    if not counts.get("corrupt"):
        return None
    used = counts["samples"] - counts["corrupt"]
    return (f"{split}: computed on {used} of {counts['samples']} samples; {counts['corrupt']} corrupt samples were "
            "skipped (see the warnings above for the shards)")


def criterion_state(state: dict) -> dict:
    """The criterion's part of a checkpoint; checkpoints written before LL-Cp's corrections moved into its
    criterion keep them under a top-level "corrections" key."""
    if "corrections" in state:
        return {"corrections": state["corrections"], **state["criterion"]}
    return state["criterion"]


class Trainer:
    """One training run: set-up and resume in the constructor, then :meth:`fit`.

    Every rank builds the same objects; rank 0 alone writes files. The state a resume needs (weights, optimizer,
    criterion state such as LL-Cp's corrections or ROLE's table, every rank's RNG, the loader position, the best
    epoch so far) is gathered by :meth:`save`, so a resumed run continues exactly where the saved one was.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.world, self.device = init_distributed(cfg.engine.timeout_s)
        world = self.world
        seed_everything(cfg.seed, world.rank)
        self.out_dir = Path(cfg.out_dir)
        if world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        self.log = RunLogger(self.out_dir / "metrics.jsonl", world.is_main, world.rank).install()
        try:
            self._build()
        except BaseException:  # a run that cannot start gives warnings and logging back to the process
            self.log.close()
            raise

    def _build(self) -> None:
        """Data, model, engine, criterion, sinks and checkpoints, then the resume (every rank)."""
        cfg, world, device = self.cfg, self.world, self.device
        self.epoch_cams: EpochCams | None = None
        dtype = DTYPES[cfg.engine.precision] if device.type == "cuda" else torch.float32
        self.loader = build_loader(cfg.data, "train", world, device, train=True, seed=cfg.seed,
                                   channels_last=cfg.model.channels_last, dtype=dtype)
        self.engine = build_engine(cfg, build_model(cfg.model, self.loader.num_classes), world, device)
        # The lr schedule (scaling, warm-up, decay) on the engine's torch optimizer: one step per optimizer step.
        # engine.optimizer is the DDP engine's torch Adam, or what deepspeed.initialize returned (bgtrain.schedule).
        batch = global_batch(cfg.data.batch_size, world.world_size, cfg.optim.grad_accum)
        total_steps = (cfg.optim.epochs * len(self.loader) // cfg.optim.grad_accum
                       if cfg.optim.schedule == "cosine" else 0)
        self.scheduler = build_scheduler(self.engine.optimizer,  # type: ignore[attr-defined]
                                         cfg.optim, batch, total_steps)
        self.micro_steps = 0  # steps that ran the engine (with data somewhere); every grad_accum-th steps the optimizer
        self.criterion = build_criterion(cfg.loss, self.loader.info.dataset, self.loader.info.num_samples,
                                         self.loader.num_classes, epochs=cfg.optim.epochs,
                                         lr=cfg.optim.lr * cfg.optim.head_lr_mult, seed=cfg.seed,
                                         batch_rows=cfg.data.batch_size)
        if world.is_main and cfg.log.tensorboard:
            self.log.add_sink(TensorBoardSink(self.out_dir))
            if cfg.log.cam_images:
                self.epoch_cams = EpochCams(cfg, self.loader.num_classes, cfg.log.cam_images)
        self.saver = ckpt.CheckpointSaver(self.out_dir / "checkpoints", cfg.checkpoint.keep_last,
                                          cfg.checkpoint.mirror)
        self.log.message(f"world {world.world_size} on {device}, engine {self.engine.name}, precision "
                          f"{cfg.engine.precision}, BoostLU op: {active_implementation(device)}, alpha train/eval "
                          f"{cfg.model.alpha_train}/{cfg.model.alpha_eval}")
        self._announce_lr()
        self.epoch, self.batches_done, self.global_step = 1, 0, 0
        self.best = {"val_map": -1.0, "epoch": 0}
        self.last_loss: float | None = None  # rank 0's loss at the last logging step, for the progress bar
        self.times = EpochTimes()             # where each epoch's wall time goes (an "epoch" record)
        self.scoring: dict[tuple[str, str | None], Loader] = {}  # kept: their loader processes serve every pass
        self._resume()

    def _announce_lr(self) -> None:
        """Rank 0: one line with the global batch, the reference batch, the scaling rule and the lrs used, and a
        warning when the global batch is not the reference one and nothing scales the lr (the lr in use at each
        logging step is in the "train" records, ``lr`` and ``lr_head``)."""
        cfg, world = self.cfg, self.world
        if not world.is_main:
            return
        self.log.message(startup_line(cfg.optim, cfg.data.batch_size, world.world_size))
        warning = scaling_warning(cfg.optim, cfg.data.batch_size, world.world_size)
        if warning:
            self.log.warning(warning)

    def _step_schedule(self) -> None:
        """After a step that ran the engine: the lr schedule moves on at each optimizer step (every grad_accum-th)."""
        self.micro_steps += 1
        if self.micro_steps % self.cfg.optim.grad_accum == 0:
            self.scheduler.step()

    def _resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume is None and restart_count() > 0:
            # A torchrun restart is this run's next attempt: continue it, do not train (and log) it all again.
            resume = "latest"
        found = self.saver.resolve(resume) if self.world.is_main else None
        path = broadcast_object(str(found) if found else None)
        if not path:
            return
        state, cost = ckpt.load_measured(path)  # the one read of the file on this rank
        self.log.run_started = state.get("run_started", self.log.run_started)
        self.engine.load_state_dict(state["engine"])
        self.criterion.load_state_dict(criterion_state(state))
        self._load_schedule(state)
        ckpt.set_rng_state(state["rng"][self.world.rank % len(state["rng"])])
        self.epoch, self.batches_done = state["loader"]["epoch"], state["loader"]["batches_done"]
        self.global_step, self.best = state["global_step"], state["best"]
        self.log.record(kind="resume", path=path, step=self.global_step, **cost)
        self.log.message(f"resumed from {path}: epoch {self.epoch}, batch {self.batches_done}")

    def _load_schedule(self, state: dict) -> None:
        """The schedule where the saved run left it; a checkpoint from before schedules were saved (whose runs had
        the constant lr) continues from the engine's count of micro-steps."""
        if "schedule" in state:
            self.scheduler.load_state_dict(dict(state["schedule"]["scheduler"]))
            self.micro_steps = state["schedule"]["micro_steps"]
            reapply(self.scheduler)
        else:
            engine = state["engine"]
            self.micro_steps = int(engine.get("micro_step", engine.get("micro_steps", 0)))
            continue_schedule(self.scheduler, self.micro_steps // self.cfg.optim.grad_accum)

    def save(self, is_best: bool = False) -> None:
        """Checkpoint now (collective: every rank must call it); rank 0 writes it in the background."""
        started = time.perf_counter()
        rngs = all_gather_object(ckpt.rng_state())
        state = {"engine": self.engine.state_dict(), "rng": rngs, "criterion": self.criterion.state_dict(),
                 "loader": self.loader.state_dict(), "global_step": self.global_step, "best": self.best,
                 "schedule": {"scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps},
                 "config": to_dict(self.cfg), "run_started": self.log.run_started}
        if self.world.is_main:
            previous_write_s = self.saver.last_write_s
            path = self.saver.save(state, self.global_step, is_best)
            self.log.record(kind="checkpoint", step=self.global_step, path=str(path),
                            stall_s=round(time.perf_counter() - started, 4),
                            host_copy_s=round(self.saver.last_stall_s, 4),
                            previous_write_s=round(previous_write_s, 4))
        self.times.add("checkpoint", time.perf_counter() - started)

    def fit(self) -> dict:
        """Train, select the best epoch on validation, evaluate it on test; returns the final results."""
        stop = StopRequested()
        self.times.add("startup", time.time() - self.log.attempt_started)
        completed = False
        try:
            while self.epoch <= self.cfg.optim.epochs:
                if not self._train_epoch(stop):
                    self.saver.wait()  # the stop's checkpoint is on disk before the process exits
                    self.log.message(f"stop requested: checkpoint at step {self.global_step}, exiting")
                    completed = True
                    return {"stopped_at_step": self.global_step}
                self._end_epoch()
            results = self._test_best()
            completed = True
            return results
        finally:
            # Nothing lost on failure: a write in flight still completes; its own error is raised only when the
            # run has none of its own to report.
            self.saver.wait(raise_error=completed)
            self.log.close()
            stop.restore()

    def _train_epoch(self, stop: StopRequested) -> bool:
        """The rest of the current epoch; False when a stop was requested (after checkpointing)."""
        cfg, loader, criterion, epoch = self.cfg, self.loader, self.criterion, self.epoch
        loader.set_epoch(epoch, self.batches_done)
        criterion.begin_epoch(loader.sample_readers)
        self.engine.train(True)
        total = len(loader)
        task = self.log.start(f"epoch {epoch}", total=total, completed=self.batches_done)
        tick = time.perf_counter()
        for batch in loader:
            data_s = time.perf_counter() - tick
            self.saver.check()  # a background checkpoint write that failed stops the run here, naming its path
            out = train_step(self.engine, criterion, batch, epoch)
            if out is not None:
                self._step_schedule()
            self.global_step += 1
            # No host sync on other steps (the device keeps its queue): the loss is read only here, on rank 0.
            logging_step = self.global_step % cfg.log_every == 0
            if logging_step and self.world.is_main:
                self.last_loss = out.loss.item() if out is not None else None
            step_s = time.perf_counter() - tick
            if logging_step:
                self.log.record(kind="train", epoch=epoch, step=self.global_step, loss=self.last_loss,
                                selected=int(out.selected.sum()) if out is not None and self.world.is_main else 0,
                                corrections=criterion.corrections_kept(), lr=self.scheduler.get_last_lr()[0],
                                lr_head=self.scheduler.get_last_lr()[1], data_s=round(data_s, 4),
                                step_s=round(step_s, 4),
                                img_s=round(batch.image.shape[0] * self.world.world_size / step_s, 1),
                                **({} if out is not None else {"empty_step": True}))
            if self.times.first_batch_s is None:
                self.times.first_batch_s = data_s
            self.times.add("data", data_s)
            self.times.add("steps", step_s - data_s)
            loss_text = "-" if self.last_loss is None else f"{self.last_loss:.4f}"
            self.log.advance(task, f"loss {loss_text}  data {data_s:.3f}s / step {step_s:.3f}s")
            if cfg.checkpoint.every_steps and self.global_step % cfg.checkpoint.every_steps == 0:
                self.save()
            # The stop flag is an all_reduce: asked at logging steps and at the epoch's last step, so every
            # rank still stops at the same step.
            if (logging_step or loader.batches_done == total) and stop.agreed(self.device):
                self.save()
                return False
            tick = time.perf_counter()
        self.log.finish(task)
        # Collective, once per epoch: what this epoch read, and how much of it was corrupt (skipped) or padding.
        counts = sum_over_ranks(loader.counts(), self.device)
        self.log.record(kind="data", split="train", epoch=epoch, step=self.global_step, **counts)
        self._warn_shortfall(f"train epoch {epoch}", counts)
        return True

    def _warn_shortfall(self, what: str, counts: dict) -> None:
        warning = shortfall(what, counts)
        if warning:
            self.log.warning(warning)

    def _end_epoch(self) -> None:
        """Criterion's epoch hook, validation, best-epoch bookkeeping and the end-of-epoch checkpoint."""
        cfg, epoch = self.cfg, self.epoch
        started = time.perf_counter()
        self.criterion.end_epoch(epoch, lambda: score_split(self.engine, self.scoring_loader("train", cfg.data.labels)))
        val_map, info = (evaluate_map(self.engine, cfg, self.scoring_loader("val"))
                         if cfg.eval.select_on == "val" else (0.0, {}))
        self.times.add("validation", time.perf_counter() - started)
        is_best = cfg.eval.select_on == "none" or val_map > self.best["val_map"]
        if is_best:
            self.best = {"val_map": val_map, "epoch": epoch}
        self.log.record(kind="val", epoch=epoch, step=self.global_step, val_map=val_map, **info)
        self._warn_shortfall(f"val mAP of epoch {epoch}", info.get("data", {}))
        if self.epoch_cams is not None:  # rank 0 alone, no collective: the same pictures every epoch
            if not isinstance(self.engine.module, CamResNet):
                raise TypeError(f"epoch CAMs need the unwrapped CamResNet, got {type(self.engine.module).__name__}")
            for tag, picture in self.epoch_cams.render(self.engine.module, self.device):
                self.log.image(tag, picture, self.global_step)
        self.log.message(f"epoch {epoch}: val mAP {val_map:.2f} "
                          f"(best {self.best['val_map']:.2f} at epoch {self.best['epoch']})")
        self.epoch, self.batches_done = epoch + 1, 0
        self.loader.set_epoch(self.epoch, 0)
        self.save(is_best)
        self.log.record(kind="epoch", epoch=epoch, step=self.global_step, **self.times.summary())
        self.times.reset()

    def scoring_loader(self, split: str, label_set: str | None = None) -> Loader:
        """The in-order loader of a split for scoring, built once per run and reused by every pass."""
        key = (split, label_set)
        if key not in self.scoring:
            self.scoring[key] = build_loader(self.cfg.data, split, self.world, self.device, train=False,
                                             seed=self.cfg.seed, channels_last=self.cfg.model.channels_last,
                                             label_set=label_set)
        return self.scoring[key]

    def _test_best(self) -> dict:
        cfg, best = self.cfg, self.best
        if self.world.is_main:
            self.saver.wait()  # best.pt is linked by the background write
        # Loaded even when the best epoch is the last: under DDP each rank's BatchNorm buffers drift from rank 0's
        # (the checkpoint's) after the last buffer broadcast, so only the file gives every rank the same model.
        best_path = broadcast_object(str(self.saver.folder / "best.pt") if self.world.is_main else None)
        if best_path is None:
            raise RuntimeError("rank 0 broadcast no path of the best checkpoint")
        barrier()
        self.engine.load_state_dict(ckpt.load(best_path)["engine"])
        test_map, info = evaluate_map(self.engine, cfg, self.scoring_loader("test"))
        results = {"name": cfg.name, "scheme": cfg.loss.scheme, "alpha_train": cfg.model.alpha_train,
                   "alpha_eval": cfg.model.alpha_eval, "best_epoch": best["epoch"], "val_map": best["val_map"],
                   "test_map": test_map, **info}
        self.log.record(kind="test", **results)
        if self.world.is_main:
            (self.out_dir / "results.json").write_text(json.dumps(results, indent=1))
        self.log.message(f"test mAP {test_map:.2f} (epoch {best['epoch']} selected on val) on "
                         f"{info['data']['samples'] - info['data']['corrupt']} test samples")
        self._warn_shortfall("test mAP", info["data"])
        return results
