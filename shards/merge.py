"""Merge the parts of an array build (``build --part I --parts N``) into one shard folder.

Each part numbers its samples from 0, because it cannot know how many images the parts before it
rejected. The merge renumbers: it rewrites every part tar with global sample ids and shard names
(I/O only, no image decoding; parallel), concatenates the index and reports, and sums the counts.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import tarfile
from pathlib import Path

from shards.build import _write_text, progress_bar
from shards.format import (
    SampleLabels,
    ShardWriter,
    decode_labels,
    read_manifest,
    read_member,
    sample_key,
    shard_name,
    write_json_atomic,
)
from shards.manifest import make_manifest


def part_dir(out: Path, part: int) -> Path:
    """Where part ``part`` of an array build writes."""
    return Path(out) / "parts" / f"part-{part:04d}"


def read_samples(tar_path: Path):
    """(key, {ext: bytes}) per sample, in tar order."""
    with tarfile.open(tar_path, "r:") as tar:
        key, members = None, {}
        for m in tar:
            if not m.isfile():
                continue
            k, ext = m.name.split(".", 1)
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            members[ext] = read_member(tar, m)
        if key is not None:
            yield key, members


def _rewrite(task: tuple[str, str, str, int, list[str]]) -> dict:
    """Copy one part tar to its global name with ids shifted by ``offset``."""
    src, dst, split, offset, classes = task
    writer = ShardWriter(Path(dst))
    try:
        for _, members in read_samples(Path(src)):
            lab = decode_labels(members["lbl"])
            new = SampleLabels(lab.sample_id + offset, lab.obs_pos, lab.obs_neg, lab.full_pos, lab.full_neg)
            writer.write(sample_key(split, new.sample_id), members["jpg"], new, classes)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def merge(out: Path, workers: int = 1) -> dict:
    """Merge ``out/parts/part-*`` into ``out``; returns the merged manifest."""
    out = Path(out)
    dirs = sorted((out / "parts").glob("part-*"))
    if not dirs:
        raise FileNotFoundError(f"{out}/parts: no part folders; run `python -m shards build ... --part I --parts N`")
    parts = [read_manifest(d) for d in dirs]
    n_parts = parts[0]["part"]["parts"]
    have = sorted(p["part"]["index"] for p in parts)
    if have != list(range(n_parts)):
        absent = sorted(set(range(n_parts)) - set(have))
        raise RuntimeError(f"{out}/parts: parts {absent} of {n_parts} are missing or unfinished; re-run them first")
    first = parts[0]
    for p, d in zip(parts, dirs):
        if p["classes"] != first["classes"] or p["build"]["args"].get("seed") != first["build"]["args"].get("seed"):
            raise RuntimeError(f"{d}: built with other classes or seed than {dirs[0]}")
    classes = first["classes"]

    tasks: list = []
    splits: dict = {}
    entries: dict = {}
    for split in first["splits"]:
        offset, k = 0, 0
        (out / split).mkdir(parents=True, exist_ok=True)
        for p, d in zip(parts, dirs):
            for sh in p["splits"][split]["shards"]:
                tasks.append((str(d / split / sh["name"]), str(out / split / shard_name(split, k)), split, offset,
                              classes))
                entries.setdefault(split, []).append((k, sh))
                offset += sh["num_samples"]
                k += 1
        splits[split] = {"shards": [], "rest": first["splits"][split]["rest"]}

    done = out / ".done" / "merge.json"
    done.parent.mkdir(parents=True, exist_ok=True)
    finished = json.loads(done.read_text()) if done.is_file() else {}
    todo = [t for t in tasks if not (Path(t[1]).is_file() and Path(t[1]).with_suffix(".idx").is_file()
                                     and t[1] in finished)]
    with progress_bar(unit="shard") as progress:
        bar = progress.add_task("merge", total=len(tasks), completed=len(tasks) - len(todo))
        pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(_rewrite, todo) if pool else map(_rewrite, todo)
            for t, entry in zip(todo, results):
                finished[t[1]] = entry
                write_json_atomic(done, finished)  # resumable: a rewritten shard is not redone
                progress.advance(bar)
        finally:
            if pool:
                pool.terminate()
                pool.join()
    for t in tasks:
        splits[t[2]]["shards"].append(finished[t[1]])

    counts = {k: [sum(x) for x in zip(*(p["train_counts"][k] for p in parts))] for k in first["train_counts"]}
    args = {k: v for k, v in first["build"]["args"].items() if k not in ("part", "out")}
    manifest = make_manifest(first["dataset"], classes, splits, counts, args,
                             rejected=sum(p["rejected"] for p in parts), missing=sum(p["missing"] for p in parts))
    inputs = {s: {k: sum(p["inputs"][s][k] for p in parts) for k in first["inputs"][s]} for s in first["inputs"]}
    manifest.update(inputs=inputs, annotation_problems=first["annotation_problems"],
                    index={s: f"index/{s}.jsonl" for s in splits},
                    **{k: first[k] for k in ("class_mids",) if k in first})
    _merge_side_files(out, dirs, list(splits))
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _merge_side_files(out: Path, dirs: list[Path], splits: list[str]) -> None:
    (out / "index").mkdir(exist_ok=True)
    for split in splits:
        lines, offset = [], 0
        for d in dirs:
            rows = [json.loads(x) for x in (d / "index" / f"{split}.jsonl").read_text().splitlines()]
            lines += [json.dumps({**r, "id": r["id"] + offset}) for r in rows]
            offset += len(rows)
        _write_text(out / "index" / f"{split}.jsonl", lines)
    for name in ("rejected.jsonl", "missing.jsonl"):
        _write_text(out / name, [x for d in dirs for x in (d / name).read_text().splitlines()])
    _write_text(out / "problems.jsonl", (dirs[0] / "problems.jsonl").read_text().splitlines())
