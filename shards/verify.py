"""``python -m shards verify OUT``: re-hash every tar, decode every image, check every count.

Run it before a long training: DALI dies on one bad JPEG, and a wrong count or id silently breaks
the LL-Cp correction store, which is keyed by sample id. ``--workers K`` checks K shards at a time;
the report is the serial one, line for line.

``OUT`` may be a URL (``s3://``, ``gs://``, ``http(s)://``, through :mod:`bgtrain.storage`): each tar must be
hashed whole anyway, so a remote tar is fetched once into memory (one tar per worker at a time, retried on
transient errors and checked against the object's size) and the same checks run on those bytes; nothing is
written to disk. The report is the one a local copy gives, with the URL in place of the folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bgtrain import storage
from shards.build import progress_bar
from shards.format import (
    HEADER,
    SampleLabels,
    decode_label_rows,
    decode_labels,
    pad_label_members,
    read_manifest,
    read_member,
    sample_key,
    sha256_file,
)
from shards.images import Rejected, check_jpeg
from shards.manifest import finish_counts, listed_counts
from shards.pool import worker_pool


def dali_index(tar_path: Path) -> str:
    """The index DALI's wds2idx writes for ``tar_path``, computed independently with tarfile."""
    return _walk(tar_path, decode=False)[1]


@dataclass
class ShardReport:
    """What checking one shard found: its problems, how far it moves the next expected id, its label counts."""

    first_id: int
    errors: list[str]
    advance: int
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    samples: int = 0


@dataclass(frozen=True)
class ShardTask:
    """One shard to check, with the id its first sample should have."""

    root: str
    split: str
    shard: dict
    first_id: int
    decode: bool
    count_labels: bool


_CLASSES: list[str] = []


def _init_worker(classes: list[str]) -> None:
    global _CLASSES
    _CLASSES = classes


def _fetch(url: str) -> bytes:
    """The whole object at ``url``, as long as the store says it is: a short read is retried, never returned."""
    n = storage.size(url)
    return storage.read_range(url, 0, n) if n else b""


def check_shard(task: ShardTask) -> ShardReport:
    """Hash, walk and (optionally) decode one shard; its ids are expected from ``task.first_id``."""
    sh, split = task.shard, task.split
    data: bytes | None = None
    if storage.is_remote(task.root):
        tar: str | Path = storage.join(task.root, split, sh["name"])
        try:
            data = _fetch(str(tar))
        except FileNotFoundError:
            return ShardReport(task.first_id, [f"{tar}: missing"], 0)
        except PermissionError:
            raise  # the store refuses us: every shard would say so, the caller says it once
        except OSError as e:  # retries ran out: name it, and keep the following ids aligned as for a bad tar
            return ShardReport(task.first_id, [f"{e}; run verify again once the store answers"], sh["num_samples"])
        digest = hashlib.sha256(data).hexdigest()
    else:
        tar = path = Path(task.root) / split / sh["name"]
        if not path.is_file():
            return ShardReport(task.first_id, [f"{tar}: missing"], 0)
        digest = sha256_file(path)
    errors: list[str] = []
    if digest != sh["sha256"]:
        errors.append(f"{tar}: sha256 differs from manifest.json")
    labels: list[SampleLabels] = []
    try:
        count = _check_tar(tar, split, _CLASSES, task.decode, task.first_id, labels, errors, data)
    except (tarfile.TarError, OSError, EOFError) as e:  # truncated or damaged: name it, go on
        errors.append(f"{tar}: unreadable tar ({e}); rebuild it (python -m shards build resumes)")
        count = -1
    if count >= 0 and count != sh["num_samples"]:
        errors.append(f"{tar}: {count} samples, manifest says {sh['num_samples']}")
    counts, n = listed_counts(labels, len(_CLASSES)) if task.count_labels else ({}, len(labels))
    # an unreadable tar keeps the ids of the following tars aligned with the manifest
    return ShardReport(task.first_id, errors, sh["num_samples"] if count < 0 else count, counts, n)


