"""The explanation gap (Kim et al., CVPR 2023, Sec. 3): how two models' CAMs differ on the same images.

For every (image, class) with a known label, both models' CAMs (flattened h*w) give:
- the Spearman rank correlation between the two maps (ties get their average rank), i.e. *where* each model looks;
- per model, the mean of its top-5% attributions (its strongest evidence) and of its bottom-5% attributions.

The paper's finding: a model trained with false negatives (AN on partial labels) keeps the *ranking* of a
full-label model's CAM on positive classes (high Spearman) but its strongest attributions are smaller; BoostLU
scales them back up. The statistics are taken on the **raw CAM** (1x1 conv output with bias, before BoostLU) of
both models, which is what the paper compares; the same tails after each model's own BoostLU (``alpha_eval``)
are reported too, as ``*_boosted`` (``--alpha-a/--alpha-b`` override the alphas), since that is the map a
BoostLU model's logit averages. BoostLU is strictly increasing, so it never changes a Spearman correlation.

Outputs: ``summary.json`` (mean, median, std, count per statistic, for positives and negatives, for a and b,
plus per-class means on positives), ``pairs_positive.csv`` and histograms as PNG (numpy + PIL, no matplotlib).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from bgtrain.checkpoint import load_model_for_eval
from bgtrain.data import build_loader
from bgtrain.distributed import WorldInfo
from bgtrain.explain.common import class_names_for, load_font, valid_rows
from bgtrain.ops.reference import boostlu as boostlu_reference
from bgtrain.runlog import RunLogger

TAIL = 0.05
STATS = ("spearman", "top5_a", "top5_b", "bottom5_a", "bottom5_b",
         "top5_boosted_a", "top5_boosted_b", "bottom5_boosted_a", "bottom5_boosted_b")


# ----------------------------------------------------------------------------------------------- statistics

def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis of (N, L), tied values sharing their average rank (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    n, length = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    ordered = np.take_along_axis(x, order, axis=1)
    starts = np.ones((n, length), dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    # A run of equal values gets the mean of the positions it covers; runs are numbered globally across rows.
    run = np.cumsum(starts, axis=1) - 1 + np.arange(n)[:, None] * length
    positions = np.broadcast_to(np.arange(1, length + 1, dtype=np.float64), (n, length))
    sums = np.bincount(run.ravel(), weights=positions.ravel(), minlength=n * length)
    counts = np.bincount(run.ravel(), minlength=n * length)
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, sums[run] / counts[run], axis=1)
    return ranks


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of a with the same row of b, (N,); NaN where either row is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)


def tail_count(length: int, fraction: float = TAIL) -> int:
    """How many attributions make the top (or bottom) ``fraction`` of a map: ceil(fraction * L), at least 1."""
    return max(1, math.ceil(fraction * length - 1e-9))


def tail_means(x: np.ndarray, fraction: float = TAIL) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the largest and of the smallest ``tail_count(L)`` values of each row of (N, L)."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=1)
    k = tail_count(x.shape[1], fraction)
    return x[:, -k:].mean(axis=1), x[:, :k].mean(axis=1)


def pair_statistics(cam_a: np.ndarray, cam_b: np.ndarray, alpha_a: float, alpha_b: float) -> dict[str, np.ndarray]:
    """Every statistic of STATS for aligned rows of flattened CAMs (N, h*w) of models a and b."""
    out = {"spearman": spearman_rows(cam_a, cam_b)}
    for tag, cam, alpha in (("a", cam_a, alpha_a), ("b", cam_b, alpha_b)):
        out[f"top5_{tag}"], out[f"bottom5_{tag}"] = tail_means(cam)
        boosted = boostlu_reference(torch.from_numpy(np.asarray(cam, np.float64)), alpha).numpy()
        out[f"top5_boosted_{tag}"], out[f"bottom5_boosted_{tag}"] = tail_means(boosted)
    return out


def describe(values: np.ndarray) -> dict:
    """mean, median, std and count of the finite values (NaN where there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan"), "count": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()), "count": int(v.size)}


def summarise(pairs: dict[str, np.ndarray]) -> dict:
    """The JSON summary of one label kind (positives or negatives): per statistic, per model, and paired."""
    out: dict = {"pairs": int(pairs["spearman"].size), "spearman": describe(pairs["spearman"]), "a": {}, "b": {}}
    for stat in STATS[1:]:
        name, tag = stat.rsplit("_", 1)
        out[tag][name] = describe(pairs[stat])
    for name in ("top5", "bottom5", "top5_boosted", "bottom5_boosted"):
        diff = pairs[f"{name}_b"] - pairs[f"{name}_a"]
        out[f"{name}_b_minus_a"] = describe(diff)
        out[f"{name}_b_lower_fraction"] = float(np.mean(diff < 0)) if diff.size else float("nan")
    return out


# ----------------------------------------------------------------------------------------------- histograms

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44))


