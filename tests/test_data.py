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


def test_loader_processes_end_when_their_rank_is_killed(smoke_shards):
    """A SIGKILLed rank leaves no loader process behind, holding its memory and its stdout (torchrun's log pipe)."""
    import signal
    import subprocess
    import sys

    import psutil
    script = ("import sys, torch\n"
              "from bgtrain.config import DataConfig\n"
              "from bgtrain.data import build_loader\n"
              "from bgtrain.distributed import WorldInfo\n"
              f"cfg = DataConfig(shards={str(smoke_shards)!r}, image_size=32, batch_size=8, workers=2)\n"
              "loader = build_loader(cfg, 'train', WorldInfo(0, 1), torch.device('cpu'), train=True, seed=0)\n"
              "batches = iter(loader)\n"
              "next(batches)\n"
              "print('reading', flush=True)\n"
              "sys.stdin.read()\n")
    rank = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert rank.stdout.readline().strip() == "reading"
        started = psutil.Process(rank.pid).children(recursive=True)
        assert sum("forkserver" in " ".join(p.cmdline()) for p in started) == 3, "the server and its 2 loaders"
        rank.send_signal(signal.SIGKILL)
        rank.wait(timeout=60)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert alive == [], [p.cmdline() for p in alive]
        assert rank.stdout.read() == "", "something still holds the rank's stdout"
    finally:
        rank.kill()


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


def _normalise_before_the_cache(images, device, dtype, channels_last, flip):
    """normalise as it was before its constants were cached and its flips became one select: the bit reference."""
    from bgtrain.data.common import IMAGENET_MEAN, IMAGENET_STD
    src = images.to(device)
    b, h, w, c = src.shape
    x = torch.empty((b, h, w, c), dtype=torch.float32, device=device)
    for i, mirrored in enumerate(flip.tolist()):
        x[i].copy_(src[i].flip(1) if mirrored else src[i])
    std = torch.tensor(IMAGENET_STD, device=device)
    x.view(b, h, w * c).mul_((1.0 / (255.0 * std)).repeat(w)).sub_(
        (torch.tensor(IMAGENET_MEAN, device=device) / std).repeat(w))
    x = x.permute(0, 3, 1, 2).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


@pytest.mark.parametrize("width", [9, 16])
def test_normalise_with_mixed_flips_is_the_plain_formula_and_bit_identical_to_the_row_loop(width):
    """One select over a CPU flip mask, cached constants: (x/255 - mean)/std with flipped rows, bit-identical."""
    from bgtrain.data.common import IMAGENET_MEAN, IMAGENET_STD, normalise
    images = torch.randint(0, 256, (6, 5, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    flip = torch.tensor([False, True, True, False, True, False])
    for dtype, channels_last in [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)]:
        for _ in range(2):  # the second call reads the cached constants
            out = normalise(images, CPU, dtype, channels_last, flip)
            assert torch.equal(out, _normalise_before_the_cache(images, CPU, dtype, channels_last, flip))
    out = normalise(images, CPU, torch.float32, True, flip)
    x = images.permute(0, 3, 1, 2).float()
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x / 255 - mean) / std, rtol=0, atol=1e-6)
    assert torch.equal(out[~flip], normalise(images[~flip], CPU, torch.float32, True))
    assert torch.equal(out[flip], normalise(images[flip].flip(2), CPU, torch.float32, True))


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
    assert loader.counts() == {"samples": 12, "corrupt": 1, "padding": 0, "retries": 0}
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


