"""Real servers on loopback for the storage tests, started by the tests themselves.

* :func:`nginx` serves a folder with Debian's ``nginx-light`` (installed with apt-get when missing): byte ranges,
  HEAD sizes and 404s as a production web server gives them.
* :func:`moto_s3` runs moto's standalone S3 server (what s3fs's own tests use) and points the standard AWS
  environment at it (``AWS_ENDPOINT_URL``, keys, region).
* :class:`FaultProxy` stands between a client and either server and breaks chosen requests: a 503, a connection
  dropped mid-body, a body cut short with the connection closed, or a stall longer than the client's timeout.
"""
from __future__ import annotations

import fcntl
import http.client
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import free_port

NGINX_PACKAGE = "nginx-light"


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: "
                               f"{log.read_text()[-2000:] if log and log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within 30 s")


def nginx_binary() -> str:
    """The nginx program, installing Debian's nginx-light first when it is missing; skips when it cannot."""
    found = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"nginx is not installed and cannot be installed here (needs root and apt-get): "
                    f"apt-get install {NGINX_PACKAGE}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    said = "another test process installed it"
    with open("/tmp/bgtrain-nginx-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers: one apt-get at a time (dpkg's own lock fails)
        for cmd in (["apt-get", "install", "-y", "-q", NGINX_PACKAGE], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", NGINX_PACKAGE]):
            if shutil.which("nginx", path="/usr/sbin"):
                break
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            said = done.stderr.strip()[-300:]
    found = shutil.which("nginx", path="/usr/sbin")
    if not found:
        pytest.skip(f"apt-get could not install {NGINX_PACKAGE}: {said}")
    return found


@contextmanager
def nginx(root: Path, workdir: Path) -> Iterator[str]:
    """Serve ``root`` read-only on a loopback port; yields the base URL (``http://127.0.0.1:PORT``)."""
    binary = nginx_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
""")
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(workdir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_for_port(port, proc, "nginx", workdir / "error.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def moto_s3(monkeypatch: pytest.MonkeyPatch | None = None) -> Iterator[str]:
    """moto's S3 server on a loopback port, with the AWS environment pointing at it; yields the endpoint URL.

    With ``monkeypatch`` the environment is set through it (undone after the test); without, nothing is set and
    the caller hands :func:`s3_env` of the endpoint to whoever needs it (a subprocess).
    """
    pytest.importorskip("moto.server", reason="moto[server] is a test requirement (requirements-test.txt)")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_port(port, proc, "moto server")
        endpoint = f"http://127.0.0.1:{port}"
        if monkeypatch is not None:
            for key, value in s3_env(endpoint).items():
                monkeypatch.setenv(key, value)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that send boto3 / s3fs to ``endpoint`` with test credentials."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def make_bucket(name: str) -> None:
    """Create bucket ``name`` on the S3 endpoint the environment points at."""
    import fsspec
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)


FAULTS = ("503", "drop", "truncate", "stall")


class FaultProxy:
    """An HTTP proxy on loopback in front of ``upstream`` that breaks every ``every``-th GET after ``after``.

    The faults cycle through ``faults``: ``503`` answers Service Unavailable; ``drop`` sends the headers and half
    the body, then resets the connection; ``truncate`` sends half the body and closes cleanly (a short read);
    ``stall`` waits ``stall_s`` before answering at all. ``injected`` counts what was done, ``requests`` all GETs.
    """

    def __init__(self, upstream: str, faults: tuple[str, ...] = ("503", "drop", "truncate"), every: int = 5,
                 after: int = 0, stall_s: float = 5.0, methods: tuple[str, ...] = ("GET",)) -> None:
        assert all(f in FAULTS for f in faults), faults
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port.rstrip("/")))
        self.faults, self.every, self.after, self.stall_s, self.methods = faults, every, after, stall_s, methods
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault_for(self, method: str) -> str | None:
        if method not in self.methods:
            return None
        with self._lock:
            self.requests += 1
            n = self.requests - self.after
            if n <= 0 or n % self.every or not self.faults:
                return None
            fault = self.faults[(n // self.every - 1) % len(self.faults)]
            self.injected[fault] += 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                fault = proxy._fault_for(self.command)
                if fault == "503":
                    body = b"Service Unavailable (injected)"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                # a HEAD's length is the upstream's (it has no body here)
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if fault in ("drop", "truncate") and self.command != "HEAD" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if fault == "drop":  # RST instead of FIN: the client sees a connection reset
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler
