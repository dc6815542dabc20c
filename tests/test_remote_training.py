"""End to end from URLs: 2-rank torchrun training reading its shards from nginx (through injected faults) and from
moto's S3 (with a rank killed mid-epoch and the node-local cache on) ends exactly where the local run does."""
from __future__ import annotations

import json

import pytest

from bgtrain import storage
from tests.servers import FaultProxy, make_bucket, nginx
from tests.test_train import (  # noqa: F401 - uninterrupted is the local run to compare with (a fixture)
    _assert_same_run,
    run,
    run_killing_rank_1_mid_epoch,
    torchrun_cmd,
    uninterrupted,
)

pytestmark = pytest.mark.distributed


def retries_recorded(out) -> int:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(r.get("retries", 0) for r in records if r["kind"] == "data")


def test_training_from_http_through_faults_matches_the_local_run(smoke_shards, tmp_path, uninterrupted):  # noqa: F811
    with nginx(smoke_shards, tmp_path / "nginx") as url, \
            FaultProxy(url, faults=("503", "drop", "truncate"), every=7) as proxy:
        out = tmp_path / "http"
        proc = run(torchrun_cmd(out, proxy.url))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(proxy.injected.values()) > 0
    assert retries_recorded(out) > 0
    _assert_same_run(uninterrupted, out)


def test_training_from_s3_with_a_rank_killed_mid_epoch_matches_the_local_run(smoke_shards, tmp_path, s3_server,
                                                                             uninterrupted):  # noqa: F811
    make_bucket("train-shards")
    for f in sorted(smoke_shards.rglob("*")):
        if f.is_file():
            storage.upload(f, storage.join("s3://train-shards/smoke", str(f.relative_to(smoke_shards))))
    out = tmp_path / "s3"
    run_killing_rank_1_mid_epoch(torchrun_cmd(out, "s3://train-shards/smoke",
                                              [f"data.cache_dir={tmp_path / 'cache'}"]), out)
    assert any((tmp_path / "cache").glob("*.tar")), "the node-local cache was not used"
    _assert_same_run(uninterrupted, out)