def test_entry_points_put_large_cpu_tensors_on_huge_pages_unless_told_otherwise(tmp_path):
    """The CLIs set THP_MEM_ALLOC_ENABLE before torch is imported; importing bgtrain sets nothing."""
    import os
    import subprocess
    import sys
    # A meta-path finder that reports the setting at the moment torch is first imported, and ends the process
    # there: what happens after is not this test's business, and importing torch four times costs seconds.
    spy = ("import os, runpy, sys\n"
           "class Spy:\n"
           "    def find_spec(self, name, path=None, target=None):\n"
           "        if name == 'torch':\n"
           "            print('at torch import:', os.environ.get('THP_MEM_ALLOC_ENABLE'), flush=True)\n"
           "            os._exit(0)\n"
           "sys.meta_path.insert(0, Spy())\n"
           "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
           "runpy.run_module(sys.argv[0], run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    cases = [("bgtrain.train", None, "1"), ("bgtrain.train", "0", "0"), ("bgtrain.explain", None, "1"),
             ("bgtrain.bench", None, "1")]
    from tests.conftest import REPO
    args = {"bgtrain.train": ["--config", str(REPO / "configs" / "smoke.yaml"), "data.shards=/nonexistent",
                              f"out_dir={tmp_path / 'run'}"],
            "bgtrain.explain": ["overlay", "--help"],
            "bgtrain.bench": ["loader", "--help"]}
    # started together: each one spends its seconds starting python
    procs = [subprocess.Popen([sys.executable, "-c", spy, module, *args[module]], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True,
                              env=env if given is None else {**env, "THP_MEM_ALLOC_ENABLE": given})
             for module, given, _ in cases]
    for proc, (module, given, expected) in zip(procs, cases):
        out = proc.communicate(timeout=300)[0]
        assert f"at torch import: {expected}" in out, (module, given, out[-500:])
    plain = "import bgtrain, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    assert subprocess.run([sys.executable, "-c", plain], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "None"



# --- the epoch plan in whole batches (issue: balanced epochs at cluster scale) ---------------------------------------

