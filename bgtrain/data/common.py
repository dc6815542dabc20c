"""What the WebDataset and DALI backends share: shard listing, the epoch plan, labels, augmentation.

The epoch plan is the heart of exactness. Shards (or interleaved parts of shards when there are fewer
shards than loader slots) are shuffled with a seed that depends only on (seed, epoch), so every rank
computes the same plan, then dealt greedily to the ``world * workers`` slots by sample count. Every
slot is padded, with repeats marked ``valid=False``, to the same number of batches, so all ranks run
the same number of steps and every sample of the epoch is valid exactly once.

DALI reads one stream instead (:class:`StreamPlan`): the epoch's shard order, which DALI itself cuts
into ``world`` contiguous sample ranges. In resampled mode (``data.resampled``) both plans draw
shards with replacement and an epoch is a nominal ``data.epoch_samples`` samples, all valid.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shards.format import HEADER, read_manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Unit:
    """Samples ``i`` of a shard with ``i % parts == part``."""

    shard: int
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class SplitInfo:
    root: Path
    split: str
    shard_paths: tuple[Path, ...]
    shard_sizes: tuple[int, ...]
    num_classes: int
    rest: int              # value of classes absent from the id lists for the chosen label set
    label_set: str         # "observed" or "full"
    dataset: str

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)

    def unit_size(self, unit: Unit) -> int:
        n = self.shard_sizes[unit.shard]
        return len(range(unit.part, n, unit.parts))


def split_info(root: str | Path, split: str, label_set: str) -> SplitInfo:
    """Read a split's shard list from the manifest, with clear errors for a missing split or tar."""
    root = Path(root)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise ValueError(f"{root / 'manifest.json'}: no split {split!r}; has {sorted(manifest['splits'])}")
    entry = manifest["splits"][split]
    paths = tuple(root / split / s["name"] for s in entry["shards"])
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: listed in {root / 'manifest.json'} but missing")
    return SplitInfo(root, split, paths, tuple(s["num_samples"] for s in entry["shards"]),
                     len(manifest["classes"]), int(entry["rest"][label_set]), label_set, manifest["dataset"])


@dataclass
class EpochPlan:
    """Which units each (rank, worker) slot reads this epoch, and how many batches every slot yields."""

    slots: list[list[Unit]]
    slot_samples: list[int]
    batches_per_slot: int
    workers: int
    batch_size: int
    extras: dict = field(default_factory=dict)

    def units(self, rank: int, worker: int) -> list[Unit]:
        return self.slots[rank * self.workers + worker]

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_slot * self.workers


def plan_epoch(info: SplitInfo, seed: int, epoch: int, world: int, workers: int, batch_size: int,
               shuffle: bool, epoch_samples: int | None = None) -> EpochPlan:
    """The same plan on every rank: a function of (seed, epoch) and the shard sizes only.

    ``epoch_samples`` switches to resampled mode: every slot draws whole shards with replacement until
    it holds its share of the nominal epoch, and its stream is cut there (no padding, all valid).
    """
    workers = max(1, workers)
    n_slots = world * workers
    if epoch_samples is not None:
        batches = nominal_batches(epoch_samples, n_slots, batch_size)
        rng = resample_rng(seed, epoch)
        slots = [[Unit(s) for s in draw_shards(info, rng, batches * batch_size)] for _ in range(n_slots)]
        return EpochPlan(slots, [batches * batch_size] * n_slots, batches, workers, batch_size,
                         {"resampled": True})
    n_shards = len(info.shard_sizes)
    parts = max(1, math.ceil(n_slots / n_shards))
    units = [Unit(s, p, parts) for s in range(n_shards) for p in range(parts)]
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(units))
        units = [units[i] for i in order]
    slots: list[list[Unit]] = [[] for _ in range(n_slots)]
    load = [0] * n_slots
    for unit in units:  # greedy: each unit to the least-loaded slot keeps the padding small
        target = min(range(n_slots), key=lambda i: (load[i], i))
        slots[target].append(unit)
        load[target] += info.unit_size(unit)
    batches = max(math.ceil(n / batch_size) for n in load) if load else 0
    return EpochPlan(slots, load, batches, workers, batch_size)


def nominal_batches(epoch_samples: int, streams: int, batch_size: int) -> int:
    """Batches per stream of a resampled epoch: ``epoch_samples`` rounded up to whole global batches."""
    if epoch_samples < 1:
        raise ValueError(f"data.epoch_samples: must be >= 1 in resampled mode, got {epoch_samples}")
    return math.ceil(epoch_samples / (streams * batch_size))


def resample_rng(seed: int, epoch: int) -> np.random.Generator:
    """The shard draws of a resampled epoch; its own stream so it never aliases the shuffle's."""
    return np.random.default_rng([seed, epoch, 0x5E5A])


def draw_shards(info: SplitInfo, rng: np.random.Generator, min_samples: int) -> list[int]:
    """Shard indices drawn uniformly with replacement until they hold at least ``min_samples``."""
    if info.num_samples == 0:
        raise ValueError(f"{info.root / info.split}: no samples to resample from")
    drawn, total = [], 0
    while total < min_samples:
        s = int(rng.integers(len(info.shard_sizes)))
        drawn.append(s)
        total += info.shard_sizes[s]
    return drawn


