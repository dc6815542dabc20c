"""The WebDataset loader's epoch rules: exact coverage, equal batch counts, seeded order, resume."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from bgtrain.config import DataConfig
from bgtrain.data import build_loader
from bgtrain.data.common import split_info
from bgtrain.data.plan import plan_epoch
from bgtrain.distributed import WorldInfo
from shards.format import SampleLabels, ShardWriter, decode_labels, sample_key, shard_name, write_json_atomic

CPU = torch.device("cpu")


def data_cfg(root, **kw) -> DataConfig:
    base = dict(shards=str(root), image_size=32, batch_size=8, workers=2, shuffle_buffer=16)
    return DataConfig(**{**base, **kw})


def epoch_ids(cfg, world: int, epoch: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Valid sample ids per rank in order, and the batch count of each rank."""
    ids, counts = [], []
    for rank in range(world):
        loader = build_loader(cfg, "train", WorldInfo(rank, world), CPU, train=True, seed=seed)
        loader.set_epoch(epoch)
        rank_ids, n = [], 0
        for batch in loader:
            n += 1
            rank_ids += batch.sample_id[batch.valid].tolist()
        ids.append(rank_ids)
        counts.append(n)
    return ids, counts


@pytest.mark.parametrize("world", [2, 3])
def test_every_sample_once_per_epoch_and_equal_batch_counts(smoke_shards, world):
    ids, counts = epoch_ids(data_cfg(smoke_shards), world, epoch=1)
    flat = [i for r in ids for i in r]
    assert sorted(flat) == list(range(200)), "each training sample exactly once across ranks and workers"
    assert len(set(counts)) == 1, f"ranks disagree on batch count: {counts}"


def test_more_slots_than_shards_splits_shards_into_parts(smoke_shards):
    cfg = data_cfg(smoke_shards, workers=2)
    info = split_info(smoke_shards, "train", "observed")
    plan = plan_epoch(info, seed=0, epoch=1, world=3, workers=2, batch_size=8, shuffle=True)
    assert len(info.shard_sizes) == 4 and sum(len(s) > 0 for s in plan.slots) == 6
    ids, counts = epoch_ids(cfg, 3, epoch=1)
    assert sorted(i for r in ids for i in r) == list(range(200))


def test_epochs_differ_in_order_and_same_seed_repeats(smoke_shards):
    cfg = data_cfg(smoke_shards)
    first, _ = epoch_ids(cfg, 2, epoch=1)
    again, _ = epoch_ids(cfg, 2, epoch=1)
    second, _ = epoch_ids(cfg, 2, epoch=2)
    other_seed, _ = epoch_ids(cfg, 2, epoch=1, seed=7)
    assert first == again
    assert first != second
    assert first != other_seed


def test_resume_mid_epoch_sees_the_rest_exactly(smoke_shards):
    cfg = data_cfg(smoke_shards)
    world = WorldInfo(0, 1)
    full = build_loader(cfg, "train", world, CPU, train=True, seed=0)
    full.set_epoch(2)
    reference = [b.sample_id.tolist() for b in full]
    stopped = build_loader(cfg, "train", world, CPU, train=True, seed=0)
    stopped.set_epoch(2)
    head = []
    for batch in stopped:
        head.append(batch.sample_id.tolist())
        if len(head) == 5:
            break
    position = stopped.state_dict()
    assert position == {"epoch": 2, "batches_done": 5}
    resumed = build_loader(cfg, "train", world, CPU, train=True, seed=0)
    resumed.set_epoch(position["epoch"], position["batches_done"])
    tail = [b.sample_id.tolist() for b in resumed]
    assert head + tail == reference


def test_label_rows_match_what_was_written(smoke_shards):
    import tarfile
    written = {}
    for tar in sorted((smoke_shards / "train").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".lbl"):
                    lab = decode_labels(t.extractfile(m).read())
                    written[lab.sample_id] = lab
    for label_set in ("observed", "full"):
        loader = build_loader(data_cfg(smoke_shards, labels=label_set), "train", WorldInfo(), CPU, train=True, seed=0)
        loader.set_epoch(1)
        for batch in loader:
            for sid, row in zip(batch.sample_id[batch.valid].tolist(), batch.labels[batch.valid]):
                lab = written[sid]
                pos = lab.obs_pos if label_set == "observed" else lab.full_pos
                expected = np.full(10, -1 if label_set == "observed" else 0, np.int8)
                expected[list(pos)] = 1
                assert row.numpy().tolist() == expected.tolist()


