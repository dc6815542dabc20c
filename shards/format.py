"""The on-disk shard format: one place that writes and parses what a sample looks like.

A split is a folder of WebDataset tars (``{split}-{index:06d}.tar``) with a DALI index
(``.idx``) beside each, plus one ``manifest.json`` for the whole dataset. A sample is:

``{key}.jpg``   the RGB JPEG.
``{key}.lbl``   little-endian int32: ``[sample_id, n_obs_pos, n_obs_neg, n_full_pos, n_full_neg,
                obs_pos..., obs_neg..., full_pos..., full_neg...]``.
``{key}.json``  the same labels with class names, for people.

One fixed-header int32 member (never empty) is readable by webdataset and by DALI's
``fn.readers.webdataset`` with ``dtypes=INT32``; DALI yields an empty tensor for an empty member
and that crashes later operators, so id lists are never stored as members of their own.
What an id list leaves out is "rest": the manifest says, per split and label set, whether the rest
is unknown (-1) or negative (0).

``.lbl`` members are decoded in one place, :func:`decode_label_rows`, a batch at a time; the loader
and the shard tools (:func:`decode_labels`, one member) both use it. The manifest is read in one
place too, :func:`read_manifest`, which checks its shape and that every path it names stays inside
the shard folder (:func:`path_inside`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bgtrain import storage

FORMAT_VERSION = "bgtrain-shards/1"
HEADER = 5


class ShardError(ValueError):
    """A shard folder's file is unreadable or disagrees with the manifest; the message names the file."""


@dataclass(frozen=True)
class SampleLabels:
    """Class-id lists of one sample. ``obs_*`` is what training sees, ``full_*`` the full annotation."""

    sample_id: int
    obs_pos: Sequence[int]
    obs_neg: Sequence[int] = ()
    full_pos: Sequence[int] = ()
    full_neg: Sequence[int] = ()


def encode_labels(labels: SampleLabels) -> bytes:
    """Pack labels into the ``.lbl`` member."""
    parts = [labels.obs_pos, labels.obs_neg, labels.full_pos, labels.full_neg]
    header = [labels.sample_id] + [len(p) for p in parts]
    flat = np.concatenate([np.asarray(header, np.int64)] + [np.asarray(p, np.int64) for p in parts])
    if flat.min(initial=0) < 0 or flat.max(initial=0) >= 2**31:
        raise ValueError(f"label ids out of int32 range for sample {labels.sample_id}")
    return flat.astype("<i4").tobytes()


def decode_labels(member: bytes | np.ndarray) -> SampleLabels:
    """Inverse of :func:`encode_labels`; accepts raw bytes or the int32 array DALI yields."""
    if isinstance(member, (bytes, bytearray)):
        rows, lengths = pad_label_members([bytes(member)])
    else:
        arr = np.asarray(member, np.int32).ravel()
        rows, lengths = arr[None, :], np.array([arr.size])
    if lengths[0] < HEADER:
        raise ValueError(f"label member has {max(int(lengths[0]), 0)} whole ints, needs at least {HEADER}")
    decoded = decode_label_rows(rows, lengths)
    if not decoded.ok[0]:
        raise ValueError(f"label member length {int(lengths[0])} does not match its header "
                         f"{rows[0, 1:HEADER].tolist()}")
    return SampleLabels(int(decoded.sample_id[0]), *(ids[0][ids[0] >= 0].tolist() for ids in decoded.lists))


