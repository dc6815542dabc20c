"""The one entry point to training and evaluation data: :func:`build_loader`.

Backends (``data.backend``) differ only in how they turn shards into raw batches
(:class:`~bgtrain.data.backend.Backend`); the epoch plan (:mod:`bgtrain.data.plan`), label rows, the
valid-rows-first order, normalisation and the counts of what was skipped are shared and happen here.

Counting: :meth:`Loader.counts` gives the current pass's samples read, corrupt (unreadable or
undecodable, invalid) samples and padding rows. ``data.max_corrupt_fraction`` bounds corrupt samples
per pass and rank: once more than that fraction of the rank's planned samples for the pass has
been corrupt, the pass stops with one line naming the shard with the most corrupt samples. The
denominator is the whole pass, so an unlucky first batch does not stop a run that stays under it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from bgtrain import storage
from bgtrain.config import DataConfig
from bgtrain.data.backend import Backend, RawBatch, ReaderFailure
from bgtrain.data.cache import shard_cache
from bgtrain.data.common import flip_mask, normalise, split_info
from bgtrain.data.dali import DaliBackend
from bgtrain.data.plan import EpochPlan, PlanSpec, SampleReaders, sample_readers
from bgtrain.data.wds import WebDatasetBackend
from bgtrain.distributed import WorldInfo
from bgtrain.labels import rows_from_padded
from shards.format import ShardError, sample_key


@dataclass
class Batch:
    """One rank's batch on the device; the valid rows come first."""

    image: torch.Tensor      # (B, 3, H, W) normalised, on the device
    labels: torch.Tensor     # (B, C) signed int8, on the device
    sample_id: torch.Tensor  # (B,) ids within the split; -1 for placeholders
    valid: torch.Tensor      # (B,) False for padding and corrupt samples; True exactly on rows [0, num_valid)
    num_valid: int           # host-side: the first num_valid rows are the valid ones (no device sync)
    step_has_data: bool      # host-side, same on every rank: False iff no rank has a real sample at this step


# data.backend -> the backend; DALI itself is imported only when its pipeline is built.
BACKENDS: dict[str, Callable[[Loader], Backend]] = {"webdataset": WebDatasetBackend, "dali": DaliBackend}


