"""Parallel, resumable build: records from a reader -> checked JPEGs -> pre-shuffled tar shards.

Worker processes read and decode-check images (the costly part); the main process writes the
shards in input order, so sample ids are 0..N-1 in written order and the bytes do not depend on the
number of workers. A shard is "done" when its tar and index exist and ``.done/{split}-NNNNNN.json``
records its sha256; a re-run after a crash or Ctrl-C skips done shards and rewrites the rest, giving
the same bytes as one clean build.

Records whose path is an http(s) URL are first fetched into a download folder (``shards.download``), only for
the shards that are not done yet; a URL that does not download is missing, with its error in missing.jsonl.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn

from shards.download import DownloadOptions, download_all, is_url, local_path
from shards.format import SampleLabels, ShardWriter, sample_key, shard_name, write_json_atomic
from shards.images import Rejected, prepare
from shards.manifest import make_manifest, train_counts
from shards.pool import worker_pool
from shards.readers import DatasetRecords, Record

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
CHUNK = 16          # images per worker task: small enough to keep the order-preserving queue short
console = Console(stderr=True)


@dataclass(frozen=True)
class BuildOptions:
    """Settings that decide the bytes of the shards (``workers`` does not)."""

    max_side: int | None = 512
    quality: int = 90
    shard_size: int = 2000
    seed: int = 1200
    part: int = 0
    parts: int = 1


class RateColumn(ProgressColumn):
    """Items per second of a task (images, or shards for the merge)."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> str:
        return f"{task.speed or 0:,.0f} {self.unit}/s"


def write_order(n: int, split: str, seed: int) -> np.ndarray:
    """The seeded permutation of a split's ``n`` records that it is written in (same in every part)."""
    return np.random.default_rng([seed, SPLIT_CODES.get(split, 9)]).permutation(n)


def shuffled(records: Sequence[Record], split: str, seed: int) -> list[Record]:
    """The seeded order the split is written in (same in every part of an array build)."""
    return [records[i] for i in write_order(len(records), split, seed)]


def plan_part(data: DatasetRecords, opts: BuildOptions) -> tuple[dict[str, list[Record]], dict[str, list[int]]]:
    """The records part ``opts.part`` writes per split, and its range [start, end) of the written order.

    Only the part's own records are built: a reader may return a sequence that makes them when indexed.
    """
    plan, ranges = {}, {}
    for split, records in data.splits.items():
        order = write_order(len(records), split, opts.seed)
        a, b = part_range(len(order), opts.part, opts.parts)
        plan[split], ranges[split] = [records[int(i)] for i in order[a:b]], [a, b]
    return plan, ranges


def id_width(n: int) -> int:
    """Characters of the largest sample id a split of ``n`` inputs can have."""
    return len(str(max(n - 1, 0)))


def part_range(n: int, part: int, parts: int) -> tuple[int, int]:
    """Contiguous input range [start, end) of ``part`` out of ``parts``."""
    if not 0 <= part < parts:
        raise ValueError(f"--part must be in [0, --parts), got {part} of {parts}")
    return n * part // parts, n * (part + 1) // parts


def process_chunk(task: tuple[list[tuple[int, str]], int | None, int]) -> list[tuple[int, str, object]]:
    """Worker: (position, status, payload) per image; status ok (jpeg, changes), missing or rejected."""
    items, max_side, quality = task
    out: list[tuple[int, str, object]] = []
    for pos, path in items:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            out.append((pos, "missing", "file not found"))
            continue
        except OSError as e:
            out.append((pos, "rejected", f"cannot read: {e}"))
            continue
        try:
            out.append((pos, "ok", prepare(data, max_side, quality)))
        except Rejected as e:
            out.append((pos, "rejected", str(e)))
    return out


def _labels(sample_id: int, r: Record) -> SampleLabels:
    return SampleLabels(sample_id, r.obs_pos, r.obs_neg, r.full_pos, r.full_neg)


def fingerprint(records: dict[str, list[Record]], classes: list[str], opts: BuildOptions) -> str:
    """Hash of everything that decides the shard bytes; a resume with another one is refused."""
    h = hashlib.sha256(json.dumps([asdict(opts), classes]).encode())
    for split in sorted(records):
        for r in records[split]:
            h.update(json.dumps([split, r.path, r.obs_pos, r.obs_neg, r.full_pos, r.full_neg]).encode())
    return h.hexdigest()


