"""The pointing game (Zhang et al., ECCV 2016): does a model's CAM peak on the object it names?

For every (test image, positive class), the CAM's maximum cell is mapped to image pixels (the centre of that
cell) and counts as a **hit** when it lies within the object's extent:

    distance(cell centre, object centre) <= r + tolerance,   tolerance = half a CAM cell in pixels

where (cx, cy, r) is the object's centre and radius as ``shards.synthetic`` drew it (every shape fits the circle
of radius r around its centre) and a cell is ``W / w`` by ``H / h`` pixels for an image of W x H pixels and a CAM
of h x w cells (the larger side when they differ). The tolerance is the usual one of the pointing game: a cell
is the finest place a CAM can point to, so a peak whose cell reaches the object counts. Coordinates are those of
the drawing (pixel k's centre is at k, as PIL draws), so cell j of w has its centre at ``(j + 0.5) * W / w - 0.5``.
Ties at the maximum go to the first cell in row-major order (``argmax``). A later object may cover part of an
earlier one; the rule still uses the drawn circle.

The CAM is the raw one (1x1 conv with bias, before BoostLU): BoostLU is strictly increasing, so its argmax, and
hence every hit, is the same at any alpha. The **chance** rate is what a uniformly random cell would score under
the same rule on the same objects: the mean over pairs of the fraction of cells whose centre is a hit. A hit rate
well above it is localisation, not luck.

The object positions come from ``<shards>/<split>/objects.json``, written by ``shards.synthetic`` since it records
them; images are matched by sample key.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bgtrain import storage
from bgtrain.checkpoint import load_model_for_eval
from bgtrain.data import build_loader
from bgtrain.distributed import WorldInfo
from bgtrain.explain.common import class_names_for, valid_rows
from bgtrain.runlog import RunLogger
from shards.format import sample_key
from shards.synthetic import OBJECTS_FILE, OBJECTS_VERSION

RULE = ("hit: the centre of the CAM's maximum cell, in image pixels, is within r + half a CAM cell of the "
        "object's centre (r: the drawn object's radius); chance: the same rule for a uniformly random cell")


# ----------------------------------------------------------------------------------------------- the rule

def cell_centres(cam_size: tuple[int, int], image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel x of each CAM column (w,) and y of each row (h,) for an image of (W, H) pixels and a CAM of (h, w)."""
    (h, w), (width, height) = cam_size, image_size
    return (np.arange(w) + 0.5) * width / w - 0.5, (np.arange(h) + 0.5) * height / h - 0.5


def tolerance(cam_size: tuple[int, int], image_size: tuple[int, int]) -> float:
    """Half a CAM cell in pixels (the larger side of the cell when the image and the CAM differ in shape)."""
    (h, w), (width, height) = cam_size, image_size
    return 0.5 * max(width / w, height / h)


