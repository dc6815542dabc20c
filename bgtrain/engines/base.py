"""What every training engine provides, and what the engines share (precisions, optimizer, TF32)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from bgtrain.config import ConfigError, TrainConfig
from bgtrain.losses.functional import LossOutput

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine(Protocol):
    """How a training step runs on one or many devices: it owns the wrapped model, the optimizer, mixed
    precision and gradient accumulation; the trainer only calls these."""

    name: str
    module: nn.Module  # the unwrapped model (no DDP / DeepSpeed / compile wrapper), e.g. for CAM pictures

    def step(self, images: torch.Tensor, loss_fn: Callable[[torch.Tensor], LossOutput]) -> LossOutput:
        """Forward, loss, backward, and an optimizer step at accumulation boundaries (collective)."""
        ...

    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the unwrapped model, without gradients."""
        ...

    def state_dict(self) -> dict:
        """Weights and optimizer state for a checkpoint (may be collective)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        ...

    def train(self, mode: bool = True) -> None:
        """Training or evaluation mode of the model."""
        ...


def eval_logits(module: nn.Module, images: torch.Tensor, device_type: str, dtype: torch.dtype) -> torch.Tensor:
    """Float32 logits of ``module`` under the precision's autocast, without gradients: the evaluation forward of
    every engine and of :class:`EvalEngine` (``python -m bgtrain.evaluate``), so both score alike."""
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        return module(images).float()


def weight_memory_format(cfg: TrainConfig) -> torch.memory_format:
    """The layout of the weights an engine trains and evaluates with: channels-last when ``model.channels_last``,
    except under DeepSpeed, whose flat ZeRO buffers keep the default layout."""
    if cfg.model.channels_last and cfg.engine.engine != "deepspeed":
        return torch.channels_last
    return torch.contiguous_format


class EvalEngine:
    """The evaluation half of an engine, for a trained model outside training (``python -m bgtrain.evaluate``).

    It scores the way the training's own validation did: the checkpoint config's precision (autocast) and weight
    layout, through the same :func:`eval_logits`, so ``bgtrain.evaluate`` reproduces the mAP the run reported.
    fp16 is the exception on a CPU device (refused for training there, see :func:`check_device`): it is scored
    in fp32, and ``fp32_instead_of`` says so.
    """

    name = "eval"

    def __init__(self, cfg: TrainConfig, model: nn.Module, device: torch.device) -> None:
        self.device = device
        precision = cfg.engine.precision
        self.fp32_instead_of = precision if device.type == "cpu" and precision == "fp16" else None
        self.dtype = torch.float32 if self.fp32_instead_of else DTYPES[precision]
        # torch's stubs lack the to(device, memory_format=...) overload that Module.to accepts
        self.module = model.to(device, memory_format=weight_memory_format(cfg))  # type: ignore[call-overload]
        self.module.eval()

    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        return eval_logits(self.module, images, self.device.type, self.dtype)

    def train(self, mode: bool = True) -> None:
        """Evaluation only: the model stays in eval mode whatever is asked (the scoring loop asks for both)."""
        self.module.eval()

    def step(self, images: torch.Tensor, loss_fn: Callable[[torch.Tensor], LossOutput]) -> LossOutput:
        raise TypeError("EvalEngine does not train")

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])


def param_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict]:
    """The paper's two learning rates: the trunk at lr, the 1x1 classifier at lr * head_lr_mult."""
    # model is a CamResNet, or torch.compile's wrapper of one (which forwards attribute look-ups to it)
    return [{"params": model.trunk_parameters(), "lr": lr},  # type: ignore[operator]
            {"params": model.head_parameters(), "lr": lr * head_lr_mult}]  # type: ignore[operator]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the two parameter groups, with the config's weight decay."""
    return torch.optim.Adam(param_groups(model, cfg.optim.lr, cfg.optim.head_lr_mult),
                            weight_decay=cfg.optim.weight_decay)


def apply_tf32(cfg: TrainConfig, device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA when ``engine.tf32`` (a process-wide torch setting)."""
    if device.type == "cuda" and cfg.engine.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def apply_determinism(cfg: TrainConfig, device: torch.device) -> None:
    """``engine.deterministic``: deterministic kernels, or on CUDA the fastest ones ``cudnn.benchmark`` finds.

    Uninitialised memory is never NaN-filled (torch's default under determinism): no kernel here reads it, and
    the fill costs a pass over every ``torch.empty`` on the GPU (the extension's outputs, the float batch).
    """
    torch.use_deterministic_algorithms(cfg.engine.deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.engine.deterministic
        torch.backends.cudnn.deterministic = cfg.engine.deterministic


def check_device(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a precision the device runs badly: fp16 on a CPU is emulated (~40x slower than bf16 there)."""
    if device.type == "cpu" and cfg.engine.precision == "fp16":
        raise ConfigError("engine.precision=fp16: runs ~40x slower than bf16 on a CPU device (no native fp16 "
                          "kernels); use engine.precision=bf16 or fp32 on CPU")
