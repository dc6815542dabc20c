"""Label encoding, partial-label simulation, and the LL-Cp correction store.

Labels are signed int8: 1 known positive, 0 known negative, -1 unknown. At OpenImages scale a dense
matrix does not fit, so samples carry id lists and dense rows are built per batch on the device.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from bgtrain.data.plan import SampleReaders

POSITIVE, NEGATIVE, UNKNOWN = 1, 0, -1


def single_positive(full: np.ndarray, seed: int = 1200) -> np.ndarray:
    """Keep one random positive per row, everything else unknown (COLE's ``observe_uniform``).

    Bit-exact with the reference: one ``RandomState(seed)`` walks the rows in order; per row it
    shuffles the positive indices and keeps the first, then shuffles the negative indices and keeps
    none. The second shuffle keeps nothing but consumes random state, so it must stay.
    """
    full = np.asarray(full)
    if full.ndim != 2:
        raise ValueError(f"full labels must be (N, C), got shape {full.shape}")
    rng = np.random.RandomState(seed)
    observed = np.full(full.shape, UNKNOWN, dtype=np.int8)
    for i, row in enumerate(full):
        positives = np.nonzero(row == 1)[0]
        rng.shuffle(positives)
        observed[i, positives[:1]] = POSITIVE
        negatives = np.nonzero(row == 0)[0]
        rng.shuffle(negatives)
    return observed


def split_train_val(n: int, val_fraction: float = 0.2, seed: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """COLE's split: the last ``round(val_fraction * n)`` of a permutation is val; both parts sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(np.round(val_fraction * n))
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[: n - n_val]), np.sort(perm[n - n_val:])


def keep_fraction(full: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Durand's partial labels: keep each known label with probability ``fraction``, hide the rest.

    Exactly ``round(fraction * known)`` labels are kept per row, drawn without replacement in row order.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    full = np.asarray(full)
    rng = np.random.RandomState(seed)
    observed = np.full(full.shape, UNKNOWN, dtype=np.int8)
    for i, row in enumerate(full):
        known = np.nonzero(row >= 0)[0]
        kept = rng.permutation(known)[: int(np.round(fraction * known.size))]
        observed[i, kept] = row[kept]
    return observed


def pad_id_lists(lists: Sequence[Sequence[int]]) -> torch.Tensor:
    """Variable-length class-id lists as one (B, L) int32 tensor padded with -1."""
    width = max((len(x) for x in lists), default=0)
    out = torch.full((len(lists), max(width, 1)), -1, dtype=torch.int32)
    for i, ids in enumerate(lists):
        out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.int32)
    return out


def rows_from_padded(pos: torch.Tensor, neg: torch.Tensor, num_classes: int, rest: int,
                     device: torch.device) -> torch.Tensor:
    """Dense signed int8 rows (B, C) from -1-padded id tensors, built on ``device``."""
    pos, neg = pos.to(device, non_blocking=True).long(), neg.to(device, non_blocking=True).long()
    rows = torch.full((pos.shape[0], num_classes + 1), rest, dtype=torch.int8, device=device)
    # Padding (-1) is sent to a scratch column C that is cut off afterwards: no masking needed.
    rows.scatter_(1, torch.where(neg < 0, num_classes, neg), NEGATIVE)
    rows.scatter_(1, torch.where(pos < 0, num_classes, pos), POSITIVE)
    return rows[:, :num_classes]


