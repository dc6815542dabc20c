"""Seeing a run (issue 17): TensorBoard events read back with tensorboard's own reader match metrics.jsonl, a resume
logs no step twice, and the HTML report builds from a tiny real run and from runs with missing pieces, parses, and
holds every image it shows.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bgtrain.checkpoint import load_model_for_eval
from bgtrain.report.cams import EpochCams
from bgtrain.report.cli import build_parser, build_report, main
from bgtrain.report.runs import ll_schedule, read_run
from bgtrain.report.tensorboard import TensorBoardSink, record_scalars, tensorboard_enabled

REPO = Path(__file__).resolve().parents[1]
CLASSES, BATCH = 6, 16


def train_run(shards: Path, out: Path, *overrides: str) -> Path:
    """A real 2-epoch run of configs/smoke.yaml in one process (20 s alone; minutes on a busy machine)."""
    cmd = [sys.executable, "-m", "bgtrain.train", "--config", str(REPO / "configs/smoke.yaml"),
           f"data.shards={shards}", f"out_dir={out}", "optim.epochs=2", "data.workers=0", "log_every=1",
           f"data.batch_size={BATCH}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Tiny shards and one finished LL-R run with group-wise mAP (2 groups)."""
    from shards.synthetic import build
    root = tmp_path_factory.mktemp("report")
    shards = root / "shards"
    build(shards, num_classes=CLASSES, n_train=64, n_val=16, n_test=12, size=64, seed=0, shard_size=40)
    run = train_run(shards, root / "LL-R", "loss.scheme=LL-R", "name=LL-R", "eval.groups=2")
    return {"root": root, "shards": shards, "run": run}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def log_all(out_dir: Path, records: list[dict]) -> None:
    """Every record through one sink, as the run logger does."""
    sink = TensorBoardSink(out_dir)
    for record in records:
        sink.record(record)
    sink.close()


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


# ----------------------------------------------------------------------------------------------- HTML checks

