"""Manifest helpers shared by every builder: annotation counts and the manifest document."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

import bgtrain
from shards.format import FORMAT_VERSION, SampleLabels


def train_counts(labels: Iterable[SampleLabels], num_classes: int, rest: dict[str, int]) -> dict[str, list[int]]:
    """Per-class positive and negative annotation counts of the training split.

    Negatives include the implicit ones: where a label set's ``rest`` is 0, every class absent from a
    sample's positive list is a negative annotation. The OpenImages groups are cut from ``full_pos``.
    """
    return finish_counts(*listed_counts(labels, num_classes), rest)


def listed_counts(labels: Iterable[SampleLabels], num_classes: int) -> tuple[dict[str, np.ndarray], int]:
    """Per-class counts of the ids the samples list, and the number of samples: partial sums of ``train_counts``."""
    ids: dict[str, list[Sequence[int]]] = {k: [] for k in ("full_pos", "full_neg", "obs_pos", "obs_neg")}
    n = 0
    for s in labels:
        n += 1
        for key, listed in (("full_pos", s.full_pos), ("full_neg", s.full_neg), ("obs_pos", s.obs_pos),
                            ("obs_neg", s.obs_neg)):
            ids[key].append(listed)
    counts = {}
    for key, lists in ids.items():
        flat = np.fromiter((c for listed in lists for c in listed), np.int64)
        counts[key] = np.bincount(flat, minlength=num_classes)[:num_classes]  # an id out of range is verify's error
    return counts, n


def finish_counts(counts: dict[str, np.ndarray], n: int, rest: dict[str, int]) -> dict[str, list[int]]:
    """``train_counts`` from summed ``listed_counts``: implicit negatives added where ``rest`` is 0."""
    counts = dict(counts)
    for prefix, key in (("full", "full"), ("obs", "observed")):
        if rest[key] == 0:  # implicit negatives: all that is neither an explicit positive nor negative
            counts[f"{prefix}_neg"] = n - counts[f"{prefix}_pos"]
    return {k: v.tolist() for k, v in counts.items()}


def make_manifest(dataset: str, classes: Sequence[str], splits: dict[str, dict], counts: dict[str, list[int]],
                  build_args: dict, rejected: int = 0, missing: int = 0) -> dict:
    """The ``manifest.json`` document; ``splits`` maps split name to its shard entries and ``rest``."""
    return {
        "format": FORMAT_VERSION,
        "dataset": dataset,
        "classes": list(classes),
        "splits": {
            name: {"num_samples": sum(s["num_samples"] for s in info["shards"]), **info}
            for name, info in splits.items()
        },
        "train_counts": counts,
        "build": {"args": build_args, "version": bgtrain.__version__},
        "rejected": rejected,
        "missing": missing,
    }
