"""Raw dataset readers: each turns a dataset's published layout into labelled records per split.

A reader never opens images: it lists them, with their label id lists, and reports bad annotations
(unknown class, annotation for an unlisted image, duplicate id, ...) instead of crashing on them.
Missing and corrupt image files are the builder's business, so that one place counts them.
"""
from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bgtrain.labels import single_positive, split_train_val

DATASETS = ("voc", "coco", "nuswide", "cub", "openimages", "csv")
_MODULES = {"voc": "voc", "coco": "coco", "nuswide": "nuswide", "cub": "cub", "openimages": "openimages",
            "csv": "csvlist"}
SINGLE_POSITIVE_REST = {"observed": -1, "full": 0}
FULLY_LABELLED_REST = {"observed": 0, "full": 0}   # test splits: observed = full, as in shards.synthetic


@dataclass(frozen=True)
class Record:
    """One input image: where it is, what it is called in the source, and its label id lists."""

    path: str            # file to read
    ref: str             # the source's own name for it (relative path or ImageID), kept in index/{split}.jsonl
    obs_pos: tuple[int, ...]
    obs_neg: tuple[int, ...] = ()
    full_pos: tuple[int, ...] = ()
    full_neg: tuple[int, ...] = ()


class Problems:
    """Counts bad annotations by kind and keeps the first examples of each for the report."""

    def __init__(self, max_examples: int = 20) -> None:
        self.counts: Counter = Counter()
        self.examples: list[dict] = []
        self._max = max_examples

    def add(self, kind: str, where: str, detail: str) -> None:
        """Record one problem; ``where`` names the file (and line) it came from."""
        self.counts[kind] += 1
        if self.counts[kind] <= self._max:
            self.examples.append({"kind": kind, "where": where, "detail": detail})

    @property
    def max_examples(self) -> int:
        """Examples kept per kind."""
        return self._max

    def count(self, kind: str, n: int) -> None:
        """Count ``n`` more problems of ``kind`` that come after its last example (none of them is kept)."""
        if n:
            self.counts[kind] += n

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


@dataclass
class DatasetRecords:
    """What a reader returns: class names, records per split, the value of absent labels per split."""

    name: str
    classes: list[str]
    splits: Mapping[str, Sequence[Record]]   # lists, or sequences that build records when indexed
    rest: dict[str, dict[str, int]]
    problems: Problems = field(default_factory=Problems)
    meta: dict = field(default_factory=dict)   # extra manifest entries, e.g. OpenImages' class MIDs
    notes: list[str] = field(default_factory=list)   # what the reader decided for the user (printed by the CLI)


Reader = Callable[..., DatasetRecords]


def get_reader(dataset: str) -> Reader:
    """The ``read(src, seed, problems, **options)`` function of a dataset's reader module."""
    if dataset not in _MODULES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return importlib.import_module(f"shards.readers.{_MODULES[dataset]}").read


def ids(row: np.ndarray, value: int) -> tuple[int, ...]:
    """Class ids where a dense label row equals ``value``."""
    return tuple(int(i) for i in np.nonzero(row == value)[0])


def cole_splits(train_paths: Sequence[tuple[str, str]], train_full: np.ndarray,
                test_paths: Sequence[tuple[str, str]], test_full: np.ndarray, seed: int) -> dict[str, list[Record]]:
    """COLE's protocol: single positive drawn on the whole train pool first, then the 80/20 split.

    ``*_paths`` are (path, ref) pairs in the reference file order and ``*_full`` their dense 0/1 rows;
    the order matters because both random draws walk the rows in it.
    """
    if len(train_paths) != len(train_full) or len(test_paths) != len(test_full):
        raise ValueError("cole_splits: paths and label rows differ in length")
    observed = single_positive(train_full, seed=seed) if len(train_full) else np.zeros((0, 0), np.int8)
    train_idx, val_idx = split_train_val(len(train_paths), 0.2, seed=seed)

    def rec(paths: Sequence[tuple[str, str]], full: np.ndarray, obs: np.ndarray | None, i: int) -> Record:
        full_pos = ids(full[i], 1)
        obs_pos = ids(obs[i], 1) if obs is not None else full_pos
        return Record(paths[i][0], paths[i][1], obs_pos=obs_pos, full_pos=full_pos)

    return {
        "train": [rec(train_paths, train_full, observed, int(i)) for i in train_idx],
        "val": [rec(train_paths, train_full, observed, int(i)) for i in val_idx],
        "test": [rec(test_paths, test_full, None, i) for i in range(len(test_paths))],
    }


def single_positive_dataset(name: str, classes: list[str], splits: dict[str, list[Record]],
                            problems: Problems) -> DatasetRecords:
    """Wrap COLE-protocol splits with their ``rest`` values."""
    rest = {"train": SINGLE_POSITIVE_REST, "val": SINGLE_POSITIVE_REST, "test": FULLY_LABELLED_REST}
    return DatasetRecords(name, classes, splits, rest, problems)


def find_file(src: Path, candidates: Sequence[str], what: str) -> Path:
    """First existing ``src/candidate``; a clear error naming all tried paths otherwise."""
    for c in candidates:
        if (src / c).exists():
            return src / c
    tried = ", ".join(str(src / c) for c in candidates)
    raise FileNotFoundError(f"{what} not found; looked for: {tried}")
