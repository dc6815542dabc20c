"""Fetch the images of a URL image list into a local folder, so that the builder reads files as it always has.

Why a folder and not a stream: a build is resumable and its shard bytes must not depend on the network. Every
image lands at ``DIR/xx/<sha256 of its URL>.<ext>`` by ``os.replace`` of a file written under ``DIR/.partial``,
so a killed build never leaves half an image where the builder looks, and a rerun fetches only what is not
there yet. The builder fetches only the records of shards that are not done (see ``shards.build``).

Why these limits: OpenImages lists millions of URLs on a few hosts. A bounded thread pool with at most
``per_host`` requests at a time to one host keeps the build polite; a socket timeout (connect and every read)
keeps a dead server from holding a thread for ever; failures that may pass (5xx, 408, 429, a reset or refused
connection, a timeout, a body shorter than its Content-Length) are retried with exponential backoff, while other
4xx answers are final. What still fails comes back with its error text, for the builder to count as missing.
Standard library only: urllib on threads.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from urllib.parse import urlsplit

import bgtrain

CHUNK = 1 << 16
PARTIAL = ".partial"            # DIR/.partial: bodies being received; never read by the builder
USER_AGENT = f"bgtrain-shards/{bgtrain.__version__} (urllib)"
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,5}$")


def is_url(path: str) -> bool:
    """Whether an image entry of a list is an http(s) URL to download rather than a file path."""
    return path[:8].lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class DownloadOptions:
    """How images are fetched; none of it changes the shard bytes, so none of it is in the build fingerprint."""

    folder: Path | None = None   # None: OUT/downloads
    workers: int = 16            # threads fetching at once
    per_host: int = 4            # requests at a time to one host (scheme://host:port)
    timeout: float = 30.0        # seconds for the connect and for every read
    retries: int = 3             # further tries after a transient failure
    backoff: float = 0.5         # seconds before the first retry, doubled each time (with jitter)


@dataclass(frozen=True)
class Failure:
    """A URL that did not download: the last error (``HTTP 404``, ``timed out after 2 s``, ...) and the tries."""

    error: str
    tries: int


@dataclass
class Report:
    """What :func:`download_all` did: fetched now, already in the folder, and the failures by URL."""

    fetched: int = 0
    present: int = 0
    failures: dict[str, Failure] = field(default_factory=dict)


class DownloadError(Exception):
    """One failed try; ``transient`` says whether another try may succeed."""

    def __init__(self, error: str, transient: bool) -> None:
        super().__init__(error)
        self.transient = transient


def local_path(folder: Path, url: str) -> Path:
    """Where ``url`` is stored in the download folder: named by a hash of the URL, so any URL gets a safe,
    unique name; the extension is kept when it looks like one."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    suffix = Path(urlsplit(url).path).suffix.lower()
    return folder / digest[:2] / (digest[:40] + (suffix if _SUFFIX.match(suffix) else ""))


def host_of(url: str) -> str:
    """``scheme://host:port`` of a URL: the unit of the per-host limit."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def by_host_round_robin(urls: Iterable[str]) -> list[str]:
    """The URLs, one host after the other: a run of one host's URLs would hold every thread waiting on its
    ``per_host`` slots while the other hosts idle."""
    groups: dict[str, list[str]] = {}
    for url in urls:
        groups.setdefault(host_of(url), []).append(url)
    return [url for row in zip_longest(*groups.values()) for url in row if url is not None]


class HostLimits:
    """At most ``per_host`` requests at a time to any one host."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, url: str) -> Iterator[None]:
        """Hold one of the host's slots for the duration of a request."""
        host = host_of(url)
        with self._lock:
            sem = self._slots.setdefault(host, threading.BoundedSemaphore(self.per_host))
        with sem:
            yield


