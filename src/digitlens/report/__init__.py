"""The run report: ``write_report(run_dir, compare=None)`` writes one self-contained
``report.html`` (figures embedded, no network needed) from what the stages left in the run folder.
"""

from digitlens.report.write import write_report

__all__ = ["write_report"]
