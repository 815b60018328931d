"""Progress of a long job on stderr: a live bar while it runs, a summary table when it ends."""
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from ironlm.jobs.runner import RunStats


class JobProgress:
    """Shows done/total, failed, documents/hour, tokens/s and ETA; `quiet` shows nothing at all.

    `num_skipped` items were finished by an earlier run: they count as done but not in this run's rates.
    """

    def __init__(self, title: str, num_total: int, num_skipped: int = 0, quiet: bool = False,
                 console: Console | None = None):
        self.title = title
        self.num_total = num_total
        self.num_skipped = num_skipped
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.stats = RunStats()
        self._progress: Progress | None = None
        self._bar = None
        self._last_refresh = 0.0

    def __enter__(self) -> "JobProgress":
        self.stats = RunStats()
        if not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.completed}/{task.total} done"), TextColumn("[red]{task.fields[failed]} failed"),
                TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"),
                console=self.console, transient=False, refresh_per_second=4)
            self._progress.start()
            self._bar = self._progress.add_task(self.title, total=self.num_total, completed=self.num_skipped,
                                                failed=0, rate="", eta="-")
        return self

    def update(self, stats: RunStats) -> None:
        self.stats = stats
        now = time.monotonic()
        if self._progress is None or now - self._last_refresh < 0.25:
            return
        self._last_refresh = now
        elapsed = max(now - stats.started, 1e-9)
        finished = stats.num_done + stats.num_failed
        per_hour = finished / elapsed * 3600
        tokens_s = stats.num_generated_tokens / elapsed
        remaining = self.num_total - self.num_skipped - finished
        eta = _duration(remaining / finished * elapsed) if finished else "-"
        self._progress.update(self._bar, completed=self.num_skipped + finished, failed=stats.num_failed,
                              rate=f"{per_hour:,.0f} docs/h {tokens_s:,.1f} tok/s", eta=eta)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._last_refresh = 0.0
            self.update(self.stats)
            self._progress.stop()

    def summary(self, rows: list[tuple[str, str]], interrupted: bool = False) -> None:
        """The table at the end: counts, rates, and the extra `rows` (e.g. output files)."""
        if self.quiet:
            return
        s = self.stats
        elapsed = max(time.monotonic() - s.started, 1e-9)
        finished = s.num_done + s.num_failed
        table = Table(title=f"{self.title}: {'interrupted, re-run to continue' if interrupted else 'finished'}",
                      show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        for name, value in [
            ("items in this job", f"{self.num_total:,}"),
            ("done by earlier runs", f"{self.num_skipped:,}"),
            ("succeeded this run", f"{s.num_done:,}"),
            ("failed this run", f"{s.num_failed:,}"),
            ("left to do", f"{self.num_total - self.num_skipped - finished:,}"),
            ("elapsed", _duration(elapsed)),
            ("documents/hour", f"{finished / elapsed * 3600:,.0f}"),
            ("prompt tokens", f"{s.num_prompt_tokens:,}"),
            ("generated tokens", f"{s.num_generated_tokens:,}"),
            ("generated tokens/s", f"{s.num_generated_tokens / elapsed:,.1f}"),
            *rows,
        ]:
            table.add_row(name, value)
        self.console.print(table)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
