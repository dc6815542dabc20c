"""What the explanation commands share: class names for a model, and a font for drawing."""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
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


def valid_rows(loader: Any, max_images: int | None, progress: Any, title: str) -> Iterator[tuple[Any, torch.Tensor]]:
    """(batch, indices of its valid rows) over the loader, at most ``max_images`` rows in all, under a progress bar.

    Batches without a valid row are counted on the bar but not yielded; the walk stops once ``max_images`` are seen.
    """
    seen = 0
    total = len(loader) if max_images is None else min(len(loader), math.ceil(max_images / loader.batch_size))
    task = progress.start(title, total=total)
    for batch in loader:
        keep = torch.nonzero(batch.valid).flatten()
        if max_images is not None:
            keep = keep[: max(0, max_images - seen)]
        if keep.numel():
            yield batch, keep
            seen += keep.numel()
        progress.advance(task, f"{seen} images")
        if max_images is not None and seen >= max_images:
            break
    progress.finish(task)