@dataclass
class StreamPlan:
    """DALI's epoch: one shard order for all ranks; DALI cuts it into ``world`` contiguous sample ranges."""

    shards: list[int]
    batches_per_rank: int
    batch_size: int
    resampled: bool = False


def plan_stream(info: SplitInfo, seed: int, epoch: int, world: int, batch_size: int, shuffle: bool,
                epoch_samples: int | None = None) -> StreamPlan:
    """The same stream plan on every rank: shard order from (seed, epoch), batch count from DALI's sharding.

    DALI gives rank r the samples [floor(N r / W), floor(N (r+1) / W)) of the concatenated shards and,
    with ``pad_last_batch``, repeats a rank's last sample up to ceil(ceil(N / W) / B) batches on every
    rank. In resampled mode the drawn shards hold at least the nominal epoch and the stream is cut there.
    """
    if epoch_samples is not None:
        batches = nominal_batches(epoch_samples, world, batch_size)
        # Every rank's range must hold its batches: floor(N / W) >= batches * B.
        shards = draw_shards(info, resample_rng(seed, epoch), world * batches * batch_size)
        return StreamPlan(shards, batches, batch_size, resampled=True)
    n = len(info.shard_sizes)
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist() if shuffle else list(range(n))
    return StreamPlan(order, math.ceil(math.ceil(info.num_samples / world) / batch_size), batch_size)


def skipped_batches(batches_done: int, worker: int, workers: int) -> int:
    """Batches a worker must skip on resume: the loader takes batches round-robin from its workers."""
    return max(0, math.ceil((batches_done - worker) / workers))


def flip_decision(seed: int, epoch: int, sample_id: int) -> bool:
    """Horizontal flip as a pure function of (seed, epoch, sample), so a resumed epoch flips alike."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample_id}".encode(), digest_size=1).digest()
    return bool(digest[0] & 1)


def flip_mask(sample_ids: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """bool (B,) CPU: the rows :func:`flip_decision` mirrors; placeholders (id < 0) never flip."""
    return torch.tensor([sid >= 0 and flip_decision(seed, epoch, sid) for sid in sample_ids.tolist()],
                        dtype=torch.bool)


def id_lists_from_lbl(lbl: np.ndarray, label_set: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised :func:`shards.format.decode_labels` over a batch of ``.lbl`` members padded with -1.

    Returns sample ids (B,) and the chosen label set's positive and negative ids as -1-padded (B, L)
    int32 arrays.
    """
    lbl = np.asarray(lbl, np.int32)
    if lbl.ndim != 2 or lbl.shape[1] < HEADER:
        raise ValueError(f"label members: expected (B, >= {HEADER}) int32, got shape {lbl.shape}")
    counts = lbl[:, 1:HEADER].astype(np.int64)
    lengths = HEADER + counts.sum(1)
    if (counts < 0).any() or (lengths > lbl.shape[1]).any():
        bad = int(np.nonzero((counts < 0).any(1) | (lengths > lbl.shape[1]))[0][0])
        raise ValueError(f"label member of sample {int(lbl[bad, 0])} does not match its header "
                         f"{counts[bad].tolist()}")
    starts = HEADER + np.concatenate([np.zeros((len(lbl), 1), np.int64), np.cumsum(counts, 1)], 1)
    first = 0 if label_set == "observed" else 2
    return lbl[:, 0].astype(np.int64), *(_gather_ids(lbl, starts[:, k], counts[:, k]) for k in (first, first + 1))


def _gather_ids(lbl: np.ndarray, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    width = max(int(count.max(initial=0)), 1)
    col = np.arange(width)
    idx = np.minimum(start[:, None] + col, lbl.shape[1] - 1)
    return np.where(col < count[:, None], np.take_along_axis(lbl, idx, 1), -1).astype(np.int32)


def normalise(images: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool,
              flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W) on the device, optionally channels-last.

    Rows where ``flip`` (bool (B,)) is true are mirrored on the way; ``images`` is never written, so
    it may be a pipeline's own buffer.
    """
    src = images.to(device, non_blocking=True)
    b, h, w, c = src.shape
    # The NHWC float written here, permuted, is already channels-last in memory: no reordering pass.
    x = torch.empty((b, h, w, c), dtype=torch.float32, device=device)
    if flip is None or not bool(flip.any()):
        x.copy_(src)
    else:  # mirroring while converting costs no extra pass over the float batch
        for i, mirrored in enumerate(flip.tolist()):
            x[i].copy_(src[i].flip(1) if mirrored else src[i])
    # (x / 255 - mean) / std as a multiply and a subtract with the per-channel constants tiled along a
    # row: a long contiguous inner dimension vectorises, an inner dimension of 3 does not (4x slower).
    std = torch.tensor(IMAGENET_STD, device=device)
    scale = (1.0 / (255.0 * std)).repeat(w)
    shift = (torch.tensor(IMAGENET_MEAN, device=device) / std).repeat(w)
    x.view(b, h, w * c).mul_(scale).sub_(shift)
    x = x.permute(0, 3, 1, 2).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
