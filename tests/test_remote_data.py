"""Training data from URLs: the same batches from nginx (HTTP) and moto (S3) on loopback as from local disk, through
injected faults, with a node-local cache, and without reading bytes outside the rank's span."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from bgtrain import storage
from bgtrain.config import DataConfig
from bgtrain.data import build_loader
from bgtrain.data.cache import ShardCache
from bgtrain.distributed import WorldInfo
from tests.servers import FaultProxy, make_bucket, nginx

# A broken connection shows as a hang: fail in minutes, not at the suite's 30-minute limit.
pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def http_shards(smoke_shards, tmp_path_factory):
    """The smoke shards behind a real nginx: their URL."""
    with nginx(smoke_shards, tmp_path_factory.mktemp("nginx")) as url:
        yield url


@pytest.fixture(scope="module")
def s3_shards(smoke_shards, s3_server) -> str:
    make_bucket("shards")
    for f in sorted(smoke_shards.rglob("*")):
        if f.is_file():
            storage.upload(f, storage.join("s3://shards/smoke", str(f.relative_to(smoke_shards))))
    return "s3://shards/smoke"


def passes(shards: str, rank: int, world: int, workers: int = 0, **data) -> list[dict]:
    """Every batch of epochs 1 and 2 (2 resumed at batch 2) of one rank: ids, labels and images."""
    cfg = DataConfig(shards=shards, image_size=32, batch_size=8, workers=workers, shuffle_buffer=16, **data)
    loader = build_loader(cfg, "train", WorldInfo(rank, world), CPU, train=True, seed=3)
    out = []
    for epoch, done in ((1, 0), (2, 0), (2, 2)):
        loader.set_epoch(epoch, done)
        out += [{"ids": b.sample_id.tolist(), "pos": b.labels.pos.tolist() if hasattr(b.labels, "pos") else None,
                 "image": b.image.clone()} for b in loader]
    out.append(loader.counts())
    return out


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a[:-1], b[:-1]):
        assert x["ids"] == y["ids"] and x["pos"] == y["pos"] and torch.equal(x["image"], y["image"])
    assert {k: v for k, v in a[-1].items() if k != "retries"} == {k: v for k, v in b[-1].items() if k != "retries"}


@pytest.mark.parametrize("rank", [0, 1])
def test_http_batches_equal_local_ones_with_loader_processes(smoke_shards, http_shards, rank):
    assert_same(passes(str(smoke_shards), rank, 2, workers=2), passes(http_shards, rank, 2, workers=2))


def test_s3_batches_equal_local_ones(smoke_shards, s3_shards):
    assert_same(passes(str(smoke_shards), 0, 2), passes(s3_shards, 0, 2))


def test_faults_are_retried_counted_and_change_nothing(smoke_shards, http_shards):
    with FaultProxy(http_shards, faults=("503", "drop", "truncate"), every=3) as proxy:
        faulty = passes(proxy.url, 1, 2)
    assert set(proxy.injected) == {"503", "drop", "truncate"}
    assert_same(passes(str(smoke_shards), 1, 2), faulty)
    # retries inside batch reads are in the pass counts; the manifest's and indexes' are not
    assert 0 < faulty[-1]["retries"] <= sum(proxy.injected.values())


def test_a_rank_fetches_only_the_bytes_of_its_own_samples(http_shards):
    cfg = DataConfig(shards=http_shards, image_size=32, batch_size=8, workers=0, shuffle_buffer=16)
    loader = build_loader(cfg, "train", WorldInfo(0, 2), CPU, train=True, seed=3)
    plan, info = loader.plan(), loader.info
    pieces = plan.units(0, 0)
    need = 0
    for p in pieces:
        lo, hi = info.open_index(p.shard).span(p.start, p.start + len(p))
        need += hi - lo
    index_bytes = sum(storage.size(info.index_location(p.shard)) for p in pieces)
    before = storage.COUNTERS["bytes"]
    loader.set_epoch(1)
    assert sum(b.num_valid for b in loader) == plan.rank_samples(0)
    fetched = storage.COUNTERS["bytes"] - before
    tars = sum(info.shard_bytes[p.shard] for p in pieces)
    assert need <= fetched <= need + 2 * index_bytes < tars  # never a whole tar: its headers and others' samples


def test_the_cache_serves_verified_shards_and_refetches_a_corrupt_entry(smoke_shards, http_shards, tmp_path):
    cache_dir = tmp_path / "cache"
    local = passes(str(smoke_shards), 0, 2)
    assert_same(local, passes(http_shards, 0, 2, cache_dir=str(cache_dir)))
    entries = sorted(p for p in cache_dir.iterdir() if p.suffix == ".tar")
    assert entries and all(p.read_bytes() == (smoke_shards / "train" / p.name.split("-", 1)[1]).read_bytes()
                           for p in entries)
    victim = entries[0]
    victim.unlink()  # a missing entry is fetched again
    before = storage.COUNTERS["cache_fetches"]
    assert_same(local, passes(http_shards, 0, 2, cache_dir=str(cache_dir)))
    assert storage.COUNTERS["cache_fetches"] == before + 1
    good = victim.read_bytes()
    victim.write_bytes(b"\0" * len(good))  # a rewritten entry of the same size: its stamp no longer matches
    assert_same(local, passes(http_shards, 0, 2, cache_dir=str(cache_dir)))
    assert storage.COUNTERS["cache_fetches"] == before + 2 and victim.read_bytes() == good


def test_a_fetch_that_does_not_match_the_manifest_is_refused_naming_the_url(smoke_shards, http_shards, tmp_path):
    shard = json.loads((smoke_shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    url = storage.join(http_shards, "train", shard["name"])
    with pytest.raises(storage.StorageError, match=rf"^{url}: fetched twice, and twice it does not match"):
        ShardCache(str(tmp_path), 10**9).local(url, shard["bytes"], "0" * 64)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_the_cache_evicts_the_least_recently_used_entries(smoke_shards, http_shards, tmp_path):
    shards = json.loads((smoke_shards / "manifest.json").read_text())["splits"]["train"]["shards"]
    biggest = max(s["bytes"] for s in shards)
    cache = ShardCache(str(tmp_path), 2 * biggest)
    for s in shards:
        cache.local(storage.join(http_shards, "train", s["name"]), s["bytes"], s["sha256"])
    kept = sorted(p.name.split("-", 1)[1] for p in tmp_path.iterdir() if p.suffix == ".tar")
    assert kept == sorted(s["name"] for s in shards[-2:])
    assert sum(p.stat().st_size for p in tmp_path.iterdir() if p.suffix == ".tar") <= 2 * biggest


def test_a_missing_shard_object_is_one_line_naming_its_url(smoke_shards, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(smoke_shards, root)
    (root / "train" / "train-000001.tar").unlink()
    with nginx(root, tmp_path / "nginx") as url:
        cfg = DataConfig(shards=url, image_size=32, batch_size=8, workers=0)
        loader = build_loader(cfg, "train", WorldInfo(0, 1), CPU, train=True, seed=3)
        with pytest.raises(FileNotFoundError, match=rf"^{url}/train/train-000001.tar: listed in {url}/manifest.json "
                                                    "but missing$"):
            loader.set_epoch(1)
            list(loader)


@pytest.mark.parametrize("world", [2, 3])
def test_dali_reads_the_same_batches_from_a_url_as_from_disk(smoke_shards, http_shards, tmp_path, world):
    """DALI reads local files only: a URL shard's span is fetched into a sparse file (or the cache) first."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is a requirement (requirements.txt)")
    for rank in range(world):
        local = passes(str(smoke_shards), rank, world, backend="dali")
        assert_same(local, passes(http_shards, rank, world, backend="dali"))
        assert_same(local, passes(http_shards, rank, world, backend="dali", cache_dir=str(tmp_path / "cache")))


def test_the_loader_bench_compares_a_url_with_its_local_copy_and_the_cache(http_shards, capsys):
    from bgtrain.bench.loader import main
    assert main(["--shards", http_shards, "--backend", "webdataset", "files", "--batches", "2", "--batch-size", "8",
                 "--workers", "0", "--image-size", "32"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["local_copy"]["bytes"] > 0
    assert [(r["backend"], r["source"]) for r in lines[1:]] == [
        ("webdataset", s) for s in ("local", "url", "url+cache cold", "url+cache warm")]
    assert lines[1]["vs_local"] == 1.0 and all(r["img_per_s"] > 0 for r in lines[1:])
