"""What every data backend shares: the split's shards, flips, and the uint8 -> float conversion.

The epoch plan is :mod:`bgtrain.data.plan`; a backend's contract (:class:`~bgtrain.data.backend.Backend`)
and its batches (:class:`~bgtrain.data.backend.RawBatch`) are :mod:`bgtrain.data.backend`.
"""
from __future__ import annotations

import bisect
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch

from bgtrain import storage
from bgtrain.data.cache import ShardCache
from shards.format import LabelRows, ShardError, ShardIndex, path_inside, read_dali_index, read_manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SplitInfo:
    root: str              # a folder or URL (bgtrain.storage)
    split: str
    shard_paths: tuple[str, ...]
    shard_sizes: tuple[int, ...]
    num_classes: int
    rest: int              # value of classes absent from the id lists for the chosen label set
    label_set: str         # "observed" or "full"
    dataset: str
    shard_bytes: tuple[int | None, ...] = ()  # tar sizes from the manifest (None: not recorded)
    shard_sha256: tuple[str | None, ...] = ()
    retry: storage.Retry = storage.DEFAULT_RETRY
    cache: ShardCache | None = None  # remote shards only

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.root)

    def shard_of(self, sample_id: int) -> int:
        """The shard holding ``sample_id``: ids are 0..N-1 in written order (shards.format)."""
        return min(bisect.bisect_right(list(accumulate(self.shard_sizes)), sample_id), len(self.shard_sizes) - 1)

    def readable(self, shard: int) -> str:
        """Where the shard's bytes are read from: its own location, or its node-local cache entry."""
        tar = self.shard_paths[shard]
        if self.cache is None or not self.remote:
            return tar
        return self.cache.local(tar, self._expected_bytes(shard), self.shard_sha256[shard] if self.shard_sha256
                                else None)

    def _expected_bytes(self, shard: int) -> int | None:
        return self.shard_bytes[shard] if self.shard_bytes else None

    def checked_size(self, shard: int) -> int:
        """The tar's size, once it is known to be there and of the size the manifest records (when it does)."""
        tar = self.shard_paths[shard]
        try:
            size = storage.size(tar, self.retry)
        except FileNotFoundError:
            raise FileNotFoundError(f"{tar}: listed in {storage.join(self.root, 'manifest.json')} but missing"
                                    ) from None
        expected = self._expected_bytes(shard)
        if expected is not None and size != expected:
            raise ShardError(f"{tar}: {size} bytes, manifest.json says {expected}; the copy is truncated or "
                             "replaced (check it with `python -m shards verify`)")
        return size

    def index_location(self, shard: int) -> str:
        return storage.with_suffix(self.shard_paths[shard], ".idx")

    def open_index(self, shard: int) -> ShardIndex:
        """The shard's DALI index, checked against the manifest and the tar's size before anything is read.

        A tar of another size than the manifest records (or, for manifests without sizes, shorter
        than its index says) is refused, naming it: a truncated or replaced copy is never trained on.
        """
        tar = self.shard_paths[shard]
        size = self.checked_size(shard)
        index = read_dali_index(self.index_location(shard), self.retry)
        if len(index) != self.shard_sizes[shard]:
            raise ShardError(f"{self.index_location(shard)}: {len(index)} samples, manifest.json says "
                             f"{self.shard_sizes[shard]}")
        if index.end > size:
            raise ShardError(f"{tar}: {size} bytes, but its index has data up to byte {index.end}; the tar is "
                             "truncated")
        return index

    def check_shards(self, shards: set[int]) -> None:
        """What can be checked of ``shards`` without reading them: each tar is there, of the size the manifest
        records, and has its index. A stat per file (a HEAD per object, several at a time, for a URL); the
        readers parse an index when they reach its shard (:meth:`open_index`), so a pass pays for what it reads."""
        def check(shard: int) -> None:
            self.checked_size(shard)
            idx = self.index_location(shard)
            if not storage.exists(idx, self.retry):
                raise ShardError(f"{idx}: index missing; rebuild the shards or run `wds2idx` (ships with DALI)")

        if not self.remote:
            for shard in sorted(shards):
                check(shard)
            return
        with ThreadPoolExecutor(16) as pool:  # round trips, not bandwidth: overlap them
            list(pool.map(check, sorted(shards)))


