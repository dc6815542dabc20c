"""What a run folder holds, read without changing it: config, metrics lines, results, best checkpoint, and what
is missing. Works on finished runs and on runs still writing (a half-written last line is left out and named)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bgtrain.losses import LARGE_LOSS_DEFAULT_DELTA, large_loss_k
from bgtrain.paper import published
from shards.format import read_manifest


@dataclass
class Run:
    """One run folder's contents; ``missing`` lists, in words, what the report could not show and why."""

    folder: Path
    name: str
    config: dict = field(default_factory=dict)
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)   # "epoch" records: where each epoch's wall time went
    test: dict | None = None
    best_checkpoint: Path | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.test is not None

    @property
    def scheme(self) -> str | None:
        return (self.config.get("loss") or {}).get("scheme") or (self.test or {}).get("scheme")

    @property
    def num_classes(self) -> int | None:
        """From the evaluation lines, else (no validation yet) from the run's shard manifest."""
        for record in [self.test or {}, *reversed(self.val)]:
            if record.get("n_classes"):
                return int(record["n_classes"])
        classes = (shard_manifest(self) or {}).get("classes")
        return len(classes) if classes else None

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        if self.train:
            last = self.train[-1]
            return f"running or stopped (epoch {last.get('epoch')}, step {last.get('step')})"
        return "not started"

    def groups(self) -> tuple[str, list[dict]] | None:
        """("test" | "val epoch N", groups) of the test line, else of the latest validation line with groups."""
        if self.test and self.test.get("groups"):
            return "test", self.test["groups"]
        for record in reversed(self.val):
            if record.get("groups"):
                return f"val epoch {record.get('epoch')}", record["groups"]
        return None


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a metrics.jsonl and notes on lines that could not be read."""
    records, notes = [], []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "its last line is incomplete (still being written)" if number == len(lines) else \
                f"line {number} is not JSON"
            notes.append(f"{path}: {where}; left out")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, notes


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last written: a resumed run may log the steps after its checkpoint again."""
    by_step: dict = {}
    for record in records:
        by_step[record.get("step")] = record
    return sorted(by_step.values(), key=lambda r: (r.get("step") is None, r.get("step") or 0))


def read_run(folder: str | Path) -> Run:
    """Read a run folder; raises FileNotFoundError only when the folder itself does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder")
    run = Run(folder=folder, name=folder.name)
    config_path = folder / "config.yaml"
    if config_path.is_file():
        try:
            tree = yaml.safe_load(config_path.read_text())
            run.config = tree if isinstance(tree, dict) else {}
        except yaml.YAMLError as e:
            run.missing.append(f"{config_path}: not valid YAML ({e.__class__.__name__}); the LL schedule is not drawn")
    else:
        run.missing.append(f"{config_path}: missing; the LL schedule and the CAM strip need it")
    metrics = folder / "metrics.jsonl"
    records: list[dict] = []
    if metrics.is_file():
        records, notes = read_metrics(metrics)
        run.missing += notes
    else:
        run.missing.append(f"{metrics}: missing; no curves for this run")
    run.train = latest_per_step([r for r in records if r.get("kind") == "train"])
    run.val = latest_per_step([r for r in records if r.get("kind") == "val"])
    run.epochs = latest_per_step([r for r in records if r.get("kind") == "epoch"])
    tests = [r for r in records if r.get("kind") == "test"]
    results_path = folder / "results.json"
    if results_path.is_file():
        try:
            run.test = json.loads(results_path.read_text())
        except json.JSONDecodeError:
            run.missing.append(f"{results_path}: not valid JSON")
    if run.test is None and tests:
        run.test = tests[-1]
    if run.test is None:
        run.missing.append(f"{folder}: no results.json and no test line: {run.status}; no test mAP")
    if metrics.is_file() and not run.train:
        run.missing.append(f"{metrics}: no train lines yet")
    if metrics.is_file() and not run.val:
        run.missing.append(f"{metrics}: no val lines yet (no val-mAP curve)")
    best = folder / "checkpoints" / "best.pt"
    if best.is_file():
        run.best_checkpoint = best
    else:
        run.missing.append(f"{best}: missing; this run has no row in the CAM strip")
    run.name = str((run.test or {}).get("name") or run.config.get("name") or folder.name)
    if run.scheme in LARGE_LOSS_DEFAULT_DELTA and ll_schedule(run) is None:
        unknown = "data.batch_size or optim.epochs (no config.yaml)" if not run.config else \
            "the class count (no val line yet and the shard manifest is unreadable)"
        run.missing.append(f"{folder}: the {run.scheme} schedule (k per batch) is not drawn: {unknown}")
    return run


def ll_schedule(run: Run) -> tuple[list[int], list[int]] | None:
    """(epochs, k per batch) of a large-loss run: how many unknown entries each full batch rejects or corrects.

    The per-rank batch ``data.batch_size`` is what k is computed on (each rank selects on its own batch)."""
    scheme = run.scheme
    if scheme not in LARGE_LOSS_DEFAULT_DELTA:
        return None
    loss, data, optim = (run.config.get(key) or {} for key in ("loss", "data", "optim"))
    classes, batch, epochs = run.num_classes, data.get("batch_size"), optim.get("epochs")
    if not (classes and batch and epochs):
        return None
    delta = loss.get("delta_rel") or LARGE_LOSS_DEFAULT_DELTA[scheme]
    numbers = list(range(1, int(epochs) + 1))
    return numbers, [large_loss_k(scheme, int(batch), classes, e, float(delta)) for e in numbers]


def shard_manifest(run: Run) -> dict | None:
    """The manifest.json of the shards the run's config names (None when unreadable)."""
    shards = (run.config.get("data") or {}).get("shards")
    if not shards:
        return None
    try:
        return read_manifest(shards)
    except (OSError, ValueError):  # the report is still written without group-wise figures
        return None


def dataset_of(run: Run) -> str | None:
    """The dataset the run trained on, as its shards' manifest names it (None when unreadable)."""
    return (shard_manifest(run) or {}).get("dataset")


def paper_number(run: Run, dataset: str | None, table: str | None = None) -> float | None:
    """The paper's test mAP for this run's row (its name) on ``dataset``, or None when it is not a paper row."""
    if dataset is None:
        return None
    if table is None:
        table = "openimages" if dataset == "openimages" else \
            "inference_only" if published("inference_only", run.name, dataset) is not None else "single_positive"
    return published(table, run.name, dataset)
