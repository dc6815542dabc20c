"""WebDataset backend: each worker reads its slot's range of tar shards through their DALI index, decodes with PIL.

Each DataLoader worker is one slot of the epoch plan (:mod:`bgtrain.data.plan`): one contiguous range
of the epoch's shard sequence, cut into the plan's batches. It opens each shard of its range at the
first sample it needs by seeking with the shard's ``.idx`` (checked against the manifest and the tar's
size first), and reads only the ``.jpg`` and ``.lbl`` members: nothing is read twice and no byte is
read only to be skipped.

Order: a seeded shuffle buffer mixes the slot's sample *positions*, so the order is known before any
byte is read. A resumed epoch drops the positions already consumed and reads only the rest, in the
same order as an uninterrupted run, holding at most about a buffer of samples in memory.

A sample that fails to read or decode (or whose labels are broken) becomes an invalid row named in
the batch's ``corrupt`` list; batch counts never change, so DDP never hangs. With ``data.decode: gpu``
the worker ships JPEG bytes and :mod:`bgtrain.data.gpu_decode` decodes the batch on the device.
"""
from __future__ import annotations

import functools
import io
import itertools
import multiprocessing
import multiprocessing.context
import os
import select
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from bgtrain import storage
from bgtrain.data.backend import RawBatch, ReaderFailure
from bgtrain.data.common import SplitInfo, flip_decision, usable_labels
from bgtrain.data.plan import EpochPlan, Piece, PlanSpec, skipped_batches
from bgtrain.data.ranges import ShardRanges
from shards.format import ShardError, decode_label_rows, pad_label_members

if TYPE_CHECKING:
    from bgtrain.data import Loader

WANTED = ("jpg", "lbl")


def decode_image(jpeg: bytes, size: int, flip: bool) -> np.ndarray:
    """JPEG bytes -> uint8 (size, size, 3): the paper's resize without crop or aspect ratio.

    ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling) when the result still covers
    ``size`` on both sides, i.e. only for sources at least twice the target. It averages in the DCT
    domain instead of bilinear filtering the full image: ~1.8x faster at 512 -> 224 px, and the
    images differ from the full decode by ~1-3 grey levels on average (docs/benchmarks.md).
    """
    img: Image.Image = Image.open(io.BytesIO(jpeg))
    img.draft("RGB", (size, size))
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def shuffled(items: Iterator[int], buffer: int, rng: np.random.Generator) -> Iterator[int]:
    """A shuffle buffer: items come out mixed within about ``buffer`` of their position."""
    pool: list[int] = []
    for s in items:
        if len(pool) < buffer:
            pool.append(s)
            continue
        j = int(rng.integers(len(pool)))
        pool[j], s = s, pool[j]
        yield s
    rng.shuffle(pool)
    yield from pool


def read_samples(info: SplitInfo, pieces: tuple[Piece, ...], positions: Iterable[int]) -> Iterator[tuple[int, dict]]:
    """(position, sample) for increasing ``positions`` of a range made of ``pieces``, seeking through the index.

    Lazy: a shard is indexed (and checked, :meth:`SplitInfo.open_index`) when the first position inside it
    is asked for, so a pass that stops early reads and indexes only what it reached. A sample is
    {"key", "shard", "jpg", "lbl"}; a member the index lacks or the tar cuts short is None.
    """
    wanted = iter(positions)
    p = next(wanted, None)
    first = 0
    for piece in pieces:
        end = first + len(piece)
        if p is not None and p < end:
            index = info.open_index(piece.shard)
            span = index.span(piece.start + max(0, p - first), piece.start + len(piece))
            with ShardRanges(info.readable(piece.shard), span, info.retry) as tar:
                while p is not None and p < end:
                    i = piece.start + p - first
                    sample: dict = {"key": index.keys[i], "shard": info.shard_paths[piece.shard]}
                    for ext in WANTED:
                        where = index.members[i].get(ext)
                        sample[ext] = tar.read(*where) if where is not None else None
                    yield p, sample
                    p = next(wanted, None)
        first = end


