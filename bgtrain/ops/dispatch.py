"""Choose the BoostLU implementation per device: the extension ops (library.py) or the torch reference.

``BGTRAIN_BOOSTLU`` forces a choice:
- ``cuda``: the CUDA extension (CUDA tensors only);
- ``cpu``: the C++ CPU extension (CPU tensors only);
- ``torch``: the reference code everywhere.
A forced extension that fails to build raises. By default CUDA tensors use the CUDA extension when it builds and
loads, and fall back to the reference with one warning otherwise; CPU tensors use the reference, so CPU users never
wait for a compiler (and torch.compile fuses the reference well on CPU).

The choice is made once per (setting, device type) and cached; torch.compile bakes it into the traced graph, so
set the variable before the first call (or call torch._dynamo.reset() after changing it).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from bgtrain.ops import library, reference

ENV_VAR = "BGTRAIN_BOOSTLU"
CHOICES = ("cuda", "cpu", "torch")

_resolved: dict[tuple[str | None, str], str] = {}


def forced_choice() -> str | None:
    """The implementation forced by $BGTRAIN_BOOSTLU, or None when it is unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)} (or unset/auto for the default)")
    return value


def _try_load(device_type: str) -> None:
    from bgtrain.ops import extension

    if device_type == "cuda":
        extension.load_cuda()
    else:
        extension.load_cpu()


def _resolve(device_type: str) -> str:
    forced = forced_choice()
    key = (forced, device_type)
    if key in _resolved:
        return _resolved[key]
    if forced == "torch" or (forced is None and device_type != "cuda"):
        choice = "torch"
    elif forced is not None:
        if forced != device_type:
            raise ValueError(f"{ENV_VAR}={forced} forces the {forced} extension, but the tensor is on "
                             f"{device_type}; unset {ENV_VAR} or set it to torch")
        try:
            _try_load(device_type)
        except Exception as err:  # a forced choice must not silently fall back
            raise RuntimeError(f"{ENV_VAR}={forced}: building/loading the BoostLU {forced} extension failed "
                               f"(see bgtrain/ops/extension.py; try `python -m bgtrain.ops build`): {err}") from err
        choice = forced
    else:
        try:
            _try_load("cuda")
            choice = "cuda"
        except Exception as err:  # noqa: BLE001 - any build/load failure means: use the reference
            warnings.warn(f"bgtrain BoostLU CUDA extension unavailable, using the torch reference instead "
                          f"(set {ENV_VAR}=cuda to make this an error): {type(err).__name__}: {err}",
                          RuntimeWarning, stacklevel=3)
            choice = "torch"
    _resolved[key] = choice
    return choice


@torch.compiler.assume_constant_result
def _resolve_for_compile(device_type: str) -> str:
    # torch.compile evaluates this once while tracing and bakes the answer into the graph, so neither the env lookup
    # nor a JIT build is traced.
    return _resolve(device_type)


def active_implementation(device: torch.device | str) -> str:
    """Implementation BoostLU uses on `device`: 'cuda', 'cpu' (extensions) or 'torch' (reference), for run logs."""
    return _resolve(torch.device(device).type)


def boostlu(x: Tensor, alpha: float) -> Tensor:
    """BoostLU(x) = alpha * x where x > 0, else x; autograd-capable, implementation per active_implementation."""
    if _resolve_for_compile(x.device.type) == "torch":
        return reference.boostlu(x, alpha)
    return library.boostlu(x, alpha)


def boostlu_pool(cam: Tensor, alpha: float) -> Tensor:
    """Spatial mean of BoostLU(cam): (B, C, H, W) -> (B, C) logits; autograd-capable, torch.compile-traceable."""
    if _resolve_for_compile(cam.device.type) == "torch":
        return reference.boostlu_pool(cam, alpha)
    return library.boostlu_pool(cam, alpha)
