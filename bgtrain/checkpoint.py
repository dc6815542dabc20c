"""Checkpoints: the only module that touches checkpoint files.

Writes are atomic (temporary file, fsync, rename, fsync of the folder), so a kill at any moment
leaves either the old or the new file. ``resume: latest`` picks the newest step; the last K and the
best-by-validation checkpoint are kept. Everything is loaded with ``weights_only=True``.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import typing
import warnings
from pathlib import Path

import numpy as np
import torch

from bgtrain.config import ConfigError, TrainConfig, _build

_NAME = re.compile(r"^step-(\d{9})\.pt$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to ``path`` so that readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load(path: str | Path) -> dict:
    """Load a checkpoint safely (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """This process's RNG states, as tensors and lists so that weights_only loading accepts them."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if torch.cuda.is_available() and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointSaver:
    """Owns ``<out_dir>/checkpoints``: step checkpoints, the last K of them, and ``best.pt``."""

    def __init__(self, folder: str | Path, keep_last: int = 2) -> None:
        self.folder = Path(folder)
        self.keep_last = keep_last

    def steps(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        found = self.steps()
        return found[-1] if found else None

    def save(self, state: dict, step: int, is_best: bool = False) -> Path:
        """Write ``step-N.pt`` (and ``best.pt``), then drop step checkpoints beyond the last K."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:09d}.pt"
        atomic_save(state, path)
        if is_best:
            atomic_save(state, self.folder / "best.pt")
        for old in self.steps()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint ``checkpoint.resume`` names: None, "latest" (None if there is none yet) or a path."""
        if resume is None:
            return None
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} does not exist")
        return path


def _known_keys(cls: type, tree: dict, prefix: str, dropped: list[str]) -> dict:
    """``tree`` without the keys ``cls`` no longer has (recursively), their dotted names added to ``dropped``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in tree.items():
        if key not in fields:
            dropped.append(prefix + key)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            out[key] = _known_keys(hints[key], value, f"{prefix}{key}.", dropped)
        else:
            out[key] = value
    return out


def config_from_checkpoint(state: dict):
    """The TrainConfig a checkpoint was trained with (its ``config`` entry, typed and checked).

    Explanations only need the model and data sections, so keys that this version of the config no longer has
    (a checkpoint from an older bgtrain) are dropped with a warning instead of refusing the checkpoint.
    """
    if "config" not in state:
        raise ConfigError("checkpoint has no 'config' entry (was it written by bgtrain.train?)")
    dropped: list[str] = []
    tree = _known_keys(TrainConfig, state["config"], "", dropped)
    if dropped:
        warnings.warn(f"checkpoint config keys unknown to this bgtrain, ignored: {', '.join(dropped)}")
    return _build(TrainConfig, tree, "")


def _model_state(state: dict, path: Path) -> dict:
    engine = state.get("engine")
    if not isinstance(engine, dict) or "model" not in engine:
        raise KeyError(f"{path}: no engine.model state dict in this checkpoint "
                       f"(top-level keys: {sorted(state)})")
    # Wrappers (DDP, torch.compile) prefix parameter names; the bare module does not.
    out = {}
    for key, value in engine["model"].items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        out[key] = value
    return out


def load_model_for_eval(path: str | Path, device: str | torch.device = "cpu"):
    """A checkpoint's CamResNet in eval mode on ``device``, and the TrainConfig it was trained with."""
    from bgtrain.model import build_model

    path = Path(path)
    state = load(path)
    cfg = config_from_checkpoint(state)
    weights = _model_state(state, path)
    if "classifier.weight" not in weights:
        raise KeyError(f"{path}: model state has no classifier.weight (is this a CamResNet checkpoint?)")
    num_classes = weights["classifier.weight"].shape[0]
    # The trained weights replace any pretrained file, which may not exist on this machine.
    model = build_model(dataclasses.replace(cfg.model, pretrained=None, channels_last=False), num_classes)
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg
