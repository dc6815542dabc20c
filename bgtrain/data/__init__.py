"""The one entry point to training and evaluation data: :func:`build_loader`.

Backends (``data.backend``) differ only in how they turn shards into raw batches; the epoch plan,
label rows, normalisation and LL-Cp corrections are shared and happen here, on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from bgtrain.config import DataConfig
from bgtrain.data.common import EpochPlan, StreamPlan, flip_mask, normalise, plan_epoch, plan_stream, split_info
from bgtrain.distributed import WorldInfo
from bgtrain.labels import rows_from_padded


@dataclass
class Batch:
    image: torch.Tensor      # (B, 3, H, W) normalised, on the device
    labels: torch.Tensor     # (B, C) signed int8, on the device
    sample_id: torch.Tensor  # (B,) ids within the split; -1 for placeholders
    valid: torch.Tensor      # (B,) False for padding and corrupt samples
    corrupt: int             # samples of this batch that failed to decode


class Loader:
    """Iterates one rank's batches of one split; ``set_epoch`` before each epoch, resumable mid-epoch."""

    def __init__(self, cfg: DataConfig, split: str, world: WorldInfo, device: torch.device, train: bool,
                 seed: int, channels_last: bool = True, dtype: torch.dtype = torch.float32,
                 label_set: str | None = None) -> None:
        self.cfg, self.world, self.device, self.train, self.seed = cfg, world, device, train, seed
        self.channels_last, self.dtype = channels_last, dtype
        self.info = split_info(cfg.shards, split, label_set or (cfg.labels if train else "full"))
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        if cfg.decode == "gpu" and device.type != "cuda":
            raise ValueError("data.decode=gpu needs a CUDA device; use data.decode=cpu on this machine")
        self.epoch, self.batches_done = 1, 0

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        self.epoch, self.batches_done = epoch, batches_done

    def _plan(self) -> EpochPlan | StreamPlan:
        if self.cfg.resampled and self.train and not self.cfg.epoch_samples:
            raise ValueError("data.epoch_samples: is required when data.resampled is true")
        nominal = self.cfg.epoch_samples if self.cfg.resampled and self.train else None
        if self.cfg.backend == "dali":
            return plan_stream(self.info, self.seed, self.epoch, self.world.world_size, self.batch_size,
                               shuffle=self.train, epoch_samples=nominal)
        return plan_epoch(self.info, self.seed, self.epoch, self.world.world_size, self.cfg.workers,
                          self.batch_size, shuffle=self.train, epoch_samples=nominal)

    def __len__(self) -> int:
        n = self._plan().batches_per_rank
        return min(n, self.cfg.max_batches) if self.cfg.max_batches and self.train else n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan()
        total = len(self)
        if self.cfg.backend == "dali":
            from bgtrain.data.dali import dali_raw_batches
            raw = dali_raw_batches(self, plan)
        else:
            raw = self._webdataset_batches(plan)
        for step, item in enumerate(raw, start=self.batches_done):
            if step >= total:
                break
            self.batches_done = step + 1
            yield self._finish(item)

    def _webdataset_batches(self, plan) -> Iterator[dict]:
        from bgtrain.data.wds import WebDatasetStream
        stream = WebDatasetStream(self.info, plan, self.world.rank, self.seed, self.epoch, self.cfg.image_size,
                                  self.cfg.flip and self.train, self.cfg.shuffle_buffer if self.train else 1,
                                  self.batches_done, decode=self.cfg.decode == "cpu")
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.cfg.workers,
                                                pin_memory=self.device.type == "cuda"))

    def _finish(self, raw: dict) -> Batch:
        images, valid, corrupt = raw["image"], raw["valid"], int(raw["corrupt"])
        if self.cfg.decode == "gpu" and self.cfg.backend == "webdataset":
            from bgtrain.data.gpu_decode import decode_resize
            images, decoded = decode_resize(images, self)
            # A JPEG that nvJPEG rejects is a corrupt sample like one PIL rejects: invalid and counted.
            failed = ~decoded & (raw["sample_id"] >= 0)
            valid, corrupt = valid & decoded, corrupt + int(failed.sum())
        # WebDataset workers mirror while decoding with PIL; the other paths mirror here, in the one
        # pass that converts the batch to float, with the same (seed, epoch, sample) rule.
        flip = None
        if self.cfg.flip and self.train and (self.cfg.backend == "dali" or self.cfg.decode == "gpu"):
            flip = flip_mask(raw["sample_id"], self.seed, self.epoch)
        return Batch(
            image=normalise(images, self.device, self.dtype, self.channels_last, flip),
            labels=rows_from_padded(raw["pos"], raw["neg"], self.info.num_classes, self.info.rest, self.device),
            # non_blocking: a blocking host-to-GPU copy waits for the queued training step (a host sync per batch)
            sample_id=raw["sample_id"].to(self.device, non_blocking=True),
            valid=valid.to(self.device, non_blocking=True),
            corrupt=corrupt,
        )


def build_loader(cfg: DataConfig, split: str, world: WorldInfo, device: torch.device, train: bool, seed: int,
                 channels_last: bool = True, dtype: torch.dtype = torch.float32,
                 label_set: str | None = None) -> Loader:
    """A loader over ``cfg.shards/split``: training order and labels if ``train``, else in order.

    Labels are ``cfg.labels`` for training and the full annotation otherwise, unless ``label_set``
    ("observed" or "full") says which.
    """
    return Loader(cfg, split, world, device, train, seed, channels_last, dtype, label_set)
