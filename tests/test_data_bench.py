"""The loader benchmark runs end to end at a tiny size and reports its speedup line last."""
from __future__ import annotations

import json

from bgtrain.bench.loader import main, unpack
from bgtrain.data.common import split_info


def test_loader_benchmark_reports_speedup_of_both_backends_last(smoke_shards, capsys):
    assert main(["--shards", str(smoke_shards), "--batches", "2", "--batch-size", "8", "--workers", "1",
                 "--image-size", "32"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r.get("backend") for r in lines[:-1]] == ["dali", "webdataset", "files"]
    assert all(r["img_per_s"] > 0 for r in lines[:-1])
    assert set(lines[-1]["speedup_vs_files"]) == {"dali", "webdataset"}
    assert all(v > 0 for v in lines[-1]["speedup_vs_files"].values())


def test_files_baseline_reads_the_same_images_and_labels(smoke_shards, tmp_path):
    info = split_info(smoke_shards, "train", "observed")
    paths, rows = unpack(info.shard_paths, tmp_path, info.num_classes)
    assert len(paths) == rows.shape[0] == info.num_samples
    assert all(p.is_file() and p.read_bytes()[:2] == b"\xff\xd8" for p in paths), "JPEG files"
    assert ((rows == 1).sum(1) == 1).all(), "single-positive observed labels, one 1 per row"