def split_info(root: str | Path, split: str, label_set: str, retry: storage.Retry = storage.DEFAULT_RETRY,
               cache: ShardCache | None = None) -> SplitInfo:
    """Read a split's shard list from the manifest (a folder or URL), with a clear error for a missing split.

    Nothing here touches a tar: a rank stats and indexes only the shards its plan gives it, when it first
    reads them (:meth:`SplitInfo.open_index`, which names a missing or truncated tar), so that the cost of
    starting does not grow with the split's shard count, and a plan can be made before the tars are staged.
    """
    root = str(root)
    manifest = read_manifest(root)
    where = storage.join(root, "manifest.json")
    if split not in manifest["splits"]:
        raise ValueError(f"{where}: no split {split!r}; has {sorted(manifest['splits'])}")
    entry = manifest["splits"][split]
    paths = tuple(path_inside(storage.join(root, split), s["name"], where) for s in entry["shards"])
    rest = entry.get("rest", {}).get(label_set) if isinstance(entry.get("rest"), dict) else None
    if not isinstance(rest, int):
        raise ShardError(f"{where}: splits.{split}.rest.{label_set} must be -1 or 0")
    return SplitInfo(root, split, paths, tuple(s["num_samples"] for s in entry["shards"]),
                     len(manifest["classes"]), rest, label_set, str(manifest.get("dataset", "")),
                     tuple(s.get("bytes") for s in entry["shards"]), tuple(s.get("sha256") for s in entry["shards"]),
                     retry, cache)


def usable_labels(labels: LabelRows, info: SplitInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positive ids, negative ids, ok) of ``info``'s label set; a class id beyond the split's classes is not ok."""
    pos, neg = labels.label_set(info.label_set)
    ok = labels.ok & (pos < info.num_classes).all(1) & (neg < info.num_classes).all(1)
    return pos, neg, ok


def flip_decision(seed: int, epoch: int, sample_id: int) -> bool:
    """Horizontal flip as a pure function of (seed, epoch, sample), so a resumed epoch flips alike."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample_id}".encode(), digest_size=1).digest()
    return bool(digest[0] & 1)


def flip_mask(sample_ids: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """bool (B,) CPU: the rows :func:`flip_decision` mirrors; placeholders (id < 0) never flip."""
    return torch.tensor([sid >= 0 and flip_decision(seed, epoch, sid) for sid in sample_ids.tolist()],
                        dtype=torch.bool)


def _normalise_constants(device: torch.device, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of :func:`normalise` for rows of ``width`` pixels on ``device``, built once per (device, width).

    Built on the device with the same operations as ever (bit-identical results); the one blocking host-to-device
    copy happens on the first batch of a size, not on every batch (a host sync that waits for the queued step).
    """
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" share one entry
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, width)
    cached = _CONSTANTS.get(key)
    if cached is None:
        std = torch.tensor(IMAGENET_STD, device=device)
        scale = (1.0 / (255.0 * std)).repeat(width)
        shift = (torch.tensor(IMAGENET_MEAN, device=device) / std).repeat(width)
        cached = _CONSTANTS[key] = (scale, shift)
    return cached


_CONSTANTS: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def normalise(images: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool,
              flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W) on the device, optionally channels-last.

    Rows where ``flip`` (bool (B,), on the CPU) is true are mirrored on the way; ``images`` is never written,
    so it may be a pipeline's own buffer. No host sync: the flip mask travels with ``non_blocking`` and the
    constants are cached per device and width.
    """
    device = torch.device(device)
    src = images.to(device, non_blocking=True)
    b, h, w, c = src.shape
    # The NHWC float written here, permuted, is already channels-last in memory: no reordering pass.
    x = torch.empty((b, h, w, c), dtype=torch.float32, device=device)
    if flip is None or not bool(flip.any()):  # flip: host-side (CPU) mask, no device read
        x.copy_(src)
    else:  # mirroring the uint8 batch in one select costs no pass over the float batch
        mask = flip.to(device, non_blocking=True).view(b, 1, 1, 1)
        x.copy_(torch.where(mask, src.flip(2), src))
    # (x / 255 - mean) / std as a multiply and a subtract with the per-channel constants tiled along a
    # row: a long contiguous inner dimension vectorises, an inner dimension of 3 does not (4x slower).
    scale, shift = _normalise_constants(device, w)
    x.view(b, h, w * c).mul_(scale).sub_(shift)
    x = x.permute(0, 3, 1, 2).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
