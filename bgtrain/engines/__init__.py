"""Training engines: how a step runs on one or many devices (:mod:`~bgtrain.engines.ddp` and
:mod:`~bgtrain.engines.deepspeed`), behind the :class:`~bgtrain.engines.base.Engine` protocol."""
from __future__ import annotations

import torch
from torch import nn

from bgtrain.config import TrainConfig
from bgtrain.distributed import WorldInfo
from bgtrain.engines.base import DTYPES, Engine, build_optimizer, check_device, param_groups
from bgtrain.engines.ddp import DDPEngine

__all__ = ["DTYPES", "DDPEngine", "Engine", "build_engine", "build_optimizer", "param_groups"]


def build_engine(cfg: TrainConfig, model: nn.Module, world: WorldInfo, device: torch.device) -> Engine:
    """The engine ``engine.engine`` names, around ``model`` on ``device``."""
    check_device(cfg, device)
    if cfg.engine.engine == "deepspeed":
        from bgtrain.engines.deepspeed import DeepSpeedEngine  # deepspeed is optional and slow to import
        return DeepSpeedEngine(cfg, model, world, device)
    return DDPEngine(cfg, model, world, device)
