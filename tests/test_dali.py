"""The DALI backend (real CPU pipeline, ``device_id=None``) against the WebDataset backend, and GPU decoding.

Decode tolerance: both backends decode JPEGs with libjpeg-turbo (bit-identical here) and resize
bilinearly with antialiasing; DALI's and PIL's resamplers differ by rounding only. Measured on the
smoke shards (64 px sources -> 40 px): mean absolute difference ~0.2 grey levels per image, at most
~1 on a pixel. The bound below is 1.0 per image mean. (When the source is at least twice the target,
the WebDataset path decodes at reduced DCT scale instead; see docs/benchmarks.md for that regime.)
"""
from __future__ import annotations

import math
import tarfile

import numpy as np
import pytest
import torch
from test_data import CPU, data_cfg, epoch_ids

from bgtrain.data import build_loader
from bgtrain.data.common import IMAGENET_STD
from bgtrain.distributed import WorldInfo
from shards.format import decode_label_rows, decode_labels

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (requirements.txt)")

TOLERANCE = 1.0  # grey levels, per-image mean absolute difference between backends


def dali_cfg(root, **kw):
    return data_cfg(root, backend="dali", **kw)


def by_sample(cfg, epoch=1, train=True, seed=0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(image in 0-255 units, label row) of every valid sample of one world-1 epoch, by sample id."""
    loader = build_loader(cfg, "train", WorldInfo(), CPU, train=train, seed=seed)
    loader.set_epoch(epoch)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = {}
    for batch in loader:
        for sid, image, row, ok in zip(batch.sample_id.tolist(), batch.image, batch.labels, batch.valid.tolist()):
            if ok:
                assert sid not in out, f"sample {sid} valid twice in one epoch"
                out[sid] = (image * std * 255, row)
    return out


def test_dali_and_webdataset_give_the_same_samples_and_label_rows(smoke_shards):
    for labels in ("observed", "full"):
        dali = by_sample(dali_cfg(smoke_shards, labels=labels), epoch=2)
        wds = by_sample(data_cfg(smoke_shards, labels=labels), epoch=2)
        assert sorted(dali) == sorted(wds) == list(range(200))
        assert all(torch.equal(dali[s][1], wds[s][1]) for s in dali), f"{labels} label rows differ"


def test_dali_images_match_webdataset_within_decode_tolerance(smoke_shards):
    # 64 px sources -> 40 px: no DCT-scaled decode on the WebDataset side; flips on, same rule.
    dali = by_sample(dali_cfg(smoke_shards, image_size=40), epoch=3)
    wds = by_sample(data_cfg(smoke_shards, image_size=40), epoch=3)
    diffs = torch.stack([(dali[s][0] - wds[s][0]).abs().mean() for s in dali])
    assert diffs.max() < TOLERANCE, f"worst image differs by {diffs.max():.2f} grey levels"
    # A flip decided differently would cost far more than the tolerance; show the check can fail.
    s = next(iter(dali))
    assert (dali[s][0] - wds[s][0].flip(2)).abs().mean() > 5 * TOLERANCE


# 24 ranks: 8 of them read 9 samples (2 batches of 8), the others 8 (one batch): an all-padding batch evens them
@pytest.mark.parametrize("world", [2, 3, 24])
def test_dali_covers_every_sample_once_with_equal_batch_counts(smoke_shards, world):
    cfg = dali_cfg(smoke_shards)
    ids, counts = epoch_ids(cfg, world, epoch=1)
    assert sorted(i for r in ids for i in r) == list(range(200)), "each sample exactly once across ranks"
    assert len(set(counts)) == 1, f"ranks disagree on batch count: {counts}"
    # DALI's own sharding rule: ceil(ceil(N / W) / B) batches on every rank.
    assert counts[0] == math.ceil(math.ceil(200 / world) / 8)
    loader = build_loader(cfg, "train", WorldInfo(0, world), CPU, train=True, seed=0)
    assert len(loader) == counts[0]


def test_dali_epochs_differ_in_order_and_same_seed_repeats(smoke_shards):
    cfg = dali_cfg(smoke_shards)
    first, _ = epoch_ids(cfg, 2, epoch=1)
    assert first == epoch_ids(cfg, 2, epoch=1)[0]
    assert first != epoch_ids(cfg, 2, epoch=2)[0]
    assert first != epoch_ids(cfg, 2, epoch=1, seed=7)[0]


def test_dali_resume_mid_epoch_sees_the_rest_exactly(smoke_shards):
    cfg = dali_cfg(smoke_shards)
    world = WorldInfo(1, 2)
    full = build_loader(cfg, "train", world, CPU, train=True, seed=0)
    full.set_epoch(2)
    reference = [(b.sample_id.tolist(), b.valid.tolist()) for b in full]
    stopped = build_loader(cfg, "train", world, CPU, train=True, seed=0)
    stopped.set_epoch(2)
    head = []
    for batch in stopped:
        head.append((batch.sample_id.tolist(), batch.valid.tolist()))
        if len(head) == 4:
            break
    assert stopped.state_dict() == {"epoch": 2, "batches_done": 4}
    resumed = build_loader(cfg, "train", world, CPU, train=True, seed=0)
    resumed.set_epoch(2, 4)
    assert head + [(b.sample_id.tolist(), b.valid.tolist()) for b in resumed] == reference
    # the padding repeats of the last batch stay invalid after a resume too
    assert not all(reference[-1][1])


def test_dali_resampled_epoch_has_its_nominal_length_on_every_rank(smoke_shards):
    cfg = dali_cfg(smoke_shards, resampled=True, epoch_samples=100)
    ids, counts = epoch_ids(cfg, 3, epoch=1)
    assert counts == [math.ceil(100 / (3 * 8))] * 3
    assert all(len(r) == counts[0] * 8 for r in ids), "resampled batches are all valid"
    assert set(i for r in ids for i in r) <= set(range(200))


def test_vectorised_label_decoding_matches_the_shard_format(smoke_shards):
    members = []
    with tarfile.open(smoke_shards / "train" / "train-000000.tar") as t:
        for m in t.getmembers():
            if m.name.endswith(".lbl"):
                members.append(np.frombuffer(t.extractfile(m).read(), "<i4"))
    width = max(len(m) for m in members)
    padded = np.stack([np.pad(m, (0, width - len(m)), constant_values=-1) for m in members])
    for label_set in ("observed", "full"):
        rows = decode_label_rows(padded)
        assert rows.ok.all()
        ids, (pos, neg) = rows.sample_id, rows.label_set(label_set)
        for i, member in enumerate(members):
            lab = decode_labels(member.tobytes())
            want_pos, want_neg = (lab.obs_pos, lab.obs_neg) if label_set == "observed" else (lab.full_pos, lab.full_neg)
            assert ids[i] == lab.sample_id
            assert pos[i][pos[i] >= 0].tolist() == list(want_pos)
            assert neg[i][neg[i] >= 0].tolist() == list(want_neg)
    broken = padded.copy()
    broken[0, 1] = width  # header claims more ids than the member holds
    assert decode_label_rows(broken).ok.tolist() == [False] + [True] * (len(members) - 1)


def _jpegs(smoke_shards, n=6) -> list[bytes]:
    with tarfile.open(smoke_shards / "train" / "train-000000.tar") as t:
        return [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")][:n]


def _check_decode_batch(smoke_shards, device: torch.device) -> None:
    from bgtrain.data.gpu_decode import decode_batch
    from bgtrain.data.wds import decode_image
    jpegs = _jpegs(smoke_shards)
    jpegs[2], jpegs[4] = b"<html>not a jpeg</html>", b""
    images, decoded = decode_batch(jpegs, 40, device)
    assert images.shape == (6, 40, 40, 3) and images.dtype == torch.uint8 and images.device.type == device.type
    assert decoded.tolist() == [True, True, False, True, False, True]
    for i in (0, 1, 3, 5):
        ref = decode_image(jpegs[i], 40, False).astype(np.float32)
        diff = np.abs(images[i].cpu().numpy().astype(np.float32) - ref).mean()
        assert diff < TOLERANCE, f"image {i} differs from PIL by {diff:.2f} grey levels"
    assert images[2].sum() == 0 and images[4].sum() == 0


def test_gpu_decode_logic_on_the_cpu(smoke_shards):
    """decode_resize's batching, bad-sample isolation and resize, run on the CPU."""
    _check_decode_batch(smoke_shards, CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs a CUDA GPU")
def test_gpu_decode_on_cuda_matches_pil(smoke_shards):
    _check_decode_batch(smoke_shards, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI mixed decoding needs a CUDA GPU")
def test_dali_mixed_and_webdataset_gpu_decode_on_cuda(smoke_shards):
    cuda = torch.device("cuda")
    for cfg in (dali_cfg(smoke_shards, image_size=40), data_cfg(smoke_shards, image_size=40, decode="gpu")):
        loader = build_loader(cfg, "train", WorldInfo(), cuda, train=True, seed=0, dtype=torch.bfloat16)
        loader.set_epoch(1)
        seen = []
        for batch in loader:
            assert batch.image.device.type == "cuda" and batch.image.dtype == torch.bfloat16
            assert batch.image.is_contiguous(memory_format=torch.channels_last)
            seen += batch.sample_id[batch.valid].tolist()
        assert sorted(seen) == list(range(200)), cfg.backend


@pytest.mark.parametrize("world", [2, 3])
def test_dali_and_webdataset_give_each_rank_the_same_samples(smoke_shards, world):
    """Both backends read the plan's rank ranges: the same sample set per rank, the same step count."""
    dali, dali_counts = epoch_ids(dali_cfg(smoke_shards), world, epoch=2)
    wds, wds_counts = epoch_ids(data_cfg(smoke_shards), world, epoch=2)
    assert [sorted(r) for r in dali] == [sorted(r) for r in wds]
    assert dali_counts == wds_counts


def test_dali_batches_put_valid_rows_first_and_count_padding(smoke_shards):
    loader = build_loader(dali_cfg(smoke_shards), "train", WorldInfo(1, 3), CPU, train=True, seed=0)
    loader.set_epoch(1)
    plan = loader.plan()
    batches = list(loader)
    for b, rows in zip(batches, plan.rows[1]):
        assert b.num_valid == rows and b.valid[:rows].all() and not b.valid[rows:].any()
        assert b.step_has_data
    assert loader.counts() == {"samples": 67, "corrupt": 0, "padding": 9 * 8 - 67, "retries": 0}


def test_dali_failure_names_the_shard_and_sample(tmp_path, smoke_shards):
    from test_data import _shard_with_a_bad_sample

    from shards.format import ShardError
    tar = _shard_with_a_bad_sample(tmp_path, smoke_shards, n=40, bad=21)
    loader = build_loader(dali_cfg(tmp_path, batch_size=4), "train", WorldInfo(), CPU, train=True, seed=0)
    with pytest.raises(ShardError) as err:
        list(loader)
    message = str(err.value)
    assert message.startswith(str(tar)) and "train_000000021" in message and "\n" not in message
