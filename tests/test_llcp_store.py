"""LL-Cp's per-epoch correction store against the store it replaced (tests/reference_llcp.py).

The real criterion is driven through the real epoch plan on 1, 2 and 3 ranks (gloo), with logits that are a fixed
function of (sample, class, epoch), so every rank's batches, labels and losses are reproducible without a model.
Both stores must give bit-identical labels and losses at every step, with and without a checkpoint-and-resume in
the middle of an epoch and at an epoch's start, and the new store must make no collective inside a step.
"""
from __future__ import annotations

import json
import math
from itertools import accumulate
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bgtrain.data.plan import EpochPlan, plan_sizes, sample_readers
from bgtrain.labels import CorrectionStore, merge_sorted, single_positive
from bgtrain.losses.criterion import LargeLossCriterion
from tests.conftest import free_port, join_gloo_group
from tests.reference_llcp import ReferenceCorrectionStore

SHARD_SIZES = (13, 7, 11, 9, 10, 6)
CLASSES, BATCH, WORKERS, EPOCHS, SEED, DELTA = 6, 4, 2, 4, 5, 0.05
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "all_to_all", "gather",
               "broadcast", "barrier", "all_gather_object", "broadcast_object_list", "reduce", "scatter")


def step_ids(plan: EpochPlan, rank: int) -> list[list[int]]:
    """The sample ids of each of ``rank``'s steps: slot s % K yields step s, its batches cut in order."""
    offsets = [0, *accumulate(SHARD_SIZES)]
    per_slot = []
    for worker in range(plan.workers):
        ids = [offsets[p.shard] + i for p in plan.units(rank, worker) for i in range(p.start, p.stop)]
        ends = list(accumulate(plan.slot_batches(rank, worker)))
        per_slot.append([ids[a:b] for a, b in zip([0, *ends[:-1]], ends)])
    return [per_slot[s % plan.workers][s // plan.workers] for s in range(plan.steps_per_epoch)]


def observed_labels() -> torch.Tensor:
    full = (np.random.RandomState(3).rand(sum(SHARD_SIZES), CLASSES) < 0.4).astype(np.int8)
    full[np.arange(full.shape[0]), np.arange(full.shape[0]) % CLASSES] = 1
    return torch.from_numpy(single_positive(full))


def logits_of(ids: list[int], epoch: int) -> torch.Tensor:
    """A fixed function of (sample, class, epoch): what a model would say, without one."""
    sid = torch.tensor(ids, dtype=torch.float64)[:, None]
    cls = torch.arange(CLASSES, dtype=torch.float64)
    return (3 * torch.sin(sid * 7.31 + cls * 1.17 + epoch * 0.37)).float()


def make_criterion(kind: str, rank: int, world: int) -> LargeLossCriterion:
    criterion = LargeLossCriterion("LL-Cp", DELTA, CLASSES)
    if kind == "reference":
        criterion.store = ReferenceCorrectionStore(CLASSES, rank, world)  # type: ignore[assignment]
    return criterion


class Spy:
    """Counts torch.distributed collectives, split into those inside a training step and the others."""

    def __init__(self) -> None:
        self.in_step, self.calls = False, {"step": 0, "other": 0}
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                self.calls["step" if self.in_step else "other"] += 1
                return _original(*args, **kwargs)
            setattr(dist, name, counted)


def run_llcp(kind: str, rank: int, world: int, resume_at: tuple[int, int] | None, folder: Path) -> dict:
    """Four LL-Cp epochs; at ``resume_at`` = (epoch, step) the state goes through a checkpoint file into a fresh
    criterion, as a killed and restarted run's would. Returns every step's labels and loss, and the spy's counts."""
    spy = Spy()
    labels_all = observed_labels()
    criterion = make_criterion(kind, rank, world)
    steps = []
    for epoch in range(1, EPOCHS + 1):
        plan = plan_sizes(SHARD_SIZES, SEED, epoch, world, WORKERS, BATCH, shuffle=True)
        readers = sample_readers(plan, SHARD_SIZES)
        criterion.begin_epoch(lambda readers=readers: readers)
        for step, ids in enumerate(step_ids(plan, rank)):
            if (epoch, step) == resume_at:
                state = criterion.state_dict()
                if rank == 0:
                    torch.save(state, folder / f"{kind}.pt")
                if world > 1:
                    dist.barrier()
                criterion = make_criterion(kind, rank, world)
                criterion.load_state_dict(torch.load(folder / f"{kind}.pt", weights_only=True))
                criterion.begin_epoch(lambda readers=readers: readers)
            sample_ids = torch.tensor(ids, dtype=torch.long)
            spy.in_step = True
            labels = criterion.prepare_labels(labels_all[sample_ids], sample_ids)
            out = criterion(logits_of(ids, epoch), labels, epoch, None, sample_ids)
            criterion.after_step(out, sample_ids)
            spy.in_step = False
            steps.append([epoch, step, labels.tolist(), float(out.loss).hex(), out.selected.nonzero().tolist()])
    return {"steps": steps, "calls": spy.calls, "kept": criterion.corrections_kept()}


def _worker(rank: int, world: int, port: int, runs: list, folder: str) -> None:
    join_gloo_group(rank, world, port)
    try:
        for kind, resume_at in runs:
            result = run_llcp(kind, rank, world, tuple(resume_at) if resume_at else None, Path(folder))
            name = f"{kind}-{resume_at[0] if resume_at else 0}-{resume_at[1] if resume_at else 0}-rank{rank}.json"
            Path(folder, name).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


RUNS = [("reference", None), ("new", None), ("new", (3, 2)), ("new", (2, 0)), ("reference", (3, 2))]


def results(world: int, folder: Path) -> dict:
    """Every run of RUNS on ``world`` ranks: {(kind, resume epoch, resume step): [rank 0's result, ...]}."""
    if world == 1:
        return {(k, *(r or (0, 0))): [run_llcp(k, 0, 1, r, folder)] for k, r in RUNS}
    mp.spawn(_worker, args=(world, free_port(), RUNS, str(folder)), nprocs=world, join=True)
    return {(k, *(r or (0, 0))): [json.loads((folder / f"{k}-{(r or (0, 0))[0]}-{(r or (0, 0))[1]}-rank{rank}.json")
                                             .read_text()) for rank in range(world)] for k, r in RUNS}


def check_equal_to_reference(runs: dict, world: int) -> None:
    reference = runs[("reference", 0, 0)]
    corrections = sum(len(s[4]) for r in reference for s in r["steps"] if s[0] >= 2)
    assert corrections > 20, f"the scenario made only {corrections} corrections"
    # Corrections change later labels: the labels of epoch 4 are not those of epoch 1 for some sample.
    assert any(1 in sum(s[2], []) for r in reference for s in r["steps"]), "no positive label at all"
    for key in [("new", 0, 0), ("new", 3, 2), ("new", 2, 0), ("reference", 3, 2)]:
        for rank in range(world):
            got, want = runs[key][rank]["steps"], reference[rank]["steps"]
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g == w, f"{key} rank {rank}: epoch {w[0]} step {w[1]} differs from the reference"
    # The held corrections add up to the same total as the reference's owned ones.
    for key in [("new", 0, 0), ("new", 3, 2)]:
        assert sum(r["kept"] for r in runs[key]) == sum(r["kept"] for r in reference)
    for rank in range(world):
        for key in [("new", 0, 0), ("new", 3, 2), ("new", 2, 0)]:
            assert runs[key][rank]["calls"]["step"] == 0, f"{key} rank {rank}: a collective inside a step"
        if world > 1:  # the spy sees collectives: the new store's once per epoch, the old one's every step
            assert runs[("new", 0, 0)][rank]["calls"]["other"] > 0
            assert reference[rank]["calls"]["step"] > 0


def test_llcp_store_equals_the_reference_on_one_rank(tmp_path) -> None:
    check_equal_to_reference(results(1, tmp_path), 1)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_llcp_store_equals_the_reference_on_several_ranks(world: int, tmp_path) -> None:
    check_equal_to_reference(results(world, tmp_path), world)


# --- the store's parts ---

def test_sample_readers_name_the_rank_whose_plan_reads_each_sample() -> None:
    for world in (1, 2, 3, 5):
        plan = plan_sizes(SHARD_SIZES, SEED, 2, world, WORKERS, BATCH, shuffle=True)
        readers = sample_readers(plan, SHARD_SIZES)
        expected = np.full(sum(SHARD_SIZES), -1)
        for rank in range(world):
            for ids in step_ids(plan, rank):
                assert (expected[ids] == -1).all(), "a sample read twice in an exact epoch"
                expected[ids] = rank
        assert (expected >= 0).all()
        got = readers.rank_of(torch.arange(sum(SHARD_SIZES)))
        np.testing.assert_array_equal(got.numpy(), expected)


def test_sample_readers_refuse_a_resampled_plan() -> None:
    plan = plan_sizes(SHARD_SIZES, SEED, 1, 2, 1, BATCH, shuffle=True, epoch_samples=40)
    with pytest.raises(ValueError, match="resampled"):
        sample_readers(plan, SHARD_SIZES)


def test_corrections_become_visible_at_the_next_epoch_and_checkpoints_keep_them() -> None:
    store = CorrectionStore(num_classes=5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 2] = mask[2, 4] = mask[2, 0] = True
    store.record(torch.tensor([10, 11, 12]), mask)
    labels = torch.full((3, 5), -1, dtype=torch.int8)
    labels[1, 1] = 1
    later = torch.tensor([12, 99, 10])
    assert torch.equal(store.apply(labels, later), labels), "visible before the epoch ended"
    assert len(store) == 3
    store.begin_epoch()
    ref = labels.clone()
    ref[0, 4] = ref[0, 0] = ref[2, 2] = 1
    assert torch.equal(store.apply(labels, later), ref)
    assert labels[0, 4] == -1                                     # the input batch is not rewritten

    state = store.state_dict()
    assert state["keys"].tolist() == [10 * 5 + 2, 12 * 5 + 0, 12 * 5 + 4]
    fresh = CorrectionStore(num_classes=5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.apply(labels, later), ref)


def test_store_reads_checkpoints_that_kept_pairs_and_refuses_another_class_count() -> None:
    store = CorrectionStore(num_classes=4)
    store.load_state_dict({"pairs": torch.tensor([[8, 3], [3, 0], [3, 3]]), "num_classes": 4})
    out = store.apply(torch.full((2, 4), -1, dtype=torch.int8), torch.tensor([8, 3]))
    assert out.tolist() == [[-1, -1, -1, 1], [1, -1, -1, 1]]
    with pytest.raises(ValueError, match="5 classes, model has 4"):
        store.load_state_dict({"keys": torch.zeros(0, dtype=torch.long), "num_classes": 5})


def test_placeholder_rows_are_never_corrected_and_recording_flushes_in_bounded_steps() -> None:
    store = CorrectionStore(num_classes=3)
    for step in range(CorrectionStore.FLUSH_STEPS + 1):
        store.record(torch.tensor([step, -1]), torch.ones(2, 3, dtype=torch.bool))
    assert len(store._queued) == 1, "the queue is turned into keys every FLUSH_STEPS steps"
    assert len(store) == 3 * (CorrectionStore.FLUSH_STEPS + 1)   # the -1 rows kept nothing
    assert int(store.keys().min()) == 0


def test_a_resume_takes_a_contiguous_share_and_every_key_once(tmp_path) -> None:
    keys = torch.arange(0, 300, 7)
    shares = []
    for rank in range(3):
        store = CorrectionStore(num_classes=10, rank=rank, world=3)
        store.load_state_dict({"keys": keys, "num_classes": 10})
        shares.append(store.keys())
    assert torch.equal(torch.cat(shares), keys)
    assert all(abs(len(s) - len(keys) / 3) < 1 for s in shares)


def test_a_world_of_one_needs_no_readers() -> None:
    store = CorrectionStore(num_classes=2)
    store.record(torch.tensor([1]), torch.tensor([[False, True]]))
    store.begin_epoch(None)
    assert store.keys().tolist() == [3]


def test_merge_sorted_equals_the_sorted_union() -> None:
    g = torch.Generator().manual_seed(0)
    for n_a, n_b in [(0, 5), (5, 0), (50, 30), (1000, 1000), (3, 200)]:
        a = torch.unique(torch.randint(0, 400, (n_a,), generator=g))
        b = torch.unique(torch.randint(0, 400, (n_b,), generator=g))
        assert torch.equal(merge_sorted(a, b), torch.unique(torch.cat([a, b])))


def test_store_benchmark_reports_its_figures_and_the_baseline(capsys) -> None:
    from bgtrain.bench.__main__ import main as bench_main
    assert bench_main(["llcp", "--corrections", "2000", "--samples", "5000", "--classes", "40", "--batch", "4",
                       "--delta", "0.05", "--steps", "70", "--baseline-max", "2000"]) == 0
    setup, row = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert setup["corrections_per_step"] == math.ceil(4 * 40 * 0.05)
    assert row["corrections"] == 2000 and row["bytes_per_correction"] == 8.0
    assert row["baseline"]["bytes_per_correction"] > 0
    assert set(row["ratio_to_baseline"]) == {"bytes_per_correction", "save_s", "load_s"}
    assert all(row[k] >= 0 for k in ("record_us", "apply_us", "epoch_merge_s", "save_s", "load_s"))


def test_config_refuses_llcp_with_resampled_epochs(tmp_path) -> None:
    from bgtrain.config import ConfigError, load_config
    from tests.conftest import REPO
    with pytest.raises(ConfigError, match=r"smoke.yaml: data.resampled: LL-Cp needs exact epochs"):
        load_config(REPO / "configs/smoke.yaml", ["loss.scheme=LL-Cp", "data.resampled=true",
                                                  "data.epoch_samples=100"])
    assert load_config(REPO / "configs/smoke.yaml", ["loss.scheme=LL-R", "data.resampled=true",
                                                     "data.epoch_samples=100"]).data.resampled