class SlotStream(torch.utils.data.IterableDataset):
    """Yields one rank's raw batches; each DataLoader worker reads the slots the plan gives it.

    The pass to read, (epoch, batches done), is read from ``position`` at the start of each pass: shared
    memory that the loader sets before it asks its persistent workers for the next pass, so a new epoch or
    a resume re-plans inside the same processes.
    """

    def __init__(self, spec: PlanSpec, rank: int, image_size: int, flip: bool, shuffle_buffer: int,
                 position: Sequence[int], decode: bool = True) -> None:
        self.spec, self.info, self.rank, self.seed = spec, spec.info, rank, spec.seed
        self.image_size, self.flip, self.shuffle_buffer = image_size, flip, shuffle_buffer
        self.position, self.decode = position, decode
        self.epoch, self.batches_done = 1, 0
        self._plan: tuple[int, EpochPlan] | None = None
        self._retries_seen = storage.COUNTERS["retries"]

    @property
    def plan(self) -> EpochPlan:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.spec.plan(self.epoch))
        return self._plan[1]

    def __iter__(self) -> Iterator[RawBatch | ReaderFailure]:
        self.epoch, self.batches_done = int(self.position[0]), int(self.position[1])
        winfo = torch.utils.data.get_worker_info()
        # The DataLoader always asks worker 0 first; after a resume at batch b the next batch belongs to
        # slot b % workers, so loader processes are rotated onto slots to keep the uninterrupted order.
        workers = self.plan.workers
        worker = ((winfo.id if winfo is not None else 0) + self.batches_done) % workers
        sizes = self.plan.slot_batches(self.rank, worker)
        done = skipped_batches(self.batches_done, worker, workers)
        order: Iterator[int] = iter(range(sum(sizes)))
        if self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            order = shuffled(order, self.shuffle_buffer, rng)
        # A resumed pass skips the positions the consumed batches held, without reading them.
        consumed = set(itertools.islice(order, sum(sizes[:done])))
        samples = self._in_order(self.plan.units(self.rank, worker), order, consumed, sum(sizes))
        try:
            for rows in sizes[done:]:
                yield self._collate([next(samples) for _ in range(rows)])
        except (ShardError, OSError) as e:  # a shard reached mid-pass cannot be read: the rank says so
            yield ReaderFailure(e)

    def _in_order(self, pieces: tuple[Piece, ...], order: Iterator[int], consumed: set[int],
                  count: int) -> Iterator[dict]:
        """The samples at slot positions ``order``, read front to back and held until their turn.

        Both streams are lazy: a pass that stops early (``data.max_batches``) reads and shuffles only about
        what it consumed plus the shuffle buffer, and the buffer bounds what is held.
        """
        reader = read_samples(self.info, pieces, (q for q in range(count) if q not in consumed))
        held: dict[int, dict] = {}
        for p in order:
            while p not in held:
                q, sample = next(reader)
                held[q] = sample
            yield held.pop(p)

    def _collate(self, samples: list[dict]) -> RawBatch:
        """Decode ``samples`` into a raw batch padded to the batch size; failures become invalid rows."""
        size, n = self.plan.batch_size, len(samples)
        labels = decode_label_rows(*pad_label_members([s.get("lbl") for s in samples]))
        pos, neg, ok = usable_labels(labels, self.info)
        images: list = []
        for i, s in enumerate(samples):
            image = None
            if ok[i] and s.get("jpg") is not None:
                image = self._image(s["jpg"], int(labels.sample_id[i]))
            ok[i] &= image is not None
            images.append(image if image is not None else self._blank())
        images += [self._blank()] * (size - n)
        sample_id = np.full(size, -1, np.int64)
        sample_id[:n] = np.where(ok, labels.sample_id, -1)
        valid = np.zeros(size, bool)
        valid[:n] = ok
        return RawBatch(
            image=torch.from_numpy(np.stack(images)) if self.decode else images,
            pos=torch.from_numpy(_rows(np.where(ok[:, None], pos, -1), size)),
            neg=torch.from_numpy(_rows(np.where(ok[:, None], neg, -1), size)),
            sample_id=torch.from_numpy(sample_id), valid=torch.from_numpy(valid), real=n,
            corrupt=[(s["shard"], s["key"]) for s, good in zip(samples, ok) if not good],
            mirrored=self.decode, retries=self._retries_since_last())

    def _retries_since_last(self) -> int:
        """Retries this process made since the previous batch (the counter is per process)."""
        now = storage.COUNTERS["retries"]
        new, self._retries_seen = now - self._retries_seen, now
        return new

    def _image(self, jpeg: bytes, sample_id: int) -> np.ndarray | bytes | None:
        if not self.decode:
            return jpeg
        try:
            return decode_image(jpeg, self.image_size, self.flip and flip_decision(self.seed, self.epoch, sample_id))
        except Exception:  # any decoder failure is a corrupt sample: counted by the Loader, never fatal here
            return None

    def _blank(self) -> np.ndarray | bytes:
        return np.zeros((self.image_size, self.image_size, 3), np.uint8) if self.decode else b""


