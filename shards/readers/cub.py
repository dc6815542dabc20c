"""CUB-200-2011 attributes: ``images.txt``, ``train_test_split.txt``,
``attributes/image_attribute_labels.txt`` and ``attributes.txt`` (312 attributes).

As COLE's ``format_cub.py``: the label of attribute j is ``is_present``; images in ``images.txt``
order; ``is_training_image == 1`` is the trainval pool, the rest the test set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.readers import DatasetRecords, Problems, cole_splits, find_file, single_positive_dataset


def _pairs(path: Path, problems: Problems, what: str) -> list[tuple[int, str, str]]:
    """(id, value, where) from a ``<id> <value>`` file; bad lines reported."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            problems.add("bad_line", f"{path}:{n}", f"expected '<id> <{what}>', got {line!r}")
            continue
        out.append((int(parts[0]), parts[1].strip(), f"{path}:{n}"))
    return out


def read(src: Path, seed: int = 1200, problems: Problems | None = None, **_: object) -> DatasetRecords:
    """Records of CUB from ``src`` (the folder holding ``CUB_200_2011/``, or that folder itself)."""
    problems = problems or Problems()
    src = Path(src).resolve()
    root = find_file(src, ["CUB_200_2011/images.txt", "images.txt"], "CUB images.txt").parent
    attr_file = find_file(root, ["../attributes.txt", "attributes.txt", "attributes/attributes.txt"],
                          "CUB attributes.txt")
    label_file = find_file(root, ["attributes/image_attribute_labels.txt"], "CUB image_attribute_labels.txt")
    split_file = find_file(root, ["train_test_split.txt"], "CUB train_test_split.txt")

    attrs = _pairs(attr_file, problems, "attribute name")
    classes = [name for _, name, _ in attrs]
    attr_index = {a: i for i, (a, _, _) in enumerate(attrs)}
    images: dict[int, str] = {}
    for image_id, name, where in _pairs(root / "images.txt", problems, "file name"):
        if image_id in images:
            problems.add("duplicate_image_id", where, f"image {image_id} listed twice; first kept")
            continue
        images[image_id] = name
    is_train: dict[int, bool] = {}
    for image_id, flag, where in _pairs(split_file, problems, "0|1"):
        if image_id not in images:
            problems.add("not_in_image_list", where, f"image {image_id} is not in images.txt")
        elif flag not in ("0", "1"):
            problems.add("bad_line", where, f"is_training_image must be 0 or 1, got {flag!r}")
        else:
            is_train[image_id] = flag == "1"
    row = {image_id: r for r, image_id in enumerate(images)}
    full = np.zeros((len(images), len(classes)), np.int8)
    seen = np.zeros_like(full, dtype=bool)
    for n, line in enumerate(label_file.read_text().splitlines(), 1):
        # The published file has a few lines with extra columns; only the first three matter.
        parts = line.split()
        if not parts:
            continue
        where = f"{label_file}:{n}"
        if len(parts) < 3 or not all(p.isdigit() for p in parts[:3]):
            problems.add("bad_line", where, f"expected '<image> <attribute> <is_present> ...', got {line!r}")
            continue
        image_id, attr_id, present = (int(p) for p in parts[:3])
        if image_id not in row:
            problems.add("not_in_image_list", where, f"image {image_id} is not in images.txt")
            continue
        if attr_id not in attr_index:
            problems.add("unknown_class", where, f"attribute {attr_id} is not in {attr_file.name}")
            continue
        r, c = row[image_id], attr_index[attr_id]
        if seen[r, c]:
            problems.add("duplicate_annotation", where, f"image {image_id} attribute {attr_id} again; first kept")
            continue
        seen[r, c] = True
        full[r, c] = 1 if present == 1 else 0
    for image_id in images:
        if image_id not in is_train:
            problems.add("no_split", str(split_file), f"image {image_id} has no train/test flag; not used")
    paths = [(str(root / "images" / images[i]), images[i]) for i in images]
    tr = [row[i] for i in images if is_train.get(i) is True]
    te = [row[i] for i in images if is_train.get(i) is False]
    splits = cole_splits([paths[r] for r in tr], full[tr], [paths[r] for r in te], full[te], seed)
    return single_positive_dataset("cub", classes, splits, problems)
