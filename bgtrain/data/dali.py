"""DALI backend: ``fn.readers.webdataset`` -> ``fn.decoders.image`` (nvJPEG ``mixed``, or ``cpu``) -> resize.

It yields the same raw batches as the WebDataset backend, so labels, flips' rule, normalisation and
corrections downstream are shared. What DALI's epochs guarantee, and how this module gets exactness:

* **Coverage.** DALI cuts the concatenated shards of :class:`~bgtrain.data.common.StreamPlan` into
  ``world`` contiguous sample ranges, rank r reading [floor(N r/W), floor(N (r+1)/W)). The shard order
  is re-drawn from (seed, epoch) for every epoch and is the same on every rank, so every sample is
  read by exactly one rank per epoch, whatever the shard sizes or their count.
* **Padding.** ``pad_last_batch=True`` repeats a rank's last sample until every rank has
  ceil(ceil(N/W)/B) batches (the iterator's ``reader_name`` makes it stop there on every rank).
  A repeat is recognised by its sample id having been seen before in this epoch on this rank and is
  marked ``valid=False``: each sample is valid exactly once, batches stay full-sized.
* **Order.** A pipeline is built per epoch, seeded by (seed, epoch, rank). ``random_shuffle`` mixes
  samples inside a buffer of ``data.shuffle_buffer`` only, so shards must be written pre-shuffled
  (the shard builder does). Same seed, same order.
* **Flip.** Applied after the pipeline, while :func:`~bgtrain.data.common.normalise` converts the
  batch to float, with the same (seed, epoch, sample) rule as the WebDataset backend.
* **Resume.** The position is (epoch, batches_done). A resumed epoch rebuilds the same seeded pipeline
  and runs through the consumed batches without yielding them, so the rest of the epoch is exactly the
  uninterrupted one; the price is decoding those batches again (a few seconds per 10^4 images on a GPU).
* **Corrupt JPEGs.** DALI cannot skip one: it kills the pipeline. The shard builder decode-checks every
  image; ``corrupt`` is always 0 here. Use the WebDataset backend for unchecked shards.
* **Resampled mode.** The stream is shards drawn with replacement; it is cut at the nominal epoch, so
  no padding occurs and repeats are valid (that is what resampling means).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from bgtrain.data.common import StreamPlan, id_lists_from_lbl

if TYPE_CHECKING:
    from bgtrain.data import Loader

READER = "Reader"


def index_paths(tars: list[str]) -> list[str]:
    """The DALI index beside each tar, with a clear error naming the missing one."""
    out = []
    for tar in tars:
        idx = tar[: -len(".tar")] + ".idx" if tar.endswith(".tar") else tar + ".idx"
        try:
            open(idx, "rb").close()
        except OSError as e:
            raise FileNotFoundError(f"{idx}: DALI index missing for {tar}; rebuild the shards or run "
                                    "`wds2idx` (ships with DALI)") from e
        out.append(idx)
    return out


def build_pipeline(tars: list[str], *, rank: int, world: int, batch_size: int, image_size: int, threads: int,
                   device_id: int | None, shuffle_buffer: int, seed: int):
    """The DALI pipeline: jpg + lbl members -> RGB decode -> resize to a square, padded int32 labels."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=max(1, threads), device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipeline():
        jpg, lbl = fn.readers.webdataset(
            paths=tars, index_paths=index_paths(tars), ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32],
            # the default yields empty tensors for a missing member, which crash the decoder
            missing_component_behavior="skip", name=READER, shard_id=rank, num_shards=world,
            pad_last_batch=True, random_shuffle=shuffle_buffer > 1, initial_fill=max(1, shuffle_buffer))
        image = fn.decoders.image(jpg, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        # The paper's resize: both sides given, so no crop and no kept aspect ratio.
        image = fn.resize(image, resize_x=image_size, resize_y=image_size)
        return image, fn.pad(lbl, fill_value=-1)

    pipe = pipeline()
    pipe.build()
    return pipe


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def dali_raw_batches(loader: "Loader", plan: StreamPlan) -> Iterator[dict]:
    """Raw batches of one rank for ``loader``'s epoch, from ``loader.batches_done`` on."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    info, world = loader.info, loader.world
    seed = int(np.random.default_rng([loader.seed, loader.epoch, world.rank]).integers(2**31 - 1))
    pipe = build_pipeline([str(info.shard_paths[s]) for s in plan.shards], rank=world.rank,
                          world=world.world_size, batch_size=plan.batch_size, image_size=loader.cfg.image_size,
                          threads=loader.cfg.workers, device_id=_device_id(loader.device),
                          shuffle_buffer=loader.cfg.shuffle_buffer if loader.train else 1, seed=seed)
    iterator = DALIGenericIterator([pipe], ["image", "lbl"], reader_name=READER, auto_reset=False,
                                   last_batch_policy=LastBatchPolicy.FILL)
    seen = np.zeros(info.num_samples, bool)
    try:
        for step, outputs in enumerate(iterator):
            if step >= plan.batches_per_rank:
                break
            out = outputs[0]
            sample_id, pos, neg = id_lists_from_lbl(out["lbl"].numpy(), info.label_set)
            valid = np.ones(len(sample_id), bool) if plan.resampled else _first_sightings(sample_id, seen)
            if step < loader.batches_done:  # resume: consumed already, but the seen-set must still learn it
                continue
            # The image may be DALI's own reference-counted buffer: nothing downstream writes it.
            yield {"image": out["image"], "pos": torch.from_numpy(pos), "neg": torch.from_numpy(neg),
                   "sample_id": torch.from_numpy(sample_id), "valid": torch.from_numpy(valid),
                   "corrupt": torch.tensor(0)}
    finally:
        del iterator, pipe


def _first_sightings(sample_id: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """True where a sample id appears for the first time this epoch; marks them seen."""
    if sample_id.size and sample_id.max() >= seen.size:
        raise ValueError(f"sample id {int(sample_id.max())} outside the split's {seen.size} samples; "
                         "sample ids must be 0..N-1 within a split (shards.format)")
    valid = np.zeros(len(sample_id), bool)
    for i, sid in enumerate(sample_id.tolist()):  # in order: a repeat inside one batch is padding too
        if not seen[sid]:
            seen[sid] = valid[i] = True
    return valid
