"""A loader keeps its worker processes for the whole run (issue 24, item 3): a new epoch, a resumed pass and a
scoring pass re-plan inside the same processes and read exactly what a freshly built loader reads."""
from __future__ import annotations

from pathlib import Path

import torch

from bgtrain.config import DataConfig
from bgtrain.data import build_loader
from bgtrain.distributed import WorldInfo

CPU = torch.device("cpu")


def ids_of(loader, epoch: int, batches_done: int = 0) -> list[list[int]]:
    loader.set_epoch(epoch, batches_done)
    return [b.sample_id[: b.num_valid].tolist() for b in loader]


def worker_pids(loader) -> list[int]:
    return sorted(w.pid for w in loader.backend._batches._iterator._workers)


def test_epochs_and_resumed_passes_reuse_the_loader_processes_and_read_what_a_fresh_loader_reads(smoke_shards):
    cfg = DataConfig(shards=str(smoke_shards), image_size=32, batch_size=8, workers=2, shuffle_buffer=16)
    world = WorldInfo(1, 2)

    def fresh(epoch: int, batches_done: int = 0) -> list[list[int]]:
        return ids_of(build_loader(cfg, "train", world, CPU, train=True, seed=3), epoch, batches_done)

    kept = build_loader(cfg, "train", world, CPU, train=True, seed=3)
    first = ids_of(kept, 1)
    pids = worker_pids(kept)
    assert len(pids) == 2
    second = ids_of(kept, 2)
    resumed = ids_of(kept, 2, batches_done=3)
    assert worker_pids(kept) == pids, "a new pass started new loader processes"
    assert first == fresh(1) and second == fresh(2) and resumed == fresh(2, 3)
    assert first != second and resumed == second[3:]


def test_a_scoring_loader_gives_the_whole_split_in_order_on_every_pass(smoke_shards):
    cfg = DataConfig(shards=str(smoke_shards), image_size=32, batch_size=8, eval_batch_size=16, workers=2)
    loader = build_loader(cfg, "val", WorldInfo(0, 1), CPU, train=False, seed=0)
    passes = [sum(ids_of(loader, 1), []) for _ in range(3)]
    assert sorted(passes[0]) == list(range(50)) and passes[1] == passes[0] and passes[2] == passes[0]


def test_a_rank_touches_only_its_own_tars(smoke_shards, tmp_path):
    import shutil

    import pytest
    root = tmp_path / "shards"
    shutil.copytree(smoke_shards, root)
    cfg = DataConfig(shards=str(root), image_size=32, batch_size=8, workers=0)
    loaders = [build_loader(cfg, "train", WorldInfo(rank, 2), CPU, train=True, seed=3) for rank in range(2)]
    own = [{p.shard for p in loader.plan().units(rank, 0)} for rank, loader in enumerate(loaders)]
    only_rank1 = sorted(own[1] - own[0])
    assert only_rank1, "the plan gives rank 1 a tar of its own"
    missing = loaders[1].info.shard_paths[only_rank1[0]]
    Path(missing).unlink()
    assert sum(len(ids) for ids in ids_of(loaders[0], 1)) == loaders[0].plan().rank_samples(0)
    with pytest.raises(FileNotFoundError, match=f"^{missing}: listed in {root / 'manifest.json'} but missing$"):
        ids_of(loaders[1], 1)
