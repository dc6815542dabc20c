"""DALI backend: ``fn.readers.webdataset`` -> ``fn.decoders.image`` (nvJPEG ``mixed``, or ``cpu``) -> resize.

It yields the same raw batches as the WebDataset backend, so labels, flips' rule, normalisation and
corrections downstream are shared. What DALI's epochs guarantee, and how this module gets exactness:

* **Coverage.** A rank's DALI reads exactly its range of the epoch plan (:mod:`bgtrain.data.plan`, one
  slot per rank): one input per piece of the range, the piece's tar with an index listing only the
  piece's samples (:func:`rank_inputs`). So every sample is read by exactly one rank per epoch, and
  DALI, which opens every tar and index it is given before reading, opens only the rank's own: start-up
  does not grow with the split's shard count. A URL shard is read from its node-local cache entry, or
  its piece's byte span is fetched into a sparse local file first (DALI reads local files only).
* **Padding.** ``pad_last_batch=True`` repeats the rank's last sample to fill its last batch; a rank
  with a batch fewer than the plan's ceil(N/(W B)) steps gets an all-padding batch, so every rank
  yields the same count. A repeat is recognised by its sample id having been seen before in this
  epoch on this rank and is marked ``valid=False``: each sample is valid exactly once. DALI fills
  each batch before the next, so the plan for DALI is made with ``pad_at_end``.
* **Order.** A pipeline is built per epoch, seeded by (seed, epoch, rank). ``random_shuffle`` mixes
  samples inside a buffer of ``data.shuffle_buffer`` only, so shards must be written pre-shuffled
  (the shard builder does). Same seed, same order.
* **Flip.** Applied after the pipeline, while :func:`~bgtrain.data.common.normalise` converts the
  batch to float, with the same (seed, epoch, sample) rule as the WebDataset backend.
* **Resume.** The position is (epoch, batches_done). A resumed epoch rebuilds the same seeded pipeline
  and runs through the consumed batches without yielding them, so the rest of the epoch is exactly the
  uninterrupted one; the price is decoding those batches again (a few seconds per 10^4 images on a GPU).
* **Corrupt JPEGs.** DALI cannot skip one: it kills the pipeline. The shard builder decode-checks every
  image. When DALI raises anyway, the error is re-raised as one line naming the shard and sample it
  failed on, found by checking the samples the pipeline could have been decoding (the rank's range up
  to the failing batch plus the read-ahead). Use the WebDataset backend for unchecked shards: it skips
  and counts corrupt samples.
* **Resampled mode.** The stream is shards drawn with replacement; it is cut at the nominal epoch, so
  no padding occurs and repeats are valid (that is what resampling means).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bgtrain import storage
from bgtrain.data.backend import RawBatch
from bgtrain.data.common import SplitInfo, usable_labels
from bgtrain.data.plan import EpochPlan, Piece
from bgtrain.data.ranges import REMOTE_BLOCK
from bgtrain.data.wds import read_samples
from shards.format import ShardError, decode_label_rows, pad_label_members, write_dali_index

if TYPE_CHECKING:
    from bgtrain.data import Loader

READER = "Reader"


def rank_inputs(info: SplitInfo, pieces: tuple[Piece, ...], folder: Path) -> tuple[list[str], list[str]]:
    """(tars, indexes) for DALI to read ``pieces`` in order: local tars, and per piece an index of its samples.

    The indexes (and any fetched spans) are written into ``folder``, which the caller removes after the pass.
    """
    def one(k: int, piece: Piece) -> tuple[str, str]:
        index = info.open_index(piece.shard)  # checked against the manifest and the tar's size
        idx = folder / f"{k:06d}.idx"
        write_dali_index(idx, [(index.keys[i], ext, off, size) for i in range(piece.start, piece.stop)
                               for ext, (off, size) in index.members[i].items()])
        tar = info.readable(piece.shard)
        if storage.is_remote(tar):
            tar = _fetch_span(tar, index.span(piece.start, piece.stop), folder / f"{k:06d}.tar", info.retry)
        return tar, str(idx)

    with ThreadPoolExecutor(8 if info.remote else 1) as pool:  # URL pieces: overlap the round trips
        inputs = list(pool.map(one, range(len(pieces)), pieces))
    return [t for t, _ in inputs], [i for _, i in inputs]


def _fetch_span(url: str, span: tuple[int, int], local: Path, retry: storage.Retry) -> str:
    """A sparse local file holding ``url``'s bytes [start, end) at their own offsets: the index's offsets hold."""
    start, end = span
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for at in range(start, end, REMOTE_BLOCK):
            os.pwrite(fd, storage.read_range(url, at, min(REMOTE_BLOCK, end - at), retry), at)
    finally:
        os.close(fd)
    return str(local)


def build_pipeline(tars: list[str], indexes: list[str], *, batch_size: int, image_size: int, threads: int,
                   device_id: int | None, shuffle_buffer: int, seed: int):
    """The DALI pipeline: jpg + lbl members -> RGB decode -> resize to a square, padded int32 labels."""
    from nvidia.dali import fn, pipeline_def, types

    # device_id None makes a CPU-only pipeline (DALI accepts it; its annotation says int)
    @pipeline_def(batch_size=batch_size, num_threads=max(1, threads), device_id=device_id,  # type: ignore[arg-type]
                  seed=seed, prefetch_queue_depth=2)
    def pipeline():
        jpg, lbl = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32],
            # the default yields empty tensors for a missing member, which crash the decoder
            missing_component_behavior="skip", name=READER, shard_id=0, num_shards=1,
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


class DaliBackend:
    """``data.backend: dali``: one DALI pipeline per rank and epoch; ``data.workers`` is its thread count."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def slots_per_rank(self) -> int:
        return 1

    def pad_at_end(self) -> bool:
        return True

    def images(self, raw: RawBatch) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(raw.image, torch.Tensor)
        return raw.image, torch.ones(len(raw.valid), dtype=torch.bool)

    def raw_batches(self, plan: EpochPlan, batches_done: int) -> Iterator[RawBatch]:
        """Raw batches of one rank for the loader's epoch, from ``batches_done`` on."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        ld = self.loader
        info, world = ld.info, ld.world
        pieces = plan.units(world.rank, 0)
        info.check_shards({p.shard for p in pieces})  # this rank's tars, before DALI reads them
        seed = int(np.random.default_rng([ld.seed, ld.epoch, world.rank]).integers(2**31 - 1))
        buffer = ld.cfg.shuffle_buffer if ld.train else 1
        seen = np.zeros(info.num_samples, bool)
        step = -1
        with tempfile.TemporaryDirectory(prefix="bgtrain-dali-") as folder:
            if pieces:
                pipe = build_pipeline(*rank_inputs(info, pieces, Path(folder)), batch_size=plan.batch_size,
                                      image_size=ld.cfg.image_size, threads=ld.cfg.workers,
                                      device_id=_device_id(ld.device), shuffle_buffer=buffer, seed=seed)
                iterator = DALIGenericIterator([pipe], ["image", "lbl"], reader_name=READER, auto_reset=False,
                                               last_batch_policy=LastBatchPolicy.FILL)
                try:
                    for step, outputs in enumerate(iterator):
                        if step >= plan.steps_per_epoch:
                            break
                        out = outputs[0]
                        labels = decode_label_rows(out["lbl"].numpy())
                        pos, neg, ok = usable_labels(labels, info)
                        valid = ok.copy() if plan.resampled else _first_sightings(labels.sample_id, ok, seen)
                        if step < batches_done:  # resume: consumed already, but the seen-set must still learn it
                            continue
                        # The image may be DALI's own reference-counted buffer: nothing downstream writes it.
                        yield RawBatch(image=out["image"], pos=torch.from_numpy(np.where(ok[:, None], pos, -1)),
                                       neg=torch.from_numpy(np.where(ok[:, None], neg, -1)),
                                       sample_id=torch.from_numpy(np.where(ok, labels.sample_id, -1)),
                                       valid=torch.from_numpy(valid), real=plan.rows[world.rank][step],
                                       corrupt=[(storage.join(info.root, info.split),
                                                 "a sample with an unreadable .lbl")] * int((~ok).sum()))
                except RuntimeError as e:
                    raise ShardError(self._failure(plan, pieces, step, buffer, e)) from None
                finally:
                    del iterator, pipe
        # A rank with fewer samples than the others (or none) may have a batch fewer: all padding.
        for _ in range(max(step + 1, batches_done), plan.steps_per_epoch):
            yield self._padding(plan)

    def _padding(self, plan: EpochPlan) -> RawBatch:
        size, b = self.loader.cfg.image_size, plan.batch_size
        device = self.loader.device if self.loader.device.type == "cuda" else torch.device("cpu")
        return RawBatch(image=torch.zeros((b, size, size, 3), dtype=torch.uint8, device=device),
                        pos=torch.full((b, 1), -1, dtype=torch.int32), neg=torch.full((b, 1), -1, dtype=torch.int32),
                        sample_id=torch.full((b,), -1, dtype=torch.int64), valid=torch.zeros(b, dtype=torch.bool),
                        real=0)

    def _failure(self, plan: EpochPlan, pieces: tuple[Piece, ...], step: int, buffer: int, error: Exception) -> str:
        """One line naming the shard and sample DALI failed on, found by checking what it could have read."""
        from shards.images import Rejected, check_jpeg
        ld, rank = self.loader, self.loader.world.rank
        said = _dali_said(error)
        ahead = min(sum(len(p) for p in pieces), (step + 3) * plan.batch_size + buffer)  # prefetch + buffer
        for _, sample in read_samples(ld.info, pieces, list(range(ahead))):
            problem = None
            if sample["jpg"] is None or sample["lbl"] is None:
                problem = "a member is missing or cut short"
            elif not decode_label_rows(*pad_label_members([sample["lbl"]])).ok[0]:
                problem = "its .lbl does not match its header"
            else:
                try:
                    check_jpeg(sample["jpg"])
                except Rejected as e:
                    problem = str(e)
            if problem:
                return (f"{sample['shard']}: DALI failed on sample {sample['key']} ({problem}) at batch {step} of "
                        f"rank {rank}; run `python -m shards verify`, or use data.backend=webdataset, which skips "
                        f"and counts corrupt samples. DALI said: {said}")
        shards = sorted({str(ld.info.shard_paths[p.shard]) for p in pieces})
        return (f"DALI failed at batch {step} of rank {rank}, reading {', '.join(shards[:3])}"
                f"{' ...' if len(shards) > 3 else ''}; no sample there is corrupt by the builder's check. "
                f"DALI said: {said}")


def _dali_said(error: Exception) -> str:
    """DALI's multi-line error in one line: the failing operator and what it encountered."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    operator = next((x.rstrip(",") for x in lines if x.startswith("Error in")), "")
    after = lines.index("encountered:") + 1 if "encountered:" in lines else len(lines)
    cause = lines[after] if after < len(lines) else (lines[0] if lines else type(error).__name__)
    return f"{operator}: {cause}" if operator else cause


def _first_sightings(sample_id: np.ndarray, ok: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """True where a readable sample's id appears for the first time this epoch; marks them seen."""
    if sample_id.size and sample_id.max() >= seen.size:
        raise ShardError(f"sample id {int(sample_id.max())} outside the split's {seen.size} samples; "
                         "sample ids must be 0..N-1 within a split (shards.format)")
    valid = np.zeros(len(sample_id), bool)
    for i, sid in enumerate(sample_id.tolist()):  # in order: a repeat inside one batch is padding too
        if ok[i] and not seen[sid]:
            seen[sid] = valid[i] = True
    return valid
