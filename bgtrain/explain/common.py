"""What the explanation commands share: class names for a model, and a font for drawing."""
from __future__ import annotations

from pathlib import Path

from PIL import ImageFont

from bgtrain.config import TrainConfig
from shards.format import read_manifest


def class_names_for(cfg: TrainConfig, num_classes: int, shards: str | None = None) -> list[str]:
    """Class names from ``shards`` (or the run's own ``data.shards``) manifest, else ``class_<i>``."""
    for root in (shards, cfg.data.shards):
        if root is None:
            continue
        try:
            names = read_manifest(root)["classes"]
        except (FileNotFoundError, ValueError):
            continue
        if len(names) == num_classes:
            return list(names)
        if root == shards:
            raise ValueError(f"{Path(root) / 'manifest.json'}: {len(names)} classes, but the model has "
                             f"{num_classes}; these shards are not the ones the model was trained for")
    return [f"class_{i}" for i in range(num_classes)]


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in scalable font at ``size`` px (no font files needed)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()