def _worker_context(workers: int) -> multiprocessing.context.BaseContext | None:
    """Loader processes start from a forkserver, never as a fork of this process.

    This process has threads (DALI's, the NCCL/gloo watchdogs, a tensorboard writer); a fork taken while one
    of them holds a lock copies the lock held, and the worker blocks on it forever while the loop waits
    for its batch. The forkserver is a clean single-threaded process that imports this module once.
    """
    if workers == 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _end_with_rank(rank_pid: int, worker_id: int) -> None:
    """In a loader process: end it as soon as the rank that asked for it ends, however that rank died.

    A forkserver child is not the rank's child, so torch's own check (is my parent alive?) watches the forkserver,
    which lives as long as any loader does; after a SIGKILL of the rank its loaders would live on, holding memory
    and the rank's stdout. A pidfd of the rank becomes readable when the rank exits.
    """
    try:
        rank = os.pidfd_open(rank_pid)
    except ProcessLookupError:
        os._exit(1)

    def wait_for_the_rank() -> None:
        watch = select.poll()  # not select.select: a worker may hold more than FD_SETSIZE descriptors
        watch.register(rank, select.POLLIN)
        watch.poll()
        os._exit(1)

    threading.Thread(target=wait_for_the_rank, name="end-with-rank", daemon=True).start()


def _rows(ids: np.ndarray, size: int) -> np.ndarray:
    """(n, L) ids padded with -1 rows to (size, L) int32."""
    out = np.full((size, ids.shape[1]), -1, np.int32)
    out[: len(ids)] = ids
    return out


class WebDatasetBackend:
    """``data.backend: webdataset``: ``data.workers`` loader processes per rank, PIL or nvJPEG decoding."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self._batches: torch.utils.data.DataLoader | None = None   # built at the first pass, then kept
        self._position: Any = [1, 0]   # (epoch, batches done): a shared-memory array once workers exist

    def slots_per_rank(self) -> int:
        return max(1, self.loader.cfg.workers)

    def pad_at_end(self) -> bool:
        return False

    def raw_batches(self, plan: EpochPlan, batches_done: int) -> Iterator[RawBatch | ReaderFailure]:
        """This rank's raw batches, from ``data.workers`` DataLoader processes (or this one with 0).

        The processes start at the first pass and serve every later one (``persistent_workers``): a pass
        hands them (epoch, batches done) through shared memory, and they re-plan from the loader's spec.
        """
        ld, rank = self.loader, self.loader.world.rank
        # Every tar of this rank is checked here, where a problem is one clear error, before workers read it.
        ld.info.check_shards({p.shard for w in range(plan.workers) for p in plan.units(rank, w)})
        if self._batches is None:
            context = _worker_context(ld.cfg.workers)
            self._position = context.Array("q", 2, lock=False) if context is not None else [1, 0]
            stream = SlotStream(ld.spec, rank, ld.cfg.image_size, ld.cfg.flip and ld.train,
                                ld.cfg.shuffle_buffer if ld.train else 1, self._position,
                                decode=ld.cfg.decode == "cpu")
            self._batches = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=ld.cfg.workers, pin_memory=ld.device.type == "cuda",
                multiprocessing_context=context, persistent_workers=ld.cfg.workers > 0,
                worker_init_fn=functools.partial(_end_with_rank, os.getpid()))
        self._position[0], self._position[1] = ld.epoch, batches_done
        return iter(self._batches)

    def images(self, raw: RawBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(raw.image, torch.Tensor):
            return raw.image, torch.ones(len(raw.valid), dtype=torch.bool)
        from bgtrain.data.gpu_decode import decode_resize
        return decode_resize(raw.image, self.loader)
