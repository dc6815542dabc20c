"""Merge the parts of an array build (``build --part I --parts N``) into one shard folder, without copying images.

Each part numbers its samples from 0, because it cannot know how many images the parts before it
rejected. The merge hard-links every part tar to its global name (or moves it where the file system
has no hard links) and renumbers it in place: it rewrites only the bytes that hold a sample id, that is
the three member headers, the first int of the ``.lbl`` and the end of the ``.json`` (parts write that
id padded, so no member changes size and no offset moves). Then it writes the DALI indexes with the new
keys, concatenates the index and reports (with ids and positions in the whole split), sums the
counts, writes the manifest, verifies the result
(``verify --no-decode``: the image bytes were not touched) and only then removes ``parts/``.

A merge that stops midway loses nothing: renumbering is idempotent (a sample may hold its part id or
its global id) and ``.done/merge.jsonl`` lists the tars already placed, so it is simply run again. A tar
that cannot be renumbered in place, such as one of a part built before ids were padded, is rewritten.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bgtrain.cli import DataError
from shards.build import SPLIT_CODES, _write_text, console, id_width, progress_bar
from shards.format import (
    SampleLabels,
    ShardIndex,
    ShardWriter,
    decode_labels,
    json_id_tail,
    read_dali_index,
    read_manifest,
    read_member,
    sample_key,
    sha256_file,
    shard_name,
    write_dali_index,
    write_json_atomic,
)
from shards.manifest import make_manifest
from shards.pool import worker_pool

USTAR_MAGIC = b"ustar\x0000"


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


@dataclass(frozen=True)
class Placement:
    """One part tar, where it goes, and the ids its samples have in the part and in the merged set."""

    src: str          # the part's tar
    dst: str          # its global name
    split: str
    local_first: int  # part id of its first sample
    first_id: int     # global id of its first sample
    width: int        # characters of the padded id at the end of each .json


class MergeError(DataError):
    """The merged folder failed verification; ``parts/`` is kept (exit code 1, one message)."""


_CLASSES: list[str] = []


def _init_worker(classes: list[str]) -> None:
    global _CLASSES
    _CLASSES = classes


def _rename_header(head: bytes, old: bytes, new: bytes, size: int) -> bytes | None:
    """``head`` with member name ``old`` renamed to ``new`` (same length), or None if it is not a header we wrote.

    ShardWriter's headers are USTAR with fixed metadata and a name without prefix, so renaming a member is
    replacing its name field and adjusting the checksum by the difference of the names' byte sums.
    """
    name = head[:100].rstrip(b"\0")
    if name not in (old, new) or head[257:265] != USTAR_MAGIC or head[156:157] != b"0" \
            or head[124:136] != b"%011o\0" % size or head[345:500].strip(b"\0"):
        return None
    checksum = sum(head[:148]) + 256 + sum(head[156:])   # the checksum field counts as 8 spaces
    if head[148:156] != b"%06o\0 " % checksum:
        return None
    if name == new:
        return head
    checksum += sum(new) - sum(name)
    return new.ljust(100, b"\0") + head[100:148] + b"%06o\0 " % checksum + head[156:]


def renumber_writes(fd: int, index: ShardIndex, p: Placement) -> list[tuple[int, bytes]] | None:
    """The (offset, bytes) writes that give the samples of an open part tar their global ids.

    Every sample must hold either its part id or its global id (a re-run after a crash), in its key, its
    ``.lbl`` and its ``.json``; anything else (None) means the tar is not renumbered in place but rewritten.
    """
    writes: list[tuple[int, bytes]] = []
    digits = len(p.split) + 1  # where the 9 id digits of a key start (``sample_key``)
    for j, (key, members) in enumerate(zip(index.keys, index.members)):
        local, final = p.local_first + j, p.first_id + j
        old_key, new_key = sample_key(p.split, local), sample_key(p.split, final)
        if key != old_key or len(old_key) != len(new_key) or set(members) != {"jpg", "lbl", "json"}:
            return None
        for ext, (off, size) in members.items():
            head = os.pread(fd, tarfile.BLOCKSIZE, off - tarfile.BLOCKSIZE) if off >= tarfile.BLOCKSIZE else b""
            new = _rename_header(head, f"{old_key}.{ext}".encode(), f"{new_key}.{ext}".encode(), size) \
                if len(head) == tarfile.BLOCKSIZE else None
            if new is None:
                return None
            if new != head:  # only the id digits of the name and the checksum change
                writes += [(off - tarfile.BLOCKSIZE + digits, new[digits: digits + 9]),
                           (off - tarfile.BLOCKSIZE + 148, new[148:156])]
        off, size = members["lbl"]
        stored = int.from_bytes(os.pread(fd, 4, off), "little", signed=True) if size >= 20 else -1
        if stored not in (local, final):
            return None
        if stored != final:
            writes.append((off, final.to_bytes(4, "little", signed=True)))
        off, size = members["json"]
        tail = json_id_tail(final, p.width)
        if size < len(tail):
            return None
        stored_tail = os.pread(fd, len(tail), off + size - len(tail))
        if stored_tail not in (json_id_tail(local, p.width), tail):
            return None
        if stored_tail != tail:
            writes.append((off + size - len(tail), tail))
    return writes


def place(p: Placement) -> tuple[dict, str, int]:
    """Link (or move) one part tar to its global name and renumber it; (manifest entry, how, bytes written)."""
    src, dst = Path(p.src), Path(p.dst)
    if src.exists():
        if dst.exists() and not os.path.samefile(src, dst):
            dst.unlink()  # not ours (an older merge's rewrite, say): start again from the part's tar
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:  # no hard links here: move it; a re-run finds it at dst
                os.replace(src, dst)
    elif not dst.exists() and dst.with_name(dst.name + ".src").exists():
        os.replace(dst.with_name(dst.name + ".src"), dst)  # a rewrite of a moved tar stopped midway
    elif not dst.exists():
        raise FileNotFoundError(f"{src}: part tar missing and not yet placed at {dst}; rebuild that part")
    index = read_dali_index(src.with_suffix(".idx"))
    try:
        fd = os.open(dst, os.O_RDWR)
    except PermissionError:
        return _rewrite(p, src if src.exists() else dst), "rewritten", dst.stat().st_size
    try:
        writes = renumber_writes(fd, index, p)
        if writes is not None:
            for off, data in writes:
                os.pwrite(fd, data, off)
            if writes:
                os.fsync(fd)
    finally:
        os.close(fd)
    if writes is None:
        return _rewrite(p, src if src.exists() else dst), "rewritten", dst.stat().st_size
    keys = [sample_key(p.split, p.first_id + j) for j in range(len(index))]
    write_dali_index(dst.with_suffix(".idx"),
                      [(k, ext, off, size) for k, m in zip(keys, index.members) for ext, (off, size) in m.items()])
    entry = {"name": dst.name, "num_samples": len(index), "sha256": sha256_file(dst), "bytes": dst.stat().st_size}
    return entry, "renumbered" if writes else "kept", sum(len(d) for _, d in writes)


def _rewrite(p: Placement, src: Path) -> dict:
    """Copy one part tar to its global name with global ids (the fallback: every byte is written)."""
    tmp = Path(p.dst).with_name(Path(p.dst).name + ".src")
    if src == Path(p.dst):  # moved here earlier: read it under another name while the new one is written
        os.replace(src, tmp)
        src = tmp
    writer = ShardWriter(Path(p.dst))
    try:
        for j, (_, members) in enumerate(read_samples(src)):  # ids by position: right whatever a tar holds
            lab = decode_labels(members["lbl"])
            new = SampleLabels(p.first_id + j, lab.obs_pos, lab.obs_neg, lab.full_pos, lab.full_neg)
            writer.write(sample_key(p.split, new.sample_id), members["jpg"], new, _CLASSES)
    except BaseException:
        writer.abort()
        raise
    entry = writer.close()
    tmp.unlink(missing_ok=True)
    return entry


def plan_merge(out: Path) -> tuple[list[dict], list[Path], list[Placement]]:
    """The parts' manifests and folders, checked to belong together, and where each of their tars goes."""
    dirs = sorted((out / "parts").glob("part-*"))
    if not dirs:
        hint = " (already merged: manifest.json is there)" if (out / "manifest.json").is_file() else ""
        raise FileNotFoundError(f"{out}/parts: no part folders{hint}; run `python -m shards build ... --part I "
                                "--parts N` first")
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
    placements = []
    for split in first["splits"]:
        width = id_width(max(p["part"]["ranges"][split][1] for p in parts))
        offset, k = 0, 0
        for p, d in zip(parts, dirs):
            local = 0
            for sh in p["splits"][split]["shards"]:
                placements.append(Placement(str(d / split / sh["name"]), str(out / split / shard_name(split, k)),
                                            split, local, offset, width))
                local += sh["num_samples"]
                offset += sh["num_samples"]
                k += 1
    return parts, dirs, placements


