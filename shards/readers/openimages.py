"""OpenImages v3 human-verified labels.

``classes-trainable.txt`` (the class MIDs, one a line), ``class-descriptions.csv`` (``MID,name``),
``{train,validation,test}/annotations-human.csv`` (``ImageID,Source,LabelName,Confidence``) and a folder
of downloaded images (``IMAGES/{train,validation,test}/{ImageID}.jpg`` or flat ``IMAGES/{ImageID}.jpg``).
Observed = full = the verified labels (Confidence 1 positive, 0 negative), rest unknown (-1) for
both; ``validation`` becomes the split ``val``. Labels outside the trainable classes are dropped and
counted; the images that were never downloaded are counted as missing by the builder.

Or the builder downloads them: with ``--url-column COLUMN`` (e.g. ``OriginalURL`` or ``Thumbnail300KURL``) the
image of each ImageID is the URL in that column of the published ``{split}/images.csv``; without it, when there
is no image folder (no ``--images``, no ``SRC/images``), the first of ``URL_COLUMNS`` the list has is used. An
ImageID with an empty cell is read from the image folder as before.

Every part of an array build reads these files whole, so the reading is a scan: plain files (no quotes,
as published) in numpy (``shards.readers.plaincsv``), others with the csv module, and a split is a
sequence that builds a record only when a part indexes it.
"""
from __future__ import annotations

import csv
import io
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import overload

import numpy as np

from shards.download import is_url
from shards.readers import DatasetRecords, Problems, Record, find_file
from shards.readers.plaincsv import byte_positions, gather, is_plain, line_bounds, read_padded, sorted_codes

SPLITS = {"train": "train", "val": "validation", "test": "test"}
REST = {"observed": -1, "full": -1}
COLUMNS = ["ImageID", "Source", "LabelName", "Confidence"]
URL_COLUMNS = ("OriginalURL", "URL", "url")   # tried in order when no image folder exists


def _class_names(src: Path, mids: list[str], problems: Problems) -> list[str]:
    path = find_file(src, ["class-descriptions.csv"], "OpenImages class-descriptions.csv")
    names: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) >= 2:
                names.setdefault(row[0], row[1])
            elif row:
                problems.add("bad_line", f"{path}:{n}", f"expected 'MID,name', got {row!r}")
    out = []
    for mid in mids:
        if mid not in names:
            problems.add("no_description", str(path), f"class {mid} has no description; its MID is its name")
        out.append(names.get(mid, mid))
    # Descriptions are not unique in OpenImages; a name must identify its class in tables and JSON.
    dup = {x for x in out if out.count(x) > 1} if len(set(out)) != len(out) else set()
    return [f"{name} ({mid})" if name in dup else name for name, mid in zip(out, mids)]


def _image_dir(images: Path, split_dir: str) -> Path:
    return images / split_dir if (images / split_dir).is_dir() else images


class LazyRecords(Sequence[Record]):
    """Records made when indexed (``_record``), one at a time or a slice's worth."""

    @overload
    def __getitem__(self, k: int) -> Record: ...

    @overload
    def __getitem__(self, k: slice) -> list[Record]: ...

    def __getitem__(self, k: int | slice) -> Record | list[Record]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(f"record {k} of {len(self)}")
        return self._record(k % len(self))

    def _record(self, k: int) -> Record:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]


class LabelledImages(LazyRecords):
    """The records of one split, sorted by ImageID, built only when indexed.

    An array build's part takes a slice of a seeded permutation of them: the part builds the few Records it
    writes, not millions (``Record`` paths cost more than the CSV scan itself).
    """

    def __init__(self, folder: Path, names: Sequence[str] | np.ndarray, starts: np.ndarray, classes: np.ndarray,
                 positive: np.ndarray) -> None:
        self.folder, self.names, self.starts, self.classes, self.positive = folder, names, starts, classes, positive

    def __len__(self) -> int:
        return len(self.names)

    def _record(self, k: int) -> Record:
        image_id = _text(self.names[k])
        a, b = self.starts[k], self.starts[k + 1]
        cls, pos = self.classes[a:b], self.positive[a:b]
        p, n = tuple(cls[pos].tolist()), tuple(cls[~pos].tolist())
        return Record(str(self.folder / f"{image_id}.jpg"), image_id, p, n, p, n)