def draw_histogram(series: dict[str, np.ndarray], title: str, xlabel: str, path: Path, bins: int = 30,
                   value_range: tuple[float, float] | None = None, size: tuple[int, int] = (720, 420)) -> None:
    """Grouped-bar histogram of one or more value sets, drawn with PIL and saved as PNG."""
    clean = {k: np.asarray(v, np.float64)[np.isfinite(v)] for k, v in series.items()}
    everything = np.concatenate([v for v in clean.values()] + [np.zeros(0)])
    if value_range is None:
        lo, hi = (float(everything.min()), float(everything.max())) if everything.size else (0.0, 1.0)
        value_range = (lo, hi if hi > lo else lo + 1.0)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    counts = {k: np.histogram(v, edges)[0] for k, v in clean.items()}
    top = max([int(c.max()) for c in counts.values()] + [1])
    width, height = size
    left, right, upper, lower = 60, 20, 50, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = load_font(14), load_font(11)
    plot_w, plot_h = width - left - right, height - upper - lower
    draw.text((left, 12), title, fill="black", font=font)
    draw.line((left, upper, left, upper + plot_h, left + plot_w, upper + plot_h), fill="black")
    slot = plot_w / bins
    bar = slot / max(1, len(counts))
    for s, c in enumerate(counts.values()):
        for i, n in enumerate(c):
            if n:
                x0 = left + i * slot + s * bar
                draw.rectangle((x0, upper + plot_h * (1 - n / top), x0 + bar - 1, upper + plot_h),
                               fill=COLOURS[s % len(COLOURS)])
    for t in range(5):  # x ticks
        v = value_range[0] + t / 4 * (value_range[1] - value_range[0])
        x = left + t / 4 * plot_w
        draw.line((x, upper + plot_h, x, upper + plot_h + 4), fill="black")
        draw.text((x - 14, upper + plot_h + 6), f"{v:.3g}", fill="black", font=small)
    for t in range(3):  # y ticks
        y = upper + plot_h * (1 - t / 2)
        draw.text((6, y - 6), f"{top * t / 2:.0f}", fill="black", font=small)
    draw.text((left + plot_w / 2 - 40, height - 20), xlabel, fill="black", font=small)
    for s, name in enumerate(counts):
        stats = describe(clean[name])
        y = upper + 4 + 16 * s
        draw.rectangle((width - 250, y, width - 240, y + 10), fill=COLOURS[s % len(COLOURS)])
        draw.text((width - 235, y - 2), f"{name}: mean {stats['mean']:.3g}, n={stats['count']}",
                  fill="black", font=small)
    image.save(path)


# ----------------------------------------------------------------------------------------------- the command