@dataclass(frozen=True)
class LabelRows:
    """Decoded ``.lbl`` members of a batch: sample ids and -1-padded (B, L) int32 id arrays.

    ``ok`` is False for a member that does not match its header (its ids are then empty and its
    sample id -1): the caller decides whether that is an error or a corrupt sample to count.
    """

    sample_id: np.ndarray   # (B,) int64
    obs_pos: np.ndarray
    obs_neg: np.ndarray
    full_pos: np.ndarray
    full_neg: np.ndarray
    ok: np.ndarray          # (B,) bool

    @property
    def lists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.obs_pos, self.obs_neg, self.full_pos, self.full_neg

    def label_set(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(positive, negative) ids of ``name``: "observed" (what training sees) or "full"."""
        return (self.obs_pos, self.obs_neg) if name == "observed" else (self.full_pos, self.full_neg)


def pad_label_members(members: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``.lbl`` members -> (int32 (B, L) rows padded with -1, member lengths in ints).

    A missing member (None) or one whose byte length is not a whole number of int32s gets length -1,
    which :func:`decode_label_rows` reports as not ok.
    """
    arrays = [np.frombuffer(m, "<i4") if m is not None and len(m) % 4 == 0 else None for m in members]
    width = max([HEADER] + [a.size for a in arrays if a is not None])
    rows = np.full((len(members), width), -1, np.int32)
    lengths = np.full(len(members), -1, np.int64)
    for i, a in enumerate(arrays):
        if a is not None:
            rows[i, : a.size] = a
            lengths[i] = a.size
    return rows, lengths


def decode_label_rows(lbl: np.ndarray, lengths: np.ndarray | None = None) -> LabelRows:
    """Vectorised :func:`encode_labels` inverse over a batch of members padded with -1 (DALI's ``fn.pad``).

    A row is ok when its counts are non-negative, its ids non-negative, and the ints after its last
    id are padding (-1); with ``lengths`` (ints per member, from :func:`pad_label_members`) its length
    must also be exactly the header's.
    """
    lbl = np.asarray(lbl, np.int32)
    if lbl.ndim != 2 or lbl.shape[1] < HEADER:
        raise ValueError(f"label members: expected (B, >= {HEADER}) int32, got shape {lbl.shape}")
    counts = lbl[:, 1:HEADER].astype(np.int64)
    length = HEADER + counts.sum(1)
    col = np.arange(lbl.shape[1])
    inside = (col >= HEADER) & (col[None, :] < length[:, None])
    ok = (counts >= 0).all(1) & (length <= lbl.shape[1]) & (lbl[:, 0] >= 0)
    ok &= np.where(inside, lbl >= 0, True).all(1) & np.where(col[None, :] >= length[:, None], lbl == -1, True).all(1)
    if lengths is not None:
        ok &= np.asarray(lengths) == length
    counts = np.where(ok[:, None], counts, 0)
    starts = HEADER + np.concatenate([np.zeros((len(lbl), 1), np.int64), np.cumsum(counts, 1)], 1)
    lists = [_gather_ids(lbl, starts[:, k], counts[:, k]) for k in range(4)]
    return LabelRows(np.where(ok, lbl[:, 0], -1).astype(np.int64), lists[0], lists[1], lists[2], lists[3], ok)


def _gather_ids(lbl: np.ndarray, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    width = max(int(count.max(initial=0)), 1)
    col = np.arange(width)
    idx = np.minimum(start[:, None] + col, lbl.shape[1] - 1)
    return np.where(col < count[:, None], np.take_along_axis(lbl, idx, 1), -1).astype(np.int32)


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of one regular-file member of an open tar (a ShardError naming it for anything else)."""
    f = tar.extractfile(member)
    if f is None:
        raise ShardError(f"{os.fsdecode(tar.name or 'tar')}: member {member.name} is not a regular file")
    return f.read()


def sample_key(split: str, sample_id: int) -> str:
    """Tar key of a sample; webdataset splits member names at the first dot, so keys have none."""
    return f"{split}_{sample_id:09d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so that the same inputs always give the same bytes (resumable, verifiable builds).
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "bgtrain"
    return info


def json_id_tail(sample_id: int, width: int = 0) -> bytes:
    """How a ``.json`` member ends: its sample id, right-aligned in ``width`` characters (0: as json.dumps writes it).

    Array-build parts write the id at the width of the largest id the split can have, so that the merge can
    renumber a sample in place without changing the size of any member (``shards.merge``).
    """
    if width and len(str(sample_id)) > width:
        raise ValueError(f"sample id {sample_id} does not fit in {width} characters")
    return f'"sample_id": {sample_id:>{width}}}}'.encode() if width else f'"sample_id": {sample_id}}}'.encode()


@dataclass
class ShardWriter:
    """Writes one tar atomically (temporary name, fsync, rename) and its DALI index beside it.

    ``id_width`` > 0 pads the sample id of each ``.json`` member to that many characters (array-build parts).
    """

    path: Path
    _entries: list = field(default_factory=list)
    id_width: int = 0

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def write(self, key: str, jpeg: bytes, labels: SampleLabels, names: Sequence[str]) -> None:
        """Append one sample."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        meta = {
            "sample_id": labels.sample_id,
            "observed": {"pos": [names[i] for i in labels.obs_pos], "neg": [names[i] for i in labels.obs_neg]},
            "full": {"pos": [names[i] for i in labels.full_pos], "neg": [names[i] for i in labels.full_neg]},
        }
        text = json.dumps(meta, sort_keys=True).encode()  # sample_id sorts last: the text ends with it
        if self.id_width:
            text = text[: -len(json_id_tail(labels.sample_id))] + json_id_tail(labels.sample_id, self.id_width)
        members = [("jpg", jpeg), ("lbl", encode_labels(labels)), ("json", text)]
        for ext, data in members:
            self._tar.addfile(_tar_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
            # DALI indexes the data, which ends the member's 512-byte-padded block.
            data_offset = self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            self._entries.append((key, ext, data_offset, len(data)))
        self._count += 1

    def close(self) -> dict:
        """Finish the tar and return its manifest entry."""
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        write_dali_index(self.path.with_suffix(".idx"), self._entries)
        os.replace(self._tmp, self.path)
        # bytes: the loader compares it with the tar before reading (a truncated copy is caught early)
        return {"name": self.path.name, "num_samples": self._count, "sha256": sha256_file(self.path),
                "bytes": self.path.stat().st_size}

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)


def write_dali_index(path: Path, entries: list) -> None:
    """Write the index that DALI's wds2idx would write (format v1.2), atomically."""
    samples: dict[str, list] = {}
    for key, ext, offset, size in entries:
        samples.setdefault(key, []).append((ext, offset, size))
    lines = [f"v1.2 {len(samples)}"]
    for key, comps in samples.items():
        lines.append(" ".join(f"{ext} {off} {size} {key}.{ext}" for ext, off, size in comps))
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class ShardIndex:
    """A shard's DALI index (``.idx``): per sample its key and, per member, (data offset, size) in the tar."""

    keys: tuple[str, ...]
    members: tuple[dict[str, tuple[int, int]], ...]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def end(self) -> int:
        """Where the last member's data ends: a tar shorter than this is truncated."""
        return max((off + size for m in self.members for off, size in m.values()), default=0)

    def span(self, first: int, stop: int) -> tuple[int, int]:
        """The byte range [start, end) holding the member data of samples ``first`` .. ``stop - 1``."""
        ranges = [(off, off + size) for m in self.members[first:stop] for off, size in m.values()]
        return (min(a for a, _ in ranges), max(b for _, b in ranges)) if ranges else (0, 0)


def read_dali_index(path: str | os.PathLike, retry: storage.Retry = storage.DEFAULT_RETRY) -> ShardIndex:
    """Parse a ``.idx`` written by :class:`ShardWriter` or DALI's ``wds2idx`` (format v1.2); a local path or URL."""
    path = str(path)
    try:
        lines = storage.read_bytes(path, retry).decode().splitlines()
    except FileNotFoundError:
        raise ShardError(f"{path}: index missing; rebuild the shards or run `wds2idx` (ships with DALI)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: cannot read the index ({e})") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise ShardError(f"{path}: not a v1.2 DALI index with as many lines as its header says")
    keys, members = [], []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split()
        try:
            if not fields or len(fields) % 4:
                raise ValueError("expected groups of 'ext offset size name'")
            comps = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
        except ValueError as e:
            raise ShardError(f"{path}: line {n} is not an index entry ({e})") from None
        if any(off < 0 or size < 0 for off, size in comps.values()):
            raise ShardError(f"{path}: line {n} has a negative offset or size")
        keys.append(fields[3].split(".", 1)[0])
        members.append(comps)
    return ShardIndex(tuple(keys), tuple(members))


def path_inside(root: str | os.PathLike, relative: str, source: str | os.PathLike) -> str:
    """``root/relative`` (a path or URL) if ``relative`` stays inside ``root``; else a :class:`ShardError` naming
    it and ``source``.

    The check is on the name (no absolute path, no ``..``), so a shard folder may still hold
    symlinks its owner put there on purpose.
    """
    parts = Path(relative).parts if isinstance(relative, str) else ()
    if not parts or Path(relative).is_absolute() or ".." in parts or "\\" in relative:
        raise ShardError(f"{source}: path {relative!r} leaves the shard folder {root}; refusing to read it")
    return storage.join(root, relative)


def read_manifest(root: str | os.PathLike) -> dict:
    """Load ``manifest.json`` from a shard folder or URL; a missing, foreign or malformed one is a clear error.

    Checked here, once, for every reader: the JSON parses to an object of this format, every split
    lists its shards with names and counts, and every path it names stays inside ``root``.
    """
    path = storage.join(root, "manifest.json")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no shard manifest here; build shards with `python -m shards build` "
                                "or `python -m shards synthetic`") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"{path}: a folder, not a shard manifest") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except storage.StorageError as e:  # names the URL already
        raise ShardError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: cannot read it ({e})") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION!r}")
    _check_manifest(manifest, str(root), path)
    return manifest


def _check_manifest(manifest: dict, root: str, path: str) -> None:
    if not isinstance(manifest.get("classes"), list):
        raise ShardError(f"{path}: 'classes' must be a list of class names")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise ShardError(f"{path}: 'splits' must map split names to their shards")
    for split, entry in splits.items():
        where = f"{path}: splits.{split}"
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise ShardError(f"{where}.shards must be a list of shard entries")
        folder = path_inside(root, split, path)
        for i, shard in enumerate(entry["shards"]):
            if not isinstance(shard, dict) or not isinstance(shard.get("name"), str):
                raise ShardError(f"{where}.shards[{i}] has no 'name'")
            path_inside(folder, shard["name"], path)
            if len(Path(shard["name"]).parts) != 1:
                raise ShardError(f"{path}: shard name {shard['name']!r} must be a file name, not a path")
            for key in ("num_samples", "bytes"):
                value = shard.get(key, 0 if key == "bytes" else None)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ShardError(f"{where}.shards[{i}].{key}: expected a count >= 0, got {value!r}")
    for rel in (manifest.get("index") or {}).values():
        path_inside(root, str(rel), path)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)
