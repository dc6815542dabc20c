"""Label encoding, partial-label simulation, and the LL-Cp correction store.

Labels are signed int8: 1 known positive, 0 known negative, -1 unknown. At OpenImages scale a dense
matrix does not fit, so samples carry id lists and dense rows are built per batch on the device.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

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
    """Permanent label corrections (LL-Cp), kept by LL-Cp's criterion in the training processes, sharded by id.

    The reference keeps them in a numpy array inside the dataset, which persistent loader workers never
    see again. Here rank ``r`` owns the sample ids with ``id % world == r``. Corrections found on any
    rank are all-gathered (a handful per step) and kept by their owner; to label a batch every rank
    asks the owners for its sample ids. The whole store goes into checkpoints, so it survives restarts
    and a change of world size.
    """

    def __init__(self, num_classes: int, rank: int = 0, world: int = 1) -> None:
        self.num_classes, self.rank, self.world = num_classes, rank, world
        self._owned: dict[int, set[int]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._owned.values())

    def _keep(self, pairs: torch.Tensor) -> None:
        for sid, cls in pairs.tolist():
            if sid % self.world == self.rank:
                self._owned.setdefault(sid, set()).add(cls)

    def record(self, sample_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Remember that ``mask[i, c]`` makes class c of ``sample_ids[i]`` positive from now on."""
        from bgtrain.distributed import all_gather_rows
        rows, cols = mask.nonzero(as_tuple=True)
        pairs = torch.stack([sample_ids.to(mask.device)[rows].long(), cols.long()], 1)
        self._keep(all_gather_rows(pairs).cpu())

    def apply(self, labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Labels with every stored correction of these samples set to 1 (a new tensor)."""
        from bgtrain.distributed import all_gather_rows
        wanted = set(all_gather_rows(sample_ids.long().to(labels.device)).cpu().tolist())
        mine = [(sid, c) for sid in sorted(wanted) for c in sorted(self._owned.get(sid, ()))]
        local = torch.tensor(mine, dtype=torch.long, device=labels.device).reshape(-1, 2)
        found = all_gather_rows(local)
        if found.numel() == 0:
            return labels.clone()
        position = {sid: i for i, sid in enumerate(sample_ids.tolist())}
        hits = [(position[s], c) for s, c in found.tolist() if s in position]
        out = labels.clone()
        if hits:
            idx = torch.tensor(hits, dtype=torch.long, device=labels.device)
            out[idx[:, 0], idx[:, 1]] = POSITIVE
        return out

    def state_dict(self) -> dict:
        """Every rank's corrections as one (K, 2) int64 tensor of (sample id, class); collective."""
        from bgtrain.distributed import all_gather_rows
        mine = sorted((s, c) for s, cs in self._owned.items() for c in cs)
        local = torch.tensor(mine, dtype=torch.long).reshape(-1, 2)
        return {"pairs": all_gather_rows(local), "num_classes": self.num_classes}

    def load_state_dict(self, state: dict) -> None:
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"correction store has {state['num_classes']} classes, model has {self.num_classes}")
        self._owned = {}
        self._keep(state["pairs"])
