"""``loss.large_loss_over``: ``global`` selects over every rank's batch exactly what one rank selects on the whole
batch (ties and partial batches included), with one all-gather and no host read; ``rank`` is the rule as it was."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bgtrain.losses import large_loss_k, large_loss_output, select_large_losses
from bgtrain.losses.criterion import LargeLossCriterion
from bgtrain.losses.large_loss import large_loss_k_tensor
from tests.conftest import free_port, join_gloo_group

CLASSES, DELTA = 7, 0.03
# (rows of each of the 4 ranks, the per-rank batch size): even, a partial last batch, a rank without rows
SPLITS = [((4, 4, 4, 4), 4), ((5, 5, 5, 2), 5), ((6, 6, 5, 0), 6)]
CASES = [(scheme, epoch) for scheme in ("LL-R", "LL-Ct", "LL-Cp") for epoch in (1, 2, 4)]
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def whole_batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits on a coarse grid (many exactly tied losses) and single-positive-like labels (+1 / 0 / -1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-4, 5, (rows, CLASSES), generator=g).float() / 2
    labels = torch.full((rows, CLASSES), -1, dtype=torch.int8)
    labels[torch.arange(rows), torch.arange(rows) % CLASSES] = 1
    labels[torch.rand((rows, CLASSES), generator=g) < 0.15] = 0
    return logits, labels


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    join_gloo_group(rank, world, port)
    import torch.distributed as dist
    results: dict[str, list] = {}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(*_args, **_kwargs):
        raise AssertionError("a host read inside the global large-loss selection")

    try:
        for s, (split, batch_rows) in enumerate(SPLITS):
            logits, labels = whole_batch(sum(split), seed=s)
            start = sum(split[:rank])
            mine = slice(start, start + split[rank])
            for scheme, epoch in CASES:
                criterion = LargeLossCriterion(scheme, DELTA, CLASSES, "global", batch_rows)
                for name in HOST_READS:
                    setattr(torch.Tensor, name, refuse)
                try:
                    out = criterion(logits[mine], labels[mine], epoch)
                finally:
                    for name, fn in originals.items():
                        setattr(torch.Tensor, name, fn)
                if scheme == "LL-Cp":  # the correction store gets this rank's selected entries, as with `rank`
                    assert out.corrections is not None and torch.equal(out.corrections, out.selected)
                    criterion.after_step(out, torch.arange(start, start + split[rank]))
                    assert len(criterion.store) == int(out.selected.sum())  # type: ignore[arg-type]
                results[f"{s}/{scheme}/{epoch}"] = out.selected.int().tolist()
        Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed  # four gloo ranks
def test_global_selection_on_four_ranks_equals_one_rank_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    differs = 0
    for s, (split, _) in enumerate(SPLITS):
        logits, labels = whole_batch(sum(split), seed=s)
        for scheme, epoch in CASES:
            key = f"{s}/{scheme}/{epoch}"
            got = torch.tensor([row for r in ranks for row in r[key]], dtype=torch.bool).reshape(-1, CLASSES)
            expected = large_loss_output(logits, labels, scheme, epoch, DELTA).selected
            assert torch.equal(got, expected), key
            k = large_loss_k(scheme, sum(split), CLASSES, epoch, DELTA)
            assert int(got.sum()) >= min(k, int((labels == -1).sum())), key  # ties can only add entries
            per_rank = sum(large_loss_k(scheme, n, CLASSES, epoch, DELTA) for n in split if n)
            differs += per_rank != k
    assert differs  # the per-rank rule selects another count in some of these cases: the test can tell them apart


def test_rank_rule_is_unchanged_and_global_on_one_process_equals_it():
    logits, labels = whole_batch(16, seed=9)
    entry = torch.nn.functional.binary_cross_entropy_with_logits(logits, (labels == 1).float(), reduction="none")
    for scheme, epoch in CASES:
        k = large_loss_k(scheme, 16, CLASSES, epoch, DELTA)
        by_rank = large_loss_output(logits, labels, scheme, epoch, DELTA)
        assert torch.equal(by_rank.selected, select_large_losses(entry, labels == -1, k))
        assert torch.equal(LargeLossCriterion(scheme, DELTA, CLASSES)(logits, labels, epoch).selected,
                           by_rank.selected)
        one = LargeLossCriterion(scheme, DELTA, CLASSES, "global", 16)(logits, labels, epoch)
        assert torch.equal(one.selected, by_rank.selected)
        assert torch.equal(one.loss, by_rank.loss)


def test_device_k_equals_the_host_k():
    for scheme in ("LL-R", "LL-Ct", "LL-Cp"):
        for delta in (0.001, 0.002, 0.005, 0.03, 0.1):
            for classes in (1, 7, 80, 5000):
                for epoch in (1, 2, 3, 10):
                    rows = torch.arange(0, 70)
                    got = large_loss_k_tensor(scheme, rows, classes, epoch, delta)
                    expected = [large_loss_k(scheme, n, classes, epoch, delta) for n in range(70)]
                    assert got.tolist() == expected, (scheme, delta, classes, epoch)
    assert large_loss_k("LL-Cp", 16, 5000, 2, 0.001) == 80 == math.ceil(16 * 5000 * 0.001)


def test_global_rule_refuses_a_missing_or_exceeded_batch_size():
    with pytest.raises(ValueError, match="batch"):
        LargeLossCriterion("LL-R", DELTA, CLASSES, "global", 0)
    logits, labels = whole_batch(8, seed=1)
    with pytest.raises(ValueError, match="exceed"):
        LargeLossCriterion("LL-R", DELTA, CLASSES, "global", 4)(logits, labels, 2)
    with pytest.raises(ValueError, match="rank or global"):
        LargeLossCriterion("LL-R", DELTA, CLASSES, "everywhere", 4)


@pytest.mark.distributed  # torchrun, two gloo ranks
def test_a_two_rank_run_with_the_global_rule_trains_and_keeps_corrections(smoke_shards, tmp_path):
    """The trainer path end to end: LL-Cp over the global batch, through epoch 2's selections, on two ranks."""
    import subprocess
    import sys

    from tests.conftest import REPO
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "bgtrain.train",
           "--config", str(REPO / "configs/smoke.yaml"), f"data.shards={smoke_shards}", f"out_dir={out}",
           "loss.scheme=LL-Cp", "loss.delta_rel=0.05", "loss.large_loss_over=global", "optim.epochs=2",
           "data.max_batches=2", "data.workers=0", "log_every=1", "checkpoint.every_steps=0", "eval.select_on=none",
           "log.tensorboard=false", "engine.timeout_s=300"]  # slack for a loaded machine
    env = {**os.environ, "COLUMNS": "400"}  # rank 0's console lines unwrapped
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "global batch 32 differs from optim.reference_batch 16" in proc.stderr
    train = [r for r in records if r["kind"] == "train"]
    assert [r["selected"] > 0 for r in train] == [False, False, True, True]  # epoch 1 is the warm-up
    assert train[-1]["corrections"] > 0
