"""mAP and group-wise mAP, class-sharded across ranks.

Each rank scores its own rows; :func:`sharded_average_precision` redistributes scores and signed
labels with ``all_to_all`` so that rank r owns a contiguous block of classes (memory O(N*C/world)),
computes AP for that block (on the GPU when the tensors are CUDA), and gathers the per-class APs on
every rank. The AP math lives in :mod:`bgtrain.metrics`.

Example::

    torchrun --standalone --nproc_per_node=2 -m bgtrain.evaluate --checkpoint runs/oi/best.pt \\
        --shards /data/openimages-shards --split test --alpha-eval 5 --out runs/oi/eval
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bgtrain.collectives import all_gather_fixed, all_to_all_pieces
from bgtrain.metrics import (
    NO_POSITIVE_RULES,
    APResult,
    NoPositiveRule,
    ap_with_counts,
    as_matrix,
    average_precision,
    class_groups,
    group_map,
    mean_ap,
)

__all__ = ["average_precision", "ap_with_counts", "mean_ap", "class_groups", "group_map", "class_blocks",
           "sharded_average_precision", "sharded_ap_with_counts", "report", "print_report", "write_report"]

GROUP_COUNT_KEYS = ("obs_pos", "obs_known", "full_pos", "full_known")


def class_blocks(num_classes: int, world: int) -> list[tuple[int, int]]:
    """Contiguous class block [start, stop) per rank; the first ``C % world`` ranks get one class more."""
    sizes = [num_classes // world + (r < num_classes % world) for r in range(world)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [(int(starts[r]), int(starts[r + 1])) for r in range(world)]


def sharded_ap_with_counts(scores_local, labels_local, group=None) -> APResult:
    """Per-class AP and counts from rows spread over ranks; every rank gets the full (C,) result."""
    scores, labels = as_matrix(scores_local, "scores"), as_matrix(labels_local, "labels")
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return ap_with_counts(scores, labels)
    if scores.dim() != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must both be (N_r, C)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = scores.device
    labels = labels.to(dev)
    # Row counts, class counts and dtypes of every rank: ranks may hold different numbers of rows (even 0).
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    if scores.dtype not in dtypes:
        raise ValueError(f"scores must be one of {dtypes}, got {scores.dtype}")
    meta = torch.tensor([scores.shape[0], scores.shape[1], dtypes.index(scores.dtype)], dtype=torch.int64, device=dev)
    metas: list[list[int]] = all_gather_fixed(meta, group).tolist()
    if len({(m[1], m[2]) for m in metas}) != 1:
        raise ValueError(f"ranks disagree on (num_classes, score dtype): {[(m[1], dtypes[m[2]]) for m in metas]}")
    num_classes = metas[0][1]
    blocks = class_blocks(num_classes, world)
    c0, c1 = blocks[rank]
    # Redistribute: rank r sends rows x block d to rank d and receives all rows of its own block.
    recv_shapes = [(m[0], c1 - c0) for m in metas]
    recv_scores = all_to_all_pieces([scores[:, a:b] for a, b in blocks], recv_shapes, group)
    recv_labels = all_to_all_pieces([labels[:, a:b] for a, b in blocks], recv_shapes, group)
    del scores, labels
    block = ap_with_counts(recv_scores, recv_labels)
    del recv_scores, recv_labels
    # Gather per-class results: pad to the largest block because all_gather needs equal sizes.
    width = blocks[0][1] - blocks[0][0]
    packed = torch.zeros((3, width), dtype=torch.float64, device=dev)
    packed[0, : c1 - c0] = block.ap
    packed[1, : c1 - c0] = block.n_pos.double()  # exact: counts < 2**53
    packed[2, : c1 - c0] = block.n_known.double()
    gathered = all_gather_fixed(packed, group)
    full = torch.cat([g[:, : b - a] for g, (a, b) in zip(gathered, blocks)], dim=1)
    return APResult(ap=full[0], n_pos=full[1].long(), n_known=full[2].long())


def sharded_average_precision(scores_local, labels_local, group=None) -> torch.Tensor:
    """Per-class AP (C,) float64 on every rank, identical to :func:`average_precision` on all rows."""
    return sharded_ap_with_counts(scores_local, labels_local, group).ap


def _train_counts(manifest: dict, count_key: str) -> np.ndarray:
    counts = manifest.get("train_counts")
    if not isinstance(counts, dict):
        raise ValueError("manifest has no 'train_counts' section; rebuild the shards with the current shard builder")
    base = count_key.split("_")[0]
    try:
        if count_key.endswith("_known"):
            return np.asarray(counts[f"{base}_pos"], np.int64) + np.asarray(counts[f"{base}_neg"], np.int64)
        return np.asarray(counts[count_key], np.int64)
    except KeyError as e:
        raise ValueError(f"manifest train_counts lacks {e.args[0]!r} (needed for group counts {count_key!r})") from e


def report(aps, manifest: dict, num_groups: int = 5, no_positive: NoPositiveRule = "zero",
           positives_per_class=None, count_key: str = "obs_pos", negatives_per_class=None) -> dict:
    """Group-wise mAP result (JSON-ready) from per-class APs and the shard manifest.

    Groups follow Durand: classes sorted ascending by their training count ``count_key`` (default
    ``obs_pos``: observed positive annotations; ``obs_known`` adds verified negatives), cut by
    ``np.array_split`` into ``num_groups`` groups, G1 rarest. With ``negatives_per_class`` each group
    counts its known negatives, and the classes with a positive but no known negative (AP 1 whatever
    the model) are named in ``no_negative_classes``.
    """
    if count_key not in GROUP_COUNT_KEYS:
        raise ValueError(f"count_key must be one of {GROUP_COUNT_KEYS}, got {count_key!r}")
    aps = np.asarray(aps.cpu() if isinstance(aps, torch.Tensor) else aps, np.float64)
    classes = manifest.get("classes", [])
    if len(classes) != aps.size:
        raise ValueError(f"manifest lists {len(classes)} classes but {aps.size} APs were computed")
    counts = _train_counts(manifest, count_key)
    result = group_map(aps, counts, num_groups, no_positive, positives_per_class, negatives_per_class)
    per_class = [{"id": i, "name": classes[i], "ap": None if math.isnan(a) else float(a),
                  "train_count": int(counts[i])} for i, a in enumerate(aps.tolist())]
    out = {"dataset": manifest.get("dataset"), "num_classes": int(aps.size), "no_positive": no_positive,
           "group_count_key": count_key, "group_cut": "np.array_split of the ascending stable sort",
           "groups": result["groups"], "all": result["all"], "per_class": per_class}
    if negatives_per_class is not None:
        neg = np.asarray(negatives_per_class.cpu() if isinstance(negatives_per_class, torch.Tensor)
                         else negatives_per_class)
        for entry in per_class:
            entry["n_neg"] = int(neg[entry["id"]])
        out["no_negative_classes"] = [classes[i] for i in range(aps.size)
                                      if neg[i] == 0 and not math.isnan(aps[i]) and aps[i] > 0]
    return out


def print_report(result: dict) -> None:
    """Print the group-wise mAP table with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mAP ({result.get('dataset')}, no-positive rule: {result['no_positive']}, "
                        f"groups by {result['group_count_key']})")
    negatives = "n_negatives" in result["all"]
    cols = ("group", "mAP", "classes", "used", "no positive", "no known") + (
        ("known neg", "no neg") if negatives else ()) + ("train count",)
    for col in cols:
        table.add_column(col, justify="right")
    rows = [*result["groups"], {"group": "All", **result["all"]}]
    for row in rows:
        span = f"{row['train_count_min']}..{row['train_count_max']}" if "train_count_min" in row else ""
        extra = (f"{row['n_negatives']:,}", str(row["n_no_negative"])) if negatives else ()
        table.add_row(row["group"], f"{row['map']:.2f}", str(row["n_classes"]), str(row["n_classes_used"]),
                      str(row["n_no_positive"]), str(row["n_no_known"]), *extra, span)
    console = Console()
    console.print(table)
    lacking = result.get("no_negative_classes") or []
    if lacking:
        shown = ", ".join(lacking[:10]) + (f" and {len(lacking) - 10} more" if len(lacking) > 10 else "")
        console.print(f"[bold yellow]warning[/]: {len(lacking)} class(es) have positives but no known negative, "
                      f"so their AP is 1 whatever the scores: {shown}")


