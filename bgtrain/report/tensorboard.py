"""TensorBoard event files of a run: every ``metrics.jsonl`` record as scalars, and images, under ``out_dir/tb/``.

:class:`TensorBoardSink` is a sink of the rank-0 run logger: ``record`` gets each record as it is written to
``metrics.jsonl``, ``image`` a uint8 (H, W, 3) picture (the epoch-end CAM overlays of :mod:`bgtrain.report.cams`).

Resume: the event writer opens lazily, at the first record or image, with TensorBoard's ``purge_step`` set to that
step when the folder already holds event files. A resumed run restarts at its checkpoint, so everything the previous
attempt logged at or after that step is stale; TensorBoard's readers drop it (a ``SessionLog.START`` event) and show
the new values, so every step appears once.

    tensorboard --logdir runs/demo
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

EVENT_GLOB = "events.out.tfevents.*"


def tensorboard_enabled(cfg: Any) -> bool:
    """The config's ``log.tensorboard`` (default on, also for configs written before the key existed)."""
    return bool(getattr(getattr(cfg, "log", None), "tensorboard", True))


def record_scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars (tag -> value) of one ``metrics.jsonl`` record; unknown kinds give none."""
    kind = record.get("kind")
    out: dict[str, float] = {}
    if kind == "train":
        for key, tag in (("loss", "train/loss"), ("selected", "train/selected"),
                         ("corrections", "train/corrections"), ("img_s", "speed/img_s"),
                         ("step_s", "speed/step_s"), ("data_s", "speed/data_s")):
            if record.get(key) is not None:
                out[tag] = float(record[key])
        for key, value in record.items():  # "lr", and per-group rates such as "lr_head" if the logger adds them
            if (key == "lr" or key.startswith("lr_")) and isinstance(value, (int, float)):
                out[f"train/{key}"] = float(value)
        if record.get("step_s") and record.get("data_s") is not None:
            # step_s runs from the end of the previous step, so it includes the wait for data: a share in [0, 1]
            out["speed/data_wait_share"] = float(record["data_s"]) / float(record["step_s"])
    elif kind in ("val", "test"):
        value = record.get(f"{kind}_map")
        if value is not None:
            out[f"{kind}/map"] = float(value)
        for group in record.get("groups") or []:
            if group.get("map") is not None:
                out[f"{kind}_groups/{group['group']}"] = float(group["map"])
    return out


class TensorBoardSink:
    """Event files under ``out_dir/tb/`` written from metrics records and images (rank 0 only)."""

    def __init__(self, out_dir: str | Path, flush_secs: int = 30) -> None:
        self.folder = Path(out_dir) / "tb"
        self.flush_secs = flush_secs
        self._writer: SummaryWriter | None = None
        self._last_step: int | None = None

    def _open(self, step: int | None) -> SummaryWriter:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            earlier = sorted(self.folder.glob(EVENT_GLOB))
            if earlier:
                wait_for_a_new_second(earlier[-1])
            # A step-less first record (the test line of a restarted, finished run) replays nothing: purge nothing.
            purge = step if earlier and step is not None else None
            self._writer = SummaryWriter(str(self.folder), purge_step=purge, flush_secs=self.flush_secs)
        return self._writer

    def _step_of(self, record: dict) -> int | None:
        step = record.get("step")
        if step is None:
            return self._last_step
        return int(step)

    def record(self, record: dict) -> None:
        """Log a metrics.jsonl record's scalars at its step (a record without one, the test line, at the last)."""
        scalars = record_scalars(record)
        if not scalars:
            return
        step = self._step_of(record)
        writer = self._open(step)
        if step is None:  # nothing logged in this process yet: continue after what the folder holds
            step = last_logged_step(self.folder)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        self._last_step = step

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log a uint8 (H, W, 3) image at ``step``."""
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"image {tag}: expected uint8 (H, W, 3), got {pixels.dtype} {pixels.shape}")
        self._open(int(step)).add_image(tag, pixels, int(step), dataformats="HWC")
        self._last_step = int(step)

    def close(self) -> None:
        """Flush and close the event file (a later record opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def wait_for_a_new_second(newest: Path) -> None:
    """Sleep (< 1 s) until the clock has passed the second in ``newest``'s name.

    Event file names start with the creation second, and readers replay a folder's files in name order; a file
    created in the same second could sort before the earlier one (its counter suffix is not zero-padded)."""
    try:
        second = int(newest.name.split(".")[3])
    except (IndexError, ValueError):
        return
    deadline = time.time() + 1.1  # a name from a clock ahead of ours (another node) must not stall the run
    while int(time.time()) <= second and time.time() < deadline:
        time.sleep(0.05)


def last_logged_step(folder: Path) -> int:
    """The largest step of any event in ``folder``'s event files (0 when there are none)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    last = 0
    for path in sorted(Path(folder).glob(EVENT_GLOB)):
        for event in EventFileLoader(str(path)).Load():
            last = max(last, int(event.step))
    return last