def _journal(path: Path) -> dict[str, dict]:
    """Tars a stopped merge already placed: {dst: manifest entry}; a torn last line is ignored."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["dst"]] = rec["entry"]
    return done


def merge(out: Path, workers: int = 1, keep_parts: bool = False, show_progress: bool = True) -> dict:
    """Merge ``out/parts/part-*`` into ``out``, verify it, remove ``parts/``; returns the merged manifest."""
    out = Path(out)
    parts, dirs, placements = plan_merge(out)
    first, classes = parts[0], parts[0]["classes"]
    for split in first["splits"]:
        (out / split).mkdir(parents=True, exist_ok=True)
    journal = out / ".done" / "merge.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    finished = _journal(journal)
    started, written_bytes = time.perf_counter(), 0
    hows: Counter[str] = Counter()
    todo = [p for p in placements if not (
        p.dst in finished and Path(p.dst).is_file() and Path(p.dst).with_suffix(".idx").is_file()
        and Path(p.dst).stat().st_size == finished[p.dst]["bytes"])]
    # forked before the progress bar's thread starts
    with worker_pool(workers if len(todo) > 1 else 1, _init_worker, (classes,)) as pool:
        if pool is None:
            _init_worker(classes)
        with progress_bar(unit="shard", disable=not show_progress) as progress, open(journal, "a") as log:
            bar = progress.add_task("merge", total=len(placements), completed=len(placements) - len(todo))
            results = pool.imap(place, todo) if pool else map(place, todo)
            for p, (entry, how, written) in zip(todo, results):
                finished[p.dst] = entry
                log.write(json.dumps({"dst": p.dst, "entry": entry, "how": how, "bytes_written": written}) + "\n")
                hows[how] += 1
                written_bytes += written
                log.flush()  # resumable: a placed tar is not placed again
                progress.advance(bar)
    splits: dict = {s: {"shards": [], "rest": first["splits"][s]["rest"]} for s in first["splits"]}
    for p in placements:
        splits[p.split]["shards"].append(finished[p.dst])

    counts = {k: [sum(x) for x in zip(*(p["train_counts"][k] for p in parts))] for k in first["train_counts"]}
    args = {k: v for k, v in first["build"]["args"].items() if k not in ("part", "out")}
    manifest = make_manifest(first["dataset"], classes, splits, counts, args,
                             rejected=sum(p["rejected"] for p in parts), missing=sum(p["missing"] for p in parts))
    inputs = {s: {k: sum(p["inputs"][s][k] for p in parts) for k in first["inputs"][s]} for s in first["inputs"]}
    manifest.update(inputs=inputs, annotation_problems=first["annotation_problems"],
                    index={s: f"index/{s}.jsonl" for s in splits},
                    **{k: first[k] for k in ("class_mids",) if k in first})
    _merge_side_files(out, dirs, parts, list(splits))
    write_json_atomic(out / "manifest.json", manifest)

    placed = time.perf_counter() - started
    from shards.verify import verify  # verify imports this module
    errors = verify(out, decode=False, workers=workers, show_progress=show_progress)
    if errors:
        os.replace(out / "manifest.json", out / "manifest.unverified.json")  # no loader reads an unchecked set
        shown = "\n  ".join(errors[:10])
        raise MergeError(f"{out}: the merged shards fail verification ({len(errors)} problems; manifest kept as "
                         f"manifest.unverified.json, parts/ kept):\n  {shown}")
    if not keep_parts:
        shutil.rmtree(out / "parts")
        journal.unlink()
    console.print(f"merge: {len(placements)} tars: {hows['renumbered']} renumbered in place ({written_bytes:,} bytes "
                  f"written), {hows['kept']} kept as they were, {hows['rewritten']} rewritten, "
                  f"{len(placements) - len(todo)} placed by an earlier run; {placed:.1f} s; verified in "
                  f"{time.perf_counter() - started - placed:.1f} s; "
                  f"{'parts/ kept' if keep_parts else 'parts/ removed'}")
    return manifest


def _merge_side_files(out: Path, dirs: list[Path], parts: list[dict], splits: list[str]) -> None:
    """index/{split}.jsonl with global ids; rejected and missing with global positions, in a single build's order."""
    (out / "index").mkdir(exist_ok=True)
    for split in splits:
        lines, offset = [], 0
        for d in dirs:
            rows = [json.loads(x) for x in (d / "index" / f"{split}.jsonl").read_text().splitlines()]
            lines += [json.dumps({**r, "id": r["id"] + offset}) for r in rows]
            offset += len(rows)
        _write_text(out / "index" / f"{split}.jsonl", lines)
    for name in ("rejected.jsonl", "missing.jsonl"):
        rows = []
        for p, d in zip(parts, dirs):
            for line in (d / name).read_text().splitlines():
                r = json.loads(line)
                rows.append({**r, "pos": r["pos"] + p["part"]["ranges"][r["split"]][0]})
        rows.sort(key=lambda r: SPLIT_CODES.get(r["split"], len(SPLIT_CODES)))  # stable: parts stay in order
        _write_text(out / name, [json.dumps(r) for r in rows])
    _write_text(out / "problems.jsonl", (dirs[0] / "problems.jsonl").read_text().splitlines())
