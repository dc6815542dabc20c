"""The epoch plan: which samples each (rank, worker) slot reads, cut in whole batches.

Every rank computes the same plan from (seed, epoch) and the manifest's shard sizes alone, so it needs
no tar (``python -m bgtrain.data plan`` runs it on a login node) and no communication.

* **Sequence.** The epoch's shard order is a permutation drawn from (seed, epoch) (identity without
  shuffling); the concatenated shards form one sequence of N sample positions.
* **Ranks.** Rank r reads positions [floor(N r / W), floor(N (r+1) / W)): the same contiguous ranges
  DALI's reader cuts, so both backends give a rank the same samples. Every rank runs
  ``steps_per_epoch = ceil(N / (W B))`` steps, the ideal: ranks differ by at most one sample.
* **Batches.** Inside a rank, step s takes its rows from worker slot ``s % K`` (the DataLoader's
  round-robin). Steps are filled in order with full batches, keeping one sample back for every later
  step, so every batch but the last of each slot is full and no batch is made only of padding.
  With N >= W ((S - 1) B + 1) samples, which is all but W - 1 sizes in every W B, a rank has one
  partial batch, its last. Otherwise a rank holding exactly (S - 1) B samples ends with two partial
  batches (B - 1 and 1 rows); with ``workers >= 2`` they are the last batches of two different slots,
  with one worker they are the slot's last two (the only case of two partial batches in a slot).
* **Slots.** Slot k of a rank reads one contiguous range: the rank's range is cut into K consecutive
  pieces whose sizes are the rows of the slot's steps. A range may start and end mid-shard; the
  reader seeks there with the shard's DALI index (``.idx``), reading nothing twice.
* **Small splits.** With fewer steps than workers, the extra workers of a rank read nothing. With
  fewer samples than ranks (N < W) some ranks' only batch is all padding; with
  batch size 1 and W not dividing N the last step is padding on the ranks with one sample fewer.
  Those are the only batches made only of padding. ``step_has_data`` is False only at a step where
  no rank has a sample, which this plan never produces; engines use it to skip such a step.
* **Resampled mode** (``data.resampled``): shards are drawn with replacement until they hold the
  nominal epoch, rounded up to whole batches per slot; the same cut gives every slot that many full
  batches and no padding.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch

from bgtrain.data.common import SplitInfo


@dataclass(frozen=True)
class Piece:
    """Samples ``start`` to ``stop`` (exclusive) of shard ``shard``, an index into the split's shards."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochPlan:
    """Which samples each (rank, worker) slot reads this epoch, and how many real rows every batch has."""

    order: tuple[int, ...]               # the epoch's shard sequence (draws, in resampled mode)
    slots: tuple[tuple[Piece, ...], ...]  # slot rank * workers + worker: its contiguous range, as shard pieces
    rows: tuple[tuple[int, ...], ...]    # rows[rank][step]: real (non-padding) samples of that batch
    steps_per_epoch: int
    world: int
    workers: int
    batch_size: int
    resampled: bool = False

    def units(self, rank: int, worker: int) -> tuple[Piece, ...]:
        """The pieces of shards that slot (rank, worker) reads, in order."""
        return self.slots[rank * self.workers + worker]

    def slot_batches(self, rank: int, worker: int) -> tuple[int, ...]:
        """Real rows of each batch of slot (rank, worker), in the order it yields them."""
        return self.rows[rank][worker::self.workers]

    def step_has_data(self, step: int) -> bool:
        """False iff no rank has a real sample at ``step``: the same answer on every rank."""
        return any(r[step] > 0 for r in self.rows)

    @property
    def batches_per_slot(self) -> int:
        """Most batches any slot yields."""
        return math.ceil(self.steps_per_epoch / self.workers)

    @property
    def samples(self) -> int:
        """Real samples of the epoch, over all ranks."""
        return sum(map(sum, self.rows))

    @property
    def padded_samples(self) -> int:
        """Padding rows of the epoch, over all ranks."""
        return self.world * self.steps_per_epoch * self.batch_size - self.samples

    def rank_samples(self, rank: int, steps: int | None = None) -> int:
        """Real samples of ``rank`` in its first ``steps`` steps (all by default)."""
        return sum(self.rows[rank][:steps])


