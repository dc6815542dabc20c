"""``python -m bgtrain.data plan``: the epoch plan a training would run, from ``manifest.json`` alone.

It uses the planning code training uses (:mod:`bgtrain.data.plan`) and reads no tar, so it runs on a
login node before the data is staged.
"""
from __future__ import annotations

import argparse
import json
import sys

from bgtrain.data.common import split_info
from bgtrain.data.plan import plan_epoch, plan_summary

EXAMPLE = """example:
  python -m bgtrain.data plan --shards data/coco --world 8 --workers 8 --batch-size 2
  python -m bgtrain.data plan --shards data/voc --world 1 --workers 8 --batch-size 16 --json
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI's arguments."""
    parser = argparse.ArgumentParser(prog="python -m bgtrain.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE)
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="steps per epoch and padding of a training's epoch plan",
                          description="Steps per epoch, the ideal ceil(N / (world x batch)), and padding rows "
                                      "of the WebDataset backend's epoch plan.",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE)
    plan.add_argument("--shards", required=True, help="shard folder with manifest.json (data.shards)")
    plan.add_argument("--world", type=int, required=True, help="ranks (GPUs) of the training")
    plan.add_argument("--workers", type=int, required=True, help="loader processes per rank (data.workers)")
    plan.add_argument("--batch-size", type=int, required=True, help="per-rank batch size (data.batch_size)")
    plan.add_argument("--split", default="train", help="split to plan (default: train)")
    plan.add_argument("--epoch", type=int, default=1, help="epoch whose shard order to use (default: 1)")
    plan.add_argument("--seed", type=int, default=0, help="the run's seed (default: 0)")
    plan.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args(argv)
    for name in ("world", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the plan's figures; 1 with one line on a bad shard folder."""
    args = parse_args(argv)
    try:
        info = split_info(args.shards, args.split, "observed")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    plan = plan_epoch(info, args.seed, args.epoch, args.world, args.workers, args.batch_size, shuffle=True)
    summary = plan_summary(plan)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.shards} [{args.split}]: {summary['samples']:,} samples in {len(info.shard_sizes):,} shards; "
          f"{args.world} ranks x {max(1, args.workers)} workers, batch {args.batch_size} per rank")
    rows = [("steps per epoch", f"{summary['steps_per_epoch']:,}"),
            ("ideal ceil(N / (world x batch))", f"{summary['ideal_steps']:,}"),
            ("overhead", f"{summary['overhead']:.3f}x"),
            ("padding rows (all ranks)", f"{summary['padded_samples']:,}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
