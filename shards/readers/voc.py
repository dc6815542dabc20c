"""PASCAL VOC 2012: ``VOCdevkit/VOC2012/ImageSets/Main/{class}_{train,val}.txt`` and ``JPEGImages/``.

As COLE's ``format_pascal.py``: the trainval pool is the images with a label 1 in some
``{class}_train.txt``, the test set the same from ``{class}_val.txt``; 0 (difficult) and -1 are
negatives, an image with no 1 is not used; images are sorted by file name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.readers import DatasetRecords, Problems, cole_splits, find_file, single_positive_dataset

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
           "tvmonitor"]


def _phase(root: Path, phase: str, problems: Problems) -> tuple[list[tuple[str, str]], np.ndarray]:
    main = root / "ImageSets" / "Main"
    listed: set[str] | None = None
    if (main / f"{phase}.txt").is_file():  # the image list; class files should only name these
        listed = {ln.split()[0] for ln in (main / f"{phase}.txt").read_text().splitlines() if ln.strip()}
    positives: dict[str, list[int]] = {}
    for c, cls in enumerate(CLASSES):
        path = main / f"{cls}_{phase}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: VOC class list missing (expected one per class and phase)")
        seen: set[str] = set()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{path}:{n}"
            if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                problems.add("bad_line", where, f"expected '<image_id> <1|0|-1>', got {line!r}")
                continue
            image_id, label = parts
            if image_id in seen:
                problems.add("duplicate_image_id", where, f"{image_id} listed twice in {path.name}")
                continue
            seen.add(image_id)
            if listed is not None and image_id not in listed:
                problems.add("not_in_image_list", where, f"{image_id} is not in {phase}.txt")
                continue
            if label == "1":
                positives.setdefault(image_id, []).append(c)
    for path in sorted(main.glob(f"*_{phase}.txt")):
        if path.name[: -len(f"_{phase}.txt")] not in CLASSES:
            problems.add("unknown_class", str(path), f"{path.name} is not one of the 20 VOC classes; ignored")
    names = sorted(f"{i}.jpg" for i in positives)  # COLE sorts file names
    full = np.zeros((len(names), len(CLASSES)), np.int8)
    for r, name in enumerate(names):
        full[r, positives[name[:-4]]] = 1
    return [(str(root / "JPEGImages" / n), n[:-4]) for n in names], full


def read(src: Path, seed: int = 1200, problems: Problems | None = None, **_: object) -> DatasetRecords:
    """Records of VOC 2012 from ``src`` (the folder holding ``VOCdevkit``, or ``VOC2012`` itself)."""
    problems = problems or Problems()
    root = find_file(Path(src), ["VOCdevkit/VOC2012", "VOC2012", "."], "VOC2012 folder").resolve()
    if not (root / "ImageSets" / "Main").is_dir():
        raise FileNotFoundError(f"{root}/ImageSets/Main not found: --src must hold VOCdevkit/VOC2012")
    train_paths, train_full = _phase(root, "train", problems)
    test_paths, test_full = _phase(root, "val", problems)
    splits = cole_splits(train_paths, train_full, test_paths, test_full, seed)
    return single_positive_dataset("voc", list(CLASSES), splits, problems)