class SplitBuilder:
    """Writes one split of one part, resuming after its last done shard."""

    def __init__(self, out: Path, split: str, records: list[Record], classes: list[str], opts: BuildOptions,
                 id_width: int = 0, download: DownloadOptions | None = None):
        self.out, self.split, self.records, self.classes, self.opts = out, split, records, classes, opts
        self.id_width = id_width  # array parts: .json ids padded so that the merge renumbers them in place
        self.done_dir = out / ".done"
        self.done: list[dict] = []
        self.download = download or DownloadOptions()
        self.download_dir = Path(self.download.folder or out / "downloads")
        self.failed: dict[int, dict] = {}  # position -> why its URL did not download

    def _done_path(self, k: int) -> Path:
        return self.done_dir / f"{self.split}-{k:06d}.json"

    def load_done(self) -> int:
        """Valid done shards form a prefix; returns the input position to continue from."""
        k = 0
        while (p := self._done_path(k)).is_file():
            d = json.loads(p.read_text())
            tar = self.out / self.split / d["name"]
            if not (tar.is_file() and tar.with_suffix(".idx").is_file() and d.get("sha256")
                    and tar.stat().st_size == d["bytes"]):
                break
            self.done.append(d)
            k += 1
        tail = self.done_dir / f"{self.split}-tail.json"
        if tail.is_file():
            self.done.append(json.loads(tail.read_text()))
        return self.done[-1]["inputs"][1] if self.done else 0

    def run(self, pool: mp.pool.Pool | None, progress: Progress) -> None:
        """Build the shards that are not done yet."""
        (self.out / self.split).mkdir(parents=True, exist_ok=True)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        start = self.load_done()
        n = len(self.records)
        if start < n:
            self._fetch(start, progress)
        task = progress.add_task(f"{self.split}", total=n, completed=start)
        if start >= n:
            return
        next_id = sum(d["num_samples"] for d in self.done)
        k = sum(1 for d in self.done if d.get("name"))
        cur = self._new_state(start, next_id)
        writer: ShardWriter | None = None
        try:
            for results in self._results(pool, start):
                for pos, status, payload in results:
                    if status == "ok":
                        if writer is not None and writer._count == self.opts.shard_size:
                            self._close(writer, cur, k, end=pos)
                            k, writer, cur = k + 1, None, self._new_state(pos, next_id)
                        if writer is None:
                            writer = ShardWriter(self.out / self.split / shard_name(self.split, k),
                                                 id_width=self.id_width)
                        jpeg, changes = payload
                        writer.write(sample_key(self.split, next_id), jpeg, _labels(next_id, self.records[pos]),
                                     self.classes)
                        cur["written"].append(pos)
                        cur["reencoded"] += bool(changes)
                        next_id += 1
                    else:
                        r = self.records[pos]
                        entry = {"pos": pos, "ref": r.ref, "path": r.path, "reason": payload}
                        if status == "missing" and pos in self.failed:  # a URL that did not download
                            entry.update(self.failed[pos])
                        cur[status].append(entry)
                    progress.advance(task)
            if writer is not None:
                self._close(writer, cur, k, end=n)
                writer = None
            else:  # nothing written since the last shard: keep the reasons in a tail record
                cur["inputs"][1] = n
                write_json_atomic(self.done_dir / f"{self.split}-tail.json", cur)
                self.done.append(cur)
        finally:
            if writer is not None:
                writer.abort()

    def _new_state(self, start: int, first_id: int) -> dict:
        return {"name": None, "num_samples": 0, "first_id": first_id, "inputs": [start, start],
                "written": [], "rejected": [], "missing": [], "reencoded": 0}

    def _close(self, writer: ShardWriter, cur: dict, k: int, end: int) -> None:
        entry = writer.close()
        tar = self.out / self.split / entry["name"]
        cur.update(entry, inputs=[cur["inputs"][0], end], bytes=tar.stat().st_size)
        write_json_atomic(self._done_path(k), cur)
        self.done.append(cur)

    def _fetch(self, start: int, progress: Progress) -> None:
        """Download the URL records from ``start`` on (those of done shards are not needed again)."""
        urls = {i: p for i in range(start, len(self.records)) if is_url(p := self.records[i].path)}
        if not urls:
            return
        task = progress.add_task(f"get {self.split}", total=len(set(urls.values())))
        report = download_all(urls.values(), self.download_dir, self.download,
                              lambda k: progress.advance(task, k))
        self.failed = {i: {"reason": f"download failed: {f.error}", "error": f.error, "tries": f.tries}
                       for i, url in urls.items() if (f := report.failures.get(url))}
        if not progress.disable:
            console.print(f"{self.split}: {report.fetched:,} downloaded, {report.present:,} already in "
                          f"{self.download_dir}, {len(report.failures):,} failed (see missing.jsonl)")

    def _source(self, i: int) -> str:
        """The file record ``i`` is read from: its path, or where its URL was downloaded to."""
        path = self.records[i].path
        return str(local_path(self.download_dir, path)) if is_url(path) else path

    def _results(self, pool: mp.pool.Pool | None, start: int) -> Iterator[list]:
        items = [(i, self._source(i)) for i in range(start, len(self.records))]
        tasks = [(items[i: i + CHUNK], self.opts.max_side, self.opts.quality) for i in range(0, len(items), CHUNK)]
        if pool is None:
            yield from map(process_chunk, tasks)
            return
        # Windows bound the memory of results waiting for an earlier, slower chunk.
        window = max(8, 16 * pool._processes)  # type: ignore[attr-defined]
        for w in range(0, len(tasks), window):
            yield from pool.imap(process_chunk, tasks[w: w + window])

    def summary(self) -> dict:
        """Shards, counts and reasons of this split, from its done records."""
        shards = [{k: d[k] for k in ("name", "num_samples", "sha256", "bytes")} for d in self.done if d.get("name")]
        written = [pos for d in self.done for pos in d["written"]]
        rejected = [x for d in self.done for x in d["rejected"]]
        missing = [x for d in self.done for x in d["missing"]]
        counts = {"inputs": len(self.records), "written": len(written), "rejected": len(rejected),
                  "missing": len(missing), "reencoded": sum(d["reencoded"] for d in self.done)}
        # Nothing is lost silently: every input is written, rejected with a reason, or missing.
        assert counts["inputs"] == counts["written"] + counts["rejected"] + counts["missing"], (self.split, counts)
        assert sorted(written + [x["pos"] for x in rejected + missing]) == list(range(len(self.records)))
        return {"shards": shards, "written": written, "rejected": rejected, "missing": missing, "counts": counts}


