"""Scores of a model on one rank's share of a split (padding and corrupt samples dropped)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from bgtrain.collectives import sum_over_ranks
from bgtrain.data import Batch, Loader
from bgtrain.engines.base import Engine


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


def score_split(engine: Engine, loader: Loader, counts: dict | None = None):
    """(scores, labels, sample ids) of this rank's share of ``loader``'s split, in eval mode (the evaluation alpha).

    ``counts``, when given, is filled with the pass's samples, corrupt samples and padding, summed over ranks
    (collective), so a score computed on less data than asked can say so. The scoring pass of the training's
    validation and test and of ``python -m bgtrain.evaluate``.
    """
    loader.set_epoch(1, 0)  # a whole pass, in order, each time the loader is reused
    engine.train(False)
    try:
        scored = predict(engine.eval_logits, loader, with_ids=True)
    finally:
        engine.train(True)
    if counts is not None:
        counts.update(sum_over_ranks(loader.counts(), loader.device))
    return scored