class Loader:
    """Iterates one rank's batches of one split; ``set_epoch`` before each epoch, resumable mid-epoch."""

    def __init__(self, cfg: DataConfig, split: str, world: WorldInfo, device: torch.device, train: bool,
                 seed: int, channels_last: bool = True, dtype: torch.dtype = torch.float32,
                 label_set: str | None = None) -> None:
        self.cfg, self.world, self.device, self.train, self.seed = cfg, world, device, train, seed
        self.channels_last, self.dtype = channels_last, dtype
        self.info = split_info(cfg.shards, split, label_set or (cfg.labels if train else "full"),
                               storage.Retry(total_s=cfg.retry_s), shard_cache(cfg))
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        if cfg.decode == "gpu" and device.type != "cuda":
            raise ValueError("data.decode=gpu needs a CUDA device; use data.decode=cpu on this machine")
        self.backend = BACKENDS[cfg.backend](self)
        self.spec = PlanSpec(self.info, seed, world.world_size, self.backend.slots_per_rank(), self.batch_size,
                             shuffle=train, epoch_samples=cfg.epoch_samples if cfg.resampled and train else None,
                             pad_at_end=self.backend.pad_at_end())
        self.epoch, self.batches_done = 1, 0
        self._plan: tuple[int, EpochPlan] | None = None
        self._counts: Counter[str] = Counter()
        self._corrupt_by_shard: Counter[str] = Counter()
        self._examples: dict[str, str] = {}

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        self.epoch, self.batches_done = epoch, batches_done
        self._reset_counts()

    def plan(self) -> EpochPlan:
        """This epoch's plan, the same on every rank (computed once per epoch)."""
        if self.cfg.resampled and self.train and not self.cfg.epoch_samples:
            raise ValueError("data.epoch_samples: is required when data.resampled is true")
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.spec.plan(self.epoch))
        return self._plan[1]

    def sample_readers(self) -> SampleReaders:
        """Which rank reads each sample id in this epoch (exact epochs only)."""
        return sample_readers(self.plan(), self.info.shard_sizes)

    def __len__(self) -> int:
        n = self.plan().steps_per_epoch
        return min(n, self.cfg.max_batches) if self.cfg.max_batches and self.train else n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def counts(self) -> dict[str, int]:
        """This pass's samples read from shards, corrupt ones among them (invalid), padding rows, and the
        transient storage errors retried while reading them."""
        return {k: self._counts[k] for k in ("samples", "corrupt", "padding", "retries")}

    def _reset_counts(self) -> None:
        self._counts.clear()
        self._corrupt_by_shard.clear()
        self._examples.clear()

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        total = len(self)
        self._reset_counts()
        limit = self.cfg.max_corrupt_fraction * plan.rank_samples(self.world.rank, total)
        raw = self.backend.raw_batches(plan, self.batches_done)
        for step, item in enumerate(raw, start=self.batches_done):
            if isinstance(item, ReaderFailure):
                raise item.error
            if step >= total:
                break
            self.batches_done = step + 1
            batch = self._finish(item, plan.step_has_data(step))
            if self._counts["corrupt"] > limit:
                raise ShardError(self._too_corrupt(plan, total))
            yield batch

    def _too_corrupt(self, plan: EpochPlan, total: int) -> str:
        shard, n = self._corrupt_by_shard.most_common(1)[0]
        return (f"{shard}: {n} corrupt samples (e.g. {self._examples[shard]}); {self._counts['corrupt']} of this "
                f"pass's {plan.rank_samples(self.world.rank, total)} samples on rank {self.world.rank} are corrupt, "
                f"more than data.max_corrupt_fraction={self.cfg.max_corrupt_fraction}; check the shards with "
                "`python -m shards verify`")

    def _finish(self, raw: RawBatch, step_has_data: bool) -> Batch:
        images, decoded = self.backend.images(raw)
        # A JPEG that nvJPEG rejects is a corrupt sample like one PIL rejects: invalid and counted.
        failed = (~decoded & raw.valid).nonzero().flatten().tolist()
        corrupt = raw.corrupt + [(str(self.info.shard_paths[self.info.shard_of(sid)]), sample_key(self.info.split, sid))
                                 for sid in raw.sample_id[failed].tolist()]
        valid = raw.valid & decoded
        self._count(raw, corrupt)
        # Valid rows first, stably, decided on the host: engines can slice [:num_valid] without a sync.
        order = torch.argsort((~valid).to(torch.int8), stable=True)
        reorder = not bool(valid[: int(valid.sum())].all())
        take = (lambda t: t[order.to(t.device, non_blocking=True)]) if reorder else (lambda t: t)
        sample_id, valid = take(raw.sample_id), take(valid)
        # PIL mirrors in the worker; the other paths mirror here, in the one pass that converts the
        # batch to float, with the same (seed, epoch, sample) rule.
        flip = None
        if self.cfg.flip and self.train and not raw.mirrored:
            flip = flip_mask(sample_id, self.seed, self.epoch)
        return Batch(
            image=normalise(take(images), self.device, self.dtype, self.channels_last, flip),
            labels=rows_from_padded(take(raw.pos), take(raw.neg), self.info.num_classes, self.info.rest, self.device),
            # non_blocking: a blocking host-to-GPU copy waits for the queued training step (a host sync per batch)
            sample_id=sample_id.to(self.device, non_blocking=True),
            valid=valid.to(self.device, non_blocking=True),
            num_valid=int(valid.sum()),
            step_has_data=step_has_data,
        )

    def _count(self, raw: RawBatch, corrupt: list[tuple[str, str]]) -> None:
        self._counts["samples"] += raw.real
        self._counts["padding"] += len(raw.valid) - raw.real
        self._counts["corrupt"] += len(corrupt)
        self._counts["retries"] += raw.retries
        for shard, key in corrupt:
            self._corrupt_by_shard[shard] += 1
            self._examples.setdefault(shard, key)


def build_loader(cfg: DataConfig, split: str, world: WorldInfo, device: torch.device, train: bool, seed: int,
                 channels_last: bool = True, dtype: torch.dtype = torch.float32,
                 label_set: str | None = None) -> Loader:
    """A loader over ``cfg.shards/split``: training order and labels if ``train``, else in order.

    Labels are ``cfg.labels`` for training and the full annotation otherwise, unless ``label_set``
    ("observed" or "full") says which.
    """
    return Loader(cfg, split, world, device, train, seed, channels_last, dtype, label_set)
