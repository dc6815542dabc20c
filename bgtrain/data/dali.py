"""DALI backend: ``fn.readers.webdataset`` -> ``fn.decoders.image`` (nvJPEG ``mixed``, or ``cpu``) -> resize.

It yields the same raw batches as the WebDataset backend, so labels, flips' rule, normalisation and
corrections downstream are shared. What DALI's epochs guarantee, and how this module gets exactness:

* **Coverage.** DALI reads the epoch plan's shard sequence (:mod:`bgtrain.data.plan`, one slot per
  rank) and cuts it into ``world`` contiguous sample ranges, rank r reading [floor(N r/W),
  floor(N (r+1)/W)): the plan's rank ranges exactly. The shard order is re-drawn from (seed, epoch)
  for every epoch and is the same on every rank, so every sample is read by exactly one rank per
  epoch, whatever the shard sizes or their count.
* **Padding.** ``pad_last_batch=True`` repeats a rank's last sample until every rank has
  ceil(ceil(N/W)/B) = ceil(N/(W B)) batches, the plan's steps (the iterator's ``reader_name`` makes
  it stop there on every rank). A repeat is recognised by its sample id having been seen before in
  this epoch on this rank and is marked ``valid=False``: each sample is valid exactly once. DALI
  fills each batch before the next, so the plan for DALI is made with ``pad_at_end``.
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

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from bgtrain import storage
from bgtrain.data.backend import RawBatch
from bgtrain.data.common import usable_labels
from bgtrain.data.plan import EpochPlan, Piece
from bgtrain.data.wds import read_samples
from shards.format import ShardError, decode_label_rows, pad_label_members

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

    # device_id None makes a CPU-only pipeline (DALI accepts it; its annotation says int)
    @pipeline_def(batch_size=batch_size, num_threads=max(1, threads), device_id=device_id,  # type: ignore[arg-type]
                  seed=seed, prefetch_queue_depth=2)
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
        pipe = build_pipeline([str(info.shard_paths[s]) for s in plan.order], rank=world.rank,
                              world=world.world_size, batch_size=plan.batch_size, image_size=ld.cfg.image_size,
                              threads=ld.cfg.workers, device_id=_device_id(ld.device), shuffle_buffer=buffer,
                              seed=seed)
        iterator = DALIGenericIterator([pipe], ["image", "lbl"], reader_name=READER, auto_reset=False,
                                       last_batch_policy=LastBatchPolicy.FILL)
        seen = np.zeros(info.num_samples, bool)
        step = 0
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
                               corrupt=[(storage.join(info.root, info.split), "a sample with an unreadable .lbl")] * int(
                                   (~ok).sum()))
        except RuntimeError as e:
            raise ShardError(self._failure(plan, pieces, step, buffer, e)) from None
        finally:
            del iterator, pipe

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