@dataclass(frozen=True)
class PlanSpec:
    """Everything but the epoch that decides a split's plans: the loader and its (persistent) worker processes
    hold the same spec, so a new epoch is one number handed to the workers, not new processes."""

    info: SplitInfo
    seed: int
    world: int
    workers: int
    batch_size: int
    shuffle: bool
    epoch_samples: int | None = None
    pad_at_end: bool = False

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.info, self.seed, epoch, self.world, self.workers, self.batch_size, self.shuffle,
                          self.epoch_samples, self.pad_at_end)


def plan_epoch(info: SplitInfo, seed: int, epoch: int, world: int, workers: int, batch_size: int,
               shuffle: bool, epoch_samples: int | None = None, pad_at_end: bool = False) -> EpochPlan:
    """The same plan on every rank: a function of (seed, epoch) and the shard sizes only.

    ``epoch_samples`` switches to resampled mode. ``pad_at_end`` fills each rank's batches strictly
    in order (full, then the rest, then padding), as DALI's reader does with one stream per rank.
    """
    return plan_sizes(info.shard_sizes, seed, epoch, world, workers, batch_size, shuffle, epoch_samples, pad_at_end)


def plan_sizes(shard_sizes: tuple[int, ...], seed: int, epoch: int, world: int, workers: int, batch_size: int,
               shuffle: bool, epoch_samples: int | None = None, pad_at_end: bool = False) -> EpochPlan:
    """:func:`plan_epoch` from the shard sizes alone."""
    if world < 1 or batch_size < 1:
        raise ValueError(f"world ({world}) and batch size ({batch_size}) must be >= 1")
    workers = max(1, workers)
    if epoch_samples is not None:
        batches = nominal_batches(epoch_samples, world * workers, batch_size)
        per_rank = workers * batches * batch_size
        order = draw_shards(shard_sizes, resample_rng(seed, epoch), world * per_rank)
        bounds = [r * per_rank for r in range(world + 1)]
        steps = workers * batches
    else:
        n = len(shard_sizes)
        order = np.random.default_rng([seed, epoch]).permutation(n).tolist() if shuffle else list(range(n))
        total = sum(shard_sizes)
        bounds = [total * r // world for r in range(world + 1)]
        steps = math.ceil(total / (world * batch_size))
    rows = tuple(batch_rows(b - a, steps, batch_size, pad_at_end) for a, b in zip(bounds, bounds[1:]))
    ends = list(accumulate(shard_sizes[s] for s in order))
    slots = []
    for rank, start in enumerate(bounds[:-1]):
        for worker in range(workers):
            stop = start + sum(rows[rank][worker::workers])
            slots.append(pieces(order, ends, start, stop))
            start = stop
    return EpochPlan(tuple(order), tuple(slots), rows, steps, world, workers, batch_size, epoch_samples is not None)


def batch_rows(samples: int, steps: int, batch_size: int, pad_at_end: bool = False) -> tuple[int, ...]:
    """Real rows of each of ``steps`` batches holding ``samples`` in order: full first, one kept for each later step."""
    if samples > steps * batch_size:
        raise ValueError(f"{samples} samples do not fit {steps} batches of {batch_size}")
    out, left = [], samples
    for step in range(steps):
        later = 0 if pad_at_end else steps - step - 1
        take = min(batch_size, max(left - later, min(left, 1)))
        out.append(take)
        left -= take
    return tuple(out)


def pieces(order: list[int], ends: list[int], start: int, stop: int) -> tuple[Piece, ...]:
    """Positions [start, stop) of the concatenated shards ``order`` (cumulative ``ends``) as shard pieces."""
    out = []
    i = bisect.bisect_right(ends, start)
    while start < stop:
        first = ends[i - 1] if i else 0
        end = min(stop, ends[i])
        out.append(Piece(order[i], start - first, end - first))
        start, i = end, i + 1
    return tuple(out)


def nominal_batches(epoch_samples: int, streams: int, batch_size: int) -> int:
    """Batches per stream of a resampled epoch: ``epoch_samples`` rounded up to whole global batches."""
    if epoch_samples < 1:
        raise ValueError(f"data.epoch_samples: must be >= 1 in resampled mode, got {epoch_samples}")
    return math.ceil(epoch_samples / (streams * batch_size))


def resample_rng(seed: int, epoch: int) -> np.random.Generator:
    """The shard draws of a resampled epoch; its own stream so it never aliases the shuffle's."""
    return np.random.default_rng([seed, epoch, 0x5E5A])


def draw_shards(shard_sizes: tuple[int, ...], rng: np.random.Generator, min_samples: int) -> list[int]:
    """Shard indices drawn uniformly with replacement until they hold at least ``min_samples``."""
    if sum(shard_sizes) == 0:
        raise ValueError("no samples to resample from")
    drawn, total = [], 0
    while total < min_samples:
        s = int(rng.integers(len(shard_sizes)))
        drawn.append(s)
        total += shard_sizes[s]
    return drawn


def skipped_batches(batches_done: int, worker: int, workers: int) -> int:
    """Batches a worker must skip on resume: the loader takes batches round-robin from its workers."""
    return max(0, math.ceil((batches_done - worker) / workers))


def plan_summary(plan: EpochPlan) -> dict[str, float | int]:
    """The figures ``python -m bgtrain.data plan`` prints: steps against the ideal, padding, samples."""
    ideal = math.ceil(plan.samples / (plan.world * plan.batch_size)) if plan.samples else 0
    return {"steps_per_epoch": plan.steps_per_epoch, "ideal_steps": ideal,
            "overhead": round(plan.steps_per_epoch / ideal, 4) if ideal else 1.0,
            "padded_samples": plan.padded_samples, "samples": plan.samples}


@dataclass(frozen=True)
class SampleReaders:
    """Which rank reads each sample id in one exact epoch: ranges ``[starts[i], stops[i])`` read by ``ranks[i]``.

    Sample ids are positions in the split's written order, so a plan piece (shard, start, stop) is one id
    range. A sample no rank reads (none in an exact epoch) is given to rank ``id % world``.
    """

    starts: torch.Tensor  # int64, ascending
    stops: torch.Tensor
    ranks: torch.Tensor
    world: int

    def rank_of(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """The reading rank of each id, on the ids' device (vectorised, no host read)."""
        ids = sample_ids.long()
        if not self.starts.numel():
            return ids % self.world
        starts, stops, ranks = (t.to(ids.device) for t in (self.starts, self.stops, self.ranks))
        at = (torch.searchsorted(starts, ids, right=True) - 1).clamp(min=0)
        inside = (starts[at] <= ids) & (ids < stops[at])
        return torch.where(inside, ranks[at], ids % self.world)


def sample_readers(plan: EpochPlan, shard_sizes: tuple[int, ...]) -> SampleReaders:
    """The :class:`SampleReaders` of an exact epoch's plan; resampled epochs read a sample on several ranks."""
    if plan.resampled:
        raise ValueError("a resampled epoch (data.resampled) may read a sample on several ranks: it has no "
                         "single reader per sample")
    offsets = [0, *accumulate(shard_sizes)]
    ranges = sorted((offsets[p.shard] + p.start, offsets[p.shard] + p.stop, slot // plan.workers)
                    for slot, slot_pieces in enumerate(plan.slots) for p in slot_pieces if len(p))
    table = torch.tensor(ranges, dtype=torch.int64).reshape(-1, 3)
    return SampleReaders(table[:, 0].contiguous(), table[:, 1].contiguous(), table[:, 2].contiguous(), plan.world)