def verify(root: str | os.PathLike, decode: bool = True, workers: int = 1, show_progress: bool = True) -> list[str]:
    """Every problem found in the shard folder ``root`` (a path or URL); empty when all is well.

    With ``workers`` > 1, shards are checked in a process pool, each expecting the ids the manifest gives
    it; a shard whose expected first id turns out otherwise (a tar before it lost samples) is checked
    again here, so the report is the serial one.
    """
    root = str(root) if storage.is_remote(root) else str(Path(root))
    manifest = read_manifest(root)
    classes, errors = manifest["classes"], []
    count_labels = {s: s == "train" and "train_counts" in manifest for s in manifest["splits"]}
    tasks = []
    for split, info in manifest["splits"].items():
        first = 0
        for sh in info["shards"]:
            tasks.append(ShardTask(root, split, sh, first, decode, count_labels[split]))
            first += sh["num_samples"]
    total = sum(s["num_samples"] for s in manifest["splits"].values())
    with worker_pool(workers if len(tasks) > 1 else 1, _init_worker, (classes,)) as pool:
        if pool is None:
            _init_worker(classes)
        with progress_bar(disable=not show_progress) as progress:
            bar = progress.add_task("verify", total=total)
            reports = iter(pool.imap(check_shard, tasks) if pool else map(check_shard, tasks))
            for split, info in manifest["splits"].items():
                next_id, counts, n = 0, None, 0
                for sh in info["shards"]:
                    report = next(reports)
                    if report.first_id != next_id:  # ids shifted by an earlier shard: check it as serial would
                        report = check_shard(ShardTask(root, split, sh, next_id, decode, count_labels[split]))
                    errors += report.errors
                    next_id += report.advance
                    progress.advance(bar, report.samples)
                    if report.counts:
                        counts = report.counts if counts is None else {k: counts[k] + v
                                                                       for k, v in report.counts.items()}
                        n += report.samples
                if next_id != info["num_samples"]:
                    errors.append(f"split {split}: {next_id} samples, manifest says {info['num_samples']}")
                if count_labels[split]:
                    got = finish_counts(counts if counts is not None else listed_counts([], len(classes))[0], n,
                                        info["rest"])
                    if got != manifest["train_counts"]:
                        errors.append("train_counts in manifest.json differ from the labels in the train shards")
    for split, c in manifest.get("inputs", {}).items():
        if c["inputs"] != c["written"] + c["rejected"] + c["missing"]:
            errors.append(f"split {split}: inputs {c['inputs']} != written + rejected + missing ({c})")
        if c["written"] != manifest["splits"][split]["num_samples"]:
            errors.append(f"split {split}: {c['written']} written but {manifest['splits'][split]['num_samples']} "
                          "in shards")
    return errors


@dataclass
class _Sample:
    """One sample as the walk over a tar found it: its member names, labels and .json, and its JPEG's verdict."""

    key: str
    members: list[str]
    lbl: bytes | None = None
    json: bytes | None = None
    jpeg_error: str | None = None


