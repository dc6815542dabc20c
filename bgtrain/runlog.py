"""One output path for a run: :class:`RunLogger` owns ``metrics.jsonl``, the rich console (progress bars and
messages) and warnings, on rank 0; extra sinks (TensorBoard, ...) plug in through :class:`MetricsSink`.

Python warnings and records of the ``bgtrain`` stdlib logger are routed to the console while a logger is
installed (:meth:`RunLogger.install`), so nothing reaches the terminal around the progress bars. Ranks other
than 0 write no metrics, bars or messages; their warnings still show, prefixed with the rank, because a
problem on one rank (a missing extension, a corrupt sample) is worth seeing.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

LOGGER_NAME = "bgtrain"


class MetricsSink(Protocol):
    """Somewhere besides ``metrics.jsonl`` that a run's records and images go (e.g. TensorBoard)."""

    def record(self, record: dict) -> None:
        """One record, exactly as written to metrics.jsonl (it has ``kind`` and usually ``step``)."""
        ...

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 (H, W, 3) RGB image at a training step."""
        ...

    def close(self) -> None:
        """Flush and release the sink."""
        ...


class _ToRunLogger(logging.Handler):
    """Records of the ``bgtrain`` logger, shown by a RunLogger."""

    def __init__(self, run_log: RunLogger) -> None:
        super().__init__(logging.INFO)
        self.run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.levelno >= logging.WARNING:
            self.run_log.warning(text)
        else:
            self.run_log.message(text)


def process_started() -> float:
    """When this process started (Unix time), so that start-up counts its imports; now where /proc is missing."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def bytes_read() -> int | None:
    """Bytes this process has read from files and sockets so far (Linux's rchar); None where unknown."""
    try:
        return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar:")))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


class EpochTimes:
    """Where an epoch's wall time went, on this rank: start-up, waiting for data, steps, checkpoints, validation.

    ``other_s`` is what none of them covers (the epoch-end collectives, logging, CAM pictures).
    ``first_batch_s`` (a part of ``data_s``) is the wait for the pass's first batch: the loader's start.
    """

    PARTS = ("startup", "data", "steps", "checkpoint", "validation")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.first_batch_s: float | None = None
        self.started = time.perf_counter()

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    def summary(self) -> dict[str, float | None]:
        """``<part>_s`` for each part, ``epoch_s`` (wall time since the last reset) and ``other_s``."""
        total = time.perf_counter() - self.started + self.seconds["startup"]
        out = {f"{part}_s": round(s, 3) for part, s in self.seconds.items()}
        return {**out, "epoch_s": round(total, 3), "other_s": round(total - sum(self.seconds.values()), 3),
                "first_batch_s": None if self.first_batch_s is None else round(self.first_batch_s, 3)}


class RunLogger:
    """Rank 0's metrics file, console and sinks; on other ranks only warnings show.

    ``metrics_path`` None keeps no metrics file (a command that only shows progress).
    """

    def __init__(self, metrics_path: Path | None, enabled: bool = True, rank: int = 0,
                 console: Console | None = None) -> None:
        self.metrics_path, self.enabled, self.rank = metrics_path, enabled, rank
        self.attempt_started = process_started()
        self.run_started = self.attempt_started   # a resume sets the first attempt's
        self.console = console or Console(stderr=True)
        self.sinks: list[MetricsSink] = []
        self._progress: Progress | None = None
        self._installed: tuple[Any, _ToRunLogger, bool, int] | None = None
        if enabled:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console, transient=False)
            self._progress.start()

    # ------------------------------------------------------------------ records and sinks
    def add_sink(self, sink: MetricsSink) -> None:
        """Also send every record (and image) to ``sink``; rank 0 only, like the file."""
        if self.enabled:
            self.sinks.append(sink)

    def record(self, **record: Any) -> None:
        """Append one JSON object to metrics.jsonl and pass it to every sink (rank 0).

        Every record carries ``run_s``, seconds since the run's first attempt started, and ``attempt_s``, since
        this process started (the two differ after a resume).
        """
        if not self.enabled:
            return
        now = time.time()
        record = {**record, "run_s": round(now - self.run_started, 3),
                  "attempt_s": round(now - self.attempt_started, 3)}
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.record(record)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Pass a uint8 (H, W, 3) image to every sink (rank 0)."""
        if not self.enabled:
            return
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {tag!r}: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
        for sink in self.sinks:
            sink.image(tag, image, step)

    # ------------------------------------------------------------------ console
    def message(self, text: str) -> None:
        """A line on the console, above the progress bars (rank 0)."""
        if self.enabled:
            self.console.log(text, log_locals=False, _stack_offset=2)

    def warning(self, text: str) -> None:
        """A warning line; every rank shows its own, prefixed with its rank when not 0."""
        prefix = "" if self.rank == 0 else f"rank {self.rank}: "
        self.console.log(f"[yellow]warning:[/yellow] {prefix}{text}", markup=True, highlight=False)

    def start(self, description: str, total: int, completed: int = 0) -> TaskID | None:
        """A new progress bar; None on ranks that show none."""
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total, completed=completed, info="")

    def advance(self, task: TaskID | None, info: str = "") -> None:
        """One step of a bar, with a host-side text (callers must not read the device for it)."""
        if self._progress is not None and task is not None:
            self._progress.update(task, advance=1, info=info)

    def finish(self, task: TaskID | None) -> None:
        """Stop a bar's clock; it stays on screen."""
        if self._progress is not None and task is not None:
            self._progress.stop_task(task)

    # ------------------------------------------------------------------ life cycle
    def install(self) -> RunLogger:
        """Route Python warnings and the ``bgtrain`` logger here until :meth:`close`."""
        if self._installed is None:
            handler = _ToRunLogger(self)
            log = logging.getLogger(LOGGER_NAME)
            previous = (warnings.showwarning, handler, log.propagate, log.level)
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False

            def show(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                     line: Any = None) -> None:
                self.warning(f"{category.__name__}: {message} ({Path(filename).name}:{lineno})")

            warnings.showwarning = show
            self._installed = previous
        return self

    def close(self) -> None:
        """Stop the bars, close the sinks, and give warnings and logging back."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self._installed is not None:
            showwarning, handler, propagate, level = self._installed
            warnings.showwarning = showwarning
            log = logging.getLogger(LOGGER_NAME)
            log.removeHandler(handler)
            log.propagate, log.level = propagate, level
            self._installed = None

    def __enter__(self) -> RunLogger:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.close()
