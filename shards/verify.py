"""``python -m shards verify OUT``: re-hash every tar, decode every image, check every count.

Run it before a long training: DALI dies on one bad JPEG, and a wrong count or id silently breaks
the LL-Cp correction store, which is keyed by sample id.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from shards.build import progress_bar
from shards.format import SampleLabels, decode_labels, read_manifest, sample_key, sha256_file
from shards.images import Rejected, check_jpeg
from shards.manifest import train_counts
from shards.merge import read_samples


def dali_index(tar_path: Path) -> str:
    """The index DALI's wds2idx writes for ``tar_path``, computed independently with tarfile."""
    samples: list[tuple[str, list[str]]] = []
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return "".join(line + "\n" for line in [f"v1.2 {len(samples)}"] + [" ".join(c) for _, c in samples])


def verify(root: Path, decode: bool = True) -> list[str]:
    """Every problem found in the shard folder ``root``; empty when all is well."""
    root = Path(root)
    manifest = read_manifest(root)
    classes, errors = manifest["classes"], []
    total = sum(s["num_samples"] for s in manifest["splits"].values())
    with progress_bar() as progress:
        bar = progress.add_task("verify", total=total)
        for split, info in manifest["splits"].items():
            next_id = 0
            labels: list[SampleLabels] = []
            for sh in info["shards"]:
                tar = root / split / sh["name"]
                if not tar.is_file():
                    errors.append(f"{tar}: missing")
                    continue
                if sha256_file(tar) != sh["sha256"]:
                    errors.append(f"{tar}: sha256 differs from manifest.json")
                try:
                    count = _check_tar(tar, split, sh, classes, decode, next_id, labels, errors, progress, bar)
                except (tarfile.TarError, OSError, EOFError) as e:  # truncated or damaged: name it, go on
                    errors.append(f"{tar}: unreadable tar ({e}); rebuild it (python -m shards build resumes)")
                    next_id += sh["num_samples"]  # keep the ids of the following tars aligned
                    continue
                next_id += count
                if count != sh["num_samples"]:
                    errors.append(f"{tar}: {count} samples, manifest says {sh['num_samples']}")
            if next_id != info["num_samples"]:
                errors.append(f"split {split}: {next_id} samples, manifest says {info['num_samples']}")
            if split == "train" and "train_counts" in manifest:
                if train_counts(labels, len(classes), info["rest"]) != manifest["train_counts"]:
                    errors.append("train_counts in manifest.json differ from the labels in the train shards")
    for split, c in manifest.get("inputs", {}).items():
        if c["inputs"] != c["written"] + c["rejected"] + c["missing"]:
            errors.append(f"split {split}: inputs {c['inputs']} != written + rejected + missing ({c})")
        if c["written"] != manifest["splits"][split]["num_samples"]:
            errors.append(f"split {split}: {c['written']} written but {manifest['splits'][split]['num_samples']} "
                          "in shards")
    return errors


def _check_tar(tar: Path, split: str, sh: dict, classes: list[str], decode: bool, next_id: int, labels: list,
               errors: list[str], progress, bar) -> int:
    """Check one tar's index and samples (ids from ``next_id``); returns how many samples it holds."""
    idx = tar.with_suffix(".idx")
    if not idx.is_file() or idx.read_text() != dali_index(tar):
        errors.append(f"{idx}: missing or not what wds2idx would write")
    count = 0
    for key, members in read_samples(tar):
        where, expected = f"{tar}:{key}", next_id + count
        if set(members) != {"jpg", "lbl", "json"}:
            errors.append(f"{where}: members {sorted(members)}, expected jpg, lbl, json")
            continue
        try:
            lab = decode_labels(members["lbl"])
        except ValueError as e:
            errors.append(f"{where}: bad .lbl: {e}")
            continue
        if lab.sample_id != expected or key != sample_key(split, expected):
            errors.append(f"{where}: sample id {lab.sample_id}, expected {expected}")
        ids = [*lab.obs_pos, *lab.obs_neg, *lab.full_pos, *lab.full_neg]
        if ids and max(ids) >= len(classes):
            errors.append(f"{where}: class id {max(ids)} >= {len(classes)} classes")
        meta = json.loads(members["json"])
        if meta["full"]["pos"] != [classes[i] for i in lab.full_pos if i < len(classes)]:
            errors.append(f"{where}: .json labels differ from .lbl")
        if decode:
            try:
                check_jpeg(members["jpg"])
            except Rejected as e:
                errors.append(f"{where}: {e}")
        labels.append(lab)
        count += 1
        progress.advance(bar)
    return count
