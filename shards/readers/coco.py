"""COCO 2014: ``annotations/instances_{train,val}2014.json`` and ``{train,val}2014/`` image folders.

As COLE's ``format_coco.py``: the images are those with at least one annotation, sorted by id as
strings; classes in the order of the ``categories`` list; train2014 is the trainval pool, val2014 the
test set.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shards.readers import DatasetRecords, Problems, cole_splits, find_file, single_positive_dataset


def _phase(src: Path, phase: str, problems: Problems) -> tuple[list[str], list[tuple[str, str]], np.ndarray]:
    path = find_file(src, [f"annotations/instances_{phase}2014.json"], f"COCO {phase} annotations")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: key {key!r} missing; is this a COCO instances file?")
    classes = [c["name"] for c in data["categories"]]
    cat_index = {c["id"]: i for i, c in enumerate(data["categories"])}
    files: dict[int, str] = {}
    for img in data["images"]:
        if img["id"] in files:
            problems.add("duplicate_image_id", str(path), f"image id {img['id']} listed twice; first kept")
            continue
        files[img["id"]] = img["file_name"]
    positives: dict[int, set[int]] = {}
    for n, ann in enumerate(data["annotations"]):
        image_id, cat = ann.get("image_id"), ann.get("category_id")
        if image_id not in files:
            problems.add("not_in_image_list", f"{path}:annotations[{n}]", f"image id {image_id} not in 'images'")
            continue
        if cat not in cat_index:
            problems.add("unknown_class", f"{path}:annotations[{n}]", f"category id {cat} not in 'categories'")
            continue
        positives.setdefault(image_id, set()).add(cat_index[cat])
    order = sorted(positives, key=str)  # COLE sorts image ids as strings
    full = np.zeros((len(order), len(classes)), np.int8)
    for r, image_id in enumerate(order):
        full[r, sorted(positives[image_id])] = 1
    folder = src / f"{phase}2014"
    return classes, [(str(folder / files[i]), str(i)) for i in order], full


def read(src: Path, seed: int = 1200, problems: Problems | None = None, **_: object) -> DatasetRecords:
    """Records of COCO 2014 from ``src`` (the folder holding ``annotations/`` and the image folders)."""
    problems = problems or Problems()
    src = Path(src).resolve()
    classes, train_paths, train_full = _phase(src, "train", problems)
    test_classes, test_paths, test_full = _phase(src, "val", problems)
    if test_classes != classes:
        raise ValueError(f"{src}/annotations: train2014 and val2014 list different categories")
    splits = cole_splits(train_paths, train_full, test_paths, test_full, seed)
    return single_positive_dataset("coco", classes, splits, problems)
