"""Progress for ``nerofy zoo``: a rich bar with ETA and running pass/fail counts on a terminal;
plain periodic lines (every 30 s and every failure) when stderr is a file or pipe (background runs)."""
from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ZooProgress:
    def __init__(self, total: int, console: Console, every_s: float = 30.0):
        self.total, self.console, self.every_s = total, console, every_s
        self.live = console.is_terminal
        self.done = 0
        self.t0 = time.monotonic()
        self.last = self.t0
        self.running: list[str] = []
        self.progress = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]zoo[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("{task.description}"),
                console=console, transient=False)
            self.task = self.progress.add_task("", total=total)

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def started(self, name: str) -> None:
        self.running.append(name)
        self._describe(None)

    def _describe(self, counts: dict | None) -> None:
        if not self.progress:
            return
        c = counts or getattr(self, "_counts", {"pass": 0, "fail": 0, "skip": 0})
        self._counts = c
        desc = (f"[green]{c['pass']} pass[/green] [red]{c['fail']} fail[/red] [yellow]{c['skip']} skip[/yellow]"
                f"  {escape(', '.join(self.running[-2:]))}")
        self.progress.update(self.task, description=desc)

    def advance(self, row: dict, counts: dict) -> None:
        self.done += 1
        if row["name"] in self.running:
            self.running.remove(row["name"])
        st = row["status"]
        if self.progress:
            self.progress.update(self.task, advance=1)
            self._describe(counts)
            if st not in ("pass", "skipped_size"):
                self.progress.console.print(f"[red]{st}[/red] {escape(row['name'])}: {escape(row.get('error', '')[:150])}")
            return
        now = time.monotonic()
        if st not in ("pass", "skipped_size") or now - self.last >= self.every_s or self.done == self.total:
            el = now - self.t0
            eta = el / self.done * (self.total - self.done) if self.done else 0
            self.console.print(f"[{self.done}/{self.total}] {el:.0f}s eta {eta:.0f}s pass {counts['pass']} "
                               f"fail {counts['fail']} skip {counts['skip']} | {st} {escape(row['name'])}"
                               + (f": {escape(row.get('error', '')[:150])}" if st not in ("pass",) else ""))
            self.last = now
