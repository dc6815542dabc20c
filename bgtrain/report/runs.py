"""What a run folder holds, read without changing it: config, metrics lines, results, best checkpoint, and what
is missing. Works on finished runs and on runs still writing (a half-written last line is left out and named).

An evaluation-only row (``bgtrain.reproduce.EVAL_ONLY``) trains nothing: its folder holds a results.json naming the
``evaluated_checkpoint`` (another run's best.pt) and no config, metrics or checkpoints of its own, which is complete."""
from __future__ import annotations

import copy
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
    evaluates: Path | None = None    # evaluation-only row: the checkpoint its results.json evaluated
    source: str | None = None        # ... and the name of the run that trained that checkpoint

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
        if self.evaluates is not None:
            test = self.test or {}
            return (f"evaluation of {self.source}'s checkpoint (epoch {test.get('best_epoch', '?')}) "
                    f"at alpha {alpha_text(test.get('alpha_eval'))}")
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


def alpha_text(alpha: object) -> str:
    """An alpha as the configs write it (5, 1, 0.5); ? when results.json lacks it."""
    return f"{alpha:g}" if isinstance(alpha, (int, float)) else "?"


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


def read_results(path: Path, missing: list[str]) -> dict | None:
    """results.json, or None (noted in ``missing`` when it exists but is not a JSON object)."""
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        results = None
    if not isinstance(results, dict):
        missing.append(f"{path}: not valid JSON")
        return None
    return results


def read_run(folder: str | Path) -> Run:
    """Read a run folder; raises FileNotFoundError only when the folder itself does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder")
    run = Run(folder=folder, name=folder.name)
    run.test = read_results(folder / "results.json", run.missing)
    if run.test is not None and run.test.get("evaluated_checkpoint"):
        return read_evaluation(run)
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


def read_evaluation(run: Run) -> Run:
    """An evaluation-only row (results.json names ``evaluated_checkpoint``): it has no config, metrics or
    checkpoint of its own, so none is missing; only the evaluated checkpoint can be. Its config is the source
    run's with this row's ``model.alpha_eval``, so the CAM strip draws the source's best model at this row's alpha
    and the paper number / shard manifest are found as for a trained row."""
    test = run.test or {}
    recorded = Path(str(test["evaluated_checkpoint"]))
    checkpoint = recorded
    sibling = run.folder.parent / recorded.parent.parent.name / "checkpoints" / recorded.name
    if not recorded.is_absolute() and not recorded.exists() and sibling.parent.parent.is_dir():
        # reproduce records the path relative to the directory it ran in; a report built from another directory
        # still finds the source row's folder beside this one, as reproduce lays the rows out
        checkpoint = sibling
    run.evaluates = checkpoint
    source_folder = checkpoint.parent.parent
    source_config: dict = {}
    try:
        tree = yaml.safe_load((source_folder / "config.yaml").read_text())
        source_config = tree if isinstance(tree, dict) else {}
    except (OSError, yaml.YAMLError):  # without it the CAM strip still reads the config inside the checkpoint
        pass
    run.source = str(source_config.get("name") or source_folder.name)
    run.config = copy.deepcopy(source_config)
    if run.config and test.get("alpha_eval") is not None:
        run.config["model"] = {**(run.config.get("model") or {}), "alpha_eval": test["alpha_eval"]}
    if checkpoint.is_file():
        run.best_checkpoint = checkpoint
    else:
        run.missing.append(f"{checkpoint}: missing; {run.folder} evaluated this checkpoint of {run.source}, "
                           "so it has no row in the CAM strip")
    run.name = str(test.get("name") or run.folder.name)
    return run


def ll_schedule(run: Run) -> tuple[list[int], list[int]] | None:
    """(epochs, k per batch) of a large-loss run: how many unknown entries each full batch rejects or corrects.

    The per-rank batch ``data.batch_size`` is what k is computed on (each rank selects on its own batch)."""
    scheme = run.scheme
    if scheme not in LARGE_LOSS_DEFAULT_DELTA or run.evaluates is not None:  # an evaluation selects nothing
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
