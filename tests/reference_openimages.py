"""The OpenImages split reader as it was before array parts read lazily (git 75c9b55, shards/readers/openimages.py),
kept as the independent reference of the equality tests: one nested dict of labels per image, a Record per image."""
from __future__ import annotations

import csv
from pathlib import Path

from shards.readers import Problems, Record, find_file
from shards.readers.openimages import COLUMNS, _image_dir


def reference_split(src: Path, images: Path, split_dir: str, class_index: dict[str, int], known_mids: set[str],
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