def fetch(url: str, dest: Path, timeout: float) -> None:
    """One try: GET ``url`` into ``dest`` atomically (``DIR/.partial`` then ``os.replace``), or raise
    :class:`DownloadError`. A body shorter than its Content-Length is an error, never a file."""
    tmp = dest.parent.parent / PARTIAL / f"{os.getpid()}@{socket.gethostname()}@{dest.name}"
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            final = resp.geturl()
            if final != url and "photo_unavailable" in final:  # Flickr's placeholder for a removed photo
                raise DownloadError(f"removed: redirected to {final}", transient=False)
            length = resp.headers.get("Content-Length")
            got = 0
            with open(tmp, "wb") as f:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    got += len(chunk)
            if length is not None and length.isdigit() and got != int(length):
                raise DownloadError(f"truncated: {got} of {length} bytes", transient=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:  # before URLError, its base class
        raise DownloadError(f"HTTP {e.code}", transient=e.code >= 500 or e.code in (408, 429)) from None
    except urllib.error.URLError as e:
        raise _network_error(e.reason, timeout) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException, ssl.SSLError) as e:
        raise _network_error(e, timeout) from None
    except ValueError as e:  # not a URL urllib can open
        raise DownloadError(f"bad URL: {e}", transient=False) from None
    finally:
        tmp.unlink(missing_ok=True)


def _network_error(reason: object, timeout: float) -> DownloadError:
    if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
        return DownloadError(f"timed out after {timeout:g} s", transient=True)
    if isinstance(reason, http.client.IncompleteRead):
        return DownloadError(f"truncated: {len(reason.partial)} bytes read, {reason.expected} more expected",
                             transient=True)
    if isinstance(reason, socket.gaierror):  # no such host: another try will not find it either
        return DownloadError(f"host not found: {reason}", transient=False)
    if isinstance(reason, ConnectionResetError):
        return DownloadError("connection reset", transient=True)
    if isinstance(reason, (OSError, http.client.HTTPException)):
        return DownloadError(f"{type(reason).__name__}: {reason}", transient=True)
    return DownloadError(str(reason), transient=False)


def download(url: str, dest: Path, opts: DownloadOptions, limits: HostLimits,
             stop: threading.Event | None = None) -> Failure | None:
    """Fetch ``url`` into ``dest`` with retries and backoff (outside the host slot); None once it is there."""
    for attempt in range(opts.retries + 1):
        with limits.slot(url):
            try:
                fetch(url, dest, opts.timeout)
                return None
            except DownloadError as e:
                error = e
        if not error.transient or attempt == opts.retries or (stop is not None and stop.is_set()):
            return Failure(str(error), attempt + 1)
        time.sleep(opts.backoff * 2 ** attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def remove_stale_partials(folder: Path) -> int:
    """Delete the ``.partial`` bodies that a killed process of this host left; returns how many.

    Another build sharing the folder may be writing its own right now: only files of dead processes go.
    """
    removed, here = 0, socket.gethostname()
    try:
        entries = list(os.scandir(folder / PARTIAL))
    except FileNotFoundError:
        return 0
    for entry in entries:
        pid, _, rest = entry.name.partition("@")
        host = rest.partition("@")[0]
        if host == here and pid.isdigit() and not _alive(int(pid)):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def download_all(urls: Iterable[str], folder: Path, opts: DownloadOptions,
                 advance: Callable[[int], None] | None = None) -> Report:
    """Make every URL a file in ``folder`` (see :func:`local_path`); URLs already there are not fetched.

    ``advance(n)`` is called from this thread as URLs are done (for a progress bar). A Ctrl-C stops new
    requests and lets the running ones end (each within its timeout).
    """
    folder = Path(folder)
    (folder / PARTIAL).mkdir(parents=True, exist_ok=True)
    remove_stale_partials(folder)
    report = Report()
    todo = []
    for url in dict.fromkeys(urls):
        if local_path(folder, url).is_file():
            report.present += 1
        else:
            todo.append(url)
    if advance and report.present:
        advance(report.present)
    limits, stop = HostLimits(opts.per_host), threading.Event()
    pending: dict[Future, str] = {}

    def collect() -> None:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            url = pending.pop(fut)
            failure = fut.result()
            if failure is None:
                report.fetched += 1
            else:
                report.failures[url] = failure
            if advance:
                advance(1)

    pool = ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="download")
    try:
        for url in by_host_round_robin(todo):  # a window of futures, not one per URL of a list of millions
            pending[pool.submit(download, url, local_path(folder, url), opts, limits, stop)] = url
            if len(pending) >= 4 * opts.workers:
                collect()
        while pending:
            collect()
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return report
