"""Progress of long steps: a rich bar on a terminal, plain lines without one, nothing under --json."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TimeRemainingColumn, TransferSpeedColumn

from .render import err, human_bytes


class TransferProgress(Progress):
    """Rich's bar on a terminal. Without one (a log, a pipe, a service) the same
    tasks are told in plain lines: when a task shows, at every tenth of it (at
    most one line per ``every`` seconds), and when it is done; a script or a
    log reader then sees the work move instead of minutes of silence."""

    def __init__(self, *columns: Any, plain: bool, every: float = 2.0, **kw: Any) -> None:
        super().__init__(*columns, **kw)
        self._plain = plain
        self._every = every
        self._said: dict[TaskID, tuple[int, float]] = {}

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        tid = super().add_task(description, start, total, completed, visible, **fields)
        self._tell(tid)
        return tid

    def update(self, task_id: TaskID, **kw: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kw)
        self._tell(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._tell(task_id)

    def _tell(self, tid: TaskID) -> None:
        if not self._plain:
            return
        task = self._tasks[tid]
        if not task.visible:
            return
        done, total = int(task.completed), task.total
        tenth = int(10 * done / total) if total else 0
        finished = bool(total) and done >= total
        now = time.monotonic()
        last = self._said.get(tid)
        if last is not None:
            if last[0] == 11:  # its last line is said
                return
            if not finished and (tenth <= last[0] or now - last[1] < self._every):
                return
        self._said[tid] = (11 if finished else tenth, now)
        if not done and not total:
            err.print(f"{task.description}: starting", markup=False, highlight=False, soft_wrap=True)
            return
        line = f"{task.description}: {human_bytes(done)}"
        if total:
            line += f" of {human_bytes(int(total))} ({100 * done // int(total)}%)"
        if task.speed and not finished:
            line += f", {human_bytes(int(task.speed))}/s"
        err.print(line + (", done" if finished else ""), markup=False, highlight=False, soft_wrap=True)


def transfer_progress(json_out: bool) -> Progress:
    """A bar with bytes, rate and ETA on stderr on a terminal, plain lines
    without one, nothing under --json."""
    plain = not json_out and not err.is_terminal
    return TransferProgress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err, transient=True, disable=json_out or plain, plain=plain,
    )


class ResumeBars:
    """The bars of a resume, fed by the runtime's streams (bytes done, bytes in all).

    Until the guest runs, its long steps (the baseline policy's fetch, an eager
    memory restore) show bars that go when the resume is done, before the
    run's own messages. A lazy restore goes on while the guest runs: its bar
    comes back under those messages until the last of RAM is in, then one line
    says so.
    """

    NAMES = {"fetch": "fetching the parcel", "restore": "restoring guest memory",
             "memory": "guest memory coming in"}

    def __init__(self, json_out: bool) -> None:
        self.json_out = json_out
        self.before = transfer_progress(json_out)
        self.tasks: dict[str, TaskID] = {}
        self.running = False
        self.memory: tuple[int, int | None] = (0, None)
        self.after: Progress | None = None
        self.after_task: TaskID | None = None
        self.memory_in = False

    def update(self, stream: str, done: int, total: int | None) -> None:
        if stream == "memory":
            self.memory = (done, total)
            if self.running:
                self._memory_after(done, total)
                return
        if stream not in self.tasks:
            if not self.tasks:
                self.before.start()
            self.tasks[stream] = self.before.add_task(self.NAMES.get(stream, stream), total=total)
        self.before.update(self.tasks[stream], completed=done, total=total)

    def resumed(self) -> None:
        """The guest runs: the bars of the resume go."""
        self.before.stop()
        self.running = True

    def guest_running(self) -> None:
        """After the resume's own messages: the memory still coming in gets its bar back."""
        done, total = self.memory
        if not total:
            return  # no lazy restore
        if done >= total:
            self._memory_in()
        elif self.after is None:
            self.after = transfer_progress(self.json_out)
            self.after_task = self.after.add_task(self.NAMES["memory"], total=total, completed=done)
            self.after.start()

    def _memory_after(self, done: int, total: int | None) -> None:
        if self.memory_in:
            return
        if self.after is not None and self.after_task is not None:
            self.after.update(self.after_task, completed=done, total=total)
        if total is not None and done >= total:
            self._memory_in()

    def _memory_in(self) -> None:
        if self.memory_in:
            return
        self.memory_in = True
        if self.after is not None:
            self.after.stop()
        if not self.json_out:
            err.print("all of the guest's memory is in", markup=False)

    def stop(self) -> None:
        self.before.stop()
        if self.after is not None:
            self.after.stop()
