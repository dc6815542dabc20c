"""CAM heatmap overlays (PNG): ``python -m bgtrain.explain overlay``.

A CamResNet's logit for class c is the spatial mean of ``BoostLU(cam_c)``, so the boosted CAM is exactly the
map the score averages: overlays show that map, upsampled bilinearly to the image, for the alpha they name.
Each overlay is the image's size and names the class (``+``/``-``/``?``: its full label, when the image comes from
shards), its score sigmoid(logit) at that alpha, and the alpha. Colours are min-max scaled per map.
Drawing uses numpy and PIL only (a jet-like colormap, PIL text), so explanations need no plotting library.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from bgtrain.checkpoint import load_model_for_eval
from bgtrain.config import TrainConfig
from bgtrain.data import build_loader
from bgtrain.data.common import IMAGENET_MEAN, IMAGENET_STD, normalise
from bgtrain.data.wds import decode_image
from bgtrain.distributed import WorldInfo
from bgtrain.explain.common import class_names_for, load_font
from bgtrain.model import CamResNet

_TOPK = re.compile(r"^top(\d+)$")


# ----------------------------------------------------------------------------------------------- image sources

@dataclass
class Picture:
    """One input: its display name, the uint8 (H, W, 3) image the model sees, and its full labels if known."""

    name: str
    pixels: np.ndarray
    labels: np.ndarray | None = None


def pictures_from_files(paths: Sequence[str | Path], size: int) -> Iterator[Picture]:
    """Image files resized as training resizes them (no crop, no aspect ratio kept)."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--images: {path} does not exist")
        try:
            pixels = decode_image(path.read_bytes(), size, flip=False)
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError naming a BytesIO, not the file
            raise ValueError(f"--images: {path} is not an image PIL can read ({type(e).__name__})") from None
        yield Picture(path.stem, pixels)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalised (B, 3, H, W) images back to uint8 (B, H, W, 3), for display."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = images.detach().float().cpu() * std + mean
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def pictures_from_shards(cfg: TrainConfig, shards: str, split: str, count: int, size: int) -> Iterator[Picture]:
    """The first ``count`` samples of a split, in shard order, with their full labels."""
    data = dataclasses.replace(cfg.data, shards=shards, image_size=size, workers=0, decode="cpu",
                               backend="webdataset", eval_batch_size=max(1, min(count, 64)))
    loader = build_loader(data, split, WorldInfo(), torch.device("cpu"), train=False, seed=0,
                          channels_last=False)
    given = 0
    for batch in loader:
        pixels = to_uint8(batch.image)
        for i in torch.nonzero(batch.valid).flatten().tolist():
            if given >= count:
                return
            yield Picture(f"{split}_{int(batch.sample_id[i]):06d}", pixels[i], batch.labels[i].cpu().numpy())
            given += 1


# ----------------------------------------------------------------------------------------------- drawing

def jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colormap: values in [0, 1] (any shape) -> uint8 RGB (..., 3), blue low to red high."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green and blue ramps peak at v = 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def heat_overlay(pixels: np.ndarray, heat: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Blend a (H, W) heat map in [0, 1] over a uint8 (H, W, 3) image."""
    blended = (1 - weight) * pixels.astype(np.float64) + weight * jet(heat).astype(np.float64)
    return blended.round().clip(0, 255).astype(np.uint8)