def dense_rows(pos: Sequence[Sequence[int]], neg: Sequence[Sequence[int]], num_classes: int,
               rest: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Signed int8 rows (B, C) from per-sample positive and negative id lists."""
    return rows_from_padded(pad_id_lists(pos), pad_id_lists(neg), num_classes, rest, torch.device(device))


class CorrectionStore:
    """LL-Cp's permanent label corrections, each held by the rank that reads its sample this epoch.

    A correction (sample ``s``, class ``c``) is the int64 key ``s * C + c``. A rank keeps its keys in one
    sorted tensor on the training device, 8 bytes each, and labels a batch with a ``searchsorted`` there:
    no collective and no host read per step. That is exact because an exact epoch reads every sample
    once: a correction found in epoch t can only matter from epoch t + 1 on, and the rank that reads a
    sample in epoch t is the only one that finds corrections of it during t.

    * :meth:`record` queues a step's correction mask; the queue becomes keys every ``FLUSH_STEPS`` steps
      (one host read then, none per step).
    * :meth:`begin_epoch` (collective, once per epoch) sends every key to the rank that reads its sample
      in the coming epoch, and makes the epoch's new corrections visible to :meth:`apply`.
    * :meth:`state_dict` gathers every rank's keys to the checkpoint writer only, never to every rank;
      :meth:`load_state_dict` takes a contiguous slice of them, which the next :meth:`begin_epoch` routes, so
      a resume may change the world size.

    Resampled epochs may read a sample on several ranks and twice in one epoch, which breaks the premise
    above: the config refuses LL-Cp with ``data.resampled``.
    """

    FLUSH_STEPS = 64

    def __init__(self, num_classes: int, rank: int = 0, world: int = 1) -> None:
        self.num_classes, self.rank, self.world = num_classes, rank, world
        self._visible = torch.empty(0, dtype=torch.int64)          # sorted keys that apply() uses
        self._found: list[torch.Tensor] = []                       # keys found since the epoch began
        self._queued: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sample ids, correction mask) per step

    def __len__(self) -> int:
        """Corrections this rank holds (a host read of the queue).

        Counted without merging, so it costs what the queue holds, not what the store holds; exact while no
        correction is recorded twice in one epoch, which LL-Cp never does (it corrects unknown entries only).
        """
        self._flush()
        return self._visible.numel() + sum(k.numel() for k in self._found)

    def nbytes(self) -> int:
        """Bytes of the tensors that hold this rank's corrections (the queue's masks included)."""
        held = [self._visible, *self._found, *(t for pair in self._queued for t in pair)]
        return sum(t.numel() * t.element_size() for t in held)

    def keys(self) -> torch.Tensor:
        """Every correction this rank holds, as sorted unique keys ``sample * C + class``."""
        self._flush()
        if self._found:
            found = torch.unique(torch.cat(self._found))
            return merge_sorted(self._visible.to(found.device), found)
        return self._visible

    def record(self, sample_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Remember that ``mask[i, c]`` makes class c of ``sample_ids[i]`` positive from the next epoch on."""
        self._queued.append((sample_ids.to(mask.device).long(), mask))
        if len(self._queued) >= self.FLUSH_STEPS:
            self._flush()

    def _flush(self) -> None:
        if not self._queued:
            return
        ids = torch.cat([i for i, _ in self._queued])
        mask = torch.cat([m for _, m in self._queued]) & (ids >= 0)[:, None]   # placeholders carry id -1
        self._queued = []
        classes = torch.arange(self.num_classes, device=mask.device)
        self._found.append(torch.unique((ids[:, None] * self.num_classes + classes)[mask]))   # the host read

    def apply(self, labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Labels with every correction of these samples from earlier epochs set to 1 (a new tensor).

        No collective: the rank that reads a sample this epoch holds its corrections.
        """
        if self._visible.device != labels.device:
            self._visible = self._visible.to(labels.device)
        keys = self._visible
        if keys.numel() == 0:
            return labels.clone()
        classes = torch.arange(self.num_classes, device=labels.device)
        wanted = sample_ids.to(labels.device).long()[:, None] * self.num_classes + classes
        at = torch.searchsorted(keys, wanted).clamp(max=keys.numel() - 1)
        return labels.masked_fill(keys[at] == wanted, POSITIVE)

    def begin_epoch(self, readers: SampleReaders | None = None) -> None:
        """Send every key to the rank that reads its sample in the coming epoch (collective), and make the
        corrections found so far visible to :meth:`apply`. ``readers`` may be None in a world of one."""
        from bgtrain.collectives import all_to_all_rows, is_distributed
        keys = self.keys()
        if is_distributed():
            if readers is None:
                raise ValueError("CorrectionStore.begin_epoch: several ranks need the epoch's sample readers")
            keys = torch.sort(all_to_all_rows(keys, readers.rank_of(keys // self.num_classes))).values
        self._visible, self._found = keys, []

    def state_dict(self) -> dict:
        """Every rank's keys on rank 0, the checkpoint writer, in rank order (each rank's part sorted); the other
        ranks' ``keys`` are empty. Collective. No rank but the writer ever holds the whole store.
        """
        from bgtrain.collectives import gather_rows
        gathered = gather_rows(self.keys().cpu())
        return {"keys": gathered if gathered is not None else torch.empty(0, dtype=torch.int64),
                "num_classes": self.num_classes}

    def load_state_dict(self, state: dict) -> None:
        """This rank's contiguous share of a checkpoint's keys, visible at once; :meth:`begin_epoch` routes them.

        Also reads checkpoints from before the keys, which kept (sample, class) pairs.
        """
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"correction store has {state['num_classes']} classes, model has {self.num_classes}")
        if "pairs" in state:
            pairs = state["pairs"].long().reshape(-1, 2)
            keys = torch.unique(pairs[:, 0] * self.num_classes + pairs[:, 1])
        else:
            keys = state["keys"].long()
        n = keys.numel()
        share = keys[n * self.rank // self.world: n * (self.rank + 1) // self.world]
        # A checkpoint written by one rank is sorted already: a linear check saves the sort.
        self._visible = share.clone() if bool((share[1:] > share[:-1]).all()) else torch.sort(share).values
        self._found, self._queued = [], []


def merge_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sorted union of two sorted unique 1-D tensors, in time linear in ``a`` (no sort of the whole)."""
    if a.numel() == 0 or b.numel() == 0:
        return b if a.numel() == 0 else a
    at = torch.searchsorted(a, b)
    fresh = a[at.clamp(max=a.numel() - 1)] != b
    b, at = b[fresh], at[fresh]
    out = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    from_b = at + torch.arange(b.numel(), device=a.device)   # b[i] lands after the at[i] smaller keys of a
    keep_a = torch.ones(out.numel(), dtype=torch.bool, device=a.device)
    keep_a[from_b] = False
    out[from_b] = b
    out[keep_a] = a
    return out