def test_images_are_normalised_channels_last(smoke_shards):
    loader = build_loader(data_cfg(smoke_shards, eval_batch_size=8), "val", WorldInfo(), CPU, train=False, seed=0)
    batch = next(iter(loader))
    assert batch.image.shape == (8, 3, 32, 32)
    assert batch.image.is_contiguous(memory_format=torch.channels_last)
    assert -2.2 < batch.image.min() < 0 < batch.image.max() < 2.7


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False)])
def test_normalise_matches_the_plain_formula_and_mirrors_only_picked_rows(dtype, channels_last):
    from bgtrain.data.common import IMAGENET_MEAN, IMAGENET_STD, normalise
    images = torch.randint(0, 256, (5, 7, 9, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    flip = torch.tensor([True, False, False, True, False])
    out = normalise(images, CPU, dtype, channels_last, flip)
    mirrored = torch.stack([im.flip(1) if f else im for im, f in zip(images, flip)])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = (mirrored.permute(0, 3, 1, 2).double() / 255 - mean.double()) / std.double()
    assert out.shape == (5, 3, 7, 9) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.equal(images, before), "normalise must never write its input (it may be DALI's buffer)"
    torch.testing.assert_close(normalise(images, CPU, dtype, channels_last), normalise(
        images, CPU, dtype, channels_last, torch.zeros(5, dtype=torch.bool)), rtol=0, atol=0)


def test_corrupt_sample_is_skipped_and_counted(tmp_path, smoke_shards):
    import json
    manifest = json.loads((smoke_shards / "manifest.json").read_text())
    (tmp_path / "train").mkdir()
    names = manifest["classes"]
    writer = ShardWriter(tmp_path / "train" / shard_name("train", 0))
    good = (smoke_shards / "train" / "train-000000.tar")
    import tarfile
    with tarfile.open(good) as t:
        jpeg = t.extractfile("train_000000000.jpg").read()
    for sid in range(12):
        data = b"<html>not a jpeg</html>" if sid == 5 else jpeg
        writer.write(sample_key("train", sid), data, SampleLabels(sid, [sid % 10], [], [sid % 10], []), names)
    entry = writer.close()
    manifest["splits"] = {"train": {"num_samples": 12, "shards": [entry], "rest": {"observed": -1, "full": 0}}}
    write_json_atomic(tmp_path / "manifest.json", manifest)
    loader = build_loader(data_cfg(tmp_path, workers=0, batch_size=4, max_corrupt_fraction=0.1), "train", WorldInfo(),
                          CPU, train=True, seed=0)
    batches = list(loader)
    assert len(batches) == 3
    assert loader.counts() == {"samples": 12, "corrupt": 1, "padding": 0}
    seen = sorted(i for b in batches for i in b.sample_id[b.valid].tolist())
    assert seen == [i for i in range(12) if i != 5]


def test_resampled_epoch_has_its_nominal_length_and_equal_batch_counts(smoke_shards):
    import math
    cfg = data_cfg(smoke_shards, resampled=True, epoch_samples=150)
    ids, counts = epoch_ids(cfg, 2, epoch=1)
    per_slot = math.ceil(150 / (2 * 2 * 8))  # world 2 x 2 workers, batch 8
    assert counts == [per_slot * 2] * 2, "same nominal batch count on every rank"
    loader = build_loader(cfg, "train", WorldInfo(0, 2), CPU, train=True, seed=0)
    assert len(loader) == per_slot * 2
    assert all(len(r) == counts[0] * 8 for r in ids), "resampled batches are all valid, never padded"
    assert set(i for r in ids for i in r) <= set(range(200))


def test_resampled_draws_shards_with_replacement_per_epoch(smoke_shards):
    info = split_info(smoke_shards, "train", "observed")
    plans = [plan_epoch(info, seed=0, epoch=e, world=2, workers=2, batch_size=8, shuffle=True, epoch_samples=400)
             for e in (1, 1, 2)]
    drawn = [[u.shard for slot in p.slots for u in slot] for p in plans]
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2], "a function of (seed, epoch) only"
    assert max(Counter(drawn[0]).values()) > 1, "with replacement: some shard is drawn twice"
    assert all(sum(info.shard_sizes[u.shard] for u in slot) >= plans[0].batches_per_slot * 8
               for slot in plans[0].slots), "every slot holds its nominal share"


def test_resampled_needs_epoch_samples(smoke_shards):
    loader = build_loader(data_cfg(smoke_shards, resampled=True), "train", WorldInfo(), CPU, train=True, seed=0)
    with pytest.raises(ValueError, match="data.epoch_samples"):
        len(loader)


def test_entry_points_put_large_cpu_tensors_on_huge_pages_unless_told_otherwise():
    import os
    import subprocess
    import sys
    code = "import bgtrain, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "1"
    assert subprocess.run([sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                          capture_output=True, text=True, check=True).stdout.strip() == "0"