def annotate(image: Image.Image, lines: Sequence[str]) -> Image.Image:
    """Write ``lines`` in the top-left corner on a dark box, with a font scaled to the image."""
    draw = ImageDraw.Draw(image, "RGBA")
    size = max(7, image.width // 14)
    font = load_font(size)
    # Shrink the font until the longest line fits: small inputs (64-80 px) are common on CPUs.
    while size > 6 and max(draw.textlength(line, font=font) for line in lines) > image.width - 4:
        size -= 1
        font = load_font(size)
    height = size + 2
    width = int(max(draw.textlength(line, font=font) for line in lines)) + 4
    draw.rectangle((0, 0, min(width, image.width), height * len(lines) + 2), fill=(0, 0, 0, 150))
    for i, line in enumerate(lines):
        draw.text((2, 1 + i * height), line, fill=(255, 255, 255, 255), font=font)
    return image


def upsample(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) CAMs -> (K, H, W) float64, bilinear like the usual CAM pictures."""
    up = F.interpolate(cam[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return up.cpu().double().numpy()


def normalise_map(cam: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes all zeros."""
    lo, hi = float(cam.min()), float(cam.max())
    return (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)


# ----------------------------------------------------------------------------------------------- overlays

def choose_classes(spec: Sequence[str], names: Sequence[str], scores: np.ndarray) -> list[int]:
    """Class ids for ``--classes``: ``topK`` (the K best-scored) and/or class names, first mention first."""
    chosen: list[int] = []
    for item in spec:
        match = _TOPK.match(item)
        if match:
            k = int(match.group(1))
            if k < 1:
                raise ValueError(f"--classes {item}: K must be >= 1")
            ids = np.argsort(-scores, kind="stable")[:k].tolist()
        elif item in names:
            ids = [list(names).index(item)]
        else:
            raise ValueError(f"--classes {item}: not topK and not a class name; classes are e.g. "
                             f"{', '.join(list(names)[:5])}")
        chosen += [c for c in ids if c not in chosen]
    return chosen


@torch.no_grad()
def boosted_cams(model: CamResNet, pixels: np.ndarray, alpha: float, device: torch.device) -> torch.Tensor:
    """BoostLU(CAM) at ``alpha`` (C, h, w) of one uint8 image; its spatial mean is the logit at that alpha."""
    x = normalise(torch.from_numpy(np.array(pixels))[None], device, torch.float32, False)
    saved = model.alpha_eval
    model.alpha_eval = float(alpha)  # the model reads alpha at call time; restore it for the caller
    try:
        return model.cam(x, boosted=True)[0].float().cpu()
    finally:
        model.alpha_eval = saved


def render_overlays(model: CamResNet, picture: Picture, names: Sequence[str], spec: Sequence[str], alpha: float,
                    device: torch.device) -> tuple[list[tuple[int, float, Image.Image]], Image.Image]:
    """Per chosen class (class id, score, overlay image), and the contact sheet of the picture."""
    cam = boosted_cams(model, picture.pixels, alpha, device)
    scores = torch.sigmoid(cam.mean(dim=(1, 2))).numpy()
    chosen = choose_classes(spec, names, scores)
    h, w = picture.pixels.shape[:2]
    heat = upsample(cam[chosen], (h, w))
    overlays = []
    for k, c in enumerate(chosen):
        image = Image.fromarray(heat_overlay(picture.pixels, normalise_map(heat[k])))
        tag = "" if picture.labels is None else {1: " +", 0: " -"}.get(int(picture.labels[c]), " ?")
        annotate(image, [f"{names[c]}{tag}", f"p={scores[c]:.2f} alpha={alpha:g}"])
        overlays.append((c, float(scores[c]), image))
    sheet = Image.new("RGB", (w * (len(overlays) + 1), h))
    sheet.paste(annotate(Image.fromarray(picture.pixels), [picture.name]), (0, 0))
    for k, (_, _, image) in enumerate(overlays):
        sheet.paste(image, (w * (k + 1), 0))
    return overlays, sheet


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_overlay(args: argparse.Namespace) -> dict:
    """The ``overlay`` command: PNG overlays per (image, class), a contact sheet per image, and index.json."""
    device = torch.device(args.device)
    model, cfg = load_model_for_eval(args.checkpoint, device)
    alpha = cfg.model.alpha_eval if args.alpha is None else float(args.alpha)
    if alpha < 1:
        raise ValueError(f"--alpha {alpha}: BoostLU needs alpha >= 1")
    size = args.size or cfg.data.image_size
    names = class_names_for(cfg, model.num_classes, args.shards)
    if args.images:
        pictures = pictures_from_files(args.images, size)
    else:
        pictures = pictures_from_shards(cfg, args.shards, args.split, args.count, size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"checkpoint": str(args.checkpoint), "alpha": alpha, "size": size,
                             "classes": list(args.classes), "images": []}
    for picture in pictures:
        overlays, sheet = render_overlays(model, picture, names, args.classes, alpha, device)
        entry: dict[str, Any] = {"name": picture.name, "sheet": f"{_safe(picture.name)}_sheet.png", "overlays": []}
        sheet.save(out / entry["sheet"])
        for c, score, image in overlays:
            file = f"{_safe(picture.name)}_{_safe(names[c])}.png"
            image.save(out / file)
            entry["overlays"].append({"class": names[c], "class_id": c, "score": score, "file": file})
        index["images"].append(entry)
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index