def _json_safe(value):
    """NaN (e.g. a group whose classes were all skipped) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(result: dict, out_dir: str | Path, name: str = "map.json") -> Path:
    """Write the report JSON (NaN as null) and return its path."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False))
    tmp.replace(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    """CLI of ``torchrun -m bgtrain.evaluate``."""
    p = argparse.ArgumentParser(
        prog="torchrun -m bgtrain.evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  torchrun --standalone --nproc_per_node=2 -m bgtrain.evaluate "
               "--checkpoint runs/oi/best.pt --shards /data/oi-shards --split test --out runs/oi/eval")
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by bgtrain.train")
    p.add_argument("--shards", required=True, help="shard folder with manifest.json")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--alpha-eval", type=float, default=None, help="BoostLU alpha at inference (default: checkpoint's)")
    p.add_argument("--no-positive", default="zero", choices=NO_POSITIVE_RULES,
                   help="class with no positive: 'zero' keeps AP 0 in the mean (reference), 'skip' leaves it out")
    p.add_argument("--groups", type=int, default=5, help="number of Durand groups (5 for OpenImages)")
    p.add_argument("--group-counts", default="obs_pos", choices=GROUP_COUNT_KEYS,
                   help="manifest train_counts used to order classes into groups")
    p.add_argument("--out", default=None, help="folder for map.json (default: next to the checkpoint)")
    p.add_argument("--timeout", type=int, default=300, help="process-group timeout in seconds (default 300)")
    return p


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Score a checkpoint on a split, shard AP by class over ranks, print and write the group table."""
    args = build_parser().parse_args(argv)
    from bgtrain.checkpoint import classes_in, load_model_for_eval
    from bgtrain.cli import DataError, UsageError
    from bgtrain.data import build_loader
    from bgtrain.distributed import init_distributed, shutdown
    from bgtrain.engines.base import EvalEngine
    from bgtrain.predict import score_split
    from shards.format import read_manifest

    manifest = read_manifest(args.shards)  # a bad folder fails before any process group
    num_classes = len(manifest.get("classes", []))
    groups_error = f"--groups {args.groups}: must be between 1 and the {num_classes} classes of {args.shards}"
    if args.groups < 1:  # wrong whatever the data: checked before the checkpoint is read
        raise UsageError(groups_error)
    # The class counts first: a limit derived from them (--groups) would hide the real mismatch.
    trained_on = classes_in(args.checkpoint)  # memory-mapped, no tensor read
    if trained_on is not None and trained_on != num_classes:
        raise DataError(f"class mismatch: --checkpoint {args.checkpoint} was trained on {trained_on} classes but "
                        f"--shards {args.shards} has {num_classes}; evaluate it on its own dataset")
    if args.groups > num_classes:  # checked before the (long) scoring, not after it
        raise UsageError(groups_error)
    world, device = init_distributed(args.timeout)
    try:
        model, cfg = load_model_for_eval(args.checkpoint, device)
        if args.alpha_eval is not None:
            model.alpha_eval = args.alpha_eval
        cfg.data.shards = args.shards
        # Scored as the training's own validation scored: the same loader settings, the config's precision and
        # weight layout (EvalEngine), and the trainer's scoring pass.
        engine = EvalEngine(cfg, model, device)
        if engine.fp32_instead_of and world.is_main:
            print(f"note: the checkpoint trained in {engine.fp32_instead_of}, which a CPU device does not run "
                  "(see engine.precision); scoring in fp32", file=sys.stderr)
        loader = build_loader(cfg.data, args.split, world, device, train=False, seed=cfg.seed,
                              channels_last=cfg.model.channels_last)
        counts: dict = {}
        scores, labels, _ = score_split(engine, loader, counts=counts)
        res = sharded_ap_with_counts(scores, labels)
        result = None
        if world.is_main:
            result = report(res.ap, manifest, args.groups, args.no_positive, res.n_pos, args.group_counts,
                            res.n_known - res.n_pos)
            result.update(checkpoint=str(args.checkpoint), split=args.split, alpha_eval=model.alpha_eval,
                          data=counts)
            if counts["corrupt"]:
                print(f"warning: {args.split}: scored {counts['samples'] - counts['corrupt']} of {counts['samples']} "
                      f"samples; {counts['corrupt']} corrupt samples were skipped", file=sys.stderr)
            print_report(result)
            path = write_report(result, args.out or Path(args.checkpoint).parent, f"map_{args.split}.json")
            print(f"wrote {path}")
        return result
    finally:
        shutdown()


if __name__ == "__main__":
    from bgtrain.cli import run_cli

    sys.exit(run_cli(main, prog="bgtrain.evaluate"))
