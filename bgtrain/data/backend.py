"""The seam between the Loader and a data backend: :class:`RawBatch` and the :class:`Backend` protocol.

A backend turns one rank's share of the epoch plan into raw batches; everything else (the plan,
label rows, the valid-rows-first order, flips it did not apply, normalisation, counting) is the
Loader's, the same for every backend.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from bgtrain.data.plan import EpochPlan


@dataclass
class ReaderFailure:
    """What a loader process hands over instead of a batch when a shard cannot be read (a missing file, an
    index that disagrees with the manifest): the rank raises ``error`` itself, as one line naming the file,
    where an exception inside the process would reach it wrapped in that process's traceback."""

    error: Exception


@dataclass
class RawBatch:
    """One batch as a backend hands it over, on the host (or in DALI's buffer).

    Rows are real samples (read from a shard) or padding; a real row that failed to read or decode
    is ``valid=False`` and listed in ``corrupt`` as (shard path, sample key).
    """

    image: torch.Tensor | list[bytes]   # uint8 (B, H, W, 3), or JPEG bytes for ``data.decode: gpu``
    pos: torch.Tensor                   # (B, L) int32 positive class ids, -1 padded
    neg: torch.Tensor                   # (B, L) int32 negative class ids, -1 padded
    sample_id: torch.Tensor             # (B,) int64, -1 where unknown (padding, unreadable labels)
    valid: torch.Tensor                 # (B,) bool
    real: int                           # rows read from shards; the other rows are padding
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    mirrored: bool = False              # the backend already applied the flip rule
    retries: int = 0                    # transient storage errors retried while reading it (bgtrain.storage)

    def pin_memory(self) -> RawBatch:
        """Page-locked copies of the tensors (the DataLoader calls this with ``pin_memory=True``)."""
        image = self.image.pin_memory() if isinstance(self.image, torch.Tensor) else self.image
        return replace(self, image=image, pos=self.pos.pin_memory(), neg=self.neg.pin_memory(),
                       sample_id=self.sample_id.pin_memory(), valid=self.valid.pin_memory())


class Backend(Protocol):
    """What the Loader needs from a backend; every backend answers every method."""

    def slots_per_rank(self) -> int:
        """Streams one rank reads in parallel: the plan is cut into this many slots per rank."""
        ...

    def pad_at_end(self) -> bool:
        """Whether the backend fills each batch before the next (DALI), instead of the plan's fill."""
        ...

    def raw_batches(self, plan: EpochPlan, batches_done: int) -> Iterator[RawBatch | ReaderFailure]:
        """This rank's raw batches of ``plan`` from step ``batches_done`` on (or a failure to raise)."""
        ...

    def images(self, raw: RawBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H, W, 3) images of ``raw`` and a bool (B,) CPU mask of rows that decoded."""
        ...
