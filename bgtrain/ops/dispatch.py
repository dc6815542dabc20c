"""Choose the BoostLU implementation per device: the extension ops (library.py) or the torch reference.

``BGTRAIN_BOOSTLU`` forces a choice:
- ``cuda``: the CUDA extension (CUDA tensors only);
- ``cpu``: the C++ CPU extension (CPU tensors only);
- ``torch``: the reference code everywhere.
A forced extension that fails to build raises. By default CUDA tensors use the CUDA extension when it builds and
loads, and fall back to the reference otherwise, with a warning at the process's (each rank's) first BoostLU call
naming the cause; CPU tensors use the reference, so CPU users never wait for a compiler (and torch.compile fuses the
reference well on CPU).

Without the variable, the run config's ``ops.boostlu`` (:func:`configure`, called by ``bgtrain.train``) decides:
``auto`` is the default above, ``cuda`` forces the CUDA extension (a missing or failed build is an error naming the
cause, see :func:`require`), ``reference`` forces the torch reference.

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
CONFIG_CHOICES = {"auto": None, "cuda": "cuda", "reference": "torch"}  # ops.boostlu -> forced implementation

_resolved: dict[tuple[str | None, str], str] = {}
_config = "auto"                # ops.boostlu of the running config (configure)
_fallback: dict[str, str] = {}  # device type -> why the extension is not used there (auto mode)
_warned: set[str] = set()       # device types whose fallback this process has warned about


class BoostLUUnavailable(RuntimeError):
    """A forced BoostLU extension cannot run here; the message is one line naming the cause."""


def configure(boostlu: str) -> None:
    """Apply the config's ``ops.boostlu`` (auto|cuda|reference); $BGTRAIN_BOOSTLU, when set, still wins."""
    global _config
    if boostlu not in CONFIG_CHOICES:
        raise ValueError(f"ops.boostlu={boostlu!r} is not one of {', '.join(CONFIG_CHOICES)}")
    _config = boostlu


def _env_choice() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)} (or unset/auto for the default)")
    return value


def forced_choice() -> str | None:
    """The implementation forced by $BGTRAIN_BOOSTLU, else by ops.boostlu; None for the default (auto)."""
    return _env_choice() or CONFIG_CHOICES[_config]


def _forced_by() -> str:
    """What forced the choice, for messages: the variable or the config key."""
    env = _env_choice()
    return f"{ENV_VAR}={env}" if env else f"ops.boostlu={_config}"


def _try_load(device_type: str) -> None:
    from bgtrain.ops import extension

    if device_type == "cuda":
        extension.load_cuda()
    else:
        extension.load_cpu()


def _resolve(device_type: str) -> str:
    forced = forced_choice()
    if forced == "cuda" and device_type != "cuda" and _env_choice() is None:
        forced = "torch"  # ops.boostlu=cuda governs GPU tensors; a CPU tensor in a GPU run uses the reference
    key = (forced, device_type)
    if key in _resolved:
        return _resolved[key]
    if forced == "torch" or (forced is None and device_type != "cuda"):
        choice = "torch"
    elif forced is not None:
        by = _forced_by()
        if forced != device_type:
            raise ValueError(f"{by} forces the {forced} extension, but the tensor is on "
                             f"{device_type}; unset {ENV_VAR} / set ops.boostlu=auto, or use {ENV_VAR}=torch")
        try:
            _try_load(device_type)
        except Exception as err:  # a forced choice must not silently fall back
            from bgtrain.ops.extension import one_line

            raise BoostLUUnavailable(f"{by}: building/loading the BoostLU {forced} extension failed: "
                                     f"{one_line(err)} (prebuild it with `python -m bgtrain.ops build`)") from err
        choice = forced
    else:
        try:
            _try_load("cuda")
            choice = "cuda"
        except Exception as err:  # noqa: BLE001 - any build/load failure means: use the reference
            from bgtrain.ops.extension import one_line

            _fallback[device_type] = one_line(err)
            choice = "torch"
    _resolved[key] = choice
    return choice


def _warn_fallback(device_type: str) -> None:
    """Once per process and device type, at the first BoostLU call: say that the reference runs, and why."""
    why = _fallback.get(device_type)
    if why is None or device_type in _warned:
        return
    _warned.add(device_type)
    rank = os.environ.get("RANK", "0")
    warnings.warn(f"rank {rank}: bgtrain BoostLU CUDA extension unavailable, running the torch reference instead "
                  f"(slower): {why}; prebuild it with `python -m bgtrain.ops build`, or set ops.boostlu=cuda "
                  f"({ENV_VAR}=cuda) to make this an error", RuntimeWarning, stacklevel=4)


def require(device: torch.device | str) -> str:
    """Resolve the implementation for `device` now, at start-up, instead of at the first step.

    With ``cuda`` forced (ops.boostlu=cuda or $BGTRAIN_BOOSTLU=cuda) a missing GPU, a CPU-only torch or a failed
    build raises :class:`BoostLUUnavailable` with one line naming the cause. Returns the implementation.
    """
    device_type = torch.device(device).type
    try:
        forced = forced_choice()
    except ValueError as err:
        raise BoostLUUnavailable(str(err)) from err
    if forced == "cuda":
        by = _forced_by()
        if device_type != "cuda" or not torch.cuda.is_available():
            cause = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                     else "no CUDA device is visible (CUDA_VISIBLE_DEVICES, or a job without GPUs)")
            raise BoostLUUnavailable(f"{by} needs the BoostLU CUDA extension on a GPU, but {cause}; use a GPU "
                                     f"node, or set ops.boostlu=auto")
    try:
        return _resolve(device_type)
    except ValueError as err:
        raise BoostLUUnavailable(str(err)) from err


@torch.compiler.assume_constant_result
def _resolve_for_compile(device_type: str) -> str:
    # torch.compile evaluates this once while tracing and bakes the answer into the graph, so neither the env lookup
    # nor a JIT build is traced.
    choice = _resolve(device_type)
    _warn_fallback(device_type)
    return choice


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
