"""The criterion contract the trainer relies on, and the criteria without per-sample state.

A criterion is called once per step, ``criterion(logits, labels, epoch, valid, sample_ids) -> LossOutput``,
and has hooks that the trainer calls on every rank, each a no-op unless a criterion needs it:

- ``begin_epoch(readers)`` before each epoch's first step, resumed ones included (LL-Cp hands each
  correction to the rank that reads its sample);
- ``prepare_labels(labels, sample_ids)`` before the forward pass (LL-Cp applies its corrections);
- ``after_step(out, sample_ids)`` after the optimizer step (ROLE's table step, LL-Cp records corrections);
- ``end_epoch(epoch, score_train)`` after each epoch (EM+APL's pseudo-labelling pass);
- ``state_dict()`` / ``load_state_dict(state)`` for checkpoints (collective where the state is sharded);
- ``corrections_kept()`` for the training log.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from bgtrain.collectives import rank_and_world
from bgtrain.data.plan import SampleReaders
from bgtrain.labels import CorrectionStore
from bgtrain.losses.functional import LossOutput
from bgtrain.losses.large_loss import large_loss_output

ScoreTrain = Callable[[], tuple]
"""Scores this rank's share of the training split: () -> (scores, observed labels, sample ids)."""

EpochReaders = Callable[[], SampleReaders]
"""Which rank reads each training sample in the coming epoch (computed only when asked)."""


class Criterion:
    """Base class of every training criterion: ``__call__`` plus hooks that do nothing by default."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, epoch: int, valid: torch.Tensor | None = None,
                 sample_ids: torch.Tensor | None = None) -> LossOutput:
        raise NotImplementedError

    def begin_epoch(self, readers: EpochReaders) -> None:
        """Called before the first step of each epoch, and of a resumed one (may be collective)."""

    def prepare_labels(self, labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """The training labels of a batch (collective for criteria that keep label state)."""
        return labels

    def after_step(self, out: LossOutput | None = None, sample_ids: torch.Tensor | None = None) -> None:
        """Called after each optimizer step with that step's output (may be collective)."""

    def end_epoch(self, epoch: int, score_train: ScoreTrain) -> None:
        """Called after each (1-based) epoch, before validation (may be collective)."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this criterion (may be collective)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; an empty dict leaves a fresh criterion."""

    def corrections_kept(self) -> int:
        """Permanent label corrections this rank keeps (LL-Cp); 0 for every other criterion."""
        return 0


class LossFunction(Criterion):
    """A stateless loss ``fn(logits, labels, valid=...) -> loss`` that selects nothing."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, epoch: int, valid: torch.Tensor | None = None,
                 sample_ids: torch.Tensor | None = None) -> LossOutput:
        return LossOutput(self.fn(logits, labels, valid=valid), torch.zeros_like(labels, dtype=torch.bool))


class LargeLossCriterion(Criterion):
    """Full, AN, LL-R, LL-Ct, and LL-Cp; LL-Cp also owns the :class:`CorrectionStore` of its corrections."""

    def __init__(self, scheme: str, delta_rel: float | None, num_classes: int = 0, over: str = "rank",
                 batch_rows: int = 0) -> None:
        """``over`` is ``loss.large_loss_over``; ``global`` needs ``batch_rows``, the per-rank batch size (the
        same on every rank), and makes each call a collective every rank joins."""
        if over not in ("rank", "global"):
            raise ValueError(f"loss.large_loss_over must be rank or global, got {over!r}")
        if over == "global" and batch_rows <= 0:
            raise ValueError("loss.large_loss_over=global needs the per-rank batch size (batch_rows > 0)")
        self.scheme, self.delta_rel, self.over, self.batch_rows = scheme, delta_rel, over, batch_rows
        self.store = CorrectionStore(num_classes, *rank_and_world()) if scheme == "LL-Cp" else None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, epoch: int, valid: torch.Tensor | None = None,
                 sample_ids: torch.Tensor | None = None) -> LossOutput:
        if self.over == "rank":
            return large_loss_output(logits, labels, self.scheme, epoch, self.delta_rel, valid)
        return large_loss_output(logits, labels, self.scheme, epoch, self.delta_rel, valid, over=self.over,
                                 batch_rows=self.batch_rows)

    def begin_epoch(self, readers: EpochReaders) -> None:
        """LL-Cp: each correction moves to the rank that reads its sample this epoch (collective)."""
        if self.store is not None:
            self.store.begin_epoch(readers())

    def prepare_labels(self, labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """LL-Cp: the labels with every correction from earlier epochs set to 1 (local: no collective)."""
        return self.store.apply(labels, sample_ids) if self.store is not None else labels

    def after_step(self, out: LossOutput | None = None, sample_ids: torch.Tensor | None = None) -> None:
        """LL-Cp: keep this step's corrections on this rank (no collective); padded rows are excluded."""
        if self.store is not None and out is not None and out.corrections is not None and sample_ids is not None:
            self.store.record(sample_ids, out.corrections)

    def state_dict(self) -> dict:
        return {"corrections": self.store.state_dict()} if self.store is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.store is not None and "corrections" in state:
            self.store.load_state_dict(state["corrections"])

    def corrections_kept(self) -> int:
        return len(self.store) if self.store is not None else 0
