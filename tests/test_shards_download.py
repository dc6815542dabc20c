"""Builds from image lists of URLs (shards.download): real nginx, a fault-injecting proxy, a killed CLI build.

Every URL build is compared with a build of the same images from local disk: same shard bytes (sha256), so the
samples, ids, labels and stored JPEGs are the same; the URLs that fail are missing there and named here.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_shards_readers import jpeg_bytes, make_openimages

from shards.__main__ import main
from shards.build import BuildOptions, build, dry_run
from shards.download import PARTIAL, DownloadOptions, download_all, local_path
from shards.format import read_manifest
from shards.merge import read_samples
from shards.readers import get_reader
from shards.verify import verify
from tests.servers import FaultProxy, nginx

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c", "d"]
OPTS = BuildOptions(max_side=64, shard_size=3)          # 40x30 JPEGs are stored byte for byte
FAST = DownloadOptions(workers=4, per_host=2, timeout=5.0, retries=2, backoff=0.05)
NEVER = 10 ** 9                                         # a FaultProxy that only counts: no request is the N-th


# ---------------------------------------------------------------- helpers

def _www(root: Path, n: int) -> dict[str, bytes]:
    """``n`` small JPEGs at ``root/img/NNNN.jpg``; returns their bytes by file name."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(n):
        files[f"{i:04d}.jpg"] = data = jpeg_bytes(i, (40, 30))
        (root / "img" / f"{i:04d}.jpg").write_bytes(data)
    return files


def _csv_src(src: Path, entries: list[str]) -> Path:
    """A csv dataset listing ``entries`` (paths or URLs) with labels that depend on the row only."""
    src.mkdir(parents=True, exist_ok=True)
    (src / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    with open(src / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "positives", "negatives"]] +
                                [[e, CLASSES[i % 4], CLASSES[(i + 2) % 4]] for i, e in enumerate(entries)])
    return src


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _stored(out: Path, split: str = "train") -> dict[str, bytes]:
    """Stored JPEG bytes by the ref of their sample (index/{split}.jsonl maps sample id -> ref)."""
    refs = {e["id"]: e["ref"] for e in _lines(out / "index" / f"{split}.jsonl")}
    m = read_manifest(out)
    samples = [s for sh in m["splits"][split]["shards"] for _, s in read_samples(out / split / sh["name"])]
    return {refs[i]: s["jpg"] for i, s in enumerate(samples)}


def _partials(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and (PARTIAL in p.parts or p.name.endswith(".partial"))]


