"""``python -m shards verify|stats`` and ``cluster.preflight`` on shard URLs: over a real nginx (HTTP) and moto (S3) on
loopback they give what the same folder gives on local disk, through injected faults, naming a missing object."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from rich.console import Console

from bgtrain import storage
from bgtrain.cli import run_cli
from bgtrain.distributed import WorldInfo
from cluster.preflight import Mode, check_shards
from shards.stats import show
from shards.verify import verify
from tests.servers import FaultProxy, make_bucket, nginx

# A broken connection shows as a hang: fail in minutes, not at the suite's 30-minute limit.
pytestmark = pytest.mark.timeout(300)

JPEG_TAR, CUT_TAR, GONE_TAR = "train/train-000001.tar", "val/val-000000.tar", "train/train-000002.tar"


def flip_a_jpeg_byte(tar: Path) -> None:
    """Flip one byte in the middle of the 4th JPEG's data: same size, and libjpeg says the image is corrupt."""
    with tarfile.open(tar) as t:
        jpg = [m for m in t if m.name.endswith(".jpg")][3]
    with open(tar, "r+b") as f:
        f.seek(jpg.offset_data + jpg.size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


@pytest.fixture(scope="module")
def www(smoke_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good/: the smoke shards; bad/: a JPEG byte flipped in one tar, another tar cut in half; gone/: a tar deleted."""
    root = tmp_path_factory.mktemp("www")
    for name in ("good", "bad", "gone"):
        shutil.copytree(smoke_shards, root / name)
    flip_a_jpeg_byte(root / "bad" / JPEG_TAR)
    cut = root / "bad" / CUT_TAR
    os.truncate(cut, cut.stat().st_size // 2)
    (root / "gone" / GONE_TAR).unlink()
    return root


@pytest.fixture(scope="module")
def http(www: Path, tmp_path_factory: pytest.TempPathFactory):
    """The base URL of a real nginx serving ``www``."""
    with nginx(www, tmp_path_factory.mktemp("nginx")) as url:
        yield url


@pytest.fixture(scope="module")
def s3(www: Path, s3_server: str) -> str:
    """``www`` uploaded to a bucket of the moto server: its base URL."""
    make_bucket("verify")
    for f in sorted(www.rglob("*")):
        if f.is_file():
            storage.upload(f, storage.join("s3://verify", str(f.relative_to(www))))
    return "s3://verify"


def local_view(errors: list[str], url: str, folder: Path) -> list[str]:
    """``errors`` of a URL shard folder with the URL written as the local folder."""
    return [e.replace(url, str(folder)) for e in errors]


def test_verify_over_http_with_workers_and_over_s3_finds_nothing_as_locally(www: Path, http: str, s3: str) -> None:
    assert verify(www / "good", show_progress=False) == []
    assert verify(f"{http}/good", workers=2, show_progress=False) == []
    assert verify(f"{s3}/good", show_progress=False) == []


@pytest.mark.parametrize("store", ["http", "s3"])
def test_verify_reports_a_damaged_copy_as_it_reports_the_local_one(www: Path, http: str, s3: str,
                                                                   store: str) -> None:
    url = f"{http if store == 'http' else s3}/bad"
    local = verify(www / "bad", show_progress=False)
    # the flipped JPEG byte and the cut tar, each named: the test sees real errors, not two empty lists
    assert any(JPEG_TAR in e and "Corrupt JPEG data" in e for e in local), local
    assert any(CUT_TAR in e for e in local) and any(f"{JPEG_TAR}: sha256 differs" in e for e in local), local
    remote = verify(url, show_progress=False)
    assert all(url in e or e.startswith("split ") for e in remote), remote
    assert local_view(remote, url, www / "bad") == local
    assert local_view(verify(url, decode=False, workers=2, show_progress=False), url, www / "bad") == \
        verify(www / "bad", decode=False, show_progress=False)


def test_verify_names_a_missing_object_by_its_url(www: Path, http: str, s3: str) -> None:
    for base in (http, s3):
        url = f"{base}/gone"
        errors = verify(url, show_progress=False)
        assert f"{url}/{GONE_TAR}: missing" in errors
        assert local_view(errors, url, www / "gone") == verify(www / "gone", show_progress=False)


def test_verify_through_transient_faults_finds_nothing(http: str) -> None:
    with FaultProxy(http, faults=("503", "drop", "truncate"), every=3) as proxy:
        errors = verify(f"{proxy.url}/good", show_progress=False)
    assert errors == []
    assert set(proxy.injected) == {"503", "drop", "truncate"}, proxy.injected


def test_cli_verify_and_stats_take_a_url(http: str, capsys: pytest.CaptureFixture[str]) -> None:
    from shards.__main__ import main

    capsys.readouterr()
    assert run_cli(main, ["verify", f"{http}/good", "--no-decode"], prog="shards") == 0
    assert capsys.readouterr().out.strip().endswith(f"{http}/good: OK")
    assert run_cli(main, ["verify", f"{http}/gone"], prog="shards") == 1
    assert f"{http}/gone/{GONE_TAR}: missing" in capsys.readouterr().out
    assert run_cli(main, ["stats", f"{http}/good", "--top", "0"], prog="shards") == 0
    assert "train annotations per class" in capsys.readouterr().out
    assert run_cli(main, ["verify", f"{http}/nothing"], prog="shards") == 1
    assert f"{http}/nothing/manifest.json" in capsys.readouterr().err


def tables(root: str | Path) -> str:
    out = io.StringIO()
    show(root, top=3, console=Console(file=out, width=200, color_system=None))
    return out.getvalue()


def test_stats_of_a_url_are_those_of_the_local_folder(www: Path, http: str, s3: str) -> None:
    local = tables(www / "good")
    assert "train" in local and "classes" in local
    assert tables(f"{http}/good") == local
    assert tables(f"{s3}/good") == local


@pytest.mark.parametrize("mode", ["default", "quick", "full"])
def test_preflight_gives_a_url_root_the_local_verdict_naming_a_missing_object(www: Path, http: str, s3: str,
                                                                              mode: Mode) -> None:
    for base in (http, s3):
        good = check_shards(f"{base}/good", WorldInfo(), mode)
        assert good.ok, good.detail
        assert check_shards(www / "good", WorldInfo(), mode).ok
        gone = check_shards(f"{base}/gone", WorldInfo(), mode)
        assert not gone.ok and f"{base}/gone/{GONE_TAR}: not found" in gone.detail, gone.detail
        assert not check_shards(www / "gone", WorldInfo(), mode).ok
        # the cut tar: caught by the sizes (default), the walk (full); --quick reads only its first member
        bad = check_shards(f"{base}/bad", WorldInfo(), mode)
        assert bad.ok == check_shards(www / "bad", WorldInfo(), mode).ok == (mode == "quick")
        if not bad.ok:
            assert f"{base}/bad/{CUT_TAR}: " in bad.detail and "truncated" in bad.detail, bad.detail


def test_preflight_cli_checks_a_url_root(http: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.preflight import main

    capsys.readouterr()
    code = run_cli(main, ["--shards", f"{http}/good", "--timeout", "20"], prog="preflight")
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert f"shards {http}/good" in out and "6 tars of this node's share there" in out
    assert run_cli(main, ["--shards", f"{http}/gone", "--timeout", "20"], prog="preflight") == 1
    assert f"{http}/gone/{GONE_TAR}: not found" in " ".join(capsys.readouterr().out.split())
