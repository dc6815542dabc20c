"""CAM overlays of a fixed set of validation images, drawn with :mod:`bgtrain.explain`'s overlay code.

The same images and classes at every epoch end (TensorBoard images, so the slider shows one map sharpening) and
under every run's best model (the report's CAM strip: the paper's Fig. 1 idea). Each image shows the classes it
truly has (full labels of the validation split), so all epochs and models are compared on the same classes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bgtrain.config import TrainConfig
from bgtrain.explain.common import class_names_for
from bgtrain.explain.overlay import Picture, pictures_from_shards, render_overlays
from bgtrain.model import CamResNet


def validation_pictures(cfg: TrainConfig, count: int, shards: str | None = None) -> list[Picture]:
    """The first ``count`` validation samples of the run's shards (or ``shards``), with their full labels."""
    return list(pictures_from_shards(cfg, shards or cfg.data.shards, "val", count, cfg.data.image_size))


def shown_classes(picture: Picture, names: Sequence[str], limit: int = 3) -> list[str]:
    """The names of up to ``limit`` classes the picture has; ``top1`` (the model's best) when none is known."""
    if picture.labels is not None:
        positives = np.flatnonzero(np.asarray(picture.labels) == 1)[:limit]
        if positives.size:
            return [names[c] for c in positives]
    return ["top1"]


@torch.no_grad()
def cam_sheets(model: CamResNet, pictures: Sequence[Picture], names: Sequence[str], alpha: float,
               device: torch.device, limit: int = 3) -> list[tuple[str, np.ndarray]]:
    """(tag, uint8 (H, W, 3)) per picture: the image, then one overlay per shown class (name, label, score, alpha)."""
    was_training = model.training
    model.eval()
    try:
        sheets = []
        for picture in pictures:
            _, sheet = render_overlays(model, picture, names, shown_classes(picture, names, limit), alpha, device)
            sheets.append((f"cams/{picture.name}", np.asarray(sheet, dtype=np.uint8)))
        return sheets
    finally:
        model.train(was_training)


class EpochCams:
    """The validation images whose CAM overlays a run logs at each epoch end (loaded once, at the start)."""

    def __init__(self, cfg: TrainConfig, num_classes: int, count: int = 4, limit: int = 3) -> None:
        self.names = class_names_for(cfg, num_classes)
        self.pictures = validation_pictures(cfg, count) if count > 0 else []
        self.alpha = cfg.model.alpha_eval
        self.limit = limit

    def render(self, model: CamResNet, device: torch.device) -> list[tuple[str, np.ndarray]]:
        """(tag, uint8 image) pairs for ``TensorBoardSink.image``: pass the unwrapped CamResNet (not DDP)."""
        return cam_sheets(model, self.pictures, self.names, self.alpha, device, self.limit)


def cam_strip(runs: Sequence, count: int, device: torch.device) -> tuple[list[list[np.ndarray | None]], list[str],
                                                                         list[str], list[str]]:
    """The report's CAM strip: (cells, row labels, column labels, notes on what is missing).

    Row 0 holds the inputs, then one row per run with a best checkpoint: each image's CAM for the same class (its
    first true class) under that run's best model, at the run's evaluation alpha (an evaluation-only row: the
    evaluated checkpoint at the alpha it was evaluated at, not the one stored in the checkpoint). Images and class
    names come from the validation shards of the first run whose checkpoint and shards can be read."""
    from bgtrain.checkpoint import load_model_for_eval

    notes: list[str] = []
    pictures: list[Picture] = []
    names: list[str] = []
    rows: list[list[np.ndarray | None]] = []
    labels: list[str] = []
    for run in runs:
        if run.best_checkpoint is None:
            continue
        try:
            model, cfg = load_model_for_eval(run.best_checkpoint, device)
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            notes.append(f"{run.best_checkpoint}: cannot be loaded ({e}); no CAM row for {run.name}")
            continue
        if not pictures:
            try:
                pictures = validation_pictures(cfg, count)
                names = class_names_for(cfg, model.num_classes)
            except (OSError, KeyError, ValueError) as e:
                notes.append(f"{cfg.data.shards}: validation images of {run.name} cannot be read ({e})")
                continue
        if model.num_classes != len(names):
            notes.append(f"{run.name}: {model.num_classes} classes, the strip's images have {len(names)}; no CAM row")
            continue
        alpha = float((run.test or {}).get("alpha_eval", cfg.model.alpha_eval)) if run.evaluates is not None \
            else cfg.model.alpha_eval
        row: list[np.ndarray | None] = []
        for picture in pictures:
            overlays, _ = render_overlays(model, picture, names, shown_classes(picture, names, 1), alpha, device)
            row.append(np.asarray(overlays[0][2], dtype=np.uint8))
        rows.append(row)
        labels.append(f"{run.name}\n{cfg.loss.scheme}, α {cfg.model.alpha_train:g}/{alpha:g}")
    if not rows:
        if not notes:
            notes.append("no run has checkpoints/best.pt: no CAM strip")
        return [], [], [], notes
    columns = [f"{p.name}: {shown_classes(p, names, 1)[0]}" for p in pictures]
    return [[p.pixels for p in pictures], *rows], ["input", *labels], columns, notes