def add_gap_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m bgtrain.explain gap``."""
    parser.add_argument("--a", required=True, help="checkpoint of the reference model (e.g. trained on full labels)")
    parser.add_argument("--b", required=True, help="checkpoint of the compared model (e.g. trained on partial labels)")
    parser.add_argument("--shards", required=True, help="shard folder; its full labels choose positive/negative")
    parser.add_argument("--split", default="test", help="split (default test)")
    parser.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    parser.add_argument("--size", type=int, default=None, help="input size in px (default: a's data.image_size)")
    parser.add_argument("--alpha-a", type=float, default=None,
                        help="BoostLU alpha of a for the *_boosted statistics (default: a's alpha_eval)")
    parser.add_argument("--alpha-b", type=float, default=None,
                        help="same for b; e.g. 5 on an alpha-1 model = 'BoostLU in inference only'")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bins", type=int, default=30, help="histogram bins")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="output folder")


@torch.no_grad()
def collect_pairs(model_a, model_b, loader, max_images: int | None, progress: RunLogger) -> dict:
    """Per (image, known class): statistics of STATS plus sample id, class id and label, over the loader."""
    alpha_a, alpha_b = model_a.alpha_eval, model_b.alpha_eval  # run_gap sets them from --alpha-a/--alpha-b
    parts: list[dict[str, np.ndarray]] = []
    seen = 0
    for batch, keep in valid_rows(loader, max_images, progress, "CAM statistics"):
        images = batch.image[keep]
        cam_a, cam_b = model_a.cam(images).float().cpu(), model_b.cam(images).float().cpu()
        if cam_a.shape != cam_b.shape:
            raise ValueError(f"CAM shapes differ: a {tuple(cam_a.shape)}, b {tuple(cam_b.shape)}")
        labels = batch.labels[keep].cpu()
        rows, classes = torch.nonzero(labels >= 0, as_tuple=True)  # known labels only (OpenImages has -1)
        flat_a = cam_a[rows, classes].flatten(1).numpy()
        flat_b = cam_b[rows, classes].flatten(1).numpy()
        stats = pair_statistics(flat_a, flat_b, alpha_a, alpha_b)
        stats.update(sample_id=batch.sample_id[keep].cpu()[rows].numpy(), class_id=classes.numpy(),
                     positive=(labels[rows, classes] == 1).numpy())
        parts.append(stats)
        seen += keep.numel()
    if not parts:
        raise ValueError("no images to analyse (empty split, or --max-images 0)")
    merged: dict[str, Any] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    merged["images"] = seen
    merged["cam_size"] = tuple(cam_a.shape[-2:])
    return merged


def per_class(pairs: dict, names: Sequence[str]) -> dict:
    """Means on positive pairs, per class: count, Spearman, top-5% of a and of b."""
    out = {}
    for c, name in enumerate(names):
        m = pairs["positive"] & (pairs["class_id"] == c)
        if m.any():
            out[name] = {"count": int(m.sum()), "spearman": float(np.nanmean(pairs["spearman"][m]))
                         if np.isfinite(pairs["spearman"][m]).any() else float("nan"),
                         "top5_a": float(pairs["top5_a"][m].mean()), "top5_b": float(pairs["top5_b"][m].mean())}
    return out


def write_histograms(pairs: dict, out: Path, bins: int, label_a: str = "a", label_b: str = "b") -> list[str]:
    """The PNG histograms; returns their file names."""
    files = []
    for kind, mask in (("positive", pairs["positive"]), ("negative", ~pairs["positive"])):
        name = f"spearman_{kind}.png"
        draw_histogram({"a vs b": pairs["spearman"][mask]}, f"Spearman correlation of CAMs, {kind} labels",
                       "Spearman rho", out / name, bins, (-1.0, 1.0))
        files.append(name)
        for stat in ("top5", "bottom5", "top5_boosted"):
            name = f"{stat}_{kind}.png"
            what = {"top5": "top-5%", "bottom5": "bottom-5%", "top5_boosted": "top-5% after BoostLU"}[stat]
            draw_histogram({label_a: pairs[f"{stat}_a"][mask], label_b: pairs[f"{stat}_b"][mask]},
                           f"mean of {what} CAM attributions, {kind} labels", "attribution", out / name, bins)
            files.append(name)
    return files


def run_gap(args: argparse.Namespace) -> dict:
    """The ``gap`` command: statistics, summary.json, pairs_positive.csv and histograms in ``args.out``."""
    device = torch.device(args.device)
    model_a, cfg_a = load_model_for_eval(args.a, device)
    model_b, cfg_b = load_model_for_eval(args.b, device)
    if model_a.num_classes != model_b.num_classes:
        raise ValueError(f"--a has {model_a.num_classes} classes, --b {model_b.num_classes}: not comparable")
    for model, alpha, flag in ((model_a, args.alpha_a, "--alpha-a"), (model_b, args.alpha_b, "--alpha-b")):
        if alpha is not None:
            if alpha < 1:
                raise ValueError(f"{flag} {alpha}: BoostLU needs alpha >= 1")
            model.alpha_eval = float(alpha)  # only the *_boosted statistics read it; raw CAMs ignore alpha
    names = class_names_for(cfg_a, model_a.num_classes, args.shards)
    size = args.size or cfg_a.data.image_size
    if args.max_images is not None and args.max_images < 1:
        raise ValueError("--max-images must be >= 1")
    data = dataclasses.replace(cfg_a.data, shards=args.shards, image_size=size, workers=1, decode="cpu",
                               backend="webdataset", eval_batch_size=args.batch_size)
    loader = build_loader(data, args.split, WorldInfo(), device, train=False, seed=0, channels_last=False,
                          label_set="full")
    progress = RunLogger(None).install()
    try:
        pairs = collect_pairs(model_a, model_b, loader, args.max_images, progress)
    finally:
        progress.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pos = pairs["positive"]
    summary = {
        "a": {"checkpoint": str(args.a), "name": cfg_a.name, "scheme": cfg_a.loss.scheme, "labels": cfg_a.data.labels,
              "alpha_train": cfg_a.model.alpha_train, "alpha_eval": cfg_a.model.alpha_eval,
              "alpha_boosted": model_a.alpha_eval},
        "b": {"checkpoint": str(args.b), "name": cfg_b.name, "scheme": cfg_b.loss.scheme, "labels": cfg_b.data.labels,
              "alpha_train": cfg_b.model.alpha_train, "alpha_eval": cfg_b.model.alpha_eval,
              "alpha_boosted": model_b.alpha_eval},
        "shards": str(args.shards), "split": args.split, "images": int(pairs["images"]), "image_size": size,
        "cam": "raw (1x1 conv output with bias, before BoostLU); *_boosted: after BoostLU at alpha_boosted",
        "tail_fraction": TAIL,
        "positive": summarise({k: v[pos] for k, v in pairs.items() if k in STATS}),
        "negative": summarise({k: v[~pos] for k, v in pairs.items() if k in STATS}),
        "per_class_positive": per_class(pairs, names),
    }
    summary["cam_size"] = list(pairs["cam_size"])
    summary["tail_count"] = tail_count(int(np.prod(pairs["cam_size"])))
    summary["histograms"] = write_histograms(pairs, out, args.bins, f"a ({cfg_a.name})", f"b ({cfg_b.name})")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "pairs_positive.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample_id", "class"] + list(STATS))
        for i in np.nonzero(pos)[0]:
            writer.writerow([int(pairs["sample_id"][i]), names[int(pairs["class_id"][i])]]
                            + [f"{pairs[s][i]:.6g}" for s in STATS])
    return summary

