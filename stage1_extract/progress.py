"""A rich progress bar for extraction: cases done, slices per second, time left."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ExtractionProgress:
    """Progress over slices, with a case counter in the description; silent when disabled."""

    def __init__(self, cases: int, slices: int, teacher: str, enabled: bool = True,
                 console: Console | None = None) -> None:
        self.cases_total = cases
        self.cases_done = 0
        self.slices_total = slices
        self.enabled = enabled and cases > 0
        self._progress = Progress(
            TextColumn("[bold]extract[/] {task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("slices {task.fields[rate]}/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(compact=True),
            console=console or Console(stderr=True),
            disable=not self.enabled,
            transient=False,
        )
        self._teacher = teacher
        self._task: TaskID | None = None

    def _description(self) -> str:
        return f"cases {self.cases_done}/{self.cases_total}"

    def __enter__(self) -> ExtractionProgress:
        if self.enabled:
            self._progress.console.print(f"teacher: {self._teacher}")
        self._progress.start()
        self._task = self._progress.add_task(self._description(), total=self.slices_total, rate="-")
        return self

    def advance_slices(self, n: int) -> None:
        if self._task is None:
            return
        self._progress.advance(self._task, n)
        task = self._progress.tasks[0]
        speed = task.speed
        self._progress.update(self._task, rate=f"{speed:.1f}" if speed else "-")

    def case_done(self, case_id: str) -> None:
        self.cases_done += 1
        if self._task is not None:
            self._progress.update(self._task, description=self._description())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()
