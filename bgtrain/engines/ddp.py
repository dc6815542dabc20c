"""The DDP engine: DistributedDataParallel (NCCL on GPU, gloo on CPU), or the plain model for one process."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bgtrain.config import TrainConfig
from bgtrain.distributed import WorldInfo
from bgtrain.engines.base import DTYPES, apply_determinism, apply_tf32, build_optimizer, eval_logits
from bgtrain.losses.functional import LossOutput


def mark_batch_dynamic(images: torch.Tensor) -> None:
    """Compile the batch dimension as a symbol, so a short batch (an epoch's last, a rank's share of it) reuses
    the one compiled graph instead of compiling another on each rank where it occurs.

    Marked rather than padded: padding rows would feed BatchNorm's batch statistics and running buffers (the
    trainer forwards only a batch's valid rows for that reason; see ``train_step``), so a padded step would not
    be the same step. ``maybe_mark_dynamic`` and not ``mark_dynamic``: a 0-row step (a rank without valid rows,
    which must still join the all-reduce) or a 1-row one is specialised by Dynamo, which ``mark_dynamic`` turns
    into an error; those sizes compile once each instead, and only when they occur.
    """
    if images.dim() > 0 and images.shape[0] > 1:
        torch._dynamo.maybe_mark_dynamic(images, 0)


class DDPEngine:
    """DDP (NCCL on GPU, gloo on CPU) with autocast, a GradScaler for fp16, and ``no_sync`` accumulation."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig, model: nn.Module, world: WorldInfo, device: torch.device) -> None:
        self.cfg, self.world, self.device = cfg, world, device
        apply_tf32(cfg, device)
        apply_determinism(cfg, device)
        if cfg.engine.sync_bn and world.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.module = model.to(device)
        self.optimizer = build_optimizer(self.module, cfg)
        # DDP wraps the plain module; the compile goes around DDP, as torch documents: Dynamo's DDPOptimizer then
        # splits the graph at DDP's bucket boundaries, so each bucket's all-reduce starts while the backward of
        # the layers before it still runs. (Compiling inside DDP gives one backward graph whose gradients all
        # arrive at its end, and the all-reduce waits for the whole backward.) ``self.module`` stays the plain
        # model, so state dicts never carry ``module.`` or ``_orig_mod.`` prefixes.
        self.ddp: DistributedDataParallel | None = (
            DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda" else None)
            if world.world_size > 1 else None)
        wrapped: nn.Module = self.ddp if self.ddp is not None else self.module
        # compiling a Module gives an OptimizedModule (a Module; torch's stub says Callable)
        self.model: nn.Module = cast(nn.Module, torch.compile(wrapped)) if cfg.engine.compile else wrapped
        self.dtype = DTYPES[cfg.engine.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.engine.precision == "fp16")
        self.micro_step = 0
        self._settle_buckets()

    def _settle_buckets(self) -> None:
        """Give DDP its final gradient buckets before the first real step, in a fresh run and a resumed one alike.

        DDP regroups its buckets in gradient-ready order after the first backward. A resumed run's first step
        would otherwise use the initial buckets where the run it continues used the regrouped ones; an element's
        place in a bucket decides the order in which the all-reduce adds the ranks' values, and from 3 ranks on
        that changes the last bits (2 ranks: a + b = b + a). One backward of an empty batch, in eval mode so
        that BatchNorm's statistics stay as they are, makes every run regroup before its first step; its zero
        gradients are dropped. It runs through the uncompiled DDP wrapper even when ``engine.compile`` is on: the
        regrouping is DDP's own (eager) bookkeeping, and an empty batch through the compiled model would cost a
        compile of its own.
        """
        if self.ddp is None:
            return
        size = self.cfg.data.image_size
        empty = torch.zeros((0, 3, size, size), device=self.device)
        if self.cfg.model.channels_last:
            empty = empty.contiguous(memory_format=torch.channels_last)
        was_training = self.module.training
        self.module.eval()
        with self.autocast():
            logits = self.ddp(empty)
        logits.float().sum().backward()
        for p in self.module.parameters():
            p.grad = None
        self.module.train(was_training)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def step(self, images: torch.Tensor, loss_fn: Callable[[torch.Tensor], LossOutput]) -> LossOutput:
        """Forward, loss, backward; an optimizer step every ``grad_accum`` micro-batches."""
        accum = self.cfg.optim.grad_accum
        self.micro_step += 1
        boundary = self.micro_step % accum == 0
        # DDP-wrapped exactly when world_size > 1; no_sync is DDP's eager flag, which its compiled form honours too
        sync = self.ddp.no_sync() if not boundary and self.ddp is not None else contextlib.nullcontext()
        if self.cfg.engine.compile:
            mark_batch_dynamic(images)
        with sync:
            with self.autocast():
                logits = self.model(images)
            out = loss_fn(logits.float())
            self.scaler.scale(out.loss / accum).backward()
        if boundary:
            if self.cfg.optim.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        return eval_logits(self.module, images, self.device.type, self.dtype)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "micro_step": self.micro_step}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.micro_step = state["micro_step"]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

