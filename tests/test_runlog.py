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
    assert written == sink.records == [{"kind": "train", "step": 2, "loss": 0.5},
                                       {"kind": "val", "step": 2, "val_map": 12.5}]
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
        warnings.warn("disk almost full")
    assert not (tmp_path / "metrics.jsonl").exists() and sink.records == []
    assert "hello" not in out.getvalue()
    assert "rank 3: UserWarning: disk almost full" in out.getvalue()


def test_warnings_and_the_bgtrain_logger_are_routed_while_installed_and_given_back_after():
    out = io.StringIO()
    before = warnings.showwarning
    with RunLogger(None, console=Console(file=out, width=200)):
        warnings.warn("an extension is missing", RuntimeWarning)
        logging.getLogger("bgtrain.data").warning("skipping corrupt sample %s", "k1")
        logging.getLogger("bgtrain.metrics").info("building the kernel")
    text = out.getvalue()
    assert "RuntimeWarning: an extension is missing" in text
    assert "bgtrain.data: skipping corrupt sample k1" in text
    assert "bgtrain.metrics: building the kernel" in text
    assert warnings.showwarning is before
    assert logging.getLogger("bgtrain").propagate and not logging.getLogger("bgtrain").handlers
