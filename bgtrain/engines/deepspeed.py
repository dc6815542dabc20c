"""DeepSpeed engine: ZeRO 0-2 behind the same :class:`~bgtrain.engines.base.Engine` protocol as the DDP engine.

- bf16/fp16 go through DeepSpeed's ``torch_autocast`` section, not its ``bf16`` mode: that mode casts
  the whole module, BatchNorm included, while autocast keeps BatchNorm and master weights in fp32.
- DeepSpeed broadcasts parameters but not buffers, so BatchNorm running statistics would drift apart
  between ranks. Like DDP's ``broadcast_buffers``, rank 0's buffers are broadcast before every forward, all
  of them in one flat broadcast (a ResNet-50 has 159 BatchNorm buffers: one collective, not 159).
- Gradient clipping is passed explicitly (DeepSpeed's default is 0, i.e. off).
- Weights keep the default memory layout (ZeRO's flat buffers need it); the inputs stay channels-last.
- A torch Adam is handed to ``deepspeed.initialize``, so no C++ optimizer is JIT-compiled.
- Checkpoints stay single files loadable with ``weights_only=True``: the ZeRO optimizer state of every
  rank is gathered to rank 0 (the writer; the other ranks hold none of it) and stripped of its Python
  objects (loss scaler, enums, slice maps), which are rebuilt from the live optimizer on load. Resuming
  needs the same world size.
- ``engine.compile`` and ``engine.sync_bn`` are not supported here; config validation refuses them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from bgtrain.collectives import broadcast_coalesced, gather_object
from bgtrain.config import TrainConfig
from bgtrain.distributed import WorldInfo
from bgtrain.engines.base import (
    DTYPES,
    apply_determinism,
    apply_tf32,
    build_optimizer,
    eval_logits,
    weight_memory_format,
)
from bgtrain.losses.functional import LossOutput

_DROPPED = ("loss_scaler", "param_slice_mappings", "ds_version")


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON config a TrainConfig implies."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.engine.precision != "fp32":
        ds["torch_autocast"] = {"enabled": True, "dtype": str(DTYPES[cfg.engine.precision])}
    return ds


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-2 with torch autocast and torch Adam."""

    name = "deepspeed"

    def __init__(self, cfg: TrainConfig, model: nn.Module, world: WorldInfo, device: torch.device) -> None:
        import deepspeed
        if not dist.is_initialized():  # DeepSpeed insists on a process group even for one process
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       auto_mpi_discovery=False)
        self.cfg, self.world, self.device = cfg, world, device
        apply_tf32(cfg, device)
        apply_determinism(cfg, device)
        # ZeRO flattens parameters into contiguous buffers and its broadcast views them as bytes, so
        # weights stay in the default layout here; inputs are still channels-last.
        # torch's stubs lack the to(device, memory_format=...) overload that Module.to accepts
        self.module = model.to(device, memory_format=weight_memory_format(cfg))  # type: ignore[call-overload]
        optimizer = build_optimizer(self.module, cfg)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer,
                                                                config=deepspeed_config(cfg))
        self.dtype = DTYPES[cfg.engine.precision]

    def _sync_buffers(self) -> None:
        broadcast_coalesced(list(self.module.buffers()), src=0)

    def step(self, images: torch.Tensor, loss_fn: Callable[[torch.Tensor], LossOutput]) -> LossOutput:
        self._sync_buffers()
        logits = self.model(images)
        out = loss_fn(logits.float())
        self.model.backward(out.loss)
        self.model.step()  # DeepSpeed applies the optimizer only at accumulation boundaries
        return out

    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        return eval_logits(self.module, images, self.device.type, self.dtype)

    def _optimizer_state(self) -> dict:
        state = self.optimizer.state_dict()
        safe = {k: v for k, v in state.items() if k not in _DROPPED}
        if "zero_stage" in safe:
            safe["zero_stage"] = int(safe["zero_stage"])
        return safe

    def state_dict(self) -> dict:
        """Model, and every rank's optimizer state on rank 0 (the checkpoint writer), None in its place on the
        other ranks (a collective: all ranks must call it)."""
        shards = gather_object(self._optimizer_state(), dst=0)
        return {"model": self.module.state_dict(), "optimizer_shards": shards,
                "global_steps": self.model.global_steps, "micro_steps": self.model.micro_steps}

    def load_state_dict(self, state: dict) -> None:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        self.module.load_state_dict(state["model"])
        shards = state["optimizer_shards"]
        if len(shards) != self.world.world_size:
            raise ValueError(f"checkpoint has optimizer state of {len(shards)} ranks; DeepSpeed resume needs the "
                             f"same world size (now {self.world.world_size})")
        live = self.optimizer.state_dict()
        if "zero_stage" in live:  # a ZeRO optimizer: restore the Python objects that were stripped
            restored = [{**s, **{k: live[k] for k in _DROPPED if k in live},
                         "zero_stage": ZeroStageEnum(s["zero_stage"])} for s in shards]
            self.optimizer.load_state_dict(restored, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(shards[self.world.rank])
        self.model.global_steps, self.model.micro_steps = state["global_steps"], state["micro_steps"]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)
