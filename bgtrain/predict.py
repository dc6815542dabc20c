"""Scores of a model on one rank's share of a split (padding and corrupt samples dropped)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from bgtrain.data import Batch


def predict(logits_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch], with_ids: bool = False):
    """(scores (N, C) float32, labels (N, C) int8[, sample ids (N,)]) over the valid samples of ``batches``."""
    scores, labels, ids = [], [], []
    with torch.no_grad():
        for batch in batches:
            keep = batch.valid
            scores.append(torch.sigmoid(logits_fn(batch.image)[keep].float()))
            labels.append(batch.labels[keep])
            ids.append(batch.sample_id[keep])
    if not scores:
        raise ValueError("no batches to score")
    out = (torch.cat(scores), torch.cat(labels))
    return out + (torch.cat(ids),) if with_ids else out