def _downloaded(folder: Path) -> dict[Path, tuple[int, int]]:
    """(inode, mtime) of every complete file in a download folder."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("??/*") if p.is_file()}


class SlowServer:
    """Serves a folder over HTTP/1.0, each body in two halves ``pause_s`` apart (a download in progress stays in
    progress long enough to be killed); counts GETs and the most requests in flight per Host header.

    A request counts as in flight from its arrival until just before its last bytes are sent, a window inside the
    client's own: the maximum seen here never exceeds what the client really had open to the host.
    """

    def __init__(self, root: Path, pause_s: float) -> None:
        self.root, self.pause_s = root, pause_s
        self.requests = 0
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                host = self.headers.get("Host", "").rsplit(":", 1)[0]
                with server._lock:
                    server.requests += 1
                    for key in (host, "*"):  # "*": all hosts together
                        server.in_flight[key] += 1
                        server.max_in_flight[key] = max(server.max_in_flight[key], server.in_flight[key])
                counted = True
                try:
                    path = server.root / self.path.lstrip("/")
                    data = path.read_bytes() if path.is_file() else None
                    self.send_response(200 if data is not None else 404)
                    self.send_header("Content-Length", str(len(data or b"")))
                    self.end_headers()
                    if data:
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        time.sleep(server.pause_s)
                        server._leave(host)
                        counted = False
                        self.wfile.write(data[len(data) // 2:])
                except (BrokenPipeError, ConnectionResetError):  # the client was killed
                    pass
                finally:
                    if counted:
                        server._leave(host)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _leave(self, host: str) -> None:
        with self._lock:
            self.in_flight[host] -= 1
            self.in_flight["*"] -= 1

    def __enter__(self) -> SlowServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- csv: failures named, the rest equal to local

def test_csv_url_build_names_every_failure_and_equals_the_local_build(tmp_path):
    www = tmp_path / "www"
    files = _www(www, 10)
    # 12 rows: 8 good images, two 404s, one that always stalls past the timeout, one always truncated
    with nginx(www, tmp_path / "nginx") as base, \
            FaultProxy(base, faults=("503",), every=NEVER) as counter, \
            FaultProxy(base, faults=("stall",), every=1, stall_s=4.0) as stall, \
            FaultProxy(base, faults=("truncate",), every=1) as cut:
        gone_1, stalled, gone_2, truncated = (f"{counter.url}/img/gone-1.jpg", f"{stall.url}/img/0005.jpg",
                                              f"{counter.url}/img/gone-2.jpg", f"{cut.url}/img/0009.jpg")
        urls = [f"{counter.url}/img/{i:04d}.jpg" for i in range(5)] + [gone_1, stalled] + \
            [f"{counter.url}/img/0006.jpg", gone_2] + [f"{counter.url}/img/{i:04d}.jpg" for i in (7, 8)] + [truncated]
        src = _csv_src(tmp_path / "url-src", urls)
        out = tmp_path / "url-out"
        assert main(["build", "csv", "--src", str(src), "--out", str(out), "--max-side", "64", "--shard-size", "3",
                     "--workers", "1", "--download-workers", "4", "--per-host", "2", "--download-timeout", "1",
                     "--download-retries", "1"]) == 0
        assert counter.requests == 8 + 2  # every good image once, and the 404s are not retried
        assert stall.injected["stall"] == 2 and cut.injected["truncate"] == 2  # retried once, failed both times

    missing = {x["ref"]: x for x in _lines(out / "missing.jsonl")}
    size = len(files["0009.jpg"])
    assert {ref: (x["error"], x["tries"]) for ref, x in missing.items()} == {
        gone_1: ("HTTP 404", 1), gone_2: ("HTTP 404", 1), stalled: ("timed out after 1 s", 2),
        truncated: (f"truncated: {size // 2} of {size} bytes", 2)}
    assert all(x["split"] == "train" and x["path"] == x["ref"] and x["reason"] == f"download failed: {x['error']}"
               for x in missing.values())
    m = read_manifest(out)
    assert m["missing"] == 4 and m["rejected"] == 0
    assert {k: m["inputs"]["train"][k] for k in ("inputs", "written", "rejected", "missing")} == \
        {"inputs": 12, "written": 8, "rejected": 0, "missing": 4}
    assert verify(out, show_progress=False) == []

    # the same list on local disk, the failed rows pointing at files that do not exist
    local = [f"img/{u.rsplit('/', 1)[1]}" if u not in missing else f"img/absent-{i}.jpg" for i, u in enumerate(urls)]
    shutil.copytree(www / "img", tmp_path / "local-src" / "img")
    ml = build(get_reader("csv")(_csv_src(tmp_path / "local-src", local)), tmp_path / "local-out", OPTS,
               show_progress=False)
    assert m["splits"] == ml["splits"] and m["train_counts"] == ml["train_counts"]  # same tar bytes (sha256)
    stored = _stored(out)
    assert sorted(stored) == sorted(u for u in urls if u not in missing)
    assert all(jpg == files[ref.rsplit("/", 1)[1]] for ref, jpg in stored.items())
    assert sorted(_stored(tmp_path / "local-out").values()) == sorted(stored.values())

    assert not _partials(out) and len(_downloaded(out / "downloads")) == 8
    report = dry_run(get_reader("csv")(src), OPTS, out / "downloads")["train"]
    assert (report["urls"], report["to_download"], report["missing"]) == (12, 4, 0)


def test_cli_help_explains_the_download_flags(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = capsys.readouterr().out
    for flag in ("--download-dir", "--download-workers", "--per-host", "--download-timeout", "--download-retries",
                 "--url-column", "http://", "missing.jsonl"):
        assert flag in text


# ---------------------------------------------------------------- openimages: the URL column of images.csv

def test_openimages_url_build_equals_the_local_build(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    truth = make_openimages(local)  # planted: one missing image per split, one truncated train JPEG
    shutil.copytree(local, remote, ignore=shutil.ignore_patterns("images"))
    with nginx(local / "images", tmp_path / "nginx") as base:
        for split in truth:  # the published image list, with its URL column
            with open(remote / split / "images.csv", "w", newline="") as f:
                csv.writer(f).writerows([["ImageID", "Subset", "OriginalURL", "License"]] +
                                        [[k, split, f"{base}/{split}/{k}.jpg", ""] for k in truth[split]])
        data = get_reader("openimages")(remote)  # no image folder: the URLs of OriginalURL
        assert all(r.path.startswith(base) for s in data.splits.values() for r in s)
        assert any("OriginalURL" in note for note in data.notes)
        m = build(data, tmp_path / "url-out", OPTS, download=FAST, show_progress=False)
    ml = build(get_reader("openimages")(local), tmp_path / "local-out", OPTS, show_progress=False)

    assert m["splits"] == ml["splits"] and m["train_counts"] == ml["train_counts"]
    assert (m["rejected"], m["missing"]) == (ml["rejected"], ml["missing"]) == (1, 3)
    assert m["inputs"] == ml["inputs"]
    missing = _lines(tmp_path / "url-out" / "missing.jsonl")
    assert [(x["split"], x["ref"]) for x in missing] == \
        [(x["split"], x["ref"]) for x in _lines(tmp_path / "local-out" / "missing.jsonl")]
    assert {x["error"] for x in missing} == {"HTTP 404"}
    # the truncated JPEG downloaded whole (its server sent all it has): the JPEG checker rejects it, as on disk
    assert [x["ref"] for x in _lines(tmp_path / "url-out" / "rejected.jsonl")] == ["tr00000000000004"]
    for split in m["splits"]:
        assert _stored(tmp_path / "url-out", split) == _stored(tmp_path / "local-out", split)
    assert verify(tmp_path / "url-out", show_progress=False) == []
    with pytest.raises(ValueError, match="no column 'Thumbnail300KURL'"):
        get_reader("openimages")(remote, url_column="Thumbnail300KURL")


# ---------------------------------------------------------------- transient faults are retried

def test_transient_faults_are_retried_and_give_the_fault_free_build(tmp_path):
    www = tmp_path / "www"
    files = _www(www, 12)
    with nginx(www, tmp_path / "nginx") as base, \
            FaultProxy(base, faults=("503", "drop", "truncate"), every=3) as proxy:
        faulty = build(get_reader("csv")(_csv_src(tmp_path / "a", [f"{proxy.url}/img/{n}" for n in files])),
                       tmp_path / "a-out", OPTS, download=DownloadOptions(workers=4, per_host=4, timeout=5.0,
                                                                          retries=6, backoff=0.02),
                       show_progress=False)
        clean = build(get_reader("csv")(_csv_src(tmp_path / "b", [f"{base}/img/{n}" for n in files])),
                      tmp_path / "b-out", OPTS, download=FAST, show_progress=False)
    assert set(proxy.injected) == {"503", "drop", "truncate"}
    assert proxy.requests == 12 + sum(proxy.injected.values())  # each fault cost exactly one more request
    assert faulty["missing"] == 0 and faulty["inputs"]["train"]["written"] == 12
    assert faulty["splits"] == clean["splits"]
    assert verify(tmp_path / "a-out", show_progress=False) == []
    assert not _partials(tmp_path / "a-out")


# ---------------------------------------------------------------- a killed build resumes

def test_killed_build_resumes_without_fetching_again_and_leaves_no_partial_file(tmp_path):
    www = tmp_path / "www"
    files = _www(www, 16)
    out = tmp_path / "out"
    with SlowServer(www, pause_s=0.6) as server:
        src = _csv_src(tmp_path / "src", [f"{server.url}/img/{n}" for n in files])
        args = ["build", "csv", "--src", str(src), "--out", str(out), "--max-side", "64", "--shard-size", "3",
                "--workers", "1", "--download-workers", "2", "--per-host", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "shards", *args], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while len(_downloaded(out / "downloads")) < 4 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(0.3)  # the next two downloads are now halfway through their bodies
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        before = _downloaded(out / "downloads")
        assert 4 <= len(before) < 16 and not (out / "manifest.json").exists(), "not killed mid-download"
        assert list((out / "downloads" / PARTIAL).iterdir()), "the kill left no download in progress"

        server.requests = 0
        assert main(args) == 0
        assert server.requests == 16 - len(before)  # what was complete is not fetched again ...
    after = _downloaded(out / "downloads")
    assert {p: after[p] for p in before} == before  # ... nor rewritten
    assert len(after) == 16 and not _partials(out)
    m = read_manifest(out)
    assert m["inputs"]["train"]["written"] == 16 and m["missing"] == 0
    assert verify(out, show_progress=False) == []
    shutil.copytree(www / "img", tmp_path / "local" / "img")
    ml = build(get_reader("csv")(_csv_src(tmp_path / "local", [f"img/{n}" for n in files])), tmp_path / "local-out",
               OPTS, show_progress=False)
    assert m["splits"] == ml["splits"]


# ---------------------------------------------------------------- politeness

def test_per_host_limit_holds(tmp_path):
    www = tmp_path / "www"
    files = _www(www, 12)
    folder = tmp_path / "downloads"
    with SlowServer(www, pause_s=0.2) as server:
        urls = [f"http://{host}:{server.port}/img/{n}" for host in ("127.0.0.1", "localhost") for n in files]
        report = download_all(urls, folder, DownloadOptions(workers=8, per_host=2, timeout=5.0))
        assert server.requests == 24
    assert (report.fetched, report.present, report.failures) == (24, 0, {})
    # reached, never exceeded; and one host's limit does not hold back the other (its URLs all came first)
    assert server.max_in_flight == {"127.0.0.1": 2, "localhost": 2, "*": 4}
    assert all(local_path(folder, u).read_bytes() == files[u.rsplit("/", 1)[1]] for u in urls)
    again = download_all(urls, folder, DownloadOptions(workers=8, per_host=2))
    assert (again.fetched, again.present) == (0, 24)
