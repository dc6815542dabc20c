"""LL-Cp's correction store as it was before the per-epoch design (git 61a722d, bgtrain/labels.py), kept as the
independent reference of the equality tests: a dict of sets owned by ``id % world``, with three variable-size
all-gathers per step and a state gathered to every rank. Only ``begin_epoch`` is new: it does nothing."""
from __future__ import annotations

import torch
import torch.distributed as dist

POSITIVE = 1


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """bgtrain.distributed.all_gather_rows as it was: a size round, then a padded all_gather."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class ReferenceCorrectionStore:
    def __init__(self, num_classes: int, rank: int = 0, world: int = 1) -> None:
        self.num_classes, self.rank, self.world = num_classes, rank, world
        self._owned: dict[int, set[int]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._owned.values())

    def _keep(self, pairs: torch.Tensor) -> None:
        for sid, cls in pairs.tolist():
            if sid % self.world == self.rank:
                self._owned.setdefault(sid, set()).add(cls)

    def begin_epoch(self, readers: object = None) -> None:
        pass

    def record(self, sample_ids: torch.Tensor, mask: torch.Tensor) -> None:
        rows, cols = mask.nonzero(as_tuple=True)
        pairs = torch.stack([sample_ids.to(mask.device)[rows].long(), cols.long()], 1)
        self._keep(all_gather_rows(pairs).cpu())

    def apply(self, labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
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
        mine = sorted((s, c) for s, cs in self._owned.items() for c in cs)
        local = torch.tensor(mine, dtype=torch.long).reshape(-1, 2)
        return {"pairs": all_gather_rows(local), "num_classes": self.num_classes}

    def load_state_dict(self, state: dict) -> None:
        self._owned = {}
        self._keep(state["pairs"])
