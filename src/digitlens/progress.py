"""The one progress bar of digitlens (Rich), for stages that loop over batches or epochs."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(enabled: bool, *extra_columns: ProgressColumn, transient: bool = False) -> Progress:
    """A Rich ``Progress`` (description, bar, done/total, elapsed, remaining, then ``extra_columns``,
    e.g. ``TextColumn("loss {task.fields[loss]:.4f}")``); it draws nothing when ``enabled`` is False.
    Use it as a context manager and call ``add_task`` / ``advance`` as with Rich."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra_columns,
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=transient, disable=not enabled)
