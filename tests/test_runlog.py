"""RunLogger: metrics.jsonl and sinks get the same records, warnings and the bgtrain logger reach its console."""
from __future__ import annotations

import io
import json
import logging
import warnings

import numpy as np
import pytest
from rich.console import Console

from bgtrain.runlog import RunLogger


class ListSink:
    """A MetricsSink that keeps what it is given."""

    def __init__(self) -> None:
        self.records, self.images, self.closed = [], [], False

    def record(self, record: dict) -> None:
        self.records.append(record)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.images.append((tag, image.shape, step))

    def close(self) -> None:
        self.closed = True


def test_every_record_goes_to_the_file_and_to_each_sink(tmp_path):
    sink = ListSink()
    log = RunLogger(tmp_path / "metrics.jsonl", console=Console(file=io.StringIO()))
    log.add_sink(sink)
    log.record(kind="train", step=2, loss=0.5)
    log.record(kind="val", step=2, val_map=12.5)
    log.image("cam", np.zeros((4, 5, 3), np.uint8), 2)
    log.close()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == sink.records
    # Each record also carries its wall time: seconds since the run and this attempt started (equal: no resume).
    assert all(r["run_s"] == r["attempt_s"] >= 0 for r in written)
    assert [{k: v for k, v in r.items() if k not in ("run_s", "attempt_s")} for r in written] == [
        {"kind": "train", "step": 2, "loss": 0.5}, {"kind": "val", "step": 2, "val_map": 12.5}]
    assert sink.images == [("cam", (4, 5, 3), 2)] and sink.closed
    with pytest.raises(ValueError, match="uint8"):
        RunLogger(None, console=Console(file=io.StringIO())).image("x", np.zeros((4, 5)), 0)


def test_other_ranks_write_nothing_but_show_their_warnings(tmp_path):
    out = io.StringIO()
    log = RunLogger(tmp_path / "metrics.jsonl", enabled=False, rank=3, console=Console(file=out, width=200))
    sink = ListSink()
    log.add_sink(sink)
    log.record(kind="train", step=1)
    log.message("hello")
    assert log.start("epoch 1", total=4) is None
    with log:
        warnings.warn("disk almost full", stacklevel=1)
    assert not (tmp_path / "metrics.jsonl").exists() and sink.records == []
    assert "hello" not in out.getvalue()
    assert "rank 3: UserWarning: disk almost full" in out.getvalue()


def test_warnings_and_the_bgtrain_logger_are_routed_while_installed_and_given_back_after():
    out = io.StringIO()
    before = warnings.showwarning
    with RunLogger(None, console=Console(file=out, width=200)):
        warnings.warn("an extension is missing", RuntimeWarning, stacklevel=1)
        logging.getLogger("bgtrain.data").warning("skipping corrupt sample %s", "k1")
        logging.getLogger("bgtrain.metrics").info("building the kernel")
    text = out.getvalue()
    assert "RuntimeWarning: an extension is missing" in text
    assert "bgtrain.data: skipping corrupt sample k1" in text
    assert "bgtrain.metrics: building the kernel" in text
    assert warnings.showwarning is before
    assert logging.getLogger("bgtrain").propagate and not logging.getLogger("bgtrain").handlers


def test_epoch_times_add_up_to_the_epoch_and_name_what_is_left(monkeypatch):
    import bgtrain.runlog as runlog
    clock = [100.0]
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: clock[0])
    times = runlog.EpochTimes()
    times.add("startup", 2.0)
    times.first_batch_s = 0.25
    for part, seconds in (("data", 0.5), ("steps", 3.0), ("checkpoint", 0.2), ("validation", 1.0)):
        times.add(part, seconds)
    clock[0] += 5.0                              # the epoch's own wall time since reset()
    summary = times.summary()
    assert summary["epoch_s"] == 7.0 and summary["other_s"] == 0.3 and summary["first_batch_s"] == 0.25
    assert sum(summary[f"{p}_s"] for p in runlog.EpochTimes.PARTS) + summary["other_s"] == summary["epoch_s"]


def test_process_start_is_before_now_and_bytes_read_grow_with_reads(tmp_path):
    import time

    from bgtrain.runlog import bytes_read, process_started
    assert time.time() - 3600 * 24 < process_started() <= time.time()
    before = bytes_read()
    if before is None:
        pytest.skip("this system has no /proc/self/io to count bytes read")
    (tmp_path / "x").write_bytes(b"x" * 100_000)
    (tmp_path / "x").read_bytes()
    assert bytes_read() - before >= 100_000
