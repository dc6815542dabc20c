"""gpu_check's ``criteria`` check: LL-Cp and EM+APL steps and checkpoints with every collective on NCCL.

One lent GPU gives NCCL a world of one, where the collectives helpers skip the backend. The check runs under
:func:`bgtrain.collectives.force_collectives`, so NCCL gets every tensor a multi-GPU run would hand it: LL-Cp's
store gathered for a checkpoint, EM+APL's soft-negative table gathered while still on the CPU (the checkpoint at
the end of epoch 1, before its first lookup) and its per-step lookup. Every tensor helper also gets an input on
the CPU, the wrong side for NCCL, and must hand its result back there. ``--cpu-smoke`` runs it over gloo, world 2.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

SAMPLES, CLASSES, BATCH = 24, 7, 4


def helper_placement(device: torch.device) -> dict[str, bool]:
    """Each tensor helper on a CPU input and on a ``device`` input: right values, back on the input's device."""
    from bgtrain.collectives import (
        all_gather_fixed,
        all_gather_padded,
        all_reduce,
        all_to_all_rows,
        broadcast_tensor,
        gather_rows,
        rank_and_world,
    )

    rank, world = rank_and_world()
    ranks = torch.arange(1.0, world + 1)
    out: dict[str, bool] = {}
    for where in dict.fromkeys([torch.device("cpu"), device]):
        mine = torch.full((1,), rank + 1.0).to(where)
        to_first_and_last = all_to_all_rows(torch.full((2, 1), rank + 1.0).to(where), torch.tensor([0, world - 1]))
        received = ranks[:, None] if rank in (0, world - 1) else torch.empty(0, 1)
        gathered = gather_rows(mine)
        results = {
            "all_reduce": (all_reduce(mine.clone()), ranks.sum()[None]),
            "all_gather_fixed": (all_gather_fixed(mine), ranks[:, None]),
            "all_gather_padded": (all_gather_padded(mine, 2, 0.0), torch.stack([ranks, 0 * ranks], 1).flatten()),
            "broadcast_tensor": (broadcast_tensor(mine.clone()), torch.ones(1)),
            "all_to_all_rows": (to_first_and_last, received if world > 1 else torch.ones(2, 1)),
            "gather_rows": (gathered if gathered is not None else mine, ranks if rank == 0 else mine.cpu()),
        }
        for name, (got, want) in results.items():
            out[f"{name}@{where.type}"] = got.device == where and torch.equal(got.cpu(), want)
    return out


def criterion_round(scheme: str, device: torch.device) -> dict:
    """A criterion's checkpoint before its first step, two epochs of steps, and a checkpoint that reloads equal."""
    from bgtrain.collectives import broadcast_object, rank_and_world
    from bgtrain.config import LossConfig
    from bgtrain.data.plan import SampleReaders
    from bgtrain.losses import build_criterion
    from bgtrain.losses.em_apl import EmAplCriterion

    rank, world = rank_and_world()
    none = torch.empty(0, dtype=torch.int64)
    readers = SampleReaders(none, none, none, world)  # no plan: sample s is read by rank s % world

    def build():
        return build_criterion(LossConfig(scheme=scheme), "synthetic", SAMPLES, CLASSES, epochs=3, batch_rows=BATCH)

    crit = build()
    crit.state_dict()  # EM+APL: its table is still on the CPU here
    gen = torch.Generator().manual_seed(rank)
    ids = torch.arange(rank, SAMPLES, world)[:BATCH]
    labels = (torch.randint(0, 5, (ids.numel(), CLASSES), generator=gen) - 3).clamp(-1, 1).float()
    if isinstance(crit, EmAplCriterion):  # the pseudo-labelling pass at the end of the warm-up
        scores = torch.rand(ids.numel(), CLASSES, generator=gen)
        crit.end_epoch(crit.warmup, lambda: (scores.to(device), labels.to(device), ids.to(device)))
    losses = []
    for epoch in (2, 3):
        crit.begin_epoch(lambda: readers)
        batch_labels = crit.prepare_labels(labels.to(device), ids.to(device))
        logits = torch.randn(ids.numel(), CLASSES, generator=gen).to(device).requires_grad_(True)
        out = crit(logits, batch_labels, epoch, None, ids.to(device))
        out.loss.backward()
        crit.after_step(out, ids.to(device))
        losses.append(float(out.loss.detach()))
    state = broadcast_object(crit.state_dict())  # every rank reads the file that rank 0 writes
    again = build()
    again.load_state_dict(state)
    reloaded = again.state_dict()
    key = "corrections" if scheme == "LL-Cp" else "soft"
    saved = state[key]["keys"] if scheme == "LL-Cp" else state[key]
    kept = int(saved.numel()) if scheme == "LL-Cp" else int((saved >= 0).sum())
    # LL-Cp writes every rank's corrections into rank 0's state only, in rank order
    same = (torch.equal(torch.sort(saved).values, torch.sort(reloaded[key]["keys"]).values) or rank > 0
            if scheme == "LL-Cp" else torch.equal(saved, reloaded[key]))
    finite = all(x == x and abs(x) < float("inf") for x in losses)
    return {"scheme": scheme, "losses": losses, "entries_in_checkpoint": kept, "reloads_equal": same,
            "ok": finite and same}


def join_check_group(rank: int, world: int, port: int, cuda: bool) -> torch.device:
    """In a spawned check process: one thread, this rank's device, and an NCCL (CUDA) or gloo group on loopback."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    return device


def criteria_worker(rank: int, world: int, port: int, out_dir: str, cuda: bool) -> None:
    """One rank: the helpers' placement, then LL-Cp and EM+APL, every collective forced through the backend."""
    import torch.distributed as dist

    from bgtrain.collectives import force_collectives
    device = join_check_group(rank, world, port, cuda)
    try:
        with force_collectives():
            placement = helper_placement(device)
            schemes = [criterion_round(scheme, device) for scheme in ("LL-Cp", "EM-APL")]
        result = {"rank": rank, "backend": dist.get_backend(), "placement": placement, "criteria": schemes}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
