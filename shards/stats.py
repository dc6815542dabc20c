"""``python -m shards stats OUT``: the split table and the per-class annotation table of a shard folder.

Both come from ``manifest.json`` alone, so ``OUT`` may as well be a URL (``s3://``, ``gs://``, ``http(s)://``).
"""
from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

from bgtrain import storage
from shards.format import read_manifest


def split_table(manifest: dict) -> Table:
    """One row per split: samples, shards, absent-label values, and input accounting."""
    t = Table(title=f"{manifest['dataset']}: {len(manifest['classes'])} classes")
    for col in ("split", "samples", "shards", "rest obs/full", "inputs", "rejected", "missing"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for split, info in manifest["splits"].items():
        c = manifest.get("inputs", {}).get(split, {})
        rest = info.get("rest", {})
        t.add_row(split, f"{info['num_samples']:,}", str(len(info["shards"])),
                  f"{rest.get('observed', '?')}/{rest.get('full', '?')}",
                  *(f"{c[k]:,}" if k in c else "-" for k in ("inputs", "rejected", "missing")))
    return t


def class_table(manifest: dict, top: int | None = None) -> Table:
    """Per-class train annotation counts, rarest first by full positives (the group-wise mAP order)."""
    counts, classes = manifest["train_counts"], manifest["classes"]
    order = sorted(range(len(classes)), key=lambda c: (counts["full_pos"][c], c))
    hidden = 0
    if top is not None and len(order) > 2 * top:
        order = order[:top] + [-1] + order[-top:]
        hidden = len(classes) - 2 * top
    t = Table(title="train annotations per class (rarest first)")
    for col in ("id", "class", "full pos", "full neg", "obs pos", "obs neg"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for c in order:
        if c < 0:
            t.add_row("...", f"({hidden} classes)", "", "", "", "")
            continue
        t.add_row(str(c), classes[c], *(f"{counts[k][c]:,}" for k in ("full_pos", "full_neg", "obs_pos", "obs_neg")))
    return t


def show(root: str | os.PathLike, top: int | None = 15, console: Console | None = None) -> None:
    """Print both tables for the shard folder (or URL) ``root``."""
    console = console or Console()
    m = read_manifest(root)
    console.print(split_table(m))
    console.print(class_table(m, top))
    if m.get("annotation_problems"):
        examples = storage.join(root, "problems.jsonl")
        console.print(f"annotation problems: {m['annotation_problems']} (examples in {examples})")