def _shards(n: int, size: int = 2000) -> tuple[int, ...]:
    return tuple([size] * (n // size) + ([n % size] if n % size else []))


def check_plan(plan, sizes: tuple[int, ...]) -> None:
    """The plan's promises, checked from its pieces and rows (no tar needed)."""
    import math
    n, w, k, b, s = sum(sizes), plan.world, plan.workers, plan.batch_size, plan.steps_per_epoch
    assert s <= math.ceil(n / (w * b)) + 1
    # coverage: the slots' pieces tile every shard exactly once
    pieces = sorted((p.shard, p.start, p.stop) for slot in plan.slots for p in slot if len(p))
    covered = {i: 0 for i in range(len(sizes))}
    for shard, start, stop in pieces:
        assert start == covered[shard], f"shard {shard}: gap or overlap at {start}"
        covered[shard] = stop
    assert covered == dict(enumerate(sizes))
    for rank in range(w):
        rows = plan.rows[rank]
        assert len(rows) == s and all(0 <= r <= b for r in rows)
        for worker in range(k):
            batches = plan.slot_batches(rank, worker)
            assert sum(batches) == sum(len(p) for p in plan.units(rank, worker)), "a slot reads what it yields"
            if n >= w * k * b and (b > 1 or n % w == 0):  # the documented exceptions: tiny splits, batch size 1
                assert all(batches), f"no batch made only of padding: {sizes, w, k, b}"
            if k > 1 or n >= w * ((s - 1) * b + 1):
                assert all(x == b for x in batches[:-1]), f"slot ({rank}, {worker}): a partial batch before its last"
        if n >= w * ((s - 1) * b + 1):
            assert sum(0 < r < b for r in rows) <= 1, f"rank {rank}: more than one partial batch"
    sums = [sum(r) for r in plan.rows]
    assert max(sums) - min(sums) <= 1, "ranks differ by at most one sample"


@pytest.mark.parametrize("name,sizes,world,workers,batch", [
    ("VOC 1 GPU x 8 workers, B 16", _shards(4574), 1, 8, 16),
    ("COCO 8 GPUs x 8 workers, B 2", _shards(65665), 8, 8, 2),
    ("OpenImages 64 GPUs x 10 workers, B 16", _shards(1_700_000), 64, 10, 16),
    ("one shard of 60,000 and 3,000 of 37", (60000,) + (37,) * 3000, 8, 8, 16),
    ("the same on 64 x 10", (60000,) + (37,) * 3000, 64, 10, 16),
    ("fewer samples than slots", (5, 3), 2, 4, 4),
    ("one shard", (1000,), 4, 8, 16),
])
def test_plan_runs_the_ideal_steps_per_epoch_at_cluster_scale(name, sizes, world, workers, batch):
    import math

    from bgtrain.data.plan import plan_sizes
    plan = plan_sizes(sizes, seed=0, epoch=3, world=world, workers=workers, batch_size=batch, shuffle=True)
    check_plan(plan, sizes)
    assert plan.steps_per_epoch == math.ceil(sum(sizes) / (world * batch)), name


def test_plan_coverage_equals_a_brute_force_enumeration():
    """Every small case: each rank reads exactly its DALI-style range of the shuffled sequence, once."""
    import itertools
    import math

    from bgtrain.data.plan import plan_sizes
    for sizes in [(1,), (3,), (7, 2), (5, 5, 5), (1, 1, 1, 1, 9), (13, 4, 0, 6)]:
        for world, workers, batch in itertools.product((1, 2, 3, 4), (0, 1, 2, 3), (1, 2, 3, 5)):
            plan = plan_sizes(sizes, seed=1, epoch=2, world=world, workers=workers, batch_size=batch, shuffle=True)
            check_plan(plan, sizes)
            # brute force: list the shuffled sequence sample by sample and cut it as DALI does
            sequence = [(s, i) for s in plan.order for i in range(sizes[s])]
            n = len(sequence)
            for rank in range(world):
                want = sequence[n * rank // world: n * (rank + 1) // world]
                got = [(p.shard, i) for w in range(plan.workers) for p in plan.units(rank, w)
                       for i in range(p.start, p.stop)]
                assert got == want, (sizes, world, workers, batch, rank)
            assert plan.steps_per_epoch == math.ceil(n / (world * batch))
            assert all(plan.step_has_data(s) for s in range(plan.steps_per_epoch))


def test_plan_with_one_worker_splits_a_full_batch_rather_than_pad_a_whole_one():
    from bgtrain.data.plan import batch_rows
    # 2 ranks, 33 samples, B 16: rank 1 holds 16 samples for 2 steps; its slot ends with 15 and 1
    assert batch_rows(17, 2, 16) == (16, 1) and batch_rows(16, 2, 16) == (15, 1)
    assert batch_rows(16, 2, 16, pad_at_end=True) == (16, 0), "DALI fills each batch before the next"
    assert batch_rows(3, 5, 4) == (1, 1, 1, 0, 0), "fewer samples than steps: padding only at the end"


def test_plan_cli_works_from_the_manifest_alone(tmp_path):
    import json
    import sys

    from tests.conftest import run_together
    sizes = _shards(65665)
    shards = [{"name": shard_name("train", i), "num_samples": n} for i, n in enumerate(sizes)]
    write_json_atomic(tmp_path / "manifest.json", {
        "format": "bgtrain-shards/1", "dataset": "coco", "classes": [str(i) for i in range(80)],
        "splits": {"train": {"num_samples": sum(sizes), "shards": shards, "rest": {"observed": -1, "full": 0}}}})
    cmd = [sys.executable, "-m", "bgtrain.data", "plan", "--shards", str(tmp_path), "--world", "8", "--workers", "8",
           "--batch-size", "2"]
    procs = run_together([cmd + ["--json"], cmd, [sys.executable, "-m", "bgtrain.data", "plan", "--help"]])
    assert [p.returncode for p in procs] == [0, 0, 0], [p.stderr[-500:] for p in procs]
    as_json, table, help_text = (p.stdout for p in procs)
    assert json.loads(as_json) == {"steps_per_epoch": 4105, "ideal_steps": 4105, "overhead": 1.0,
                                   "padded_samples": 8 * 4105 * 2 - 65665, "samples": 65665}
    assert "steps per epoch" in table and "4,105" in table
    assert "example:" in help_text


# --- the batch contract: valid rows first, step_has_data from the plan ------------------------------------------------

def test_valid_rows_come_first_and_step_has_data_agrees_on_every_rank(smoke_shards):
    world, cfg = 3, data_cfg(smoke_shards, workers=2)
    plans, per_rank = [], []
    for rank in range(world):
        loader = build_loader(cfg, "train", WorldInfo(rank, world), CPU, train=True, seed=0)
        loader.set_epoch(4)
        plans.append(loader.plan())
        batches = list(loader)
        for b in batches:
            assert b.valid[: b.num_valid].all() and not b.valid[b.num_valid:].any()
            assert (b.sample_id[: b.num_valid] >= 0).all()
        per_rank.append([(b.step_has_data, b.num_valid) for b in batches])
        assert [b.num_valid for b in batches] == list(plans[-1].rows[rank]), "clean shards: real rows are valid"
    assert all(p == plans[0] for p in plans), "every rank computes the same plan"
    steps = len(per_rank[0])
    for step in range(steps):
        flags = {per_rank[r][step][0] for r in range(world)}
        assert flags == {any(per_rank[r][step][1] > 0 for r in range(world))}
    assert steps == 9  # ceil(200 / (3 * 8))


def _shard_with_a_bad_sample(tmp_path, smoke_shards, n: int = 12, bad: int = 5):
    import json
    import tarfile
    manifest = json.loads((smoke_shards / "manifest.json").read_text())
    (tmp_path / "train").mkdir()
    writer = ShardWriter(tmp_path / "train" / shard_name("train", 0))
    with tarfile.open(smoke_shards / "train" / "train-000000.tar") as t:
        jpeg = t.extractfile("train_000000000.jpg").read()
    for sid in range(n):
        data = b"<html>not a jpeg</html>" if sid == bad else jpeg
        writer.write(sample_key("train", sid), data, SampleLabels(sid, [sid % 10], [], [sid % 10], []),
                     manifest["classes"])
    entry = writer.close()
    manifest["splits"] = {"train": {"num_samples": n, "shards": [entry], "rest": {"observed": -1, "full": 0}}}
    write_json_atomic(tmp_path / "manifest.json", manifest)
    return tmp_path / "train" / entry["name"]


def test_a_corrupt_row_moves_behind_the_valid_ones(tmp_path, smoke_shards):
    _shard_with_a_bad_sample(tmp_path, smoke_shards)
    cfg = data_cfg(tmp_path, workers=0, eval_batch_size=4, max_corrupt_fraction=0.5)
    loader = build_loader(cfg, "train", WorldInfo(), CPU, train=False, seed=0)
    batches = list(loader)
    assert batches[1].num_valid == 3 and batches[1].sample_id.tolist()[:3] == [4, 6, 7]
    assert batches[1].valid.tolist() == [True, True, True, False]
    assert loader.counts() == {"samples": 12, "corrupt": 1, "padding": 0, "retries": 0}


# --- counts and refusals (issue: no silent wrong results) ------------------------------------------------------------

def test_counts_give_samples_and_padding_of_the_pass_and_reset_each_epoch(smoke_shards):
    sizes = []
    for rank in range(3):
        loader = build_loader(data_cfg(smoke_shards), "train", WorldInfo(rank, 3), CPU, train=True, seed=0)
        loader.set_epoch(1)
        assert loader.counts() == {"samples": 0, "corrupt": 0, "padding": 0, "retries": 0}
        list(loader)
        c = loader.counts()
        assert c["samples"] + c["padding"] == 9 * 8 and c["corrupt"] == 0
        sizes.append(c["samples"])
        loader.set_epoch(2)
        assert loader.counts()["samples"] == 0
    assert sorted(sizes) == [66, 67, 67]


def test_too_many_corrupt_samples_stop_the_pass_naming_the_shard(tmp_path, smoke_shards):
    from shards.format import ShardError
    tar = _shard_with_a_bad_sample(tmp_path, smoke_shards)
    loader = build_loader(data_cfg(tmp_path, workers=0, batch_size=4), "train", WorldInfo(), CPU, train=True, seed=0)
    with pytest.raises(ShardError) as err:
        list(loader)
    message = str(err.value)
    assert str(tar) in message and "train_000000005" in message and "data.max_corrupt_fraction" in message
    assert "\n" not in message


def _copy_shards(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("recorded", [True, False])
def test_a_truncated_tar_is_refused_before_reading(tmp_path, smoke_shards, recorded):
    import json

    from shards.format import ShardError
    root = _copy_shards(smoke_shards, tmp_path / "copy")
    manifest = json.loads((root / "manifest.json").read_text())
    if not recorded:  # an older manifest without sizes: the index tells where the data ends
        for shard in manifest["splits"]["train"]["shards"]:
            shard.pop("bytes", None)
        write_json_atomic(root / "manifest.json", manifest)
    tar = root / "train" / manifest["splits"]["train"]["shards"][1]["name"]
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    loader = build_loader(data_cfg(root, workers=0), "train", WorldInfo(), CPU, train=True, seed=0)
    with pytest.raises(ShardError, match=str(tar)):
        list(loader)


def test_manifest_records_tar_sizes(smoke_shards):
    import json
    manifest = json.loads((smoke_shards / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        assert shard["bytes"] == (smoke_shards / "train" / shard["name"]).stat().st_size


@pytest.mark.parametrize("name", ["../../outside.tar", "../../../etc/passwd", "/etc/passwd", "sub/../../x.tar"])
def test_a_manifest_path_outside_the_shard_folder_is_refused(tmp_path, smoke_shards, name):
    import json

    from shards.format import ShardError, read_manifest
    root = _copy_shards(smoke_shards, tmp_path / "copy")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name
    write_json_atomic(root / "manifest.json", manifest)
    for read in (lambda: read_manifest(root), lambda: split_info(root, "train", "observed")):
        with pytest.raises(ShardError, match=f"{name!r}.*leaves the shard folder|{name!r} must be a file name"):
            read()
    manifest["splits"]["train"]["shards"][0]["name"] = "train-000000.tar"
    manifest["index"] = {"train": "../../index.jsonl"}
    write_json_atomic(root / "manifest.json", manifest)
    with pytest.raises(ShardError, match="leaves the shard folder"):
        read_manifest(root)


@pytest.mark.parametrize("text,why", [("{not json", "not valid JSON"), ("[]", "expected a JSON object, got list"),
                                      ('{"format": "bgtrain-shards/1", "classes": [], "splits": []}', "'splits'")])
def test_a_garbage_manifest_is_one_clear_error_naming_the_file(tmp_path, text, why):
    from shards.format import ShardError, read_manifest
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ShardError) as err:
        read_manifest(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "manifest.json")) and why in str(err.value)
    assert "\n" not in str(err.value)


# --- resume with slots that start mid-shard ---------------------------------------------------------------------------

@pytest.mark.parametrize("world,rank,workers,stop", [(3, 1, 3, 2), (2, 1, 2, 5)])
def test_resume_mid_epoch_with_mid_shard_slots_sees_the_rest_exactly(smoke_shards, world, rank, workers, stop):
    cfg = data_cfg(smoke_shards, workers=workers)
    info = WorldInfo(rank, world)

    def run(batches_done=0, limit=None):
        loader = build_loader(cfg, "train", info, CPU, train=True, seed=0)
        loader.set_epoch(3, batches_done)
        out = []
        for b in loader:
            out.append(b.sample_id.tolist())
            if limit and len(out) == limit:
                break
        return out

    reference = run()
    assert any(p.start > 0 for w in range(workers) for p in build_loader(cfg, "train", info, CPU, True, 0)
               .plan().units(rank, w)), "some slot starts mid-shard"
    assert run(limit=stop) + run(batches_done=stop) == reference
