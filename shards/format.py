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
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT_VERSION = "bgtrain-shards/1"
HEADER = 5


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
    arr = np.frombuffer(member, "<i4") if isinstance(member, (bytes, bytearray)) else np.asarray(member, np.int32)
    if arr.size < HEADER:
        raise ValueError(f"label member has {arr.size} ints, needs at least {HEADER}")
    counts = arr[1:HEADER]
    if arr.size != HEADER + int(counts.sum()):
        raise ValueError(f"label member length {arr.size} does not match its header {counts.tolist()}")
    bounds = np.cumsum(np.concatenate([[HEADER], counts]))
    lists = [arr[bounds[i]: bounds[i + 1]].tolist() for i in range(4)]
    return SampleLabels(int(arr[0]), *lists)


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


@dataclass
class ShardWriter:
    """Writes one tar atomically (temporary name, fsync, rename) and its DALI index beside it."""

    path: Path
    _entries: list = field(default_factory=list)

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
        members = [("jpg", jpeg), ("lbl", encode_labels(labels)),
                   ("json", json.dumps(meta, sort_keys=True).encode())]
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
        _write_dali_index(self.path.with_suffix(".idx"), self._entries)
        os.replace(self._tmp, self.path)
        return {"name": self.path.name, "num_samples": self._count, "sha256": sha256_file(self.path)}

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)


def _write_dali_index(path: Path, entries: list) -> None:
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


def read_manifest(root: str | os.PathLike) -> dict:
    """Load ``manifest.json`` from a shard folder with a clear error if it is missing or foreign."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest here; build shards with `python -m shards build` "
                                "or `python -m shards synthetic`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION!r}")
    return manifest


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)
