"""NUS-WIDE in the formatted ``.npy`` release of the single-positive literature (COLE).

``formatted_{train,val}_images.npy`` (image paths relative to the image root) and
``formatted_{train,val}_labels.npy`` (0/1 rows, 81 concepts). Images with no label are kept, as in
COLE (about 22% of them); they get no observed positive. ``val`` is the test set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.readers import DatasetRecords, Problems, cole_splits, find_file, single_positive_dataset


def _class_names(src: Path, num_classes: int, problems: Problems) -> list[str]:
    for name in ("Concepts81.txt", "concepts.txt", "classes.txt"):
        path = src / name
        if path.is_file():
            names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            if len(names) != num_classes:
                raise ValueError(f"{path}: {len(names)} names but the label matrix has {num_classes} columns")
            return names
    problems.add("no_class_names", str(src), "no Concepts81.txt next to the .npy files; using concept_<id>")
    return [f"concept_{i:02d}" for i in range(num_classes)]


def _phase(src: Path, images: Path, phase: str, problems: Problems) -> tuple[list[tuple[str, str]], np.ndarray]:
    img_path = find_file(src, [f"formatted_{phase}_images.npy"], f"NUS-WIDE {phase} image list")
    lbl_path = find_file(src, [f"formatted_{phase}_labels.npy"], f"NUS-WIDE {phase} labels")
    names = [str(x) for x in np.load(img_path, allow_pickle=False)]
    labels = np.load(lbl_path, allow_pickle=False)
    if labels.ndim != 2 or labels.shape[0] != len(names):
        raise ValueError(f"{lbl_path}: shape {labels.shape} does not match {len(names)} images in {img_path.name}")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        r = int(np.nonzero(bad.any(1))[0][0])
        problems.add("bad_label_value", str(lbl_path), f"{int(bad.sum())} entries not 0/1 (first in row {r}); "
                     "treated as not positive")
    seen: set[str] = set()
    for n, name in enumerate(names):
        if name in seen:  # kept: dropping a row would shift COLE's random draws for all later rows
            problems.add("duplicate_image_id", f"{img_path}[{n}]", f"{name} listed twice; both kept")
        seen.add(name)
    full = (labels == 1).astype(np.int8)
    return [(str(images / n), n) for n in names], full


def read(src: Path, seed: int = 1200, problems: Problems | None = None, images: Path | None = None,
         **_: object) -> DatasetRecords:
    """Records of NUS-WIDE from ``src`` (the ``.npy`` files); images under ``images`` (default ``src``)."""
    problems = problems or Problems()
    src = Path(src).resolve()
    images = Path(images).resolve() if images else src
    train_paths, train_full = _phase(src, images, "train", problems)
    test_paths, test_full = _phase(src, images, "val", problems)
    if train_full.shape[1] != test_full.shape[1]:
        raise ValueError(f"{src}: train has {train_full.shape[1]} classes, val {test_full.shape[1]}")
    classes = _class_names(src, train_full.shape[1], problems)
    splits = cole_splits(train_paths, train_full, test_paths, test_full, seed)
    return single_positive_dataset("nuswide", classes, splits, problems)
