"""Generic lists: ``{train,val,test}.csv`` (``path,positives[,negatives]``) or ``.jsonl``, plus ``classes.txt``.

CSV cells hold class names (or integer ids) separated by ``;``; an optional header row starting with
``path`` is skipped. JSONL lines are ``{"path": ..., "positives": [...], "negatives": [...]}``. Paths are
relative to ``--images`` (default: the folder of the list); a path that starts with ``http://`` or ``https://``
is a URL, which the builder downloads (``shards.download``). Observed = full = what is listed; classes
not listed are unknown or negative, per split: ``--rest negative``, ``--rest train=unknown,val=negative``.
Without ``--rest``, train is unknown and a val/test list is unknown when it lists negatives itself, else
negative (a note says so). A val/test split with no negative at all would score 100 mAP whatever the model,
so it is refused.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from bgtrain.cli import DataError, UsageError
from shards.download import is_url
from shards.readers import DatasetRecords, Problems, Record, find_file

SPLITS = ("train", "val", "test")
SCORED = ("val", "test")
REST_VALUES = {"unknown": -1, "negative": 0}


def parse_rest(text: str | None) -> dict[str, str]:
    """``--rest``: "unknown", "negative" or "split=value,..." -> {split: value} (splits not named: inferred)."""
    if text is None or not str(text).strip():
        return {}
    text = str(text).strip()
    if text in REST_VALUES:
        return {s: text for s in SPLITS}
    out = {}
    for part in text.split(","):
        split, _, value = part.partition("=")
        split, value = split.strip(), value.strip()
        if split not in SPLITS or value not in REST_VALUES:
            raise UsageError(f"--rest {text!r}: expected unknown, negative or SPLIT=VALUE,... with SPLIT in "
                             f"{', '.join(SPLITS)} and VALUE unknown or negative; {part!r} is neither")
        out[split] = value
    return out


def _labels(cells: list, classes: dict[str, int], where: str, problems: Problems) -> tuple[int, ...]:
    out = set()
    for cell in cells:
        name = str(cell).strip()
        if not name:
            continue
        if name in classes:
            out.add(classes[name])
        elif name.isdigit() and int(name) < len(classes):
            out.add(int(name))
        else:
            problems.add("unknown_class", where, f"class {name!r} is not in classes.txt; label dropped")
    return tuple(sorted(out))


def _rows(path: Path, problems: Problems) -> list[tuple[str, list, list, str]]:
    """(path, positives, negatives, where) per listed image."""
    rows = []
    if path.suffix == ".jsonl":
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            line_no = path.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line_no}: not UTF-8; save the list as UTF-8") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
                rows.append((str(obj["path"]), list(obj.get("positives", [])), list(obj.get("negatives", [])), where))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                problems.add("bad_line", where, f"expected a JSON object with 'path' ({e})")
        return rows
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line_no}: not UTF-8 (byte {path.read_bytes()[e.start]:#04x}); "
                        "save the list as UTF-8") from None
    with io.StringIO(text, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not any(c.strip() for c in row) or (n == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) > 3:
                problems.add("bad_line", f"{path}:{n}", f"expected path,positives[,negatives], got {row!r}")
                continue
            split = [c.split(";") if c else [] for c in row[1:]] + [[], []]
            rows.append((row[0].strip(), split[0], split[1], f"{path}:{n}"))
    return rows


def read(src: Path, seed: int = 1200, problems: Problems | None = None, images: Path | None = None,
         classes: Path | None = None, rest: str | None = None, **_: object) -> DatasetRecords:
    """Records from per-split lists in ``src``; class names from ``classes`` (default ``src/classes.txt``)."""
    problems = problems or Problems()
    src = Path(src).resolve()
    class_file = Path(classes) if classes else find_file(src, ["classes.txt"], "class names file")
    names = [ln.strip() for ln in class_file.read_text().splitlines() if ln.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{class_file}: class names must be non-empty and unique")
    index = {n: i for i, n in enumerate(names)}
    images = Path(images).resolve() if images else src
    rest_of = parse_rest(rest)
    splits: dict[str, list[Record]] = {}
    for split in SPLITS:
        lists = [src / f"{split}.{ext}" for ext in ("csv", "jsonl") if (src / f"{split}.{ext}").is_file()]
        if len(lists) > 1:
            raise ValueError(f"{src}: both {split}.csv and {split}.jsonl exist; keep one")
        if not lists:
            continue
        rows = _rows(lists[0], problems)
        if not rows:
            problems.add("empty_file", str(lists[0]), f"no images listed; split {split} is empty")
        seen: set[str] = set()
        out = []
        for path, pos_cells, neg_cells, where in rows:
            if path in seen:
                problems.add("duplicate_image_id", where, f"{path} listed again; first kept")
                continue
            seen.add(path)
            pos = _labels(pos_cells, index, where, problems)
            neg = tuple(c for c in _labels(neg_cells, index, where, problems) if c not in pos)
            out.append(Record(path if is_url(path) else str(images / path), path, pos, neg, pos, neg))
        splits[split] = out
    if "train" not in splits:
        raise FileNotFoundError(f"{src}: no train.csv or train.jsonl")
    notes = []
    for split, records in splits.items():
        if split in rest_of:
            continue
        listed_negatives = any(r.full_neg for r in records)
        rest_of[split] = "unknown" if split not in SCORED or listed_negatives else "negative"
        if split in SCORED and records:
            notes.append(f"--rest not given for {split}: unlisted classes are {rest_of[split]} "
                         f"({'the list gives negatives' if listed_negatives else 'the list gives no negatives'})")
    for split in SCORED:
        records = splits.get(split, [])
        if records and rest_of[split] == "unknown" and not any(r.full_neg for r in records):
            raise UsageError(f"split {split}: no negative label and --rest {split}=unknown, so its mAP would be "
                             f"100 whatever the model; list negatives or use --rest {split}=negative")
    rest_values = {s: {"observed": REST_VALUES[rest_of[s]], "full": REST_VALUES[rest_of[s]]} for s in splits}
    return DatasetRecords("csv", names, splits, rest_values, problems, notes=notes)
