"""Synthetic multi-object images with known labels, written as real shards.

Each class is a distinct (shape, colour, texture) triple drawn at a random position and scale on a
cluttered background, 1 to 4 objects per image, so that CAMs have something to localise. ``--objects 1`` writes
single-object, single-label images instead: a stand-in for ImageNet on which to pretrain a trunk.
"""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.progress import Progress

from bgtrain.labels import single_positive, split_train_val
from shards.format import SampleLabels, ShardWriter, sample_key, shard_name, write_json_atomic
from shards.manifest import make_manifest, train_counts

SHAPES = ("disc", "square", "triangle", "diamond", "cross", "ring", "hbar", "star")
TEXTURES = ("solid", "stripes", "checks")
SPLIT_CODES = {"trainval": 0, "test": 1}
OBJECTS_FILE = "objects.json"  # per split: where each sample's objects are (bgtrain.explain.pointing reads it)
OBJECTS_VERSION = 1
Object = list[float]  # [class, cx, cy, r]: class id, centre and radius in pixels of the rendered image


def class_names(num_classes: int) -> list[str]:
    """Readable names, e.g. ``red_disc``; unique because (shape, hue, texture) is unique per class."""
    return [f"{_appearance(c)[0]}_{c:03d}" for c in range(num_classes)]


def _appearance(c: int) -> tuple[str, tuple[int, int, int], str]:
    hue = (c * 0.618034) % 1.0
    r, g, b = (int(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.85, 0.95))
    return SHAPES[c % len(SHAPES)], (r, g, b), TEXTURES[(c // len(SHAPES)) % len(TEXTURES)]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        d.ellipse(box, fill=255)
    elif shape == "square":
        d.rectangle(box, fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    elif shape == "cross":
        w = r / 3
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        d.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=0)
    elif shape == "hbar":
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=255)
    else:  # star
        angles = np.linspace(-np.pi / 2, 3 * np.pi / 2, 11)[:-1]
        radii = np.where(np.arange(10) % 2 == 0, r, r / 2.5)
        d.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)], fill=255)
    return mask


