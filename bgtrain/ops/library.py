"""BoostLU custom ops (``torch.ops.bgtrain.*``) backed by the C++/CUDA extensions, with fake and autograd rules.

The ops are defined here at import time, but their kernels load the extension only on first call, so importing
bgtrain never builds anything. Dispatch between these ops and the torch reference lives in dispatch.py.

``boostlu_pool`` saves a 1-bit sign mask for backward, not the CAM. The CAM is the 1x1 classifier conv's output; the
conv's backward needs its input and weight, not its output, so saving the CAM would keep a B*C*H*W tensor alive
only for this op (125 MB in bf16 at 64x5000x14x14). The mask costs 1/16 of that in bf16 (1/32 in fp32), and the
backward reads 1/8 byte per element instead of 2, so fwd+bwd moves ~4.25 bytes per bf16 element instead of 6.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bgtrain.ops import extension

_MODULES: dict[str, object] = {}  # device type -> loaded extension; skips the arch lookup on every call


def _ext(device: torch.device):
    """The extension module that serves tensors on `device`."""
    module = _MODULES.get(device.type)
    if module is not None:
        return module
    if device.type in ("cuda", "cpu"):
        module = extension.load_cuda() if device.type == "cuda" else extension.load_cpu()
        _MODULES[device.type] = module
        return module
    raise RuntimeError(f"bgtrain BoostLU extension has no kernel for device {device} (only cpu and cuda); "
                       "set BGTRAIN_BOOSTLU=torch to use the reference implementation")


def dense_format(t: Tensor) -> torch.memory_format:
    """Memory format the kernels use for `t`: channels-last if `t` is already so, else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _mask_words(shape: torch.Size, channels_last: bool) -> int:
    b, c, h, w = shape
    return b * h * w * -(-c // 32) if channels_last else b * c * -(-(h * w) // 32)


# ---------------------------------------------------------------------------------------------------- boostlu_pool
@torch.library.custom_op("bgtrain::boostlu_pool_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def boostlu_pool_fwd(cam: Tensor, alpha: float, save_mask: bool) -> tuple[Tensor, Tensor]:
    """BoostLU+GAP forward: (B, C, H, W) -> ((B, C) logits, int32 sign mask or an empty tensor)."""
    if cam.dim() != 4:
        raise ValueError(f"boostlu_pool expects a (B, C, H, W) CAM, got shape {tuple(cam.shape)}")
    cam = cam.contiguous(memory_format=dense_format(cam))
    return _ext(cam.device).pool_forward(cam, alpha, save_mask)


@boostlu_pool_fwd.register_fake
def _(cam: Tensor, alpha: float, save_mask: bool) -> tuple[Tensor, Tensor]:
    torch._check(cam.dim() == 4, lambda: f"boostlu_pool expects a (B, C, H, W) CAM, got {cam.dim()} dims")
    words = _mask_words(cam.shape, dense_format(cam) == torch.channels_last) if save_mask else 0
    return cam.new_empty(cam.shape[:2]), cam.new_empty((words,), dtype=torch.int32)


@torch.library.custom_op("bgtrain::boostlu_pool_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def boostlu_pool_bwd(grad: Tensor, mask: Tensor, alpha: float, height: int, width: int,
                     channels_last: bool) -> Tensor:
    """BoostLU+GAP backward: grad_cam = grad / HW * (cam > 0 ? alpha : 1), from the sign mask."""
    return _ext(grad.device).pool_backward(grad.contiguous(), mask, alpha, height, width, channels_last)


@boostlu_pool_bwd.register_fake
def _(grad: Tensor, mask: Tensor, alpha: float, height: int, width: int, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((*grad.shape, height, width), dtype=grad.dtype, device=grad.device, memory_format=fmt)


def _pool_setup(ctx, inputs, output) -> None:
    cam, alpha, save_mask = inputs
    if not save_mask:
        raise RuntimeError("boostlu_pool_fwd ran with save_mask=False but a gradient is needed; call "
                           "bgtrain.ops.boostlu_pool, which sets save_mask from requires_grad")
    ctx.save_for_backward(output[1])
    ctx.alpha = alpha
    ctx.hw = (cam.shape[2], cam.shape[3])
    ctx.channels_last = dense_format(cam) == torch.channels_last


def _pool_backward(ctx, grad_logits: Tensor, _grad_mask: Tensor):
    (mask,) = ctx.saved_tensors
    grad = boostlu_pool_bwd(grad_logits, mask, ctx.alpha, ctx.hw[0], ctx.hw[1], ctx.channels_last)
    return grad, None, None


boostlu_pool_fwd.register_autograd(_pool_backward, setup_context=_pool_setup)


def boostlu_pool(cam: Tensor, alpha: float) -> Tensor:
    """Extension BoostLU+GAP: (B, C, H, W) -> (B, C); saves the sign mask only when a gradient will be needed."""
    save_mask = cam.requires_grad and torch.is_grad_enabled()
    return boostlu_pool_fwd(cam, float(alpha), save_mask)[0]


# --------------------------------------------------------------------------------------------------------- boostlu
@torch.library.custom_op("bgtrain::boostlu_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def boostlu_fwd(x: Tensor, alpha: float) -> Tensor:
    """Elementwise BoostLU: x > 0 ? alpha * x : x, in x's layout (contiguous or channels-last)."""
    return _ext(x.device).boostlu_forward(x.contiguous(memory_format=dense_format(x)), alpha)


@boostlu_fwd.register_fake
def _(x: Tensor, alpha: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))


@torch.library.custom_op("bgtrain::boostlu_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def boostlu_bwd(grad: Tensor, x: Tensor, alpha: float) -> Tensor:
    """Elementwise BoostLU backward: grad * (x > 0 ? alpha : 1)."""
    fmt = dense_format(x)
    return _ext(x.device).boostlu_backward(grad.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt), alpha)


@boostlu_bwd.register_fake
def _(grad: Tensor, x: Tensor, alpha: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))


def _boostlu_setup(ctx, inputs, output) -> None:
    # The standalone op keeps its input: it is elementwise and generic, and its input is usually alive anyway.
    x, alpha = inputs
    ctx.save_for_backward(x)
    ctx.alpha = alpha


def _boostlu_backward(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    return boostlu_bwd(grad, x, ctx.alpha), None


boostlu_fwd.register_autograd(_boostlu_backward, setup_context=_boostlu_setup)


def boostlu(x: Tensor, alpha: float) -> Tensor:
    """Extension BoostLU, elementwise."""
    return boostlu_fwd(x, float(alpha))