def _walk(tar: str | Path, decode: bool, data: bytes | None = None) -> tuple[list[_Sample], str]:
    """The samples of a tar and the index wds2idx would write for it, in one pass (JPEGs checked if ``decode``).

    The tar is the file ``tar``, or ``data`` when given (a fetched remote tar). A damaged tar raises here,
    before anything about its samples is reported.
    """
    samples: list[_Sample] = []
    lines: list[list[str]] = []
    with (tarfile.open(tar, "r:") if data is None else tarfile.open(fileobj=io.BytesIO(data), mode="r:")) as t:
        for m in t:
            if not m.isfile():
                continue
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1].key != key:
                samples.append(_Sample(key, []))
                lines.append([])
            sample = samples[-1]
            sample.members.append(ext)
            lines[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
            if ext == "lbl":
                sample.lbl = read_member(t, m)
            elif ext == "json":
                sample.json = read_member(t, m)
            elif ext == "jpg" and decode:
                try:
                    check_jpeg(read_member(t, m))
                    sample.jpeg_error = None
                except Rejected as e:
                    sample.jpeg_error = str(e)
    index = "".join(line + "\n" for line in [f"v1.2 {len(samples)}"] + [" ".join(c) for c in lines])
    return samples, index


def _decode_all(members: list[bytes], num_classes: int) -> list[SampleLabels | str]:
    """``decode_labels`` of every member at once: its labels, or the message it would raise."""
    longest = HEADER + 4 * max(num_classes, 1)  # a longer member is damaged: decoded alone, not padded to
    batch = [i for i, m in enumerate(members) if len(m) <= 4 * longest]
    out: list[SampleLabels | str] = []
    for m in members:
        if len(m) > 4 * longest:
            try:
                out.append(decode_labels(m))
            except ValueError as e:
                out.append(str(e))
        else:
            out.append("")
    if not batch:
        return out
    rows, lengths = pad_label_members([members[i] for i in batch])
    decoded = decode_label_rows(rows, lengths)
    for j, i in enumerate(batch):
        if lengths[j] < HEADER:
            out[i] = f"label member has {max(int(lengths[j]), 0)} whole ints, needs at least {HEADER}"
        elif not decoded.ok[j]:
            out[i] = f"label member length {int(lengths[j])} does not match its header {rows[j, 1:HEADER].tolist()}"
        else:
            out[i] = SampleLabels(int(decoded.sample_id[j]), *(ids[j][ids[j] >= 0].tolist() for ids in decoded.lists))
    return out


def _read_index(idx: str) -> str | None:
    """The text of a remote ``.idx`` as ``Path.read_text`` would give it locally; None when there is none."""
    try:
        data = storage.read_bytes(idx)
    except FileNotFoundError:
        return None
    return data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def _check_tar(tar: str | Path, split: str, classes: list[str], decode: bool, next_id: int, labels: list,
               errors: list[str], data: bytes | None = None) -> int:
    """Check one tar's index and samples (ids from ``next_id``); returns how many samples it holds.

    ``data``: the bytes of a remote tar (``tar`` is then its URL, and its index is read beside it).
    """
    if data is None:
        idx = Path(tar).with_suffix(".idx")
        if not idx.is_file():
            errors.append(f"{idx}: missing or not what wds2idx would write")
        samples, index = _walk(tar, decode)
        if idx.is_file() and idx.read_text() != index:
            errors.append(f"{idx}: missing or not what wds2idx would write")
    else:
        url = storage.with_suffix(str(tar), ".idx")
        text = _read_index(url)
        if text is None:
            errors.append(f"{url}: missing or not what wds2idx would write")
        samples, index = _walk(tar, decode, data)
        if text is not None and text != index:
            errors.append(f"{url}: missing or not what wds2idx would write")
    whole = [s for s in samples if set(s.members) == {"jpg", "lbl", "json"}]
    decoded = dict(zip((id(s) for s in whole), _decode_all([s.lbl or b"" for s in whole], len(classes))))
    count = 0
    for sample in samples:
        key = sample.key
        where, expected = f"{tar}:{key}", next_id + count
        if set(sample.members) != {"jpg", "lbl", "json"}:
            errors.append(f"{where}: members {sorted(set(sample.members))}, expected jpg, lbl, json")
            continue
        lab = decoded[id(sample)]
        if isinstance(lab, str):
            errors.append(f"{where}: bad .lbl: {lab}")
            continue
        if lab.sample_id != expected or key != sample_key(split, expected):
            errors.append(f"{where}: sample id {lab.sample_id}, expected {expected}")
        ids = [*lab.obs_pos, *lab.obs_neg, *lab.full_pos, *lab.full_neg]
        if ids and max(ids) >= len(classes):
            errors.append(f"{where}: class id {max(ids)} >= {len(classes)} classes")
        meta = json.loads(sample.json or b"")
        if meta["full"]["pos"] != [classes[i] for i in lab.full_pos if i < len(classes)]:
            errors.append(f"{where}: .json labels differ from .lbl")
        if decode and sample.jpeg_error is not None:
            errors.append(f"{where}: {sample.jpeg_error}")
        labels.append(lab)
        count += 1
    return count