def _texture(texture: str, size: int, period: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "stripes":
        return 0.55 + 0.45 * ((xx + yy) // period % 2)
    if texture == "checks":
        return 0.55 + 0.45 * ((xx // period + yy // period) % 2)
    return np.ones((size, size))


def render(classes: list[int], size: int, rng: np.random.Generator) -> Image.Image:
    """One image containing one object of each class in ``classes``."""
    return render_objects(classes, size, rng)[0]


def render_objects(classes: list[int], size: int, rng: np.random.Generator) -> tuple[Image.Image, list[Object]]:
    """``render``'s image and the objects drawn on it, ``[class, cx, cy, r]`` in pixels, in drawing order.

    (cx, cy) is the centre of the shape's box and r its half-side (the shape fits the circle of radius r around
    the centre); a later object may cover part of an earlier one. The rng draws are exactly ``render``'s.
    """
    objects: list[Object] = []
    base = rng.uniform(60, 190, size=3)
    ramp = np.linspace(-30, 30, size)[None, :, None] * rng.uniform(-1, 1, size=3)
    img = np.clip(base + ramp + rng.normal(0, 12, (size, size, 3)), 0, 255)
    canvas = Image.fromarray(img.astype(np.uint8))
    clutter = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 10))):  # grey strokes: clutter with no class colour
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        g = int(rng.integers(40, 220))
        clutter.line((x0, y0, x1, y1), fill=(g, g, g), width=int(rng.integers(1, max(2, size // 32))))
    for c in classes:
        shape, rgb, texture = _appearance(c)
        r = rng.uniform(0.12, 0.22) * size
        cx, cy = rng.uniform(r, size - r, 2)
        mask = _shape_mask(shape, size, cx, cy, r)
        tex = _texture(texture, size, max(2, size // 24))[..., None] * np.asarray(rgb)
        layer = Image.fromarray(np.clip(tex, 0, 255).astype(np.uint8))
        canvas.paste(layer, (0, 0), mask)
        objects.append([int(c), float(cx), float(cy), float(r)])
    return canvas, objects


def _draw_labels(n: int, num_classes: int, max_objects: int, rng: np.random.Generator,
                 min_objects: int = 1) -> np.ndarray:
    full = np.zeros((n, num_classes), np.int8)
    for i in range(n):
        k = int(rng.integers(min_objects, max_objects + 1))
        full[i, rng.choice(num_classes, size=min(k, num_classes), replace=False)] = 1
    return full


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_objects(path: Path, size: int, objects: dict[str, list[Object]]) -> None:
    """The split's side file: ``{"version", "size": [w, h], "objects": {sample key: [[class, cx, cy, r], ...]}}``.

    Compact JSON (one line), written atomically: a split of thousands of images stays a small file. The manifest
    does not list it, so shards built before it existed, and every reader of shards, are unaffected.
    """
    doc = {"version": OBJECTS_VERSION, "size": [size, size], "objects": objects}
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True))
    os.replace(tmp, path)


def build(out: Path, num_classes: int, n_train: int, n_val: int, n_test: int, size: int, seed: int,
          shard_size: int = 250, max_objects: int = 4, quality: int = 90, label_seed: int = 1200,
          min_objects: int = 1) -> dict:
    """Generate the dataset and write shards plus ``manifest.json`` into ``out``.

    Every image holds between ``min_objects`` and ``max_objects`` objects of distinct classes (uniformly drawn).
    Each split folder also gets ``objects.json`` (``write_objects``): where every sample's objects are drawn.
    """
    if num_classes < 2 or min(n_train, n_test) < 1 or n_val < 0 or size < 16:
        raise ValueError("need classes >= 2, train >= 1, test >= 1, val >= 0 and size >= 16")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    names = class_names(num_classes)
    rng = np.random.default_rng(seed)
    n_trainval = n_train + n_val
    full = {"trainval": _draw_labels(n_trainval, num_classes, max_objects, rng, min_objects),
            "test": _draw_labels(n_test, num_classes, max_objects, rng, min_objects)}
    # COLE's protocol: the single positive is drawn on the whole train pool, before the split.
    observed = single_positive(full["trainval"], seed=label_seed)
    train_idx, val_idx = split_train_val(n_trainval, n_val / n_trainval, seed=label_seed)
    parts = {"train": ("trainval", train_idx), "val": ("trainval", val_idx), "test": ("test", np.arange(n_test))}

    splits: dict[str, dict[str, Any]] = {}
    all_train_labels: list = []
    with Progress() as progress:
        for split, (pool, rows) in parts.items():
            if rows.size == 0:
                continue
            order = rows[np.random.default_rng([seed, len(split)]).permutation(rows.size)]  # pre-shuffled
            task = progress.add_task(f"{split}", total=rows.size)
            (out / split).mkdir(parents=True, exist_ok=True)
            shards, written, objects = [], [], {}
            for start in range(0, order.size, shard_size):
                writer = ShardWriter(out / split / shard_name(split, start // shard_size))
                for sid, row in enumerate(order[start: start + shard_size], start=start):
                    img_rng = np.random.default_rng([seed, SPLIT_CODES[pool], int(row)])
                    pos = np.nonzero(full[pool][row] == 1)[0].tolist()
                    render_img, objects[sample_key(split, sid)] = render_objects(pos, size, img_rng)
                    obs = np.nonzero(observed[row] == 1)[0].tolist() if pool == "trainval" else pos
                    labels = SampleLabels(sid, obs_pos=obs, full_pos=pos)
                    writer.write(sample_key(split, sid), _jpeg(render_img, quality), labels, names)
                    written.append(labels)
                    progress.advance(task)
                shards.append(writer.close())
            write_objects(out / split / OBJECTS_FILE, size, objects)
            rest = {"observed": -1, "full": 0} if split != "test" else {"observed": 0, "full": 0}
            splits[split] = {"shards": shards, "rest": rest}
            if split == "train":
                all_train_labels = written
    rest = splits["train"]["rest"]
    manifest = make_manifest("synthetic", names, splits, train_counts(all_train_labels, num_classes, rest),
                             build_args={"classes": num_classes, "train": n_train, "val": n_val, "test": n_test,
                                         "size": size, "seed": seed, "shard_size": shard_size,
                                         "min_objects": min_objects, "max_objects": max_objects,
                                         "quality": quality})
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    """CLI entry: ``python -m shards synthetic``."""
    parser = argparse.ArgumentParser(
        prog="python -m shards synthetic",
        description="Generate synthetic multi-object images as WebDataset shards with full and "
                    "single-positive labels.",
        epilog="examples: python -m shards synthetic --out data/smoke --classes 10 --train 200 --val 50 "
               "--test 50 --size 64\n"
               "          python -m shards synthetic --out data/pretrain --objects 1 --train 2000   "
               "(single-object images to pretrain a trunk on)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--classes", type=int, default=20, help="number of classes (default 20)")
    parser.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--val", type=int, default=500, help="validation images, split off COLE-style (default 500)")
    parser.add_argument("--test", type=int, default=500, help="test images (default 500)")
    parser.add_argument("--size", type=int, default=128, help="square image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of images and shard order (default 0)")
    parser.add_argument("--label-seed", type=int, default=1200, help="COLE seed of split and single positive")
    parser.add_argument("--shard-size", type=int, default=250, help="samples per tar (default 250)")
    parser.add_argument("--max-objects", type=int, default=4, help="objects per image: 1..N (default 4)")
    parser.add_argument("--objects", type=int, default=None,
                        help="exactly N objects per image, overriding --max-objects; 1 gives single-label images "
                             "to pretrain a trunk on (an ImageNet stand-in)")
    args = parser.parse_args(argv)
    low, high = (args.objects, args.objects) if args.objects is not None else (1, args.max_objects)
    try:
        m = build(args.out, args.classes, args.train, args.val, args.test, args.size, args.seed,
                  args.shard_size, high, label_seed=args.label_seed, min_objects=low)
    except ValueError as e:
        parser.error(str(e))
    counts = {k: v["num_samples"] for k, v in m["splits"].items()}
    print(f"wrote {counts} with {len(m['classes'])} classes to {args.out}")
