"""What ``xwin backfill`` shows while it runs, fed by the events of :mod:`xwin.flows.progress`.

In a terminal: a live display (rich) with the series bar of the cohort and, for each series being rendered, a bar
of its views with views/s and the time left, then its commit; then the verify step. Elsewhere (a log file, a pipe,
CI): one plain line per stage -- start, each series' ingest, render (views and views/s) and commit, each series
done, verify -- and never a redraw. When the run is asked to stop (``xwin.flows.stop``) the live display stops at
once (its last frame stays) and neither shows the series the stop cancels.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import TaskID


class ProgressLog:
    """One line per stage on ``out`` (stderr by default): for logs and pipes. The lines are the stage lines the run
    also sends to its Prefect logs (``xwin.flows.progress.stage_line``); the summary at the end is the command's."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stderr
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            print(text, file=self.out, flush=True)

    def __call__(self, ev: dict) -> None:
        from xwin.flows.progress import stage_line

        if ev.get("event") == "end":  # the command prints its own summary on stdout
            return
        text = stage_line(ev)
        if text is not None:
            self.line(text)


class ProgressBar:
    """A live terminal display: the cohort's series bar, one views bar per series in render, the current step."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.lock = threading.Lock()
        self.task: TaskID | None = None
        self.renders: dict[str, tuple[TaskID, float]] = {}
        self.tally = {"done": 0, "skipped": 0, "rejected": 0}
        self.halted = False

    def __enter__(self) -> ProgressBar:
        self.p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt()

    def halt(self) -> None:
        """Stop the display for good: no more redraws, later events are ignored."""
        with self.lock:
            self.halted = True
            self.p.stop()

    def __call__(self, ev: dict) -> None:
        with self.lock:
            if not self.halted:
                self._on(ev)

    def _on(self, ev: dict) -> None:
        e = ev.get("event")
        if e == "start":
            self.tally["skipped"] = ev["skipped"]
            self.task = self.p.add_task(f"backfill {ev['cohort']}", total=ev["total"], info=self._t())
        elif e == "series" and self.task is not None:
            if ev["status"] in self.tally:
                self.tally[ev["status"]] += 1
            self.p.update(self.task, advance=1, info=self._t())
        elif e == "views":
            vid, done, total = str(ev.get("volume_id")), int(ev["done"]), int(ev["total"])
            if vid not in self.renders:
                tid = self.p.add_task(f"  render {vid[:12]}", total=total, info="")
                self.renders[vid] = (tid, time.monotonic())
            tid, t0 = self.renders[vid]
            dt = time.monotonic() - t0
            info = f"{done / dt:.1f} views/s" if done and dt > 0 else ""
            self.p.update(tid, completed=done, info=info)
        elif e == "step" and ev.get("step") in ("render", "commit"):
            vid = str(ev.get("volume_id"))
            if vid in self.renders:
                tid, _ = self.renders[vid]
                if ev["step"] == "render":
                    self.p.update(tid, description=f"  commit {vid[:12]}")
                else:
                    self.p.remove_task(tid)
                    del self.renders[vid]
        elif e == "stage" and self.task is not None:
            self.p.update(self.task, description=str(ev["name"]))

    def _t(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.tally.items())


@contextlib.contextmanager
def show_progress(terminal: bool) -> Iterator[Callable[[str], None]]:
    """Listen to the progress events of this process for the block: a live display when ``terminal``, else one
    line per stage on stderr. Yields a function that prints one more stage line (the commands' own steps)."""
    from xwin.flows import stop
    from xwin.flows.progress import add_listener

    if terminal:
        bar = ProgressBar()
        remove = add_listener(bar)
        unhook = stop.on_stop(bar.halt, first=True)  # before the stop's notice is printed
        try:
            with bar:
                yield lambda text: bar.console.print(text)
        finally:
            unhook()
            remove()
    else:
        log = ProgressLog()
        remove = add_listener(log)
        try:
            yield log.line
        finally:
            remove()
