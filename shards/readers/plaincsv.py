"""Plain CSV files scanned in numpy, for the annotation lists that every part of an array build reads whole.

A file is plain when it has no quote, no lone CR and no NUL: then a csv row is its line (CRLF or LF ended)
split at commas, and fields can be found from byte offsets without a Python loop per row. A reader
falls back to the csv module for any other file, and for a field longer than ``FIELD_MAX`` bytes.
"""
from __future__ import annotations

import codecs
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

FIELD_MAX = 64     # longest field gathered into a fixed-width array
CHUNK = 1 << 24    # bytes looked at per step: no temporary as large as the file


def read_padded(path: Path) -> tuple[bytearray, int]:
    """A file's bytes followed by FIELD_MAX zero bytes (see :func:`gather`), and its size; checked to be UTF-8."""
    size = path.stat().st_size
    raw = bytearray(size + FIELD_MAX)
    with open(path, "rb") as f:
        got = f.readinto(memoryview(raw)[:size])
    if got != size:
        raise OSError(f"{path}: read {got} of {size} bytes; did the file change while it was read?")
    decoder = codecs.getincrementaldecoder("utf-8")()  # raises as reading the file as text would
    for a in range(0, size, CHUNK):
        decoder.decode(raw[a: min(a + CHUNK, size)])
    decoder.decode(b"", final=True)
    return raw, size


def is_plain(raw: bytearray, size: int) -> bool:
    """Whether the first ``size`` bytes hold lines that split at commas exactly as the csv module reads them."""
    return bool(size) and raw.find(b'"', 0, size) < 0 and raw.find(b"\0", 0, size) < 0 and (
        raw.find(b"\r", 0, size) < 0 or raw.count(b"\r", 0, size) == raw.count(b"\r\n", 0, size))


def byte_positions(buf: np.ndarray, byte: int, size: int) -> np.ndarray:
    """Offsets of ``byte`` in ``buf[:size]``."""
    found = [np.flatnonzero(buf[a: min(a + CHUNK, size)] == byte) + a for a in range(0, size, CHUNK)]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def line_bounds(buf: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of every line of a plain file, without its LF or CRLF."""
    ends = byte_positions(buf, ord("\n"), size)
    if size and buf[size - 1] != ord("\n"):
        ends = np.append(ends, size)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return starts, ends - ((ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r")))


def gather(buf: np.ndarray, start: np.ndarray, end: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """The fields ``buf[start:end]`` of ``rows`` as a fixed-width bytes array (other rows: whatever lies there).

    ``buf`` ends with FIELD_MAX zero bytes, so every field's window lies inside it. None if a field of
    ``rows`` is longer than FIELD_MAX.
    """
    length = end - start
    width = max(int(length[rows].max(initial=0)), 1)
    if width > FIELD_MAX:
        return None
    out = sliding_window_view(buf, width)[start]
    short = np.flatnonzero(rows & (length < width))
    if len(short):
        out[short] *= np.arange(width) < length[short, None]
    return out.view(f"S{width}").ravel()


def sorted_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a bytes array in order, and each value's index among them.

    One pass when the values are already sorted (OpenImages lists are sorted by ImageID); else the values
    are hashed to integers, which sort far faster than bytes, and the hash is checked to be collision-free.
    """
    if len(values) and bool(np.all(values[1:] >= values[:-1])):
        new = np.concatenate([[True], values[1:] != values[:-1]])
        return values[new], np.cumsum(new) - 1
    chars = values.view(np.uint8).reshape(len(values), values.dtype.itemsize)
    digest = np.full(len(values), 14695981039346656037, np.uint64)  # FNV-1a
    for j in range(chars.shape[1]):
        digest = (digest ^ chars[:, j]) * np.uint64(1099511628211)
    codes, inverse = np.unique(digest, return_inverse=True)
    inverse = inverse.ravel()
    some = np.empty(len(codes), np.int64)
    some[inverse] = np.arange(len(values))
    distinct = values[some]
    if not np.array_equal(distinct[inverse], values):  # a collision: sort the bytes themselves
        unique, inverse = np.unique(values, return_inverse=True)
        return unique, inverse.ravel()
    order = np.argsort(distinct)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return distinct[order], rank[inverse]
