"""Reading one shard's samples by byte range: from local disk, the node-local cache, or a URL.

A reader is opened on the byte span of the samples a slot reads (from the shard's index), and never reads
outside it: a rank fetches exactly the ranges its plan gives it, never a whole tar it does not need. Reads are
served from blocks of that span (1 MiB from a file, 8 MiB from a URL, where each request costs a round trip);
for a URL the next block is fetched in the background while the current one is decoded.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from bgtrain import storage

LOCAL_BLOCK = 1 << 20
REMOTE_BLOCK = 8 << 20


class ShardRanges:
    """Reads of ``location`` inside [start, end), front to back, in blocks (see the module's docstring)."""

    def __init__(self, location: str, span: tuple[int, int], retry: storage.Retry = storage.DEFAULT_RETRY) -> None:
        self.location, (self.start, self.end), self.retry = location, span, retry
        self.remote = storage.is_remote(location)
        self.block_size = REMOTE_BLOCK if self.remote else LOCAL_BLOCK
        self._fd = None if self.remote else os.open(location, os.O_RDONLY)
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix="read-ahead") if self.remote else None
        self._block, self._block_at = b"", self.start
        self._next: tuple[int, int, Future[bytes]] | None = None  # (at, asked, bytes)

    def __enter__(self) -> ShardRanges:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._ahead is not None:
            self._ahead.shutdown(wait=True, cancel_futures=True)
            self._ahead = None

    def _fetch(self, at: int, size: int) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, size, at)  # short at a truncated tar: the caller sees the member cut
        return storage.read_range(self.location, at, size, self.retry)

    def read(self, offset: int, size: int) -> bytes | None:
        """``size`` bytes at ``offset`` (inside the span); None when the file ends before they do."""
        if not (self.start <= offset and offset + size <= self.end):
            raise ValueError(f"{self.location}: bytes [{offset}, {offset + size}) outside the span "
                             f"[{self.start}, {self.end}) this reader was opened on")
        if offset < self._block_at:  # backwards: never in a pass, which reads in increasing order
            self._block, self._block_at = b"", offset
        while offset + size > self._block_at + len(self._block):
            have = self._block_at + len(self._block)
            if offset >= have:  # a gap (samples skipped on resume): start the buffer at the read
                self._block, self._block_at, have = b"", offset, offset
            length = min(max(offset + size - have, self.block_size), self.end - have)
            chunk, asked = self._take_or_fetch(have, length)
            # keep only from the read on: the buffer holds at most about two blocks
            self._block, self._block_at = self._block[offset - self._block_at:] + chunk, offset
            if self._ahead is not None and have + len(chunk) < self.end:
                following = have + len(chunk)
                ask = min(self.block_size, self.end - following)
                self._next = (following, ask, self._ahead.submit(self._fetch, following, ask))
            if len(chunk) < asked:  # the file ends here
                break
        at = offset - self._block_at
        data = self._block[at: at + size]
        return data if len(data) == size else None

    def _take_or_fetch(self, at: int, length: int) -> tuple[bytes, int]:
        """(bytes, how many were asked for): the block fetched ahead if it starts at ``at``, else ``length``
        bytes fetched now."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == at:
            return ahead[2].result(), ahead[1]
        if ahead is not None:
            ahead[2].cancel()
        return self._fetch(at, length), length
