"""The storage layer against real servers on loopback: nginx for HTTP, moto for S3, and a proxy that breaks
requests in between (tests/servers.py)."""
from __future__ import annotations

import os

import pytest

from bgtrain import storage
from tests.servers import FaultProxy, make_bucket, moto_s3, nginx

# A broken connection shows as a hang: fail in minutes, not at the suite's 30-minute limit.
pytestmark = pytest.mark.timeout(300)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, every offset distinguishable


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder, base URL): a folder of files behind a real nginx."""
    root = tmp_path_factory.mktemp("www")
    (root / "sub").mkdir()
    (root / "sub" / "blob.bin").write_bytes(PAYLOAD)
    with nginx(root, tmp_path_factory.mktemp("nginx")) as url:
        yield root, url


def test_locations_join_and_change_suffix_alike_for_paths_and_urls():
    assert storage.join("s3://bucket/", "train", "a.tar") == "s3://bucket/train/a.tar"
    assert storage.join("/data/x", "train", "a.tar") == "/data/x/train/a.tar"
    assert storage.with_suffix("s3://bucket/train/a.tar", ".idx") == "s3://bucket/train/a.idx"
    assert storage.with_suffix("/data/train/a.tar", ".idx") == "/data/train/a.idx"
    assert storage.with_suffix("a.tar", ".idx") == "a.idx"
    assert storage.is_remote("https://h/x") and storage.is_remote("gs://b/x") and not storage.is_remote("/s3:/x")


def test_http_range_reads_match_the_local_bytes(served):
    root, url = served
    blob = storage.join(url, "sub", "blob.bin")
    assert storage.size(blob) == len(PAYLOAD) == storage.size(root / "sub" / "blob.bin")
    for start, length in [(0, 10), (1000, 70000), (len(PAYLOAD) - 5, 5)]:
        assert storage.read_range(blob, start, length) == PAYLOAD[start:start + length]
        assert storage.read_range(str(root / "sub" / "blob.bin"), start, length) == PAYLOAD[start:start + length]
    assert storage.read_bytes(blob) == PAYLOAD


def test_a_missing_object_is_one_line_naming_the_url_and_not_retried(served):
    _, url = served
    before = storage.COUNTERS["retries"]
    with pytest.raises(FileNotFoundError, match=r"^http://127\.0\.0\.1:\d+/sub/nope\.bin: not found$"):
        storage.read_range(storage.join(url, "sub", "nope.bin"), 0, 10)
    with pytest.raises(FileNotFoundError, match="nope.bin: not found"):
        storage.size(storage.join(url, "sub", "nope.bin"))
    assert storage.COUNTERS["retries"] == before


def test_transient_faults_are_retried_and_counted_and_the_bytes_are_exact(served):
    _, url = served
    with FaultProxy(url, faults=("503", "drop", "truncate"), every=2) as proxy:
        blob = storage.join(proxy.url, "sub", "blob.bin")
        before = storage.COUNTERS["retries"]
        for i in range(12):
            start = 4096 * i * 7
            assert storage.read_range(blob, start, 50000) == PAYLOAD[start:start + 50000]
        assert set(proxy.injected) == {"503", "drop", "truncate"}
        assert storage.COUNTERS["retries"] - before == sum(proxy.injected.values())


def test_retries_stop_at_the_bounded_total_time(served):
    _, url = served
    with FaultProxy(url, faults=("503",), every=1) as proxy:
        with pytest.raises(storage.StorageError, match=r"blob\.bin: still failing after .* retries"):
            storage.read_range(storage.join(proxy.url, "sub", "blob.bin"), 0, 10, storage.Retry(total_s=0.5))


def test_s3_write_read_list_and_remove(monkeypatch, tmp_path):
    with moto_s3(monkeypatch):
        make_bucket("bgtrain-test")
        base = "s3://bgtrain-test/run"
        storage.write_bytes(storage.join(base, "a.bin"), PAYLOAD)
        (tmp_path / "b.bin").write_bytes(b"hello")
        storage.upload(tmp_path / "b.bin", storage.join(base, "b.bin"))
        assert storage.listdir(base) == ["a.bin", "b.bin"]
        assert storage.size(storage.join(base, "a.bin")) == len(PAYLOAD)
        assert storage.read_range(storage.join(base, "a.bin"), 300, 1000) == PAYLOAD[300:1300]
        storage.download(storage.join(base, "b.bin"), tmp_path / "c.bin")
        assert (tmp_path / "c.bin").read_bytes() == b"hello"
        storage.remove(storage.join(base, "a.bin"))
        storage.remove(storage.join(base, "a.bin"))  # already gone: fine
        assert storage.listdir(base) == ["b.bin"] and not storage.exists(storage.join(base, "a.bin"))
        with pytest.raises(FileNotFoundError, match="^s3://bgtrain-test/run/zz: not found$"):
            storage.read_bytes(storage.join(base, "zz"))
        assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