def score_pairs(cams: np.ndarray, objects: np.ndarray, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Hits (N,) bool and chance (N,) in [0, 1] for CAMs (N, h, w) and their objects (N, 3) as cx, cy, r."""
    cams = np.asarray(cams)
    objects = np.asarray(objects, dtype=np.float64).reshape(-1, 3)
    n, h, w = cams.shape
    xs, ys = cell_centres((h, w), image_size)
    cx, cy, r = (objects[:, k, None, None] for k in range(3))
    # (N, h, w): which cells' centres are inside each object's extent, tolerance included.
    inside = np.hypot(xs[None, None, :] - cx, ys[None, :, None] - cy) <= r + tolerance((h, w), image_size)
    peak = cams.reshape(n, -1).argmax(axis=1)
    hits = inside.reshape(n, -1)[np.arange(n), peak]
    return hits, inside.reshape(n, -1).mean(axis=1)


def summarise(hits: np.ndarray, chance: np.ndarray, class_id: np.ndarray, names: Sequence[str]) -> dict:
    """Hit rate and chance in percent, overall and per class (classes with at least one pair)."""
    def rates(m: np.ndarray) -> dict:
        return {"hit_rate": 100.0 * float(hits[m].mean()), "chance": 100.0 * float(chance[m].mean()),
                "pairs": int(m.sum()), "hits": int(hits[m].sum())}

    if hits.size == 0:
        raise ValueError("no (image, positive class) pairs to score")
    out = rates(np.ones(hits.size, bool))
    out["per_class"] = {name: rates(class_id == c) for c, name in enumerate(names) if (class_id == c).any()}
    return out


# ----------------------------------------------------------------------------------------------- objects

def load_objects(shards: str, split: str) -> tuple[dict[str, list], tuple[int, int]]:
    """``<shards>/<split>/objects.json``: objects per sample key and the (W, H) their pixels refer to."""
    path = storage.join(shards, split, OBJECTS_FILE)
    try:
        doc = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: these shards were written by a shards synthetic older than "
                                "the object positions (or are not synthetic); rebuild them with "
                                "`python -m shards synthetic`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); rebuild the shards") from None
    if not isinstance(doc, dict) or doc.get("version") != OBJECTS_VERSION or not isinstance(doc.get("objects"), dict):
        raise ValueError(f"{path}: not an objects file of version {OBJECTS_VERSION}; rebuild the shards")
    width, height = doc["size"]
    return doc["objects"], (int(width), int(height))


def objects_of(objects: dict[str, list], split: str, sample_id: int, classes: Sequence[int]) -> list[list[float]]:
    """(cx, cy, r) of each of ``classes`` in one sample; a clear error when the file does not know them."""
    key = sample_key(split, sample_id)
    if key not in objects:
        raise ValueError(f"{OBJECTS_FILE} has no objects for sample {key}; it belongs to other shards, rebuild them")
    drawn = {int(c): (cx, cy, r) for c, cx, cy, r in objects[key]}
    missing = [c for c in classes if c not in drawn]
    if missing:
        raise ValueError(f"{OBJECTS_FILE}: sample {key} is labelled with classes {missing} but has no such object")
    return [list(drawn[c]) for c in classes]


# ----------------------------------------------------------------------------------------------- the game

@torch.no_grad()
def collect(model, loader, objects: dict[str, list], split: str, image_size: tuple[int, int],
            max_images: int | None, progress: RunLogger) -> dict:
    """Hits, chance and class per (image, positive class) over the loader, plus images seen and the CAM size."""
    hits, chance, class_id = [], [], []
    seen, cam_size = 0, (0, 0)
    for batch, keep in valid_rows(loader, max_images, progress, "pointing game"):
        cam = model.cam(batch.image[keep]).float().cpu()
        cam_size = (int(cam.shape[-2]), int(cam.shape[-1]))
        rows, classes = torch.nonzero(batch.labels[keep].cpu() == 1, as_tuple=True)
        ids = batch.sample_id[keep].cpu()[rows].tolist()
        boxes = [objects_of(objects, split, sid, [c])[0] for sid, c in zip(ids, classes.tolist())]
        batch_hits, batch_chance = score_pairs(cam[rows, classes].numpy(), np.asarray(boxes).reshape(-1, 3),
                                               image_size)
        hits.append(batch_hits)
        chance.append(batch_chance)
        class_id.append(classes.numpy())
        seen += keep.numel()
    if not seen:
        raise ValueError("no images to score (empty split, or --max-images 0)")
    return {"hits": np.concatenate(hits), "chance": np.concatenate(chance), "class_id": np.concatenate(class_id),
            "images": seen, "cam_size": cam_size}


def pointing_game(checkpoint: Path, shards: str, split: str = "test", max_images: int | None = None,
                  alpha: float | None = None, batch_size: int = 32, device: str | None = None,
                  size: int | None = None) -> dict:
    """The pointing game of ``checkpoint`` on ``shards``/``split`` (synthetic, with objects.json); see the module.

    Returns ``hit_rate`` and ``chance`` in percent, ``pairs`` and ``hits`` counts, ``per_class`` (the same four
    per class name), ``images``, ``split``, ``cam_size`` [h, w], the ``image_size`` [W, H] of the objects' pixels,
    ``input_size`` (the model's input side), ``tolerance_px``, ``alpha`` (recorded only: it cannot change a hit),
    ``checkpoint``, ``shards`` and ``rule``.
    """
    if max_images is not None and max_images < 1:
        raise ValueError("--max-images must be >= 1")
    if alpha is not None and alpha < 1:
        raise ValueError(f"--alpha {alpha}: BoostLU needs alpha >= 1")
    objects, image_size = load_objects(shards, split)  # first: a missing file is the likeliest mistake
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg = load_model_for_eval(checkpoint, torch_device)
    names = class_names_for(cfg, model.num_classes, shards)
    input_size = size or cfg.data.image_size
    data = dataclasses.replace(cfg.data, shards=shards, image_size=input_size, workers=1, decode="cpu",
                               backend="webdataset", eval_batch_size=batch_size)
    loader = build_loader(data, split, WorldInfo(), torch_device, train=False, seed=0, channels_last=False,
                          label_set="full")
    progress = RunLogger(None).install()
    try:
        pairs = collect(model, loader, objects, split, image_size, max_images, progress)
    finally:
        progress.close()
    result: dict[str, Any] = summarise(pairs["hits"], pairs["chance"], pairs["class_id"], names)
    result.update(images=int(pairs["images"]), split=split, cam_size=list(pairs["cam_size"]),
                  image_size=list(image_size), input_size=input_size,
                  tolerance_px=tolerance(pairs["cam_size"], image_size),
                  alpha=float(alpha) if alpha is not None else model.alpha_eval,
                  checkpoint=str(checkpoint), shards=str(shards), rule=RULE)
    return result


def add_pointing_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m bgtrain.explain pointing``."""
    parser.add_argument("--checkpoint", required=True, help="a bgtrain checkpoint (e.g. out_dir/checkpoints/best.pt)")
    parser.add_argument("--shards", required=True, help="synthetic shard folder with <split>/objects.json")
    parser.add_argument("--split", default="test", help="split (default test)")
    parser.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    parser.add_argument("--alpha", type=float, default=None,
                        help="BoostLU alpha to record (default: the checkpoint's alpha_eval); it cannot change a hit")
    parser.add_argument("--size", type=int, default=None, help="input size in px (default: the config's image_size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder to write pointing.json into (created)")


def run_pointing(args: argparse.Namespace) -> dict:
    """The ``pointing`` command: the result, also written as ``pointing.json`` into ``args.out`` when given."""
    result = pointing_game(Path(args.checkpoint), args.shards, args.split, args.max_images, args.alpha,
                           batch_size=args.batch_size, device=args.device, size=args.size)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pointing.json").write_text(json.dumps(result, indent=1))
    return result
