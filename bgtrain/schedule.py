"""The learning rate a run actually uses: scaling by the global batch, warm-up and schedule (``optim.*``).

The config's ``optim.lr`` (trunk) and ``optim.lr × optim.head_lr_mult`` (1x1 classifier) are the lrs of a global
batch of ``optim.reference_batch`` (the paper: 16, one GPU). At optimizer step s (0-based) both groups use

    lr_group × scale × warmup(s) × decay(s)

- scale: ``optim.lr_scaling`` — ``none`` 1, ``linear`` G / ref, ``sqrt`` sqrt(G / ref), G = data.batch_size ×
  world × optim.grad_accum;
- warmup(s) = min(1, (s + 1) / optim.warmup_steps), 1 without warm-up;
- decay(s) = 1 (``constant``), or 0.5 (1 + cos(π p)) with p = (s − warmup) / (total − warmup) clipped to [0, 1]
  (``cosine``, total = the run's optimizer steps).

One factor for both groups keeps their ratio. The factor is applied by a :class:`torch.optim.lr_scheduler.LambdaLR`
on the torch optimizer, stepped once per optimizer step by the trainer; its state goes into checkpoints. With the
defaults (``none``, no warm-up, ``constant``) the factor is exactly 1.0, so every lr is the config's, bit for bit.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from bgtrain.config import OptimConfig


def global_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """Samples per optimizer step over all ranks."""
    return batch_size * world * grad_accum


def lr_scale(cfg: OptimConfig, batch: int) -> float:
    """The factor ``optim.lr_scaling`` applies for a global batch of ``batch`` (1.0 for ``none``)."""
    if cfg.lr_scaling == "none":
        return 1.0
    ratio = batch / cfg.reference_batch
    return ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio)


def lr_factor(cfg: OptimConfig, batch: int, total_steps: int, step: int) -> float:
    """The lr multiplier of optimizer step ``step`` (0-based) in a run of ``total_steps`` optimizer steps."""
    factor = lr_scale(cfg, batch)
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        factor *= (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside an engine's optimizer: itself, or the one a DeepSpeed (ZeRO) wrapper holds as
    ``.optimizer`` (its ``param_groups`` are the wrapper's, so an lr set there is the lr DeepSpeed steps with)."""
    seen = optimizer
    for _ in range(4):
        if isinstance(seen, torch.optim.Optimizer):
            return seen
        seen = getattr(seen, "optimizer", None)
    raise TypeError(f"no torch optimizer found inside {type(optimizer).__name__} for the lr schedule")


def build_scheduler(optimizer: Any, cfg: OptimConfig, batch: int, total_steps: int) -> LambdaLR:
    """The LambdaLR of :func:`lr_factor` on both parameter groups; built before the first step (it sets the first
    step's lr) and stepped after each optimizer step."""
    return LambdaLR(torch_optimizer(optimizer), lambda step: lr_factor(cfg, batch, total_steps, step))


def startup_line(cfg: OptimConfig, batch_size: int, world: int) -> str:
    """What the run uses: the global batch, the reference, the rule and the lrs after scaling."""
    batch = global_batch(batch_size, world, cfg.grad_accum)
    scale = lr_scale(cfg, batch)
    trunk, head = cfg.lr * scale, cfg.lr * cfg.head_lr_mult * scale
    warmup = f"warm-up {cfg.warmup_steps} steps" if cfg.warmup_steps else "no warm-up"
    return (f"global batch {batch} (data.batch_size {batch_size} x world {world} x optim.grad_accum "
            f"{cfg.grad_accum}), optim.reference_batch {cfg.reference_batch}, optim.lr_scaling {cfg.lr_scaling} "
            f"(x{scale:.4g}): lr trunk {trunk:.4g}, head {head:.4g}; {warmup}, schedule {cfg.schedule}")


def scaling_warning(cfg: OptimConfig, batch_size: int, world: int) -> str | None:
    """A warning when the global batch is not the reference one and the lr is not scaled for it."""
    batch = global_batch(batch_size, world, cfg.grad_accum)
    if cfg.lr_scaling != "none" or batch == cfg.reference_batch:
        return None
    return (f"global batch {batch} differs from optim.reference_batch {cfg.reference_batch} and optim.lr_scaling is "
            f"none: optim.lr {cfg.lr:g} is used as given; set optim.lr_scaling (linear or sqrt), or "
            "data.batch_size / optim.grad_accum to match optim.reference_batch")


def continue_schedule(scheduler: LambdaLR, optimizer_steps: int) -> None:
    """Put a fresh scheduler at ``optimizer_steps`` done (a checkpoint written before schedules were saved) and
    give both groups that step's lr."""
    scheduler.last_epoch = optimizer_steps
    reapply(scheduler)


def reapply(scheduler: LambdaLR) -> None:
    """Set every group's lr to the scheduler's for its current step, computed as its own step computes it (so a
    resume gives the lrs the saved run had, bit for bit, whether or not the engine restored them)."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