class Images(HTMLParser):
    """Collects every <img src> and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])

    def handle_data(self, data) -> None:
        self.text.append(data)


def parse_report(path: Path) -> Images:
    """Parse the page and check that every image it references is embedded (a valid PNG) or exists beside it."""
    parser = Images()
    parser.feed(path.read_text())
    parser.close()
    for src in parser.sources:
        if src.startswith("data:image/png;base64,"):
            data = base64.b64decode(src.split(",", 1)[1], validate=True)
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        else:
            assert (path.parent / src).is_file(), f"{path} references {src}, which does not exist"
    return parser


# ----------------------------------------------------------------------------------------------- TensorBoard

def test_train_record_scalars_include_lr_and_the_data_wait_share() -> None:
    scalars = record_scalars({"kind": "train", "epoch": 1, "step": 3, "loss": 0.5, "selected": 2, "corrections": 0,
                              "data_s": 0.1, "step_s": 0.4, "img_s": 40.0, "lr": 1e-4, "lr_head": 1e-3})
    assert scalars["train/lr"] == 1e-4 and scalars["train/lr_head"] == 1e-3
    assert scalars["speed/data_wait_share"] == pytest.approx(0.25)
    assert record_scalars({"kind": "val", "step": 4, "val_map": 60.0, "groups": [{"group": "G1", "map": 50.0}]}) \
        == {"val/map": 60.0, "val_groups/G1": 50.0}
    assert record_scalars({"kind": "something else", "step": 1}) == {}


def test_tensorboard_is_on_unless_the_config_turns_it_off() -> None:
    from types import SimpleNamespace

    from bgtrain.config import TrainConfig
    assert tensorboard_enabled(TrainConfig()) is True           # also a config from before log.tensorboard existed
    assert tensorboard_enabled(SimpleNamespace(log=SimpleNamespace(tensorboard=False))) is False


def test_tensorboard_steps_and_values_match_metrics_jsonl(tiny, tmp_path) -> None:
    records = metrics(tiny["run"])
    log_all(tmp_path, records)
    acc = events(tmp_path / "tb")
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in train]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/selected")] == [r["selected"] for r in train]
    assert [e.value for e in acc.Scalars("speed/data_wait_share")] == pytest.approx(
        [r["data_s"] / r["step_s"] for r in train], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/map")] == [r["step"] for r in val]
    assert [e.value for e in acc.Scalars("val_groups/G2")] == pytest.approx(
        [r["groups"][1]["map"] for r in val], rel=1e-6)
    test = records[-1]
    assert test["kind"] == "test"
    (logged,) = acc.Scalars("test/map")
    assert logged.value == pytest.approx(test["test_map"], rel=1e-6) and logged.step == train[-1]["step"]


def test_epoch_cam_images_show_each_validation_image_with_its_classes(tiny, tmp_path) -> None:
    model, cfg = load_model_for_eval(tiny["run"] / "checkpoints" / "best.pt")
    cams = EpochCams(cfg, model.num_classes, count=3)
    sheets = cams.render(model, torch.device("cpu"))
    assert [tag for tag, _ in sheets] == [f"cams/{p.name}" for p in cams.pictures] and len(sheets) == 3
    for (_, image), picture in zip(sheets, cams.pictures):
        shown = min(3, int((picture.labels == 1).sum())) or 1      # its positives (at most 3), else the top class
        assert image.dtype == np.uint8 and image.shape == (64, 64 * (1 + shown), 3)
    sink = TensorBoardSink(tmp_path)
    for tag, image in sheets:
        sink.image(tag, image, step=8)
    sink.close()
    acc = events(tmp_path / "tb")
    for tag, image in sheets:
        (logged,) = acc.Images(tag)
        assert (logged.step, logged.width, logged.height) == (8, image.shape[1], image.shape[0])
        with Image.open(io.BytesIO(logged.encoded_image_string)) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), image)   # PNG: lossless


def test_resume_replaces_the_steps_after_the_checkpoint_instead_of_duplicating_them(tiny, tmp_path) -> None:
    records = [r for r in metrics(tiny["run"]) if r["kind"] == "train"]
    steps = [r["step"] for r in records]
    killed_at, checkpoint = steps[5], steps[2]                     # logged up to 6; the checkpoint was at 3
    first = TensorBoardSink(tmp_path)
    for record in records[:6]:
        first.record(record)
    first.image("cams/x", np.zeros((4, 4, 3), np.uint8), killed_at)   # an epoch-end image after the checkpoint
    first.close()
    resumed = TensorBoardSink(tmp_path)
    for record in records[3:]:                                      # the resumed run logs again from step 4
        resumed.record({**record, "loss": record["loss"] + 100.0})  # told apart from the first attempt's values
    resumed.close()
    logged = events(tmp_path / "tb").Scalars("train/loss")
    assert [e.step for e in logged] == steps                        # each step once, in order
    expected = [r["loss"] + (100.0 if r["step"] > checkpoint else 0.0) for r in records]
    assert [e.value for e in logged] == pytest.approx(expected, rel=1e-6)
    assert events(tmp_path / "tb").Images("cams/x") == []           # the stale image is gone too


def test_a_restart_after_the_end_logs_its_test_line_without_purging(tiny, tmp_path) -> None:
    records = metrics(tiny["run"])
    log_all(tmp_path, records)
    again = TensorBoardSink(tmp_path)                                # restart of a finished run: only the test line
    again.record(records[-1])
    again.close()
    acc = events(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("train/loss")] == [r["step"] for r in records if r["kind"] == "train"]
    assert {e.step for e in acc.Scalars("test/map")} == {records[-2]["step"]}


# ----------------------------------------------------------------------------------------------- report

def test_ll_schedule_is_the_large_loss_k_of_the_run_config(tiny) -> None:
    run = read_run(tiny["run"])
    epochs, ks = ll_schedule(run)
    assert epochs == [1, 2]
    assert ks == [0, math.ceil(BATCH * CLASSES * 1 * 0.005)]           # LL-R: B*C*(epoch-1)*delta, warm-up 0
    second = [r["selected"] for r in run.train if r["epoch"] == 2]
    assert second and min(second) >= ks[1]                          # ties can only add entries
    assert all(r["selected"] == 0 for r in run.train if r["epoch"] == 1)


def test_report_of_a_finished_run_has_every_figure_and_the_test_map(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "report.html"
    assert main([str(tiny["run"]), "--out", str(out), "--cam-images", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = parse_report(out)
    assert len(page.sources) == 6   # curves, LL selection, throughput, where the time went, group bars, CAM strip
    assert "Where the time went" in " ".join(page.text)
    assert all(src.startswith("data:") for src in page.sources)     # one self-contained file
    text = " ".join(page.text)
    results = json.loads((tiny["run"] / "results.json").read_text())
    assert f"{results['test_map']:.2f}" in text and "Missing" not in text


def test_report_says_what_is_missing_for_a_run_still_running(tiny, tmp_path, capsys) -> None:
    running = tmp_path / "running"
    shutil.copytree(tiny["run"], running)
    (running / "results.json").unlink()
    (running / "checkpoints" / "best.pt").unlink()
    lines = (running / "metrics.jsonl").read_text().splitlines()
    first_epoch = [line for line in lines if json.loads(line).get("epoch") == 1 and json.loads(line)["kind"] == "train"]
    (running / "metrics.jsonl").write_text("\n".join(first_epoch) + '\n{"kind": "train", "ep')   # mid-write
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "report.html"
    assert main([str(running), str(empty), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for expected in ("results.json", "best.pt", "last line is incomplete", f"{empty / 'metrics.jsonl'}: missing",
                     "no val lines yet", "config.yaml: missing"):
        assert expected in err
    page = parse_report(out)
    text = " ".join(page.text)
    assert "Missing" in text and "last line is incomplete" in text and "running or stopped (epoch 1" in text
    assert len(page.sources) == 3   # curves and throughput of the first epoch; the schedule from the config
    report = build_report([running], tmp_path / "again.html", cam_images=0)
    assert [r["step"] for r in report.runs[0].train] == [json.loads(line)["step"] for line in first_epoch]
    config = (running / "config.yaml").read_text().replace(str(tiny["shards"]), str(tmp_path / "moved"))
    (running / "config.yaml").write_text(config)     # no val line and no manifest: the class count is unknown
    report = build_report([running], tmp_path / "moved.html", cam_images=0)
    assert any("LL-R schedule (k per batch) is not drawn: the class count" in m for m in report.missing)


def test_report_names_a_run_folder_that_does_not_exist(tmp_path, capsys) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nope'}: no such run folder"


def test_report_help_has_an_example() -> None:
    assert "python -m bgtrain.report runs/demo/AN" in build_parser().format_help()


def test_the_epoch_time_figure_stacks_every_part_of_each_epoch(tiny) -> None:
    from bgtrain.report import figures
    from bgtrain.report.runs import read_run
    run = read_run(tiny["run"])
    assert run.epochs and all({k for k, _ in figures.TIME_PARTS} <= set(e) for e in run.epochs)
    for e in run.epochs:  # the parts the bar stacks add up to the epoch's wall time
        assert abs(sum(e[k] for k, _ in figures.TIME_PARTS) - e["epoch_s"]) < 0.01
    png = figures.epoch_time([run])
    assert png is not None and png.startswith(b"\x89PNG")


# ----------------------------------------------------------------------------------------------- evaluation-only rows

def evaluation_row(folder: Path, source_run: Path, checkpoint: str | Path | None = None, alpha_eval: float = 1.0,
                   test_map: float = 12.34) -> Path:
    """A folder as bgtrain.reproduce.evaluate_checkpoint writes it: results.json naming the evaluated checkpoint (by
    default source_run's best.pt) and map_test.json, but no config.yaml, metrics.jsonl or checkpoints/."""
    checkpoint = checkpoint or source_run / "checkpoints" / "best.pt"
    source = json.loads((source_run / "results.json").read_text())
    folder.mkdir()
    results = {"name": folder.name, "scheme": source["scheme"], "alpha_train": source["alpha_train"],
               "alpha_eval": alpha_eval, "best_epoch": source["best_epoch"], "val_map": source["val_map"],
               "test_map": test_map, "evaluated_checkpoint": str(checkpoint), "selected_at_alpha": source["alpha_eval"]}
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    (folder / "map_test.json").write_text(json.dumps({"all": {"map": test_map}}))
    return folder


def test_an_evaluation_only_row_misses_nothing_and_shows_the_source_checkpoint_at_its_alpha(tiny, tmp_path,
                                                                                            capsys) -> None:
    from bgtrain.report.cams import cam_strip
    source = tiny["run"]
    best = source / "checkpoints" / "best.pt"
    source_results = json.loads((source / "results.json").read_text())
    row = evaluation_row(tmp_path / "LL-R_inference", source, alpha_eval=1.0, test_map=12.34)
    run = read_run(row)
    assert run.missing == [] and run.finished
    assert run.evaluates == best and run.best_checkpoint == best and run.source == "LL-R"
    assert run.status == f"evaluation of LL-R's checkpoint (epoch {source_results['best_epoch']}) at alpha 1"
    source_config = read_run(source).config
    assert run.config["model"] == {**source_config["model"], "alpha_eval": 1.0}
    assert run.config["data"] == source_config["data"] and source_config["model"]["alpha_eval"] == 5.0
    assert ll_schedule(run) is None   # an LL-R checkpoint, but this row selects nothing: no k line, none missing

    out = tmp_path / "report.html"
    assert main([str(source), str(row), "--out", str(out), "--cam-images", "2"]) == 0
    captured = capsys.readouterr()
    assert "missing:" not in captured.err and "0 things missing" in captured.out
    page = parse_report(out)
    assert len(page.sources) == 6   # the evaluation row adds no figure and breaks none
    text = " ".join(page.text)
    assert "Missing" not in text and "12.34" in text
    assert f"evaluation of LL-R's checkpoint (epoch {source_results['best_epoch']}) at alpha 1" in text
    assert ("LL-R_inference trains nothing: the best checkpoint of LL-R, selected on validation at alpha 5, "
            "evaluated on test at alpha 1") in text

    report = build_report([source, row], tmp_path / "again.html", cam_images=0)
    assert report.missing == []
    (_, table_row) = report.rows
    assert table_row["test_map"] == 12.34 and table_row["best_epoch"] == source_results["best_epoch"]
    assert table_row["val_map"] == source_results["val_map"] and table_row["status"] == run.status
    cells, labels, _, notes = cam_strip(report.runs, 2, torch.device("cpu"))
    assert notes == [] and len(cells) == 3 and all(c is not None for c in cells[2])
    assert labels[1:] == ["LL-R\nLL-R, α 5/5", "LL-R_inference\nLL-R, α 5/1"]   # the source's model, this alpha


def test_an_evaluation_row_whose_checkpoint_is_gone_names_that_checkpoint(tiny, tmp_path) -> None:
    source = tmp_path / "LL-R"
    shutil.copytree(tiny["run"], source)
    # reproduce records the path relative to where it ran; the source row beside this one is found from anywhere
    row = evaluation_row(tmp_path / "LL-R_inference", source, Path("no-such-dir/LL-R/checkpoints/best.pt"))
    best = source / "checkpoints" / "best.pt"
    assert read_run(row).best_checkpoint == best and read_run(row).missing == []
    best.unlink()
    run = read_run(row)
    assert run.best_checkpoint is None and run.evaluates == best
    assert run.status.startswith("evaluation of LL-R's checkpoint") and run.config["model"]["alpha_eval"] == 1.0
    (line,) = run.missing
    assert line.startswith(f"{best}: missing; {row} evaluated this checkpoint of LL-R")
    report = build_report([source, row], tmp_path / "report.html", cam_images=0)
    assert line in report.missing and f"{best}: missing; this run has no row in the CAM strip" in report.missing
    assert "Missing" in " ".join(parse_report(tmp_path / "report.html").text)
