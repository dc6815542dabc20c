"""The node-local shard cache (``data.cache_dir``, ``data.cache_gb``): remote shards kept on local disk.

An entry is a whole shard tar, fetched the first time any rank or loader process of the node needs it and checked
against the manifest's size and sha256 before it is renamed into place, so a reader never sees a partial or corrupt
entry. A stamp beside it records the sha256 with the size and modification time it was checked at: an entry
changed since (truncated, rewritten) no longer matches its stamp and is fetched again. Several processes may want the
same shard at once: an exclusive ``flock`` on the entry's lock file makes one of them fetch it while the others
wait, so each entry is written once. Past ``cache_gb`` the least recently used entries are deleted (a reader
holding one open keeps reading it: Linux frees the blocks at its close).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bgtrain import storage
from bgtrain.config import DataConfig

CHUNK = 8 << 20


def shard_cache(cfg: DataConfig) -> ShardCache | None:
    """The cache ``data.cache_dir`` / ``data.cache_gb`` ask for, or None."""
    if cfg.cache_dir is None:
        return None
    return ShardCache(cfg.cache_dir, int(cfg.cache_gb * 1e9), storage.Retry(total_s=cfg.retry_s))


@dataclass(frozen=True)
class ShardCache:
    folder: str
    capacity_bytes: int
    retry: storage.Retry = storage.DEFAULT_RETRY

    def entry(self, location: str) -> Path:
        """Where ``location`` is kept: a readable name plus a hash of the full URL (two stores, one cache)."""
        digest = hashlib.sha256(location.encode()).hexdigest()[:16]
        return Path(self.folder, f"{digest}-{location.rstrip('/').rsplit('/', 1)[-1]}")

    def local(self, location: str, size: int | None, sha256: str | None) -> str:
        """A local path holding ``location``'s bytes, fetched and verified first if it is not cached yet."""
        path = self.entry(location)
        if self._valid(path, size, sha256):
            _touch(path)
            return str(path)
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        with open(_beside(path, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per entry; the others wait here, then find it
            if not self._valid(path, size, sha256):
                self._fetch(location, path, size, sha256)
        self._evict(keep=path)
        return str(path)

    @staticmethod
    def _valid(path: Path, size: int | None, sha256: str | None) -> bool:
        """The entry is there and unchanged since it was checked against the manifest's size and sha256."""
        try:
            st = path.stat()
            stamp = _beside(path, ".sha256").read_text().split()
        except (FileNotFoundError, OSError):
            return False
        return (len(stamp) == 3 and (sha256 is None or stamp[0] == sha256) and (size is None or st.st_size == size)
                and stamp[1:] == [str(st.st_size), str(st.st_mtime_ns)])

    def _fetch(self, location: str, path: Path, size: int | None, sha256: str | None) -> None:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            for _ in range(2):  # a verified copy, or one refetch after a corrupt one
                storage.download(location, tmp, self.retry)
                digest = _sha256(tmp) if sha256 else None
                if (size is None or tmp.stat().st_size == size) and digest == sha256:
                    st = tmp.stat()
                    _beside(path, ".sha256").write_text(f"{digest or '-'} {st.st_size} {st.st_mtime_ns}\n")
                    os.replace(tmp, path)
                    storage.COUNTERS["cache_fetches"] += 1
                    return
                storage.COUNTERS["cache_corrupt"] += 1
            raise storage.StorageError(f"{location}: fetched twice, and twice it does not match the manifest's "
                                       f"size ({size}) and sha256; the object differs from the shards' manifest")
        finally:
            tmp.unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        entries = []
        for p in Path(self.folder).iterdir():
            if p.name.startswith(".") or p.suffix in (".lock", ".sha256"):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_atime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):  # least recently used first
            if total <= self.capacity_bytes:
                break
            if p != keep:
                _beside(p, ".sha256").unlink(missing_ok=True)
                p.unlink(missing_ok=True)
                total -= size
                storage.COUNTERS["cache_evictions"] += 1


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _touch(path: Path) -> None:
    """Mark the entry recently used: its access time, set explicitly (a noatime mount never updates it), and
    not its modification time, which its stamp holds."""
    st = path.stat()
    os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
