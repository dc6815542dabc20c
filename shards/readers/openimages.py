"""OpenImages v3 human-verified labels.

``classes-trainable.txt`` (the class MIDs, one a line), ``class-descriptions.csv`` (``MID,name``),
``{train,validation,test}/annotations-human.csv`` (``ImageID,Source,LabelName,Confidence``) and a folder
of downloaded images (``IMAGES/{train,validation,test}/{ImageID}.jpg`` or flat ``IMAGES/{ImageID}.jpg``).
Observed = full = the verified labels (Confidence 1 positive, 0 negative), rest unknown (-1) for
both; ``validation`` becomes the split ``val``. Labels outside the trainable classes are dropped and
counted; the images that were never downloaded are counted as missing by the builder.
"""
from __future__ import annotations

import csv
from pathlib import Path

from shards.readers import DatasetRecords, Problems, Record, find_file

SPLITS = {"train": "train", "val": "validation", "test": "test"}
REST = {"observed": -1, "full": -1}
COLUMNS = ["ImageID", "Source", "LabelName", "Confidence"]


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


def _split(src: Path, images: Path, split_dir: str, class_index: dict[str, int], known_mids: set[str],
           problems: Problems) -> list[Record]:
    path = find_file(src, [f"{split_dir}/annotations-human.csv"], f"OpenImages {split_dir} annotations")
    listed: set[str] | None = None
    if (src / split_dir / "images.csv").is_file():  # the published image list, when present
        with open(src / split_dir / "images.csv", newline="", encoding="utf-8") as f:
            listed = {row["ImageID"] for row in csv.DictReader(f)}
    labels: dict[str, dict[int, int]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            problems.add("empty_file", str(path), "no header and no rows")
            return []
        if header[:4] != COLUMNS:
            raise ValueError(f"{path}: header {header}, expected {','.join(COLUMNS)}")
        for n, row in enumerate(reader, 2):
            where = f"{path}:{n}"
            if len(row) < 4 or row[3] not in ("0", "1"):
                problems.add("bad_line", where, f"expected ImageID,Source,LabelName,Confidence(0|1), got {row!r}")
                continue
            image_id, mid, conf = row[0], row[2], int(row[3])
            if listed is not None and image_id not in listed:
                problems.add("not_in_image_list", where, f"{image_id} is not in {split_dir}/images.csv")
                continue
            if mid not in class_index:
                kind = "untrainable_class" if mid in known_mids else "unknown_class"
                problems.add(kind, where, f"label {mid} is not in classes-trainable.txt; dropped")
                continue
            per_image = labels.setdefault(image_id, {})
            c = class_index[mid]
            if c in per_image:
                kind = "duplicate_annotation" if per_image[c] == conf else "conflicting_annotation"
                problems.add(kind, where, f"{image_id} {mid} annotated again (Confidence {conf}); first kept")
                continue
            per_image[c] = conf
    folder = _image_dir(images, split_dir)
    out = []
    for image_id in sorted(labels):
        pos = tuple(sorted(c for c, v in labels[image_id].items() if v == 1))
        neg = tuple(sorted(c for c, v in labels[image_id].items() if v == 0))
        out.append(Record(str(folder / f"{image_id}.jpg"), image_id, pos, neg, pos, neg))
    return out


def read(src: Path, seed: int = 1200, problems: Problems | None = None, images: Path | None = None,
         **_: object) -> DatasetRecords:
    """Records of OpenImages v3 from ``src``; images under ``images`` (default ``src/images``)."""
    problems = problems or Problems()
    src = Path(src).resolve()
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
    return DatasetRecords("openimages", classes, splits, {s: dict(REST) for s in SPLITS}, problems,
                          meta={"class_mids": mids})
