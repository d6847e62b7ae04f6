"""``write_report``: the report of a run folder, or of a seed group folder (``train --seeds``)."""

from __future__ import annotations

from pathlib import Path

from digitlens.intervals import DEFAULT_BOOTSTRAP, check_bootstrap
from digitlens.report.build import write_run_report
from digitlens.report.group import write_group_report
from digitlens.runio import writes_folders
from digitlens.seeds import is_group


def write_report(run_dir: str | Path, *, compare: str | Path | None = None, out: str | Path | None = None,
                 bootstrap: int = DEFAULT_BOOTSTRAP) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) and return its path: the run's report
    (:func:`digitlens.report.build.write_run_report`, with ``compare`` side by side), or for a seed
    group folder (holds ``group.json``) the group report
    (:func:`digitlens.report.group.write_group_report`). ``bootstrap``: resamples of the paired
    bootstrap (``compare``) and of seed runs evaluated for a group report."""
    bootstrap = check_bootstrap(bootstrap)
    if is_group(run_dir):
        return write_group_report(run_dir, out=out, compare=compare, bootstrap=bootstrap)
    return write_run_report(run_dir, compare=compare, out=out, bootstrap=bootstrap)


def _report_folders(run_dir, *args, out=None, **kwargs):
    # With --out elsewhere the run folder is only read (it may be read-only): nothing to lock.
    return [] if is_group(run_dir) or out is not None else [(run_dir, "run")]


# One writer per run folder (issue 14): report.html and comparison.json are written under its lock.
write_report = writes_folders("report", _report_folders)(write_report)
