"""Rich progress bars and messages on rank 0 only; other ranks stay quiet."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RankZeroProgress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress = None
        if enabled:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console, transient=False)
            self._progress.start()

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.log(message)

    def start(self, description: str, total: int, completed: int = 0):
        if not self.enabled:
            return None
        return self._progress.add_task(description, total=total, completed=completed, info="")

    def advance(self, task, info: str = "") -> None:
        if self.enabled:
            self._progress.update(task, advance=1, info=info)

    def finish(self, task) -> None:
        if self.enabled:
            self._progress.stop_task(task)

    def close(self) -> None:
        if self.enabled:
            self._progress.stop()