def progress_bar(disable: bool = False, unit: str = "img") -> Progress:
    """The build's rich progress bar, with img/s."""
    return Progress(TextColumn("[bold]{task.description:>6}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                    TimeRemainingColumn(), console=console, disable=disable)


def build(data: DatasetRecords, out: Path, opts: BuildOptions, workers: int = 1, build_args: dict | None = None,
          show_progress: bool = True, download: DownloadOptions | None = None) -> dict:
    """Write the shards, index, reports and ``manifest.json`` of ``data`` (or of one part) into ``out``.

    URL records are downloaded as ``download`` says (default folder ``out/downloads``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan, ranges = plan_part(data, opts)
    fp = fingerprint(plan, data.classes, opts)
    fp_path = out / ".done" / "build.json"
    if fp_path.is_file() and json.loads(fp_path.read_text())["fingerprint"] != fp:
        raise RuntimeError(f"{out} holds a build with other inputs or settings ({fp_path}); "
                           "use a fresh --out or delete the folder")
    (out / ".done").mkdir(parents=True, exist_ok=True)
    write_json_atomic(fp_path, {"fingerprint": fp, "options": asdict(opts)})

    width = {s: id_width(len(data.splits[s])) if opts.parts > 1 else 0 for s in plan}  # see shards.merge
    builders = {s: SplitBuilder(out, s, recs, data.classes, opts, width[s], download) for s, recs in plan.items()}
    with worker_pool(workers) as pool, progress_bar(disable=not show_progress) as progress:
        for builder in builders.values():
            builder.run(pool, progress)
    return finish(data, out, opts, builders, ranges, build_args or {})


def finish(data: DatasetRecords, out: Path, opts: BuildOptions, builders: dict[str, SplitBuilder],
           ranges: dict[str, list[int]], build_args: dict) -> dict:
    """Index files, reports and the manifest, from the done records."""
    (out / "index").mkdir(exist_ok=True)
    splits, inputs, rejected, missing = {}, {}, [], []
    train_labels: list[SampleLabels] = []
    for split, b in builders.items():
        s = b.summary()
        lines = [json.dumps({"id": i, "ref": b.records[pos].ref, "path": b.records[pos].path})
                 for i, pos in enumerate(s["written"])]
        _write_text(out / "index" / f"{split}.jsonl", lines)
        rejected += [{"split": split, **x} for x in s["rejected"]]
        missing += [{"split": split, **x} for x in s["missing"]]
        splits[split] = {"shards": s["shards"], "rest": data.rest[split]}
        inputs[split] = s["counts"]
        if split == "train":
            train_labels = [_labels(i, b.records[pos]) for i, pos in enumerate(s["written"])]
    _write_text(out / "rejected.jsonl", [json.dumps(x) for x in rejected])
    _write_text(out / "missing.jsonl", [json.dumps(x) for x in missing])
    _write_text(out / "problems.jsonl", [json.dumps(x) for x in data.problems.examples])
    rest = data.rest.get("train", {"observed": -1, "full": -1})
    manifest = make_manifest(data.name, data.classes, splits, train_counts(train_labels, len(data.classes), rest),
                             {**build_args, **asdict(opts)}, rejected=len(rejected), missing=len(missing))
    manifest.update(inputs=inputs, annotation_problems=data.problems.summary(),
                    index={s: f"index/{s}.jsonl" for s in builders}, **data.meta)
    if opts.parts > 1:
        manifest["part"] = {"index": opts.part, "parts": opts.parts, "ranges": ranges}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _write_text(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def dry_run(data: DatasetRecords, opts: BuildOptions, download_dir: Path | None = None) -> dict:
    """What a build would do, without decoding: inputs per split and files that do not exist.

    URLs are not fetched: ``urls`` counts them and ``to_download`` those not yet in ``download_dir``.
    """
    report = {}
    for split, recs in plan_part(data, opts)[0].items():
        urls = [r.path for r in recs if is_url(r.path)]
        absent = sum(not is_url(r.path) and not os.path.exists(r.path) for r in recs)
        report[split] = {"inputs": len(recs), "missing": absent,
                         "shards": -(-(len(recs) - absent) // opts.shard_size)}
        if urls:
            report[split].update(urls=len(urls), to_download=sum(
                download_dir is None or not local_path(download_dir, u).is_file() for u in urls))
    return report