class WithURLs(LazyRecords):
    """A split's records with the path of each ImageID listed with a URL replaced by that URL."""

    def __init__(self, records: Sequence[Record], urls: dict[str, str]) -> None:
        self.records, self.urls = records, urls

    def __len__(self) -> int:
        return len(self.records)

    def _record(self, k: int) -> Record:
        r = self.records[k]
        url = self.urls.get(r.ref)
        return replace(r, path=url) if url else r

def _url_column(path: Path, wanted: str | None) -> str | None:
    """The column of ``path`` (an images.csv) that holds the URLs: ``wanted``, or else the first of URL_COLUMNS."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if wanted is not None and wanted not in header:
        raise ValueError(f"{path}: no column {wanted!r} (--url-column) in its header {header}")
    return wanted or next((c for c in URL_COLUMNS if c in header), None)


def _image_urls(path: Path, column: str) -> dict[str, str]:
    """ImageID -> URL of an images.csv, for the rows whose ``column`` holds an http(s) URL."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        return {row["ImageID"]: url for row in rows if is_url(url := (row.get(column) or "").strip())}


def _text(name: str | bytes) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else name


def _image_list(path: Path) -> set[str | None]:
    """ImageIDs of the published image list, read as ``csv.DictReader`` would (only the ImageID column)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return set()
        col = len(header) - 1 - header[::-1].index("ImageID") if "ImageID" in header else -1
        listed: set[str | None] = set()
        for row in reader:
            if not row:
                continue
            if col < 0:
                raise ValueError(f"{path}: no ImageID column in its header {header}")
            listed.add(row[col] if col < len(row) else None)
    return listed


class _Events:
    """A split's annotation problems, handed to ``Problems`` in file order once duplicates are known.

    Duplicates are found only at the end of the scan, so every problem is held back with its line number:
    all of a kind are counted, only as many as ``Problems`` could keep as examples are stored.
    """

    def __init__(self, problems: Problems, path: Path) -> None:
        self.problems, self.path = problems, path
        self.kept: list[tuple[int, str, str]] = []
        self.room: Counter[str] = Counter()
        self.more: Counter[str] = Counter()

    def add(self, line: int, kind: str, detail: str) -> None:
        if self.room[kind] < self.problems.max_examples:
            self.room[kind] += 1
            self.kept.append((line, kind, detail))
        else:
            self.more[kind] += 1

    def add_rows(self, kind: str, rows: np.ndarray, line: np.ndarray, detail: Callable[[int], str]) -> None:
        """Problems of one kind at ``rows`` (in file order): the first few with their detail, the rest counted."""
        room = self.problems.max_examples - self.room[kind]
        for k in rows[: max(room, 0)].tolist():
            self.add(int(line[k]), kind, detail(k))
        if len(rows) > max(room, 0):
            self.more[kind] += len(rows) - max(room, 0)

    def flush(self) -> None:
        for line, kind, detail in sorted(self.kept, key=lambda e: e[0]):
            self.problems.add(kind, f"{self.path}:{line}", detail)
        for kind, n in self.more.items():
            self.problems.count(kind, n)


@dataclass
class _Scan:
    """What a scan keeps of an annotation file: sorted ImageIDs, and per kept row in file order its image's
    rank among them, its class, its confidence and its line number."""

    names: Sequence[str] | np.ndarray   # str, or UTF-8 bytes (a numpy bytes array) decoded when used
    image: np.ndarray
    cls: np.ndarray
    conf: np.ndarray
    line: np.ndarray


def _bad_line(row: list[str]) -> str:
    return f"expected ImageID,Source,LabelName,Confidence(0|1), got {row!r}"


def _scan_rows(rows: Iterator[list[str]], listed: set[str | None] | None, class_index: dict[str, int],
               known_mids: set[str], split_dir: str, events: _Events) -> _Scan:
    """Any CSV, through the csv module: one dict lookup or two per row."""
    index_of: dict[str, int] = {}
    packed, lines = array("q"), array("q")  # per kept row: (image * C + class) * 2 + confidence, line number
    num_classes = max(len(class_index), 1)
    keep_row, keep_line, get_class = packed.append, lines.append, class_index.get
    for n, row in enumerate(rows, 2):
        if len(row) < 4 or row[3] not in ("0", "1"):
            events.add(n, "bad_line", _bad_line(row))
            continue
        image_id = row[0]
        if listed is not None and image_id not in listed:
            events.add(n, "not_in_image_list", f"{image_id} is not in {split_dir}/images.csv")
            continue
        c = get_class(row[2])
        if c is None:
            kind = "untrainable_class" if row[2] in known_mids else "unknown_class"
            events.add(n, kind, f"label {row[2]} is not in classes-trainable.txt; dropped")
            continue
        i = index_of.get(image_id)
        if i is None:
            i = index_of[image_id] = len(index_of)
        keep_row(((i * num_classes + c) << 1) | (row[3] == "1"))
        keep_line(n)
    names = sorted(index_of)
    rank = np.empty(len(names), np.int64)
    rank[[index_of[x] for x in names]] = np.arange(len(names))
    kept = np.frombuffer(packed, np.int64) if len(packed) else np.zeros(0, np.int64)
    return _Scan(names, rank[(kept >> 1) // num_classes], (kept >> 1) % num_classes, kept & 1,
                 np.frombuffer(lines, np.int64) if len(lines) else np.zeros(0, np.int64))


def _scan_plain(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, listed: set[str | None] | None,
                class_index: dict[str, int], known_mids: set[str], split_dir: str, events: _Events) -> _Scan | None:
    """A file without quotes, lone CRs or NULs, where a csv row is its line split at commas, scanned in numpy.

    ``starts``/``ends`` bound the rows after the header. The same rows are kept and the same problems found,
    in the same order, as :func:`_scan_rows` would; None if a field is too long to gather.
    """
    commas = byte_positions(buf, ord(","), int(ends[-1]) if len(ends) else 0)
    first = np.searchsorted(commas, starts)
    n_commas = np.searchsorted(commas, ends) - first
    last = max(len(commas) - 1, 0)

    def comma(k: int) -> np.ndarray:
        return commas[np.minimum(first + k, last)] if len(commas) else np.zeros(len(starts), np.int64)

    c0, c1, c2 = comma(0), comma(1), comma(2)
    c3 = np.where(n_commas >= 4, comma(3), ends)
    digit = buf[np.minimum(c2 + 1, len(buf) - 1)] if len(buf) else np.zeros(len(starts), np.uint8)
    ok = (n_commas >= 3) & (c3 - c2 == 2) & ((digit == ord("0")) | (digit == ord("1")))
    line = np.arange(len(starts), dtype=np.int64) + 2

    def text(k: int) -> str:
        return bytes(buf[starts[k]: ends[k]]).decode("utf-8")

    def note(mask: np.ndarray, kind: str, detail: Callable[[int], str]) -> None:
        events.add_rows(kind, np.flatnonzero(mask), line, detail)

    note(~ok, "bad_line", lambda k: _bad_line(text(k).split(",") if ends[k] > starts[k] else []))
    ids = gather(buf, starts, c0, ok)
    if ids is None:
        return None
    if listed is not None:
        width = ids.dtype.itemsize
        allowed = np.array([b for x in listed if x is not None and len(b := x.encode("utf-8")) <= width],
                           dtype=ids.dtype)
        in_list = np.zeros(len(starts), bool)
        in_list[ok] = np.isin(ids[ok], allowed)
        note(ok & ~in_list, "not_in_image_list", lambda k: f"{text(k).split(',')[0]} is not in {split_dir}/images.csv")
        ok &= in_list
    mids = gather(buf, c1 + 1, c2, ok)
    if mids is None:
        return None
    cls = np.full(len(starts), -1, np.int64)
    if ok.any():
        unique, inverse = sorted_codes(mids[ok])
        names = [u.decode("utf-8") for u in unique.tolist()]
        cls[ok] = np.array([class_index.get(m, -1) for m in names], np.int64)[inverse]
        known = np.array([m in known_mids for m in names], bool)[inverse]
        for kind, mask in (("untrainable_class", known), ("unknown_class", ~known)):
            sub = np.zeros(len(starts), bool)
            sub[ok] = (cls[ok] < 0) & mask
            note(sub, kind, lambda k: f"label {text(k).split(',')[2]} is not in classes-trainable.txt; dropped")
    ok &= cls >= 0
    unique, image = sorted_codes(ids[ok])
    return _Scan(unique, image.astype(np.int64), cls[ok],
                 (digit[ok] == ord("1")).astype(np.int64), line[ok])


def _split(src: Path, images: Path, split_dir: str, class_index: dict[str, int], known_mids: set[str],
           problems: Problems) -> Sequence[Record]:
    path = find_file(src, [f"{split_dir}/annotations-human.csv"], f"OpenImages {split_dir} annotations")
    listed = _image_list(src / split_dir / "images.csv") if (src / split_dir / "images.csv").is_file() else None
    raw, size = read_padded(path)  # a file that is not UTF-8 fails here, as reading it as text would
    events = _Events(problems, path)
    # Every part of an array build scans every row, so the common plain file is scanned in numpy.
    scan: _Scan | None = None
    if is_plain(raw, size):
        buf = np.frombuffer(raw, np.uint8)
        starts, ends = line_bounds(buf, size)
        header = bytes(buf[starts[0]: ends[0]]).decode("utf-8").split(",") if ends[0] > starts[0] else []
        if header[:4] != COLUMNS:
            raise ValueError(f"{path}: header {header}, expected {','.join(COLUMNS)}")
        scan = _scan_plain(buf, starts[1:], ends[1:], listed, class_index, known_mids, split_dir, events)
        if scan is None:
            events = _Events(problems, path)
    if scan is None:
        reader = csv.reader(io.StringIO(raw[:size].decode("utf-8"), newline=""))
        head = next(reader, None)
        if head is None:
            problems.add("empty_file", str(path), "no header and no rows")
            return []
        if head[:4] != COLUMNS:
            raise ValueError(f"{path}: header {head}, expected {','.join(COLUMNS)}")
        scan = _scan_rows(reader, listed, class_index, known_mids, split_dir, events)
    num_classes = max(len(class_index), 1)
    key = scan.image * num_classes + scan.cls
    order = np.argsort(key, kind="stable")          # rows of one (image, class) stay in file order
    first = np.ones(len(order), bool)
    first[1:] = key[order][1:] != key[order][:-1]
    # A later row of an (image, class) is a duplicate or a conflict with the first, which is kept.
    group_first = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    later = np.sort(order[~first])
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    first_of_later = group_first[position][later]
    mids = list(class_index)
    same = scan.conf[later] == scan.conf[first_of_later]

    def again(r: int) -> str:
        return (f"{_text(scan.names[int(scan.image[r])])} {mids[int(scan.cls[r])]} annotated again "
                f"(Confidence {int(scan.conf[r])}); first kept")
    for kind, rows in (("duplicate_annotation", later[same]), ("conflicting_annotation", later[~same])):
        events.add_rows(kind, rows, scan.line, again)
    events.flush()
    kept = order[first]
    starts = np.searchsorted(scan.image[kept], np.arange(len(scan.names) + 1))
    return LabelledImages(_image_dir(images, split_dir), scan.names, starts, scan.cls[kept], scan.conf[kept] == 1)


def read(src: Path, seed: int = 1200, problems: Problems | None = None, images: Path | None = None,
         url_column: str | None = None, **_: object) -> DatasetRecords:
    """Records of OpenImages v3 from ``src``; images under ``images`` (default ``src/images``), or the URLs of
    ``url_column`` of the image lists (default: a URL column, when there is no image folder)."""
    problems = problems or Problems()
    src = Path(src).resolve()
    use_urls = url_column is not None or (images is None and not (src / "images").exists())
    images = Path(images).resolve() if images else src / "images"
    trainable = find_file(src, ["classes-trainable.txt"], "OpenImages classes-trainable.txt")
    mids = [ln.strip() for ln in trainable.read_text().splitlines() if ln.strip()]
    if len(set(mids)) != len(mids):
        raise ValueError(f"{trainable}: duplicated class MIDs")
    classes = _class_names(src, mids, problems)
    with open(src / "class-descriptions.csv", newline="", encoding="utf-8") as f:
        known = {row[0] for row in csv.reader(f) if row}
    class_index = {m: i for i, m in enumerate(mids)}
    splits = {name: _split(src, images, d, class_index, known, problems) for name, d in SPLITS.items()}
    notes = []
    for name, d in SPLITS.items():
        listing = src / d / "images.csv"
        column = _url_column(listing, url_column) if use_urls and listing.is_file() else None
        if column is not None:
            urls = _image_urls(listing, column)
            splits[name] = WithURLs(splits[name], urls)
            notes.append(f"{d}: images downloaded from the URLs in column {column} of {listing} ({len(urls):,} "
                         "listed with a URL)")
        elif use_urls:
            notes.append(f"{d}: no {'images.csv' if not listing.is_file() else 'URL column in ' + str(listing)}; "
                         f"images are read from {_image_dir(images, d)}")
    return DatasetRecords("openimages", classes, splits, {s: dict(REST) for s in SPLITS}, problems,
                          meta={"class_mids": mids}, notes=notes)
